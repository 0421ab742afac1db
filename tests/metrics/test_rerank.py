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
