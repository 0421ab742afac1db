"""TripletLoss (batch hard) against the paper definition, hand-computed cases and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from src.losses import TripletLoss, TripletStats
from src.losses.functional import euclidean_dist

from ._naive import make_labels, naive_batch_hard_triplet, naive_mining

DT = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-6}


def _feat(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT).requires_grad_(True)


@pytest.mark.parametrize("normalize_feature", [False, True])
@pytest.mark.parametrize("margin", [0.3, 1.0, None])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_naive_loop_with_unequal_identities(
    margin: float | None, normalize_feature: bool, seed: int
) -> None:
    labels = make_labels([2, 4, 3, 5, 2, 3, 4], seed=seed)
    x = _feat(len(labels), 10, seed=seed + 100)
    # Small features so that many hinge terms are active with margin 0.3 / 1.0.
    x = (x * 0.3).detach().requires_grad_(True)
    loss = TripletLoss(margin=margin, normalize_feature=normalize_feature)(x, labels)
    ref = naive_batch_hard_triplet(x, labels, margin, normalize_feature)
    torch.testing.assert_close(loss, ref, **TOL)
    (grad,) = torch.autograd.grad(loss, x)
    (ref_grad,) = torch.autograd.grad(ref, x)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, ref_grad, **TOL)


def test_equals_reference_margin_ranking_and_soft_margin_criteria() -> None:
    labels = make_labels([4] * 6, seed=5)
    x = _feat(24, 8, seed=6)
    dist_ap, dist_an, _, _ = naive_mining(x, labels)
    dist_ap, dist_an = torch.stack(dist_ap), torch.stack(dist_an)
    y = torch.ones_like(dist_an)
    hard_ref = torch.nn.MarginRankingLoss(margin=0.3)(dist_an, dist_ap, y)
    soft_ref = torch.nn.SoftMarginLoss()(dist_an - dist_ap, y)
    torch.testing.assert_close(TripletLoss(0.3)(x, labels), hard_ref, **TOL)
    torch.testing.assert_close(TripletLoss(None)(x, labels), soft_ref, **TOL)


def test_hand_computed_values_and_gradients() -> None:
    # 1-D features 0, 2 (id 0) and 3, 10 (id 1).
    x = torch.tensor([[0.0], [2.0], [3.0], [10.0]], dtype=DT, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    # anchor: (d_ap, d_an) = 0: (2, 3), 1: (2, 1), 2: (7, 1), 3: (7, 8)
    # hinge with margin 0.3: 0, 1.3, 6.3, 0 -> mean 7.6 / 4
    loss = TripletLoss(margin=0.3)(x, labels)
    assert loss.item() == pytest.approx(7.6 / 4, abs=1e-12)
    loss.backward()
    # active terms (anchors 1, 2): (x1 - x0) - (x2 - x1) and (x3 - x2) - (x2 - x1)
    expected = torch.tensor([[-1.0], [3.0], [-3.0], [1.0]], dtype=DT) / 4
    torch.testing.assert_close(x.grad, expected, rtol=0, atol=1e-12)

    soft = TripletLoss(margin=None)(x.detach(), labels)
    expected_soft = sum(math.log1p(math.exp(v)) for v in (-1.0, 1.0, 6.0, -1.0)) / 4
    assert soft.item() == pytest.approx(expected_soft, abs=1e-12)


def test_forward_with_stats_exposes_mining() -> None:
    labels = make_labels([3, 2, 4], seed=7)
    x = _feat(9, 5, seed=8)
    criterion = TripletLoss(margin=0.3)
    stats = criterion.forward_with_stats(x, labels)
    assert isinstance(stats, TripletStats)
    assert torch.equal(stats.loss, criterion(x, labels))
    ref_ap, ref_an, ref_p, ref_n = naive_mining(x, labels)
    assert stats.p_inds.tolist() == ref_p and stats.n_inds.tolist() == ref_n
    torch.testing.assert_close(stats.dist_ap, torch.stack(ref_ap), **TOL)
    torch.testing.assert_close(stats.dist_an, torch.stack(ref_an), **TOL)
    # from_distances is the ranking part alone (the reference TripletLoss.__call__).
    torch.testing.assert_close(criterion.from_distances(stats.dist_ap, stats.dist_an), stats.loss)


@pytest.mark.parametrize("margin", [0.3, None])
def test_gradcheck(margin: float | None) -> None:
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 2])
    x = _feat(7, 3, seed=9)
    for normalize_feature in (False, True):
        criterion = TripletLoss(margin=margin, normalize_feature=normalize_feature)
        assert torch.autograd.gradcheck(lambda f, c=criterion: c(f, labels), (x,))


def test_self_only_positive_behaves_as_reference() -> None:
    labels = torch.tensor([0, 0, 1, 2, 2, 2])  # identity 1 has one sample
    x = _feat(6, 4, seed=10)
    stats = TripletLoss(margin=0.3).forward_with_stats(x, labels)
    dist = euclidean_dist(x, x)
    # Anchor 2's hardest positive is itself: its clamped self-distance sqrt(1e-12).
    assert stats.p_inds[2].item() == 2
    assert stats.dist_ap[2].item() == pytest.approx(1e-6, abs=1e-15)
    ref_ap, ref_an, _, _ = naive_mining(x, labels)  # None for anchor 2's positive
    ref_ap[2] = torch.tensor(1e-6, dtype=DT)
    torch.testing.assert_close(stats.dist_an, torch.stack(ref_an), **TOL)
    assert stats.dist_an[2].item() == pytest.approx(min(dist[2, j].item() for j in (0, 1, 3, 4, 5)))
    ref_loss = torch.stack([torch.clamp(a - n + 0.3, min=0) for a, n in zip(ref_ap, ref_an)])
    torch.testing.assert_close(stats.loss, ref_loss.mean(), **TOL)
    stats.loss.backward()
    assert torch.isfinite(x.grad).all()


def test_batch_without_negative_raises_value_error() -> None:
    x = _feat(4, 3, seed=11)
    with pytest.raises(ValueError, match="single identity"):
        TripletLoss()(x, torch.tensor([5, 5, 5, 5]))


@pytest.mark.parametrize("dtype", [torch.float32, DT])
@pytest.mark.parametrize("margin", [0.3, None])
def test_identical_features_give_finite_loss_and_gradients(
    dtype: torch.dtype, margin: float | None
) -> None:
    x = torch.full((8, 32), 0.25, dtype=dtype, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    for normalize_feature in (False, True):
        loss = TripletLoss(margin=margin, normalize_feature=normalize_feature)(x, labels)
        expected = 0.3 if margin is not None else math.log(2.0)
        assert loss.item() == pytest.approx(expected, abs=1e-5)
        (grad,) = torch.autograd.grad(loss, x)
        assert torch.isfinite(grad).all()


def test_collapsed_identity_gives_finite_gradients() -> None:
    # Realistic case: one identity's features coincide, the others do not.
    x = _feat(6, 5, seed=12).detach()
    x[0:3] = x[0]
    x.requires_grad_(True)
    loss = TripletLoss(margin=0.3)(x.float(), torch.tensor([0, 0, 0, 1, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_bf16_autocast_input_gives_fp32_result() -> None:
    labels = make_labels([4] * 4, seed=13)
    x = torch.randn(16, 64).bfloat16().requires_grad_(True)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        stats = TripletLoss(margin=0.3).forward_with_stats(x, labels)
    assert stats.loss.dtype == stats.dist_ap.dtype == torch.float32
    ref = TripletLoss(margin=0.3)(x.detach().float(), labels)
    torch.testing.assert_close(stats.loss, ref)
    stats.loss.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_no_host_sync_when_negatives_are_not_checked() -> None:
    # On the meta device any host read raises, so this proves the hot path never syncs.
    x = torch.empty(16, 8, device="meta", requires_grad=True)
    labels = torch.empty(16, dtype=torch.long, device="meta")
    for margin in (0.3, None):
        stats = TripletLoss(margin, check_negatives=False).forward_with_stats(x, labels)
        assert stats.loss.shape == () and stats.loss.device.type == "meta"
        stats.loss.backward()


def test_invalid_margin() -> None:
    with pytest.raises(ValueError, match="margin"):
        TripletLoss(margin=-0.1)
