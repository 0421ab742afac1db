"""Learning-rate schedules (hand-computed sequences) and optimizer parameter groups."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from src.systems.optim import (
    ExponentialDecayLR,
    WarmupCosineLR,
    WarmupMultiStepLR,
    build_optimizer,
)
from src.train import train
from tests.conftest import tiny_overrides


def lrs(scheduler_factory, epochs: int, lr: float = 1.0) -> list[float]:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = scheduler_factory(opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_multistep_by_hand():
    got = lrs(
        partial(
            WarmupMultiStepLR, milestones=[3, 5], gamma=0.1, warmup_epochs=2, warmup_factor=0.1
        ),
        6,
    )
    # warm-up: 0.1, then 0.1 + 0.9 * 1/2 = 0.55; flat 1 until 3; x0.1 at 3 and at 5
    expected = [0.1, 0.55, 1.0, 0.1, 0.1, 0.01]
    assert got == pytest.approx(expected)


def test_warmup_multistep_rejects_unsorted_milestones():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="milestones"):
        WarmupMultiStepLR(opt, milestones=[5, 3])


def test_warmup_cosine_by_hand():
    got = lrs(
        partial(WarmupCosineLR, max_epochs=6, warmup_epochs=2, warmup_factor=0.0, eta_min=0.0), 7
    )
    cos = [0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(5)]
    assert got == pytest.approx([0.0, 0.5, *cos])


def test_exponential_decay_reaches_the_final_factor():
    got = lrs(partial(ExponentialDecayLR, decay_start=2, decay_end=4, final_factor=0.01), 6)
    assert got == pytest.approx([1.0, 1.0, 1.0, 0.1, 0.01, 0.01])
    with pytest.raises(ValueError, match="decay_start < decay_end"):
        lrs(partial(ExponentialDecayLR, decay_start=3, decay_end=3), 1)
    with pytest.raises(ValueError, match="interval"):
        lrs(partial(ExponentialDecayLR, decay_start=0, decay_end=3, interval="batch"), 1)


def test_build_optimizer_excludes_norm_parameters_from_weight_decay():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = build_optimizer(model, partial(torch.optim.Adam, lr=1e-3, weight_decay=5e-4))
    decays = {g["name"]: (g["weight_decay"], len(g["params"])) for g in opt.param_groups}
    assert decays == {"decay": (5e-4, 4), "norm": (0.0, 2)}


@pytest.mark.parametrize(
    "overrides",
    [
        ["scheduler=cosine"],
        ["scheduler=multistep"],
        ["optimizer=sgd"],
        ["scheduler=hermans_exp"],
        ["model=resnet50", "model.backbone.pretrained=false"],
        ["loss=triplet_soft"],
        ["callbacks=[model_checkpoint,early_stopping]"],
        ["callbacks=none"],
    ],
)
def test_group_options_compose_and_run(overrides, make_cfg, tiny_data_root):
    base = tiny_overrides(tiny_data_root)
    if any(o.startswith("callbacks") for o in overrides):  # replaces the whole callbacks group
        base = [o for o in base if not o.startswith("callbacks")]
    cfg = make_cfg(base + overrides + ["debug=fdr", "test=false"])
    metrics, objects = train(cfg)
    assert metrics["train/loss_step"] > 0


def test_build_optimizer_norm_and_bias_weight_decay_keys():
    """`optimizer.norm_weight_decay` / `bias_weight_decay` are consumed by build_optimizer (BoT
    decays every parameter) and never reach the optimizer's constructor."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2, bias=False))
    factory = partial(
        torch.optim.Adam, lr=1e-3, weight_decay=5e-4, norm_weight_decay=1e-4, bias_weight_decay=2e-4
    )
    opt = build_optimizer(model, factory)
    decays = {g["name"]: (g["weight_decay"], len(g["params"])) for g in opt.param_groups}
    assert decays == {"decay": (5e-4, 2), "norm": (1e-4, 2), "bias": (2e-4, 1)}
    assert "norm_weight_decay" not in opt.defaults
