"""Verification ROC of a re-ID evaluation: TPR at fixed FPR over all query-gallery pairs.

Pairs are those the ranking protocol keeps: for each query, every gallery item except the
same-identity same-camera ones ("junk"). A pair is positive when the identities match
(distractors are negatives). A pair is accepted when its distance is at most a threshold t;
``TPR(t)`` and ``FPR(t)`` are the accepted fractions of positive and negative pairs, and
``TPR@FPR=x = max {TPR(t) : FPR(t) <= x}`` (the ROC's upper envelope at x, ties included:
a threshold accepts every pair at that distance).

Chunked and exact: with ``m = floor(x * num_negatives)``, the answer is the fraction of
positives strictly closer than the (m+1)-th smallest negative distance, so only the positive
distances (few) and the ``m_max + 1`` smallest negative ones seen so far are kept (at most
1 % of the negatives for x <= 1e-2; candidates are filtered against the current cut first).

FastReID's ``evaluate_roc`` feeds sklearn's ``roc_curve`` with the *non-matches* as the positive
class (labels 0 for matches, 1 for non-matches, distances as scores) and reads the point
nearest to each FPR; its "TPR@FPR=x" is therefore ``1 - FAR`` at a match-rejection rate of x,
not the verification TPR computed here (documented in docs/evaluation.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from src.metrics._inputs import ArrayLike, _chunk_rows
from src.metrics.rank import Labels, _as_distmat, _distmat_blocks, _labels

__all__ = ["DEFAULT_FPRS", "ROCAccumulator", "roc_key", "tpr_at_fpr"]

DEFAULT_FPRS = (1e-4, 1e-3, 1e-2)


def roc_key(fpr: float) -> str:
    """Result-dict key of TPR at ``fpr``: ``"TPR@FPR=1e-04"`` (FastReID's names)."""
    return f"TPR@FPR={fpr:.0e}"


class ROCAccumulator:
    """Observer of (start, stop, distances (rows, num_g)) query blocks; see the module doc."""

    def __init__(self, labels: Labels, fprs: Sequence[float] = DEFAULT_FPRS) -> None:
        q_pids, g_pids, q_camids, g_camids = labels
        for x in fprs:
            if not 0.0 < float(x) < 1.0:
                raise ValueError(f"fprs: expected values in (0, 1), got {x!r}")
        self.labels, self.fprs = labels, tuple(float(x) for x in fprs)
        # pair counts from the labels alone
        uniq, counts = torch.unique(g_pids, return_counts=True)
        slot = torch.searchsorted(uniq, q_pids).clamp_(max=uniq.numel() - 1)
        same_pid = torch.where(uniq[slot] == q_pids, counts[slot], 0)
        self.num_neg = int(len(g_pids) * len(q_pids) - int(same_pid.sum()))
        self.keep = [math.floor(x * self.num_neg) for x in self.fprs]
        self.capacity = max(self.keep) + 1
        self.pos: list[Tensor] = []
        self.neg = torch.empty(0)
        self.cut = math.inf  # the capacity-th smallest negative so far, once full

    def __call__(self, start: int, stop: int, dist: Tensor) -> None:
        q_pids, g_pids, q_camids, g_camids = self.labels
        same_pid = g_pids.unsqueeze(0) == q_pids[start:stop].unsqueeze(1)
        same_cam = g_camids.unsqueeze(0) == q_camids[start:stop].unsqueeze(1)
        self.pos.append(dist[same_pid & ~same_cam].cpu())
        neg = dist[~same_pid & (dist < self.cut)]
        if self.neg.numel() == 0:
            self.neg = self.neg.to(dist)
        merged = torch.cat([self.neg, neg])
        if merged.numel() >= self.capacity:
            merged = torch.topk(merged, self.capacity, largest=False, sorted=False).values
            self.cut = float(merged.max())
        self.neg = merged

    def result(self) -> dict[str, float]:
        pos = torch.cat(self.pos) if self.pos else torch.empty(0)
        if pos.numel() == 0 or self.num_neg == 0:
            raise ValueError(
                f"ROC needs positive and negative pairs, got {pos.numel()} positive and "
                f"{self.num_neg} negative pairs (check the query/gallery pids and camids)"
            )
        neg = torch.sort(self.neg.cpu()).values
        out = {}
        for x, m in zip(self.fprs, self.keep, strict=True):
            # m < num_neg (x < 1): accept every positive strictly below the (m+1)-th negative
            out[roc_key(x)] = int((pos < neg[m]).sum()) / pos.numel()
        return out


def tpr_at_fpr(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    fprs: Sequence[float] = DEFAULT_FPRS,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """``{"TPR@FPR=1e-04": ..., ...}`` of a (num_q, num_g) distance matrix, chunk by chunk.

    Pairs, positives and the TPR@FPR definition: see :mod:`src.metrics.roc`. Values are
    fractions in [0, 1]. For features, pass a ``ROCAccumulator`` as an observer of the
    evaluation instead (``evaluate_features(..., roc=True)`` does), so no matrix is built.
    """
    d = _as_distmat(distmat)
    if bool(torch.isnan(d).any()):
        raise ValueError("distance matrix contains NaN")
    num_q, num_g = d.shape
    labels = _labels(q_pids, g_pids, q_camids, g_camids, num_q, num_g, d.device)
    acc = ROCAccumulator(labels, fprs)
    for start, stop, block in _distmat_blocks(d, _chunk_rows(chunk_size, num_q, num_g, d.device)):
        acc(start, stop, block)
    return acc.result()
