"""bf16 on CPU: a self-check at the start of a run, and the oneDNN AMX workaround.

oneDNN 3.12 (torch 2.14.1) returns garbage from its AMX bf16 conv2d kernel when a stride-2
convolution has an output width of 1 (pytorch/pytorch#169688): on Intel CPUs with AMX-BF16,
bf16 runs at small inputs (64x32 reaches that shape in ResNet's layer4) give NaN or features 15-20 %
off fp32. Importing :mod:`src` caps oneDNN at AVX512_CORE_BF16 (``ONEDNN_MAX_CPU_ISA``, read
when oneDNN first dispatches; harmless for fp32, which never uses AMX) unless the variable is
already set. :func:`check_bf16_forward` is the check that does not trust any of this: it compares
the network's bf16-autocast forward with its fp32 forward on one batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

from src import ONEDNN_ISA_CAP

#: Relative L2 error of bf16 embeddings against fp32 above which bf16 is declared broken
#: (healthy ResNets measure 0.4-0.8 %; the AMX bug gives 20 % or NaN).
BF16_TOLERANCE = 0.05


class Bf16CheckError(RuntimeError):
    """The bf16 forward disagrees with fp32 (the message names the cause and the fix)."""


@torch.no_grad()
def bf16_forward_error(embed: Callable[[Tensor], Tensor], shape: tuple[int, ...]) -> float:
    """Relative L2 distance between ``embed(x)`` under CPU bf16 autocast and in fp32, for one
    random batch `x` of `shape` (private generator: the global RNG is untouched); inf if the bf16
    output is not finite."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    reference = embed(x).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = embed(x).float()
    if not torch.isfinite(low).all():
        return float("inf")
    return float((low - reference).norm() / reference.norm().clamp_min(1e-12))


def check_bf16_forward(
    net: torch.nn.Module, shape: tuple[int, ...], tolerance: float = BF16_TOLERANCE
) -> str | None:
    """Run :func:`bf16_forward_error` on `net.embed` (eval mode, restored after).

    Returns None when bf16 agrees with fp32, or a warning when it only does with oneDNN turned off
    (``torch.backends.mkldnn.enabled = False`` is then left applied: the documented workaround,
    slower). Raises :class:`Bf16CheckError` when bf16 disagrees either way.
    """
    was_training = net.training
    net.eval()
    try:
        error = bf16_forward_error(net.embed, shape)
        if error <= tolerance:
            return None
        isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "<unset>")
        torch.backends.mkldnn.enabled = False
        fixed = bf16_forward_error(net.embed, shape)
    finally:
        net.train(was_training)
    cause = (
        f"bf16 self-check: the network's bf16 forward differs from fp32 by {error:.1%} at input "
        f"{tuple(shape)} (tolerance {tolerance:.0%}; ONEDNN_MAX_CPU_ISA={isa}). The known cause "
        "is oneDNN's AMX bf16 convolution on Intel CPUs (pytorch/pytorch#169688)"
    )
    if fixed <= tolerance:
        return (
            f"{cause}. Applied the workaround: oneDNN is disabled for this run "
            f"(torch.backends.mkldnn.enabled=False; bf16 now within {fixed:.1%}), which is slow: "
            f"start the run with ONEDNN_MAX_CPU_ISA={ONEDNN_ISA_CAP} instead"
        )
    torch.backends.mkldnn.enabled = True
    raise Bf16CheckError(
        f"{cause}; with oneDNN disabled it still differs by {fixed:.1%}. Train in fp32 "
        f"(trainer.precision=32) or start with ONEDNN_MAX_CPU_ISA={ONEDNN_ISA_CAP}"
    )
