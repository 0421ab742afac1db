"""Naive per-sample reference implementations written from the papers' definitions.

Deliberately loop-based and float64, used only to check the vectorised losses. Self pairs are
excluded from the positives (the paper's definition): the random batches in the tests give every
identity at least two samples, and the self-only case is tested separately.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def make_labels(sizes: list[int], seed: int = 0) -> Tensor:
    """Shuffled labels with the given number of samples per identity (unequal sizes)."""
    labels = torch.cat([torch.full((s,), pid, dtype=torch.long) for pid, s in enumerate(sizes)])
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return labels[perm]


def pair_dist(a: Tensor, b: Tensor) -> Tensor:
    """‖a − b‖₂ of two vectors (not differentiable at a == b)."""
    return torch.sqrt(((a - b) ** 2).sum())


def naive_mining(
    x: Tensor, labels: Tensor
) -> tuple[list[Tensor], list[Tensor], list[int], list[int]]:
    """Per anchor: hardest positive (max distance, self excluded), hardest negative (min).

    Ties go to the lowest index (strict comparisons while scanning in index order).
    """
    n = x.size(0)
    dist_ap, dist_an, p_inds, n_inds = [], [], [], []
    for a in range(n):
        best_p, best_p_idx, best_n, best_n_idx = None, -1, None, -1
        for j in range(n):
            if j == a:
                continue
            d = pair_dist(x[a], x[j])
            if labels[j] == labels[a]:
                if best_p is None or d.item() > best_p.item():
                    best_p, best_p_idx = d, j
            elif best_n is None or d.item() < best_n.item():
                best_n, best_n_idx = d, j
        dist_ap.append(best_p)
        dist_an.append(best_n)
        p_inds.append(best_p_idx)
        n_inds.append(best_n_idx)
    return dist_ap, dist_an, p_inds, n_inds


def hinge(dist_ap: Tensor, dist_an: Tensor, margin: float | None) -> Tensor:
    """One triplet term: max(0, d_ap − d_an + m), or log(1 + exp(d_ap − d_an)) without margin."""
    if margin is None:
        return torch.log1p(torch.exp(dist_ap - dist_an))
    return torch.clamp(dist_ap - dist_an + margin, min=0)


def naive_batch_hard_triplet(
    x: Tensor, labels: Tensor, margin: float | None, normalize_feature: bool = False
) -> Tensor:
    if normalize_feature:
        x = torch.stack([row / (torch.sqrt((row**2).sum()) + 1e-12) for row in x])
    dist_ap, dist_an, _, _ = naive_mining(x, labels)
    terms = [hinge(ap, an, margin) for ap, an in zip(dist_ap, dist_an)]
    return torch.stack(terms).mean()


def naive_shortest_path(cost: Tensor) -> Tensor:
    """The AlignedReID reference double loop over a (m, n) grid."""
    m, n = cost.shape
    dist = [[None] * n for _ in range(m)]
    for i in range(m):
        for j in range(n):
            if i == 0 and j == 0:
                dist[i][j] = cost[i, j]
            elif i == 0:
                dist[i][j] = dist[i][j - 1] + cost[i, j]
            elif j == 0:
                dist[i][j] = dist[i - 1][j] + cost[i, j]
            else:
                dist[i][j] = torch.min(dist[i - 1][j], dist[i][j - 1]) + cost[i, j]
    return dist[-1][-1]


def naive_local_pair_dist(a: Tensor, b: Tensor) -> Tensor:
    """Aligned distance of two local features (m, d) and (n, d) from the paper's definition."""
    m, n = a.size(0), b.size(0)
    cost = torch.stack(
        [torch.stack([_element_dist(a[i], b[j]) for j in range(n)]) for i in range(m)]
    )
    return naive_shortest_path(cost)


def _element_dist(u: Tensor, v: Tensor) -> Tensor:
    d = pair_dist(u, v)
    return (torch.exp(d) - 1.0) / (torch.exp(d) + 1.0)


def softplus_scalar(v: float) -> float:
    return math.log1p(math.exp(v))
