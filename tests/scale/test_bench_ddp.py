"""The DDP benchmarks run and measure what they claim (slow: each spawns 2 gloo processes)."""

from __future__ import annotations

import statistics

import pytest

from src.bench import ddp_bytes

BROADCAST = "buffer broadcast (DDP broadcast_buffers)"
GRADIENTS = "gradient all-reduce (DDP)"


@pytest.mark.slow
def test_ddp_bytes_before_minus_after_is_exactly_the_mar_state():
    cfg = ddp_bytes.QUICK
    before, after = ddp_bytes.measure(cfg, True), ddp_bytes.measure(cfg, False)
    module = ddp_bytes._module(cfg, broadcast_state=False)
    state = sum(
        b.numel() * b.element_size()
        for name, b in module.named_buffers()
        if not name.startswith("net.")
    )
    net_buffers = sum(b.numel() * b.element_size() for b in module.net.buffers())
    params = sum(p.numel() * p.element_size() for p in module.parameters())

    def steady(steps, key):
        return statistics.median(s["bytes"].get(key, 0) for s in steps[1:])

    assert steady(before, BROADCAST) == net_buffers + state
    assert steady(after, BROADCAST) == net_buffers
    assert steady(before, GRADIENTS) == steady(after, GRADIENTS) == params
