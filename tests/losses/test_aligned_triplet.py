"""AlignedTripletLoss against a naive loop version of the AlignedReID reference code."""

from __future__ import annotations

import pytest
import torch

from src.losses import AlignedTripletLoss, AlignedTripletStats, TripletLoss
from src.losses import functional as LF

from ._naive import hinge, make_labels, naive_local_pair_dist, naive_mining

DT = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-6}


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=DT) * scale).requires_grad_(True)


def _naive_aligned(
    global_feat: torch.Tensor,
    local_feat: torch.Tensor,
    labels: torch.Tensor,
    margin: float | None,
    normalize_feature: bool,
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    if normalize_feature:
        global_feat = global_feat / (global_feat.norm(dim=-1, keepdim=True) + 1e-12)
        local_feat = local_feat / (local_feat.norm(dim=-1, keepdim=True) + 1e-12)
    dist_ap, dist_an, p_inds, n_inds = naive_mining(global_feat, labels)
    g_terms = [hinge(ap, an, margin) for ap, an in zip(dist_ap, dist_an)]
    l_terms = []
    for a, (p, n) in enumerate(zip(p_inds, n_inds)):
        l_ap = naive_local_pair_dist(local_feat[a], local_feat[p])
        l_an = naive_local_pair_dist(local_feat[a], local_feat[n])
        l_terms.append(hinge(l_ap, l_an, margin))
    return torch.stack(g_terms).mean(), torch.stack(l_terms).mean(), p_inds, n_inds


@pytest.mark.parametrize("normalize_feature", [False, True])
@pytest.mark.parametrize("margin", [0.3, None])
def test_matches_naive_loop_with_unequal_identities(
    margin: float | None, normalize_feature: bool
) -> None:
    labels = make_labels([2, 3, 4, 2, 3], seed=1)
    n = len(labels)
    global_feat = _randn(n, 8, seed=2, scale=0.3)
    local_feat = _randn(n, 5, 4, seed=3, scale=0.3)
    criterion = AlignedTripletLoss(margin=margin, normalize_feature=normalize_feature)
    stats = criterion.forward_with_stats(global_feat, local_feat, labels)
    g_ref, l_ref, p_ref, n_ref = _naive_aligned(
        global_feat, local_feat, labels, margin, normalize_feature
    )
    assert stats.p_inds.tolist() == p_ref and stats.n_inds.tolist() == n_ref
    torch.testing.assert_close(stats.global_loss, g_ref, **TOL)
    torch.testing.assert_close(stats.local_loss, l_ref, **TOL)
    w_local = 0.7  # weight the two losses differently to test both gradient paths
    total = stats.global_loss + w_local * stats.local_loss
    ref_total = g_ref + w_local * l_ref
    grads = torch.autograd.grad(total, (global_feat, local_feat))
    ref_grads = torch.autograd.grad(ref_total, (global_feat, local_feat))
    assert grads[1].abs().sum() > 0
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, **TOL)


def test_forward_returns_global_and_local_losses() -> None:
    labels = make_labels([3, 3, 2, 4], seed=4)
    global_feat = _randn(12, 6, seed=5)
    local_feat = _randn(12, 4, 3, seed=6)
    criterion = AlignedTripletLoss(margin=0.3)
    g_loss, l_loss = criterion(global_feat, local_feat, labels)
    stats = criterion.forward_with_stats(global_feat, local_feat, labels)
    assert isinstance(stats, AlignedTripletStats)
    assert torch.equal(g_loss, stats.global_loss) and torch.equal(l_loss, stats.local_loss)
    # The global part is exactly the batch-hard TripletLoss.
    assert torch.equal(g_loss, TripletLoss(margin=0.3)(global_feat, labels))
    # The local distances are those of the globally mined pairs.
    torch.testing.assert_close(
        stats.local_dist_ap, LF.batch_local_dist(local_feat, local_feat[stats.p_inds])
    )
    torch.testing.assert_close(
        stats.local_dist_an,
        LF.local_dist(local_feat, local_feat)[torch.arange(12), stats.n_inds],
        **TOL,
    )


def test_equals_reference_global_loss_local_loss_pipeline() -> None:
    # AlignedReID-Re-Production: global_loss(...) then local_loss with the same p/n indices.
    labels = make_labels([4] * 4, seed=7)
    global_feat = _randn(16, 6, seed=8)
    local_feat = _randn(16, 3, 5, seed=9)
    tri = TripletLoss(margin=0.3)
    g_loss, p_inds, n_inds, _, _, _ = LF.global_loss(
        tri, global_feat, labels, normalize_feature=True
    )
    local = LF.normalize(local_feat, axis=-1)
    l_ap = LF.batch_local_dist(local, local[p_inds])
    l_an = LF.batch_local_dist(local, local[n_inds])
    l_loss = tri.from_distances(l_ap, l_an)
    ours = AlignedTripletLoss(margin=0.3, normalize_feature=True)(global_feat, local_feat, labels)
    assert torch.equal(ours[0], g_loss) and torch.equal(ours[1], l_loss)


def test_gradcheck() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    global_feat = _randn(6, 3, seed=10)
    local_feat = _randn(6, 3, 2, seed=11)
    criterion = AlignedTripletLoss(margin=5.0)  # large margin: every hinge active
    assert torch.autograd.gradcheck(
        lambda g, f: torch.stack(criterion(g, f, labels)), (global_feat, local_feat)
    )


def test_identical_features_give_finite_losses_and_gradients() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    global_feat = torch.ones(6, 16, requires_grad=True)
    local_feat = torch.ones(6, 4, 8, requires_grad=True)
    for normalize_feature in (False, True):
        g_loss, l_loss = AlignedTripletLoss(0.3, normalize_feature)(global_feat, local_feat, labels)
        assert g_loss.item() == pytest.approx(0.3, abs=1e-5)
        assert l_loss.item() == pytest.approx(0.3, abs=1e-4)
        grads = torch.autograd.grad(g_loss + l_loss, (global_feat, local_feat))
        assert all(torch.isfinite(g).all() for g in grads)


def test_edge_cases_and_errors() -> None:
    local_feat = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="single identity"):
        AlignedTripletLoss()(torch.randn(4, 5), local_feat, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="local_feat"):
        AlignedTripletLoss()(torch.randn(4, 5), torch.randn(4, 6), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="margin"):
        AlignedTripletLoss(margin=-1.0)


def test_bf16_autocast_and_no_host_sync() -> None:
    labels = make_labels([2] * 4, seed=12)
    g = torch.randn(8, 32).bfloat16()
    f = torch.randn(8, 4, 16).bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        g_loss, l_loss = AlignedTripletLoss()(g, f, labels)
    assert g_loss.dtype == l_loss.dtype == torch.float32
    ref = AlignedTripletLoss()(g.float(), f.float(), labels)
    torch.testing.assert_close(g_loss, ref[0])
    torch.testing.assert_close(l_loss, ref[1])
    meta = AlignedTripletLoss(check_negatives=False)(
        torch.empty(8, 32, device="meta"),
        torch.empty(8, 4, 16, device="meta"),
        torch.empty(8, dtype=torch.long, device="meta"),
    )
    assert all(t.shape == () for t in meta)
