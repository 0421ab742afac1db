"""k-reciprocal re-ranking against a loop implementation of the paper's equations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from src.metrics.functional import compute_distance_matrix, re_ranking
from tests.metrics._naive import naive_re_ranking


def _blobs(rng, num_q, num_g, num_ids=4, dim=3):
    centres = rng.standard_normal((num_ids, dim)) * 2
    q = centres[rng.integers(0, num_ids, num_q)] + rng.standard_normal((num_q, dim))
    g = centres[rng.integers(0, num_ids, num_g)] + rng.standard_normal((num_g, dim))
    return torch.tensor(q, dtype=torch.float32), torch.tensor(g, dtype=torch.float32)


@pytest.mark.parametrize(("k1", "k2"), [(4, 2), (5, 1), (6, 3), (3, 4)])
def test_matches_naive_paper_implementation(k1, k2):
    rng = np.random.default_rng(k1 * 10 + k2)
    qf, gf = _blobs(rng, 5, 16)
    qg = compute_distance_matrix(qf, gf).sqrt()  # plain Euclidean distances as input
    qq = compute_distance_matrix(qf, qf).sqrt()
    gg = compute_distance_matrix(gf, gf).sqrt()
    expected = naive_re_ranking(qg.numpy(), qq.numpy(), gg.numpy(), k1, k2, 0.3)
    got = re_ranking(qg, qq, gg, k1=k1, k2=k2, lambda_value=0.3)
    assert got.shape == (5, 16) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_lambda_extremes():
    rng = np.random.default_rng(0)
    qf, gf = _blobs(rng, 4, 12)
    qg, qq, gg = (compute_distance_matrix(a, b).numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf)))
    # lambda = 1: the original distances, squared and divided by the row maximum over q+g items
    full = np.block([[qq, qg], [qg.T, gg]]).astype(np.float64) ** 2
    expected = full[:4, 4:] / full.max(axis=0)[:4, None]
    np.testing.assert_allclose(re_ranking(qg, qq, gg, 3, 2, 1.0), expected, rtol=1e-6)
    # lambda = 0: pure Jaccard distance, in [0, 1]
    jac = re_ranking(qg, qq, gg, 3, 2, 0.0)
    assert jac.min() >= -1e-6 and jac.max() <= 1.0 + 1e-6
    np.testing.assert_allclose(jac, naive_re_ranking(qg, qq, gg, 3, 2, 0.0), atol=2e-6)


def test_re_ranking_improves_retrieval_on_clusters():
    # Sanity of direction: on well-separated identities re-ranking keeps rank-1 at 1.
    from src.metrics.functional import evaluate_rank

    rng = np.random.default_rng(1)
    centres = rng.standard_normal((6, 8)) * 3
    q_pids, g_pids = np.arange(6), np.repeat(np.arange(6), 5)
    qf = torch.tensor(centres[q_pids] + rng.standard_normal((6, 8)) * 0.3, dtype=torch.float32)
    gf = torch.tensor(centres[g_pids] + rng.standard_normal((30, 8)) * 0.3, dtype=torch.float32)
    rr = re_ranking(
        compute_distance_matrix(qf, gf),
        compute_distance_matrix(qf, qf),
        compute_distance_matrix(gf, gf),
        k1=6,
        k2=3,
    )
    cmc, mAP, _ = evaluate_rank(rr, q_pids, g_pids, np.zeros(6, int), np.ones(30, int), 10)
    assert cmc[0] == 1.0 and mAP == 1.0


def test_input_validation():
    qg, qq, gg = np.ones((2, 5)), np.zeros((2, 2)), np.zeros((5, 5))
    with pytest.raises(ValueError, match="q_q_dist"):
        re_ranking(qg, np.zeros((3, 3)), gg)
    with pytest.raises(ValueError, match="k1"):
        re_ranking(qg, qq, gg, k1=0)
    with pytest.raises(ValueError, match="lambda_value"):
        re_ranking(qg, qq, gg, k1=2, k2=1, lambda_value=1.5)
    with pytest.raises(ValueError, match="must not exceed"):
        re_ranking(qg, qq, gg, k1=20)
    bad = qg.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        re_ranking(bad, qq, gg, k1=2, k2=1)


# ---------------------------------------------------------------------------------------------
# Chunked re-ranking from features (evaluate_reranked / re_ranking_features) vs the dense one
# ---------------------------------------------------------------------------------------------
def _dense_reference(qf, gf, k1, k2, lam, metric):
    d = {m: compute_distance_matrix(a, b, metric) for m, (a, b) in
         {"qg": (qf, gf), "qq": (qf, qf), "gg": (gf, gf)}.items()}  # fmt: skip
    return re_ranking(d["qg"], d["qq"], d["gg"], k1=k1, k2=k2, lambda_value=lam)


@pytest.mark.parametrize(
    ("k1", "k2", "lam", "metric", "chunk"),
    [(20, 6, 0.3, "euclidean", None), (5, 1, 0.0, "cosine", 1), (7, 3, 1.0, "euclidean", 4),
     (3, 12, 0.5, "cosine", 7), (10, 2, 0.3, "euclidean", 1)],
)  # fmt: skip
def test_chunked_equals_dense_reference(k1, k2, lam, metric, chunk):
    from src.metrics import re_ranking_features

    rng = np.random.default_rng(k1 + k2)
    qf, gf = _blobs(rng, 30, 90, num_ids=6, dim=5)
    expected = _dense_reference(qf, gf, k1, k2, lam, metric)
    got = re_ranking_features(qf, gf, k1, k2, lam, metric, chunk_size=chunk)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, atol=3e-7)


def test_chunked_equals_dense_with_ties_and_tiny_budgets(monkeypatch):
    from src.metrics import re_ranking_features
    from src.metrics import rerank as RR

    monkeypatch.setattr(RR, "_PAIR_BUDGET", 40)
    monkeypatch.setattr(RR, "_SET_BUDGET", 50)
    rng = np.random.default_rng(3)
    # integer grid features: exact, symmetric distances with many ties and duplicates
    qf = torch.tensor(rng.integers(0, 3, (12, 2)), dtype=torch.float32)
    gf = torch.tensor(rng.integers(0, 3, (40, 2)), dtype=torch.float32)
    for k1, k2 in ((6, 3), (4, 1)):
        expected = _dense_reference(qf, gf, k1, k2, 0.3, "euclidean")
        got = re_ranking_features(qf, gf, k1, k2, 0.3, chunk_size=5)
        np.testing.assert_allclose(got.numpy(), expected, atol=3e-7)


def test_evaluate_reranked_equals_dense_protocol_with_junk_and_distractors():
    from src.metrics import evaluate_rank, evaluate_reranked

    rng = np.random.default_rng(7)
    centres = rng.standard_normal((8, 6)) * 1.5
    q_pids = rng.integers(1, 8, 25)
    g_pids = np.concatenate([rng.integers(1, 8, 70), np.zeros(20, int)])  # 20 distractors
    q_cams, g_cams = rng.integers(0, 3, 25), rng.integers(0, 3, 90)  # same-camera junk
    qf = torch.tensor(centres[q_pids] + rng.standard_normal((25, 6)), dtype=torch.float32)
    gf = torch.tensor(centres[g_pids] + rng.standard_normal((90, 6)), dtype=torch.float32)
    labels = (q_pids, g_pids, q_cams, g_cams)
    dense = _dense_reference(qf, gf, 8, 3, 0.3, "euclidean")
    for chunk in (None, 1, 6):
        for ap in ("standard", "market_trapezoid"):
            exp = evaluate_rank(dense, *labels, max_rank=20, ap=ap)
            got = evaluate_reranked(qf, gf, *labels, k1=8, k2=3, chunk_size=chunk, max_rank=20,
                                    ap=ap)  # fmt: skip
            np.testing.assert_array_equal(got[0], exp[0])
            assert got[1:] == pytest.approx(exp[1:], abs=1e-12)


def test_chunked_input_validation():
    from src.metrics import evaluate_reranked, re_ranking_features

    qf, gf = torch.zeros(2, 3), torch.zeros(5, 3)
    with pytest.raises(ValueError, match="must not exceed"):
        re_ranking_features(qf, gf, k1=20)
    with pytest.raises(ValueError, match="lambda_value"):
        re_ranking_features(qf, gf, k1=2, lambda_value=-0.1)
    with pytest.raises(ValueError, match="feature dims differ"):
        re_ranking_features(qf, torch.zeros(5, 4), k1=2)
    with pytest.raises(ValueError, match="q_pids"):
        evaluate_reranked(qf, gf, [1], [1] * 5, [0, 0], [1] * 5, k1=2, k2=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_reranking_matches_cpu_and_stays_on_device():
    from src.metrics import re_ranking_features

    rng = np.random.default_rng(0)
    qf, gf = _blobs(rng, 60, 300, num_ids=10, dim=16)
    cpu = re_ranking_features(qf, gf)
    gpu = re_ranking_features(qf.cuda(), gf.cuda())
    assert gpu.is_cuda
    np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-5)
