"""ROC (TPR at fixed FPR) and alpha-query expansion against loop versions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from src.metrics.query_expansion import aqe
from src.metrics.roc import tpr_at_fpr


def _loop_roc(d, q_pids, g_pids, q_cams, g_cams, fprs):
    """Every threshold swept: max TPR(t) over t with FPR(t) <= x (accept d <= t)."""
    pos, neg = [], []
    for i in range(d.shape[0]):
        for j in range(d.shape[1]):
            if g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i]:
                continue  # junk
            (pos if g_pids[j] == q_pids[i] else neg).append(d[i, j])
    pos, neg = np.array(pos), np.array(neg)
    out = {}
    for x in fprs:
        best = 0.0
        for t in np.concatenate([[-np.inf], pos, neg]):
            if (neg <= t).mean() <= x:
                best = max(best, (pos <= t).mean())
        out[f"TPR@FPR={x:.0e}"] = best
    return out


def _problem(seed, num_q=30, num_g=80, levels=None):
    rng = np.random.default_rng(seed)
    q_pids, g_pids = rng.integers(0, 6, num_q), rng.integers(0, 7, num_g)  # pid 6: distractors
    q_cams, g_cams = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
    d = rng.random((num_q, num_g)) + 0.5 * (g_pids[None] != q_pids[:, None])
    if levels:
        d = np.round(d * levels) / levels  # many ties
    return d.astype(np.float32), q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize(("seed", "levels", "chunk"), [(0, None, None), (1, 7, 1), (2, 3, 4)])
def test_tpr_at_fpr_matches_threshold_sweep(seed, levels, chunk):
    d, *labels = _problem(seed, levels=levels)
    fprs = (1e-3, 0.01, 0.05, 0.3)
    got = tpr_at_fpr(d, *labels, fprs=fprs, chunk_size=chunk)
    assert got == pytest.approx(_loop_roc(d, *labels, fprs), abs=1e-12)


def test_tpr_at_fpr_extremes_and_errors():
    d = np.array([[0.1, 0.2, 0.9]], dtype=np.float32)
    labels = ([1], [1, 2, 3], [0], [1, 1, 1])
    # one positive (0.1), two negatives (0.2, 0.9): FPR 1/2 reaches the positive already
    assert tpr_at_fpr(d, *labels, fprs=(0.4, 0.6)) == {"TPR@FPR=4e-01": 1.0, "TPR@FPR=6e-01": 1.0}
    d2 = np.array([[0.5, 0.2, 0.9]], dtype=np.float32)
    assert tpr_at_fpr(d2, *labels, fprs=(0.4, 0.6)) == {"TPR@FPR=4e-01": 0.0, "TPR@FPR=6e-01": 1.0}
    with pytest.raises(ValueError, match="positive and negative pairs"):
        tpr_at_fpr(d, [5], [1, 2, 3], [0], [1, 1, 1])
    with pytest.raises(ValueError, match="fprs"):
        tpr_at_fpr(d, *labels, fprs=(0.0,))


def _loop_aqe(qf, gf, qe_times, qe_k, alpha):
    x = np.concatenate([qf, gf]).astype(np.float64)
    for _ in range(qe_times):
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        new = np.empty_like(x)
        for i in range(len(x)):
            sim = unit @ unit[i]
            top = np.argsort(-sim, kind="stable")[:qe_k]
            new[i] = sum(sim[j] ** alpha * x[j] for j in top) / qe_k
        x = new
    return x[: len(qf)], x[len(qf) :]


@pytest.mark.parametrize(("times", "k", "alpha", "chunk"), [(1, 5, 3.0, None), (2, 3, 1.0, 1),
                                                             (1, 10, 3.0, 7)])  # fmt: skip
def test_aqe_matches_loop(times, k, alpha, chunk):
    rng = np.random.default_rng(times * 10 + k)
    qf = rng.standard_normal((12, 6)).astype(np.float32) + 1.0  # mostly positive similarities
    gf = rng.standard_normal((40, 6)).astype(np.float32) + 1.0
    eq, eg = aqe(torch.from_numpy(qf), torch.from_numpy(gf), times, k, alpha, chunk_size=chunk)
    rq, rg = _loop_aqe(qf, gf, times, k, alpha)
    np.testing.assert_allclose(eq.numpy(), rq, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(eg.numpy(), rg, rtol=2e-5, atol=1e-6)


def test_aqe_of_exact_duplicates_is_their_weighted_mean():
    # two identical pairs far apart: with qe_k=2 each item averages itself and its twin
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 2.0]])
    q, g = aqe(x[:1], x[1:], qe_times=1, qe_k=2, alpha=3.0)
    out = torch.cat([q, g])
    torch.testing.assert_close(out, x)  # cos = 1 -> weights 1 -> mean of equal rows
    assert F.normalize(out, dim=1).shape == (4, 2)
    with pytest.raises(ValueError, match="qe_k"):
        aqe(x[:1], x[1:], qe_k=5)
