"""Tests of the Market-1501 evaluation protocol (src.metrics.functional)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from src.metrics import rank as MF
from src.metrics.functional import (
    SkippedQueriesWarning,
    compute_distance_matrix,
    evaluate_features,
    evaluate_rank,
    topk_gallery,
)
from tests.metrics._naive import naive_evaluate

# ---------------------------------------------------------------------------------------------
# A 3 x 5 case worked by hand.
#
# gallery   g0        g1        g2        g3              g4
# pid/cam   1/c0      1/c1      2/c1      0/c2 (distr.)   2/c2
#
# q0 = pid 1, cam 0, d = [0.1, 0.5, 0.3, 0.2, 0.4]
#    g0 is the same person seen by the same camera: junk, removed (it would be rank 1).
#    kept ranking: g3 (0.2, distractor), g2 (0.3), g4 (0.4), g1 (0.5, true)
#    true match at 0-based rank 3: AP = 1/4; trapezoid AP = (0/3 + 1/4)/2 = 1/8; INP = 1/4
# q1 = pid 2, cam 0, d = [0.6, 0.7, 0.2, 0.1, 0.3]  (no junk)
#    ranking: g3 (0.1), g2 (0.2, true), g4 (0.3, true), g0, g1 -> true at ranks 1 and 2
#    AP = (1/2 + 2/3) / 2 = 7/12
#    trapezoid: j=0: (0/1 + 1/2)/2 = 1/4; j=1: (1/2 + 2/3)/2 = 7/12 -> (1/4 + 7/12)/2 = 5/12
#    INP = 2/3 (2 matches, hardest at rank 3 1-based)
# q2 = pid 5, cam 0: no gallery item of pid 5 -> skipped with a warning.
# Over the two valid queries: CMC = [0, 1/2, 1/2, 1, 1], mAP = (1/4 + 7/12)/2 = 5/12,
# trapezoid mAP = (1/8 + 5/12)/2 = 13/48, mINP = (1/4 + 2/3)/2 = 11/24.
# ---------------------------------------------------------------------------------------------
TOY_D = np.array(
    [
        [0.1, 0.5, 0.3, 0.2, 0.4],
        [0.6, 0.7, 0.2, 0.1, 0.3],
        [0.3, 0.2, 0.5, 0.4, 0.1],
    ],
    dtype=np.float32,
)
TOY_LABELS = dict(
    q_pids=np.array([1, 2, 5]),
    g_pids=np.array([1, 1, 2, 0, 2]),
    q_camids=np.array([0, 0, 0]),
    g_camids=np.array([0, 1, 1, 2, 2]),
)


def _labels_tuple(d: dict) -> tuple:
    return d["q_pids"], d["g_pids"], d["q_camids"], d["g_camids"]


def test_hand_computed_toy_case_standard_ap():
    with pytest.warns(SkippedQueriesWarning, match="1 of 3 queries"):
        cmc, mAP, mINP = evaluate_rank(TOY_D, *_labels_tuple(TOY_LABELS), max_rank=5)
    np.testing.assert_allclose(cmc, [0.0, 0.5, 0.5, 1.0, 1.0])
    assert mAP == pytest.approx(5 / 12, abs=1e-12)
    assert mINP == pytest.approx(11 / 24, abs=1e-12)


def test_hand_computed_toy_case_trapezoid_ap():
    with pytest.warns(SkippedQueriesWarning):
        cmc, mAP, mINP = evaluate_rank(
            TOY_D, *_labels_tuple(TOY_LABELS), max_rank=5, ap="market_trapezoid"
        )
    np.testing.assert_allclose(cmc, [0.0, 0.5, 0.5, 1.0, 1.0])
    assert mAP == pytest.approx(13 / 48, abs=1e-12)
    assert mINP == pytest.approx(11 / 24, abs=1e-12)


def test_same_camera_only_match_is_skipped_and_torch_inputs_work():
    # q1's only same-pid gallery item is in its own camera: no valid match -> skipped
    d = torch.tensor([[0.2, 0.1], [0.1, 0.2]])
    q_pids, g_pids = torch.tensor([7, 8]), torch.tensor([7, 8])
    q_cams, g_cams = torch.tensor([0, 1]), torch.tensor([1, 1])
    with pytest.warns(SkippedQueriesWarning, match="1 of 2 queries"):
        cmc, mAP, mINP = evaluate_rank(d, q_pids, g_pids, q_cams, g_cams, max_rank=2)
    # q0: gallery [g1 (0.1, pid 8), g0 (0.2, pid 7, other camera)] -> match at rank 2
    np.testing.assert_allclose(cmc, [0.0, 1.0])
    assert mAP == pytest.approx(0.5) and mINP == pytest.approx(0.5)


def test_trapezoidal_ap_hand_value():
    # one query, true matches at 0-based ranks 0, 2 and 5 of a 7-item gallery
    is_match = np.array([1, 0, 1, 0, 0, 1, 0], dtype=bool)
    d = np.arange(7, dtype=np.float32)[None]
    g_pids = np.where(is_match, 3, 4)
    args = (d, np.array([3]), g_pids, np.array([0]), np.ones(7, dtype=np.int64))
    # standard: (1/1 + 2/3 + 3/6) / 3 = 13/18
    assert evaluate_rank(*args, max_rank=7)[1] == pytest.approx(13 / 18, abs=1e-12)
    # trapezoid: ((1+1)/2 + (1/2+2/3)/2 + (2/5+3/6)/2) / 3 = (1 + 7/12 + 9/20) / 3 = 61/90
    assert evaluate_rank(*args, max_rank=7, ap="market_trapezoid")[1] == pytest.approx(
        61 / 90, abs=1e-12
    )
    # mINP = 3 matches / hardest at rank 6 (1-based) = 1/2
    assert evaluate_rank(*args, max_rank=7)[2] == pytest.approx(0.5)


def _random_problem(rng, num_q, num_g, num_ids=12, num_cams=3, levels=6):
    """Random labels and integer-valued distances (many exact ties)."""
    q_pids = rng.integers(0, num_ids, num_q)
    g_pids = rng.integers(0, num_ids, num_g)
    q_cams = rng.integers(0, num_cams, num_q)
    g_cams = rng.integers(0, num_cams, num_g)
    d = rng.integers(0, levels, (num_q, num_g)).astype(np.float32)
    return d, q_pids, g_pids, q_cams, g_cams


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ranking paths: pruned (sort only the items up to each row's last true match); dense (float32:
# histogram of every row, exact comparison inside the true matches' bins, also with very few
# bins; float64: full stable sort of every row); search (searchsorted fallback).
PATHS = {
    "auto": {},
    "pruned": {"_PRUNE_MAX_FRACTION": 1.0},
    "dense": {"_PRUNE_MAX_FRACTION": -1.0},
    "dense_4_bins": {"_PRUNE_MAX_FRACTION": -1.0, "_HIST_BINS": 4},
    "search": {"_PRUNE_MAX_FRACTION": -1.0, "_HIST_BINS": 2**31},
}


@pytest.mark.parametrize("ap", ["standard", "market_trapezoid"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_matches_naive_loop_with_ties(ap, path, dtype, monkeypatch):
    for name, value in PATHS[path].items():
        monkeypatch.setattr(MF, name, value)
    rng = np.random.default_rng(0)
    for trial in range(6):
        d, *labels = _random_problem(rng, 40, 300 if trial < 3 else 17)
        if trial % 3 == 1:
            d = d - 3.0  # negative distances and -0.0 must rank like floats
            d[d == 0] = -0.0
        expected = naive_evaluate(d, *labels, max_rank=15, ap=ap)
        cmc, mAP, mINP = _quiet(evaluate_rank, d.astype(dtype), *labels, max_rank=15, ap=ap)
        np.testing.assert_array_equal(cmc, expected[0])
        assert mAP == pytest.approx(expected[1], abs=1e-12)
        assert mINP == pytest.approx(expected[2], abs=1e-12)


@pytest.mark.parametrize("path", list(PATHS))
def test_large_nonnegative_chunk_shortcut_matches_naive(path, monkeypatch):
    # > 2**16 elements per chunk exercises the non-negative key shortcut (incl. -0.0)
    for name, value in PATHS[path].items():
        monkeypatch.setattr(MF, name, value)
    rng = np.random.default_rng(1)
    d, *labels = _random_problem(rng, 90, 1000, num_ids=40, levels=30)
    d[d == 0] = -0.0
    d[:, 7] = np.inf
    expected = naive_evaluate(d, *labels, max_rank=50)
    cmc, mAP, mINP = _quiet(evaluate_rank, d, *labels)
    np.testing.assert_array_equal(cmc, expected[0])
    assert (mAP, mINP) == pytest.approx(expected[1:3], abs=1e-12)


def test_chunked_equals_unchunked_exactly():
    rng = np.random.default_rng(2)
    d, *labels = _random_problem(rng, 57, 211)
    d += rng.random(d.shape).astype(np.float32) * (rng.random(d.shape) < 0.5)
    for ap in ("standard", "market_trapezoid"):
        full = _quiet(evaluate_rank, d, *labels, ap=ap, chunk_size=10**6)
        for chunk in (1, 7, 20):
            part = _quiet(evaluate_rank, d, *labels, ap=ap, chunk_size=chunk)
            np.testing.assert_array_equal(part[0], full[0])
            assert part[1:] == full[1:]  # bit-identical


def test_perfect_distance_matrix_gives_ones():
    rng = np.random.default_rng(3)
    g_pids = np.repeat(np.arange(10), 4)
    g_cams = np.tile(np.arange(4), 10)
    q_pids, q_cams = np.arange(10), np.full(10, 5)
    d = np.where(q_pids[:, None] == g_pids[None], 0.0, 1.0) + rng.random((10, 40)) * 0.1
    cmc, mAP, mINP = evaluate_rank(d.astype(np.float32), q_pids, g_pids, q_cams, g_cams, 40)
    assert cmc[0] == 1.0 and mAP == 1.0 and mINP == 1.0
    assert np.all(cmc == 1.0)


def test_gallery_shuffle_changes_nothing():
    rng = np.random.default_rng(4)
    q_pids, g_pids = rng.integers(0, 20, 50), rng.integers(0, 20, 400)
    q_cams, g_cams = rng.integers(0, 4, 50), rng.integers(0, 4, 400)
    d = rng.random((50, 400)).astype(np.float32)  # no ties, so order cannot matter
    base = _quiet(evaluate_rank, d, q_pids, g_pids, q_cams, g_cams)
    perm = rng.permutation(400)
    shuffled = _quiet(evaluate_rank, d[:, perm], q_pids, g_pids[perm], q_cams, g_cams[perm])
    np.testing.assert_array_equal(base[0], shuffled[0])
    assert base[1] == pytest.approx(shuffled[1], abs=1e-12)
    assert base[2] == pytest.approx(shuffled[2], abs=1e-12)


def test_invariants_map_cmc_minp():
    # Planted identities (features = identity centre + noise), as in real evaluations: there
    # mAP <= CMC@max_rank. (It is not a theorem: a query whose many matches all sit just after
    # max_rank has AP > 0 and CMC@max_rank = 0.) mINP <= standard AP holds per query, since the
    # precision at the hardest match is one of the precisions averaged by AP.
    rng = np.random.default_rng(5)
    for trial in range(4):
        centres = rng.standard_normal((25, 32)).astype(np.float32)
        q_pids, g_pids = rng.integers(0, 25, 60), rng.integers(0, 25, 500)
        qf = centres[q_pids] + (0.5 + 0.3 * trial) * rng.standard_normal((60, 32))
        gf = centres[g_pids] + (0.5 + 0.3 * trial) * rng.standard_normal((500, 32))
        labels = (q_pids, g_pids, rng.integers(0, 4, 60), rng.integers(0, 4, 500))
        d = compute_distance_matrix(qf.astype(np.float32), gf.astype(np.float32))
        for ap in ("standard", "market_trapezoid"):
            cmc, mAP, mINP = _quiet(evaluate_rank, d, *labels, max_rank=50, ap=ap)
            assert 0.0 < mAP <= cmc[-1] <= 1.0
            assert np.all(np.diff(cmc) >= 0)
            if ap == "standard":
                assert 0.0 < mINP <= mAP


def test_evaluate_features_equals_evaluate_rank_of_distance_matrix():
    rng = np.random.default_rng(6)
    q_pids, g_pids = rng.integers(0, 15, 60), rng.integers(0, 15, 250)
    q_cams, g_cams = rng.integers(0, 3, 60), rng.integers(0, 3, 250)
    labels = (q_pids, g_pids, q_cams, g_cams)
    # Small integer features: every distance is exact, so any chunking of the products gives
    # the same floats (and many ties).
    qf = torch.from_numpy(rng.integers(-2, 3, (60, 16)).astype(np.float32))
    gf = torch.from_numpy(rng.integers(-2, 3, (250, 16)).astype(np.float32))
    # Cosine: vectors with four entries of +-1 have norm 2, so normalisation is exact too.
    qc = torch.zeros(60, 16)
    gc = torch.zeros(250, 16)
    for f in (qc, gc):
        for row in f:
            row[torch.from_numpy(rng.choice(16, 4, replace=False))] = torch.from_numpy(
                rng.choice([-1.0, 1.0], 4).astype(np.float32)
            )
    for metric, (q, g) in (("euclidean", (qf, gf)), ("cosine", (qc, gc))):
        for ap in ("standard", "market_trapezoid"):
            full = _quiet(evaluate_rank, compute_distance_matrix(q, g, metric), *labels, ap=ap)
            for chunk in (None, 1, 13):
                got = _quiet(evaluate_features, q, g, *labels, metric, chunk, 50, ap)
                np.testing.assert_array_equal(got[0], full[0])
                assert got[1:] == full[1:]


def test_compute_distance_matrix_values():
    torch.manual_seed(0)
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    sq = compute_distance_matrix(x, y, "euclidean")
    torch.testing.assert_close(sq, torch.cdist(x, y) ** 2)
    cos = compute_distance_matrix(x.numpy(), y.numpy(), "cosine")
    expected = 1 - (x / x.norm(dim=1, keepdim=True)) @ (y / y.norm(dim=1, keepdim=True)).T
    torch.testing.assert_close(cos, expected)
    assert compute_distance_matrix(x.half(), y.half()).dtype == torch.float32
    assert (compute_distance_matrix(x.float(), x.float()) >= 0).all()  # clamped
    with pytest.raises(ValueError, match="metric"):
        compute_distance_matrix(x, y, "manhattan")
    with pytest.raises(ValueError, match="feature dims"):
        compute_distance_matrix(x, y[:, :3])


def test_max_rank_larger_than_gallery_is_shrunk():
    d = np.array([[0.1, 0.2, 0.3]], dtype=np.float32)
    with pytest.warns(UserWarning, match="exceeds the gallery size 3"):
        cmc, _, _ = evaluate_rank(d, [1], [2, 1, 3], [0], [1, 1, 1], max_rank=50)
    np.testing.assert_allclose(cmc, [0.0, 1.0, 1.0])


def test_errors_are_clear():
    args = _labels_tuple(TOY_LABELS)
    with pytest.raises(ValueError, match="none of the 1 queries"):
        evaluate_rank(TOY_D[2:], [5], *args[1:2], [0], args[3], max_rank=5)
    bad = TOY_D.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        _quiet(evaluate_rank, bad, *args)
    with pytest.raises(ValueError, match="q_pids"):
        evaluate_rank(TOY_D, [1, 2], *args[1:])
    with pytest.raises(ValueError, match="ap="):
        evaluate_rank(TOY_D, *args, ap="interpolated")
    with pytest.raises(ValueError, match="chunk_size"):
        evaluate_rank(TOY_D, *args, max_rank=5, chunk_size=0)
    with pytest.raises(TypeError, match="integer labels"):
        evaluate_rank(TOY_D, np.array([1.0, 2.0, 5.0]), *args[1:])


def test_topk_gallery_follows_protocol():
    rng = np.random.default_rng(7)
    d, *labels = _random_problem(rng, 20, 60, levels=4)
    q_pids, g_pids, q_cams, g_cams = labels
    for dtype in (np.float32, np.float64):
        positions, matches, dists = topk_gallery(d.astype(dtype), *labels, k=10, chunk_size=6)
        for i in range(20):
            order = np.argsort(d[i], kind="stable")
            junk = (g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i])
            expected = order[~junk][:10]
            np.testing.assert_array_equal(positions[i].numpy(), expected)
            np.testing.assert_array_equal(matches[i].numpy(), g_pids[expected] == q_pids[i])
            np.testing.assert_array_equal(dists[i].numpy(), d[i, expected])
    # fewer than k non-junk items: padded with -1 / False
    pos, match, _ = topk_gallery(np.zeros((1, 3), np.float32), [1], [1, 2, 1], [0], [0, 0, 1], 3)
    assert pos.tolist() == [[1, 2, -1]] and match.tolist() == [[False, True, False]]


def test_inputs_that_require_grad_are_accepted():
    d = torch.from_numpy(TOY_D).requires_grad_(True)
    labels = _labels_tuple(TOY_LABELS)
    expected = _quiet(evaluate_rank, TOY_D, *labels, max_rank=5)
    got = _quiet(evaluate_rank, d, *labels, max_rank=5)
    assert got[1:] == expected[1:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_cpu():
    rng = np.random.default_rng(8)
    q_pids, g_pids = rng.integers(0, 30, 300), rng.integers(0, 30, 3000)
    labels = (q_pids, g_pids, rng.integers(0, 4, 300), rng.integers(0, 4, 3000))
    qf = torch.from_numpy(rng.integers(-2, 3, (300, 32)).astype(np.float32))
    gf = torch.from_numpy(rng.integers(-2, 3, (3000, 32)).astype(np.float32))
    for ap in ("standard", "market_trapezoid"):
        cpu = _quiet(evaluate_features, qf, gf, *labels, ap=ap, chunk_size=64)
        gpu = _quiet(evaluate_features, qf.cuda(), gf.cuda(), *labels, ap=ap, chunk_size=64)
        np.testing.assert_array_equal(cpu[0], gpu[0])
        assert cpu[1:] == gpu[1:]
        d = compute_distance_matrix(qf, gf).double()
        cpu64 = _quiet(evaluate_rank, d, *labels, ap=ap)
        gpu64 = _quiet(evaluate_rank, d.cuda(), *labels, ap=ap)
        assert cpu64[1:] == gpu64[1:] == cpu[1:]
    positions, matches, _ = topk_gallery(compute_distance_matrix(qf, gf).cuda(), *labels)
    expected = topk_gallery(compute_distance_matrix(qf, gf), *labels)
    assert torch.equal(positions.cpu(), expected[0]) and torch.equal(matches.cpu(), expected[1])
