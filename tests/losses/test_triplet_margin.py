"""TripletMarginLoss: identical to torch.nn.TripletMarginLoss for every option."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from src.losses import TripletMarginLoss

DT = torch.float64

OPTIONS = list(
    itertools.product(
        [0.2, 1.0, 2.5],  # margin
        [1.0, 2.0, 3.0, math.inf],  # p
        [1e-6, 0.1],  # eps
        [False, True],  # swap
        ["mean", "sum", "none"],  # reduction
    )
)


def _triplet(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True) for _ in range(3)]


@pytest.mark.parametrize("dtype", [DT, torch.float32])
def test_identical_to_torch_for_every_option(dtype: torch.dtype) -> None:
    for i, (margin, p, eps, swap, reduction) in enumerate(OPTIONS):
        kwargs = {"margin": margin, "p": p, "eps": eps, "swap": swap, "reduction": reduction}
        for shape in [(12, 6), (6,), (2, 3, 4)]:
            a, pos, neg = _triplet(shape, dtype, seed=i)
            ours = TripletMarginLoss(**kwargs)(a, pos, neg)
            ref = torch.nn.TripletMarginLoss(**kwargs)(a, pos, neg)
            assert ours.shape == ref.shape and ours.dtype == ref.dtype
            torch.testing.assert_close(ours, ref, rtol=1e-12 if dtype == DT else 1e-6, atol=0)
            w = torch.rand(ours.shape, dtype=dtype, generator=torch.Generator().manual_seed(i))
            grads = torch.autograd.grad((ours * w).sum(), (a, pos, neg))
            ref_grads = torch.autograd.grad((ref * w).sum(), (a, pos, neg))
            for g, rg in zip(grads, ref_grads):
                torch.testing.assert_close(g, rg, rtol=1e-12 if dtype == DT else 1e-6, atol=1e-7)


def test_broadcasting_like_torch() -> None:
    a = torch.randn(5, 4, dtype=DT)
    pos, neg = torch.randn(1, 4, dtype=DT), torch.randn(5, 1, dtype=DT)
    for swap in (False, True):
        ours = TripletMarginLoss(swap=swap, reduction="none")(a, pos, neg)
        ref = torch.nn.TripletMarginLoss(swap=swap, reduction="none")(a, pos, neg)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)


def test_matches_facenet_definition_loop() -> None:
    a, pos, neg = _triplet((7, 3), DT, seed=99)
    margin, eps = 1.5, 1e-6

    def dist(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(((u - v + eps) ** 2).sum())

    for swap in (False, True):
        terms = []
        for i in range(7):
            d_neg = dist(a[i], neg[i])
            if swap:
                d_neg = torch.minimum(d_neg, dist(pos[i], neg[i]))
            terms.append(torch.clamp(margin + dist(a[i], pos[i]) - d_neg, min=0))
        ref = torch.stack(terms).mean()
        ours = TripletMarginLoss(margin=margin, eps=eps, swap=swap)(a, pos, neg)
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        for g, rg in zip(
            torch.autograd.grad(ours, (a, pos, neg)), torch.autograd.grad(ref, (a, pos, neg))
        ):
            torch.testing.assert_close(g, rg, rtol=1e-6, atol=1e-6)


def test_hand_computed() -> None:
    a = torch.tensor([[0.0, 0.0]])
    pos = torch.tensor([[3.0, 4.0]])
    neg = torch.tensor([[6.0, 8.0]])
    loss = TripletMarginLoss(margin=1.0, eps=0.0)
    assert loss(a, pos, neg).item() == pytest.approx(0.0)  # 1 + 5 - 10 < 0
    assert loss(a, neg, pos).item() == pytest.approx(6.0)  # 1 + 10 - 5
    # Swap: d(p, n) = 5 < d(a, n) = 10 -> 1 + 5 - 5 = 1.
    assert TripletMarginLoss(margin=1.0, eps=0.0, swap=True)(a, pos, neg).item() == pytest.approx(
        1.0
    )


def test_gradcheck() -> None:
    a, pos, neg = _triplet((4, 3), DT, seed=3)
    for swap, p in itertools.product((False, True), (1.5, 2.0)):
        criterion = TripletMarginLoss(margin=2.0, p=p, swap=swap)
        assert torch.autograd.gradcheck(criterion, (a, pos, neg))


def test_identical_inputs_have_finite_gradients() -> None:
    a = torch.ones(3, 5, requires_grad=True)
    for eps in (1e-6, 0.0):
        loss = TripletMarginLoss(eps=eps)(a, a, a)
        assert loss.item() == pytest.approx(1.0)
        (g,) = torch.autograd.grad(loss, a)
        assert torch.isfinite(g).all()


def test_bf16_autocast_input_gives_fp32_result() -> None:
    a, pos, neg = (t.detach().bfloat16() for t in _triplet((8, 16), torch.float32, seed=4))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = TripletMarginLoss()(a, pos, neg)
    assert out.dtype == torch.float32
    ref = torch.nn.TripletMarginLoss()(a.float(), pos.float(), neg.float())
    torch.testing.assert_close(out, ref)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="margin must be > 0"):
        TripletMarginLoss(margin=0.0)
    with pytest.raises(ValueError, match="reduction"):
        TripletMarginLoss(reduction="avg")
    with pytest.raises(ValueError, match="same number of dimensions"):
        TripletMarginLoss()(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
