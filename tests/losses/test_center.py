"""CenterLoss against loop versions, and its optimizer recipe against the reference's update
(reid-strong-baseline engine/trainer.py, create_supervised_trainer_with_center)."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from src.losses import CenterLoss
from src.systems.optim import WarmupMultiStepLR, WithSGDGroups, build_optimizer


def loop_center_loss(x: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_i clamp(‖x_i − c_{y_i}‖², 1e-12, 1e12), one sample at a time."""
    total = x.new_zeros(())
    for i in range(x.size(0)):
        total = total + ((x[i] - centers[labels[i]]) ** 2).sum().clamp(1e-12, 1e12)
    return total / x.size(0)


def masked_distmat_center_loss(x, labels, centers):
    """The reference's formulation: the full (N, K) squared-distance matrix, masked to each
    sample's own centre, every entry clamped to [1e-12, 1e12] (so the (K - 1) masked zeros of
    each row add 1e-12 each), summed and divided by N."""
    n, k = x.size(0), centers.size(0)
    dist = (x**2).sum(1, keepdim=True) + (centers**2).sum(1)[None] - 2 * x @ centers.t()
    mask = labels[:, None] == torch.arange(k)[None]
    return (dist * mask).clamp(1e-12, 1e12).sum() / n


def test_center_loss_equals_the_loop_and_the_reference_formulation():
    torch.manual_seed(0)
    loss_fn = CenterLoss(num_classes=5, feat_dim=6).double()
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 3, 3, 4, 4])
    got = loss_fn(x, labels)
    want = loop_center_loss(x, labels, loss_fn.centers)
    torch.testing.assert_close(got, want)
    ref = masked_distmat_center_loss(x, labels, loss_fn.centers)
    torch.testing.assert_close(got + 4 * 1e-12, ref)  # the (K - 1) * 1e-12 constant
    g_got = torch.autograd.grad(got, (x, loss_fn.centers))
    g_ref = torch.autograd.grad(ref, (x, loss_fn.centers))
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b)
    # hand-computed: d/dc_k = (2/N) Σ_{i: y_i = k} (c_k - x_i); identity 2 has no sample
    c = loss_fn.centers
    hand = torch.zeros_like(c)
    for i, y in enumerate(labels):
        hand[y] += 2 * (c[y] - x[i]) / 8
    torch.testing.assert_close(g_got[1], hand)
    assert g_got[1][2].abs().sum() == 0


def test_center_loss_computes_in_fp32_under_autocast():
    loss_fn = CenterLoss(num_classes=3, feat_dim=4)
    x = torch.randn(6, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(x, torch.tensor([0, 0, 1, 1, 2, 2]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out, loop_center_loss(x.float(), torch.tensor([0, 0, 1, 1, 2, 2]), loss_fn.centers)
    )


def test_center_loss_checks_its_inputs():
    loss_fn = CenterLoss(num_classes=3, feat_dim=4)
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        loss_fn(torch.randn(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels"):
        loss_fn(torch.randn(2, 4), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="must be > 0"):
        CenterLoss(num_classes=3, feat_dim=4, weight=0.0)


class _Net(nn.Module):
    """A feature extractor + classifier + centre loss, as TripletReIDModule holds them."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 4)
        self.bn = nn.BatchNorm1d(4)
        self.classifier = nn.Linear(4, 3, bias=False)
        self.center_loss = CenterLoss(num_classes=3, feat_dim=4, weight=5e-4, lr=0.5)

    def loss(self, x, y):
        feat = self.body(x)
        logits = self.classifier(self.bn(feat))
        return nn.functional.cross_entropy(logits, y) + 5e-4 * self.center_loss(feat, y)


def test_center_sgd_group_reproduces_the_reference_update():
    """Three steps of build_optimizer's WithSGDGroups == the reference loop: Adam over the model
    parameters only, then centre grads *= 1 / weight, then SGD(lr=0.5) on the centres."""
    torch.manual_seed(0)
    ours = _Net()
    ref = copy.deepcopy(ours)
    x, y = torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    opt = build_optimizer(ours, partial(torch.optim.Adam, lr=1e-2, weight_decay=5e-4))
    assert isinstance(opt, WithSGDGroups)
    names = [g["name"] for g in opt.param_groups]
    assert names == ["decay", "norm", "center"]
    center_group = opt.param_groups[-1]
    assert center_group["lr"] == 0.5 and center_group["weight_decay"] == 0.0
    assert center_group["params"] == [ours.center_loss.centers]
    in_main = {id(p) for g in opt.main.param_groups for p in g["params"]}
    assert id(ours.center_loss.centers) not in in_main

    # Adam over the model parameters only (BN undecayed, as build_optimizer's default groups)
    ref_opt = torch.optim.Adam(
        [
            {"params": [ref.body.weight, ref.body.bias, ref.classifier.weight]},
            {"params": [ref.bn.weight, ref.bn.bias], "weight_decay": 0.0},
        ],
        lr=1e-2,
        weight_decay=5e-4,
    )
    ref_center = torch.optim.SGD(ref.center_loss.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        ours.loss(x, y).backward()
        opt.step()

        ref_opt.zero_grad()
        ref_center.zero_grad()
        ref.loss(x, y).backward()
        ref_opt.step()
        for p in ref.center_loss.parameters():
            p.grad.data *= 1.0 / 5e-4
        ref_center.step()
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_center_sgd_group_state_dict_round_trip_and_fixed_lr():
    torch.manual_seed(0)
    net = _Net()
    x, y = torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    opt = build_optimizer(net, partial(torch.optim.Adam, lr=1e-2))
    sched = WarmupMultiStepLR(opt, milestones=[1], warmup_epochs=2, warmup_factor=0.1)
    net.loss(x, y).backward()
    opt.step()
    sched.step()
    # the schedule drives the main groups only; the centres keep lr 0.5
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5.5e-4, 5.5e-4, 0.5])
    saved = copy.deepcopy(opt.state_dict())
    clone = _Net()
    clone.load_state_dict(net.state_dict())
    opt2 = build_optimizer(clone, partial(torch.optim.Adam, lr=1e-2))
    opt2.load_state_dict(saved)
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in opt.param_groups]
    assert len(opt2.state) == len(opt.state) > 0
    for net_, opt_ in ((net, opt), (clone, opt2)):
        opt_.zero_grad()
        net_.loss(x, y).backward()
        opt_.step()
    for a, b in zip(net.state_dict().values(), clone.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    # a scheduler that does not know about fixed groups changes the centre lr: fail loudly
    torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1]).step()
    with pytest.raises(ValueError, match="'center' param group changed"):
        opt.step()


def test_centres_start_standard_normal_and_hand_their_sgd_group():
    torch.manual_seed(0)
    loss_fn = CenterLoss(num_classes=500, feat_dim=64, weight=5e-4, lr=0.5)
    c = loss_fn.centers.detach()
    assert (
        abs(c.mean().item()) < 0.03 and abs(c.std().item() - 1) < 0.03
    )  # N(0, 1): 32,000 draws, 5 sigma
    group = loss_fn.sgd_param_group()
    assert group["params"] == [loss_fn.centers]
    assert (group["lr"], group["grad_scale"], group["weight_decay"]) == (0.5, 2000.0, 0.0)


def test_center_sgd_group_is_unscaled_by_a_grad_scaler():
    """fp16 loss scaling: GradScaler.unscale_ walks `param_groups`, which list the centres, so
    a scaled step equals the unscaled one."""
    torch.manual_seed(0)
    plain, scaled = _Net(), _Net()
    scaled.load_state_dict(plain.state_dict())
    x, y = torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 2, 2])
    opt_a = build_optimizer(plain, partial(torch.optim.Adam, lr=1e-2))
    opt_b = build_optimizer(scaled, partial(torch.optim.Adam, lr=1e-2))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(2):
        opt_a.zero_grad()
        plain.loss(x, y).backward()
        opt_a.step()
        opt_b.zero_grad()
        scaler.scale(scaled.loss(x, y)).backward()
        scaler.step(opt_b)
        scaler.update()
    for a, b in zip(plain.state_dict().values(), scaled.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
