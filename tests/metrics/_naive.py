"""Straightforward reference implementations used by the tests (loops, no tricks).

`naive_evaluate` follows the Market-1501 protocol query by query, the way torchreid's
`eval_market1501` is usually written (full stable argsort, remove same-pid same-camera items,
cumulative sums). `naive_re_ranking` follows the equations of Zhong et al. (CVPR 2017) with the
conventions of the released code (squared, row-normalised distances; N(p, k) holds k+1 items;
strict 2/3 test), with Python sets and loops and the Jaccard distance as sum-min / sum-max.
"""

from __future__ import annotations

import contextlib

import numpy as np


def naive_evaluate(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, ap="standard"):
    """(cmc, mAP, mINP, num_valid) by a loop over queries."""
    distmat = np.asarray(distmat)
    q_pids, g_pids = np.asarray(q_pids), np.asarray(g_pids)
    q_camids, g_camids = np.asarray(q_camids), np.asarray(g_camids)
    max_rank = min(max_rank, distmat.shape[1])
    order = np.argsort(distmat, axis=1, kind="stable")
    cmcs, aps, inps = [], [], []
    for i in range(distmat.shape[0]):
        ranked = order[i]
        junk = (g_pids[ranked] == q_pids[i]) & (g_camids[ranked] == q_camids[i])
        hits = (g_pids[ranked] == q_pids[i])[~junk].astype(np.int64)
        if not hits.any():
            continue
        positions = np.flatnonzero(hits)  # 0-based ranks of the true matches
        cmc = np.zeros(max_rank)
        cmc[positions[0] :] = 1.0
        cmcs.append(cmc)
        n = len(positions)
        precisions = [(j + 1) / (pos + 1) for j, pos in enumerate(positions)]
        if ap == "standard":
            aps.append(sum(precisions) / n)
        else:
            total = 0.0
            for j, pos in enumerate(positions):
                before = 1.0 if pos == 0 else j / pos
                total += (before + precisions[j]) / 2
            aps.append(total / n)
        inps.append(n / (positions[-1] + 1))
    if not cmcs:
        raise ValueError("no valid query")
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), len(cmcs)


def naive_query_ap(distmat, q_pids, g_pids, q_camids, g_camids, ap="standard"):
    """(num_q,) AP of each query by :func:`naive_evaluate` on that query alone; NaN when it has
    no true match in the gallery."""
    out = np.full(len(q_pids), np.nan)
    for i in range(len(q_pids)):
        with contextlib.suppress(ValueError):  # no valid query: stays NaN
            _, out[i], _, _ = naive_evaluate(
                np.asarray(distmat)[i : i + 1], np.asarray(q_pids)[i : i + 1], g_pids,
                np.asarray(q_camids)[i : i + 1], g_camids, ap=ap,
            )  # fmt: skip
    return out


def naive_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value):
    q_g_dist = np.asarray(q_g_dist, dtype=np.float64)
    num_q, num_g = q_g_dist.shape
    full = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]]).astype(np.float64) ** 2
    n = num_q + num_g
    # d(i, j): column-normalised then transposed, as the released code
    d = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            d[i, j] = full[j, i] / full[:, i].max()

    def neighbours(p, k):  # N(p, k): the k+1 nearest, p itself usually first; ties by index
        return [int(j) for j in np.argsort(d[p], kind="stable")[: k + 1]]

    def reciprocal(p, k):  # R(p, k) = {g in N(p, k) : p in N(g, k)}
        return {g for g in neighbours(p, k) if p in neighbours(g, k)}

    half = int(round(k1 / 2))
    V = np.zeros((n, n))
    for p in range(n):
        r_star = set(reciprocal(p, k1))
        base = reciprocal(p, k1)
        for q in base:
            r_half = reciprocal(q, half)
            if len(r_half & base) > 2 / 3 * len(r_half):
                r_star |= r_half
        weights = {g: np.exp(-d[p, g]) for g in r_star}
        total = sum(weights.values())
        for g, w in weights.items():
            V[p, g] = w / total
    if k2 != 1:
        V_qe = np.zeros_like(V)
        for p in range(n):
            nearest = np.argsort(d[p], kind="stable")[:k2]
            V_qe[p] = V[nearest].mean(axis=0)
        V = V_qe
    out = np.zeros((num_q, num_g))
    for i in range(num_q):
        for j in range(num_g):
            g = num_q + j
            jaccard = 1 - np.minimum(V[i], V[g]).sum() / np.maximum(V[i], V[g]).sum()
            out[i, j] = (1 - lambda_value) * jaccard + lambda_value * d[i, g]
    return out


def naive_k_reciprocal_jaccard(features, k1, k2, metric="euclidean"):
    """Dense (N, N) Jaccard distance by loops and sets, cluster-contrast-reid's conventions.

    ``compute_jaccard_distance`` with its faiss search replaced by a stable argsort of the dense
    distances: N(i) holds k1 items, the half sets round(k1/2)+1 (capped at k1), V weights
    exp(-d) normalised over R*(i), k2 query expansion over the first k2 items of N(i), then
    jaccard = 1 - sum min / sum max, clamped at 0.
    """
    x = np.asarray(features, dtype=np.float64)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    d = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            d[i, j] = ((x[i] - x[j]) ** 2).sum()
    order = np.argsort(d, axis=1, kind="stable")[:, :k1]

    def reciprocal(p, k):
        k = min(k, k1)
        return {int(g) for g in order[p, :k] if p in order[g, :k]}

    half = int(round(k1 / 2)) + 1
    V = np.zeros((n, n))
    for p in range(n):
        base = reciprocal(p, k1)
        r_star = set(base)
        for c in base:
            r_half = reciprocal(c, half)
            if len(r_half & base) > 2 / 3 * len(r_half):
                r_star |= r_half
        total = sum(np.exp(-d[p, g]) for g in r_star)
        for g in r_star:
            V[p, g] = np.exp(-d[p, g]) / total
    if k2 != 1:
        V = np.stack([V[order[p, :k2]].mean(axis=0) for p in range(n)])
    out = np.ones((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = 1 - np.minimum(V[i], V[j]).sum() / np.maximum(V[i], V[j]).sum()
    return np.maximum(out, 0.0)
