"""src.losses.functional against naive loops, hand-computed cases and gradcheck."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from src.losses import TripletLoss
from src.losses import functional as LF

from ._naive import (
    hinge,
    make_labels,
    naive_local_pair_dist,
    naive_mining,
    naive_shortest_path,
    pair_dist,
)

DT = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-6}


def _randn(*shape: int, seed: int = 0, requires_grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------- distances


def test_normalize_matches_loop_and_zero_row_is_finite() -> None:
    x = _randn(5, 7)
    x_zero = torch.cat([x, torch.zeros(1, 7, dtype=DT)]).detach().requires_grad_(True)
    out = LF.normalize(x_zero)
    expected = torch.stack([row / (torch.sqrt((row**2).sum()) + 1e-12) for row in x_zero[:5]])
    torch.testing.assert_close(out[:5], expected, **TOL)
    torch.testing.assert_close(out[:5].norm(dim=1), torch.ones(5, dtype=DT), **TOL)
    assert torch.equal(out[5], torch.zeros(7, dtype=DT))
    out.sum().backward()
    assert torch.isfinite(x_zero.grad).all()
    # axis=0 normalises columns.
    torch.testing.assert_close(LF.normalize(x, axis=0).norm(dim=0), torch.ones(7, dtype=DT))


def test_euclidean_dist_matches_loop_values_and_grads() -> None:
    x, y = _randn(6, 5, seed=1), _randn(4, 5, seed=2)
    out = LF.euclidean_dist(x, y)
    expected = torch.stack([torch.stack([pair_dist(a, b) for b in y]) for a in x])
    torch.testing.assert_close(out, expected, **TOL)
    w = _randn(6, 4, seed=3, requires_grad=False)
    gx, gy = torch.autograd.grad((out * w).sum(), (x, y))
    ex, ey = torch.autograd.grad((expected * w).sum(), (x, y))
    torch.testing.assert_close(gx, ex, **TOL)
    torch.testing.assert_close(gy, ey, **TOL)


def test_euclidean_dist_hand_computed_and_clamped() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=DT)
    out = LF.euclidean_dist(x, x)
    # Zero distances are clamped to sqrt(1e-12) = 1e-6, exactly as open-reid.
    expected = torch.tensor([[1e-6, 5.0], [5.0, 1e-6]], dtype=DT)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_euclidean_dist_identical_rows_have_finite_gradients() -> None:
    for dtype in (torch.float32, DT):
        x = torch.full((8, 16), 0.37, dtype=dtype, requires_grad=True)
        out = LF.euclidean_dist(x, x)
        assert torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(x.grad).all()


def test_clamp_is_what_keeps_the_sqrt_gradient_finite() -> None:
    # Without the clamp, d sqrt(s)/ds at s = 0 is inf and the chain rule yields NaN/inf.
    s = torch.zeros(3, requires_grad=True)
    s.sqrt().sum().backward()
    assert not torch.isfinite(s.grad).any()
    s.grad = None
    s.clamp(min=1e-12).sqrt().sum().backward()
    assert torch.equal(s.grad, torch.zeros(3))  # clamped entries get no gradient


def test_batch_euclidean_dist_matches_euclidean_dist() -> None:
    x, y = _randn(3, 4, 6, seed=4), _randn(3, 5, 6, seed=5)
    out = LF.batch_euclidean_dist(x, y)
    assert out.shape == (3, 4, 5)
    for i in range(3):
        torch.testing.assert_close(out[i], LF.euclidean_dist(x[i], y[i]), **TOL)


def test_cosine_dist_matches_loop() -> None:
    x, y = _randn(5, 3, seed=6), _randn(4, 3, seed=7)
    out = LF.cosine_dist(x, y)
    expected = torch.stack(
        [torch.stack([1 - (a @ b) / (a.norm() * b.norm()) for b in y]) for a in x]
    )
    torch.testing.assert_close(out, expected, **TOL)
    hand = LF.cosine_dist(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0], [-3.0, 0.0]]))
    torch.testing.assert_close(hand, torch.tensor([[1.0, 2.0]]))


@pytest.mark.parametrize(
    ("fn", "args", "match"),
    [
        (LF.euclidean_dist, ((3, 4), (2, 5)), "feature dimension"),
        (LF.euclidean_dist, ((3, 4, 1), (2, 4)), r"\(N, D\)"),
        (LF.cosine_dist, ((3, 4), (2, 5)), "feature dimension"),
        (LF.local_dist, ((3, 4), (2, 4, 1)), "local features"),
        (LF.batch_local_dist, ((3, 4, 2), (2, 4, 2)), "batch and channel"),
    ],
)
def test_distance_shape_errors(fn: Callable, args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn(*(torch.zeros(s) for s in args))


# ----------------------------------------------------------------------------- mining


def test_hard_example_mining_matches_loop_with_unequal_identity_sizes() -> None:
    labels = make_labels([2, 3, 5, 2, 4, 3], seed=1)
    x = _randn(len(labels), 8, seed=8)
    dist_mat = LF.euclidean_dist(x, x)
    dist_ap, dist_an, p_inds, n_inds = LF.hard_example_mining(dist_mat, labels, return_inds=True)
    ref_ap, ref_an, ref_p, ref_n = naive_mining(x, labels)
    torch.testing.assert_close(dist_ap, torch.stack(ref_ap), **TOL)
    torch.testing.assert_close(dist_an, torch.stack(ref_an), **TOL)
    assert p_inds.tolist() == ref_p
    assert n_inds.tolist() == ref_n
    assert p_inds.dtype == n_inds.dtype == torch.long
    # Two-value form and gradients through the selected entries only.
    ap2, an2 = LF.hard_example_mining(dist_mat, labels)
    assert torch.equal(ap2, dist_ap) and torch.equal(an2, dist_an)
    w = torch.arange(1.0, len(labels) + 1, dtype=DT)
    (grad,) = torch.autograd.grad(((dist_ap - dist_an) * w).sum(), x)
    (ref_grad,) = torch.autograd.grad(((torch.stack(ref_ap) - torch.stack(ref_an)) * w).sum(), x)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def _reference_view_mining(dist_mat: torch.Tensor, labels: torch.Tensor):
    """The original open-reid/AlignedReID code path (valid for equal identity sizes only)."""
    n = dist_mat.size(0)
    is_pos = labels.expand(n, n).eq(labels.expand(n, n).t())
    is_neg = labels.expand(n, n).ne(labels.expand(n, n).t())
    dist_ap, rel_p = torch.max(dist_mat[is_pos].contiguous().view(n, -1), 1, keepdim=True)
    dist_an, rel_n = torch.min(dist_mat[is_neg].contiguous().view(n, -1), 1, keepdim=True)
    ind = torch.arange(n).unsqueeze(0).expand(n, n)
    p_inds = torch.gather(ind[is_pos].contiguous().view(n, -1), 1, rel_p).squeeze(1)
    n_inds = torch.gather(ind[is_neg].contiguous().view(n, -1), 1, rel_n).squeeze(1)
    return dist_ap.squeeze(1), dist_an.squeeze(1), p_inds, n_inds


def test_hard_example_mining_equals_reference_code_for_pk_batches() -> None:
    labels = make_labels([4] * 5, seed=2)
    x = _randn(20, 6, seed=9, requires_grad=False)
    dist_mat = LF.euclidean_dist(x, x)
    ours = LF.hard_example_mining(dist_mat, labels, return_inds=True)
    ref = _reference_view_mining(dist_mat, labels)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_hard_example_mining_ties_pick_lowest_index_like_reference() -> None:
    dist_mat = torch.tensor(
        [[0.0, 2.0, 2.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0, 1.0], [2.0, 3.0, 0.0, 1.0, 1.0],
         [1.0, 1.0, 1.0, 0.0, 5.0], [1.0, 1.0, 1.0, 5.0, 0.0]]
    )  # fmt: skip
    labels = torch.tensor([0, 0, 0, 1, 1])
    _, _, p_inds, n_inds = LF.hard_example_mining(dist_mat, labels, return_inds=True)
    assert p_inds.tolist() == [1, 2, 1, 4, 3]
    assert n_inds.tolist() == [3, 3, 3, 0, 0]


def test_hard_example_mining_self_only_positive_uses_self_distance() -> None:
    # Identity 7 has a single sample (index 2): its hardest positive is itself, as in the
    # reference code, so dist_ap is its (clamped) distance to itself.
    labels = torch.tensor([3, 3, 7, 5, 5])
    x = _randn(5, 4, seed=10)
    dist_mat = LF.euclidean_dist(x, x)
    dist_ap, dist_an, p_inds, n_inds = LF.hard_example_mining(dist_mat, labels, return_inds=True)
    assert p_inds[2].item() == 2
    assert dist_ap[2].item() == dist_mat[2, 2].item() == pytest.approx(1e-6)
    assert dist_an[2].item() == pytest.approx(min(dist_mat[2, j].item() for j in (0, 1, 3, 4)))
    dist_ap.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_hard_example_mining_without_negative_raises() -> None:
    dist_mat = torch.rand(4, 4)
    with pytest.raises(ValueError, match="single identity"):
        LF.hard_example_mining(dist_mat, torch.tensor([2, 2, 2, 2]))
    with pytest.raises(ValueError, match="single identity"):
        LF.hard_example_mining(torch.rand(1, 1), torch.tensor([0]))
    # Opting out of the check (no host read): anchors without a negative get +inf.
    _, dist_an = LF.hard_example_mining(dist_mat, torch.tensor([2, 2, 2, 2]), check_negatives=False)
    assert torch.isinf(dist_an).all()


def test_hard_example_mining_shape_errors() -> None:
    with pytest.raises(ValueError, match="square"):
        LF.hard_example_mining(torch.rand(3, 4), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"labels must have shape \(3,\)"):
        LF.hard_example_mining(torch.rand(3, 3), torch.tensor([0, 1]))


def test_hard_example_mining_gradcheck() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    x = _randn(7, 3, seed=11)

    def fn(feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return LF.hard_example_mining(LF.euclidean_dist(feat, feat), labels)

    assert torch.autograd.gradcheck(fn, (x,))


# ----------------------------------------------------------------------------- global_loss


@pytest.mark.parametrize("normalize_feature", [True, False])
@pytest.mark.parametrize("margin", [0.3, None])
def test_global_loss_matches_loop(normalize_feature: bool, margin: float | None) -> None:
    labels = make_labels([3, 2, 4, 2, 3], seed=3)
    x = _randn(len(labels), 6, seed=12)
    loss, p_inds, n_inds, dist_ap, dist_an, dist_mat = LF.global_loss(
        TripletLoss(margin=margin), x, labels, normalize_feature=normalize_feature
    )
    feat = x / (x.norm(dim=1, keepdim=True) + 1e-12) if normalize_feature else x
    ref_ap, ref_an, ref_p, ref_n = naive_mining(feat, labels)
    ref_loss = torch.stack([hinge(a, n, margin) for a, n in zip(ref_ap, ref_an)]).mean()
    torch.testing.assert_close(loss, ref_loss, **TOL)
    assert p_inds.tolist() == ref_p and n_inds.tolist() == ref_n
    torch.testing.assert_close(dist_ap, torch.stack(ref_ap), **TOL)
    torch.testing.assert_close(dist_an, torch.stack(ref_an), **TOL)
    assert dist_mat.shape == (len(labels), len(labels))
    (grad,) = torch.autograd.grad(loss, x)
    (ref_grad,) = torch.autograd.grad(ref_loss, x)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def test_global_loss_accepts_reference_style_callable() -> None:
    # The reference code passes a TripletLoss object called as tri_loss(dist_ap, dist_an).
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    x = _randn(6, 4, seed=13, requires_grad=False)
    ranking = torch.nn.MarginRankingLoss(margin=0.5)

    def reference_tri_loss(dist_ap: torch.Tensor, dist_an: torch.Tensor) -> torch.Tensor:
        return ranking(dist_an, dist_ap, torch.ones_like(dist_an))

    loss_ref = LF.global_loss(reference_tri_loss, x, labels)[0]
    loss_ours = LF.global_loss(TripletLoss(margin=0.5), x, labels)[0]
    assert torch.equal(loss_ref, loss_ours)


def test_triplet_ranking_loss_equals_torch_criteria() -> None:
    dist_ap, dist_an = _randn(9, seed=14).abs(), _randn(9, seed=15).abs()
    ones = torch.ones(9, dtype=DT)
    hard = LF.triplet_ranking_loss(dist_ap, dist_an, 0.3)
    assert torch.equal(hard, torch.nn.MarginRankingLoss(margin=0.3)(dist_an, dist_ap, ones))
    soft = LF.triplet_ranking_loss(dist_ap, dist_an, None)
    torch.testing.assert_close(soft, torch.nn.SoftMarginLoss()(dist_an - dist_ap, ones), **TOL)
    # Large distance gaps stay finite in fp32 (SoftMarginLoss's exp would overflow).
    big = LF.triplet_ranking_loss(torch.tensor([500.0]), torch.tensor([1.0]), None)
    assert big.item() == pytest.approx(499.0)


# ----------------------------------------------------------------------------- AlignedReID


@pytest.mark.parametrize(("m", "n"), [(1, 1), (1, 4), (5, 1), (3, 3), (4, 6), (7, 2)])
def test_shortest_path_matches_reference_double_loop(m: int, n: int) -> None:
    cost = _randn(3, m, n, seed=16 + m * 10 + n).abs().detach().requires_grad_(True)
    out = LF.shortest_path(cost)
    assert out.shape == (3,)
    ref = torch.stack([naive_shortest_path(c) for c in cost])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    (grad,) = torch.autograd.grad((out * w).sum(), cost)
    (ref_grad,) = torch.autograd.grad((ref * w).sum(), cost)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_shortest_path_hand_computed_and_ties() -> None:
    cost = torch.tensor([[1.0, 5.0, 1.0], [1.0, 1.0, 9.0], [7.0, 1.0, 1.0]], requires_grad=True)
    # Best path: down, right, down, right -> 1 + 1 + 1 + 1 + 1 = 5.
    out = LF.shortest_path(cost)
    assert out.item() == 5.0
    out.backward()
    expected = torch.tensor([[1.0, 0, 0], [1.0, 1.0, 0], [0, 1.0, 1.0]])
    assert torch.equal(cost.grad, expected)
    # All-equal costs: every path ties; the gradient splits exactly like the reference loop.
    tied = torch.ones(4, 5, dtype=DT, requires_grad=True)
    (g,) = torch.autograd.grad(LF.shortest_path(tied), tied)
    (g_ref,) = torch.autograd.grad(naive_shortest_path(tied), tied)
    assert torch.equal(g, g_ref)
    assert g.sum().item() == pytest.approx(4 + 5 - 1)


def test_local_dist_and_batch_local_dist_match_loop() -> None:
    x, y = _randn(3, 4, 5, seed=17), _randn(4, 6, 5, seed=18)
    out = LF.local_dist(x, y)
    assert out.shape == (3, 4)
    ref = torch.stack([torch.stack([naive_local_pair_dist(a, b) for b in y]) for a in x])
    torch.testing.assert_close(out, ref, **TOL)
    gx, gy = torch.autograd.grad(out.sum(), (x, y))
    rx, ry = torch.autograd.grad(ref.sum(), (x, y))
    torch.testing.assert_close(gx, rx, **TOL)
    torch.testing.assert_close(gy, ry, **TOL)

    z = _randn(3, 6, 5, seed=19)
    batch = LF.batch_local_dist(x, z)
    ref_batch = torch.stack([naive_local_pair_dist(x[i], z[i]) for i in range(3)])
    torch.testing.assert_close(batch, ref_batch, **TOL)
    torch.testing.assert_close(batch, LF.local_dist(x, z).diagonal(), **TOL)
    gx, gz = torch.autograd.grad(batch.sum(), (x, z))
    rx, rz = torch.autograd.grad(ref_batch.sum(), (x, z))
    torch.testing.assert_close(gx, rx, **TOL)
    torch.testing.assert_close(gz, rz, **TOL)


def test_local_dist_large_distances_do_not_overflow() -> None:
    # (e^d - 1)/(e^d + 1) is inf/inf = NaN in fp32 for d > 88; tanh(d/2) saturates at 1.
    x = torch.zeros(2, 3, 4, requires_grad=True)
    y = torch.full((2, 3, 4), 100.0)
    out = LF.batch_local_dist(x, y)
    torch.testing.assert_close(out, torch.full((2,), 5.0))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_local_distances_gradcheck() -> None:
    x, y = _randn(2, 3, 2, seed=20), _randn(3, 4, 2, seed=21)
    assert torch.autograd.gradcheck(LF.local_dist, (x, y))
    assert torch.autograd.gradcheck(LF.batch_local_dist, (x, y[:2]))


# ----------------------------------------------------------------------------- precision


def test_functional_computes_in_fp32_under_autocast() -> None:
    x = torch.randn(6, 8).bfloat16()
    local = torch.randn(6, 3, 4).bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert (x @ x.t()).dtype == torch.bfloat16  # autocast is really on
        outs = [
            LF.normalize(x),
            LF.euclidean_dist(x, x),
            LF.cosine_dist(x, x),
            LF.local_dist(local, local),
            LF.batch_local_dist(local, local),
            LF.hard_example_mining(LF.euclidean_dist(x, x), torch.tensor([0, 0, 1, 1, 2, 2]))[0],
        ]
    for out in outs:
        assert out.dtype == torch.float32
    torch.testing.assert_close(outs[1], LF.euclidean_dist(x.float(), x.float()))


def test_hot_path_has_no_host_sync() -> None:
    # On the meta device any host read (.item(), bool(tensor), data-dependent shapes) raises,
    # so running there proves the mining and distances never synchronise.
    x = torch.empty(8, 16, device="meta")
    labels = torch.empty(8, dtype=torch.long, device="meta")
    dist_ap, dist_an, p_inds, _ = LF.hard_example_mining(
        LF.euclidean_dist(x, x), labels, return_inds=True, check_negatives=False
    )
    assert dist_ap.shape == dist_an.shape == p_inds.shape == (8,)
    local = torch.empty(8, 4, 5, device="meta")
    assert LF.local_dist(local, local).shape == (8, 8)
    assert LF.batch_local_dist(local, local[p_inds]).shape == (8,)
