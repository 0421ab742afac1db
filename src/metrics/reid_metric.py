"""`ReIDMetric`: the Market-1501 evaluation as a torchmetrics Metric (DDP-safe)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from src.metrics._inputs import (
    _AP_VARIANTS,
    _METRICS,
    _as_labels,
    _check_choice,
    _check_positive_int,
    _chunk_rows,
)
from src.metrics.query_expansion import aqe as _aqe
from src.metrics.rank import (
    Blocks,
    _Accumulator,
    _evaluate_blocks,
    _feature_blocks,
    _labels,
    _topk_blocks,
)
from src.metrics.rerank import _Reranking, _reranking
from src.metrics.roc import DEFAULT_FPRS, ROCAccumulator

__all__ = ["RankList", "ReIDMetric", "evaluate_split"]


class RankList(NamedTuple):
    """Top-k gallery lists of the last evaluation (see :meth:`ReIDMetric.topk_gallery`).

    query_index (Q,): dataset ``index`` of each query, ascending.
    gallery_index (Q, k): dataset ``index`` of the gallery items in rank order (-1 = none).
    matches (Q, k) bool: the gallery item has the query's identity.
    distances (Q, k): their distances to the query (re-ranked ones when ``rerank=True``).
    ap (Q,) float64: each query's AP (NaN: no true match in the gallery, not scored).
    """

    query_index: Tensor
    gallery_index: Tensor
    matches: Tensor
    distances: Tensor
    ap: Tensor | None = None


@dataclass
class _Split:
    """De-duplicated query/gallery data of the last compute(), sorted by dataset index."""

    qf: Tensor
    gf: Tensor
    q_pids: Tensor
    g_pids: Tensor
    q_camids: Tensor
    g_camids: Tensor
    q_index: Tensor
    g_index: Tensor
    reranking: _Reranking | None = None  # the k-reciprocal state, when rerank=True
    query_ap: Tensor | None = None  # (Q,) float64 AP of each query (NaN: no true match)

    @property
    def labels(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.q_pids, self.g_pids, self.q_camids, self.g_camids


class ReIDMetric(Metric):
    """Market-1501 protocol over features collected batch by batch (query and gallery mixed).

    ``update(features, pids, camids, is_query, index)`` stores a batch; ``compute()`` gathers
    all ranks' batches (list states with ``dist_reduce_fx="cat"``), drops the repeats that
    ``DistributedSampler`` padding adds (the first occurrence of each ``(is_query, index)`` is
    kept; query and gallery indices may overlap since they index different lists), splits query
    and gallery, sorts each by ``index`` (so the result does not depend on how samples were
    sharded, ties included) and evaluates with :func:`~src.metrics.rank.evaluate_features`
    (chunked, on the features' device) or, with ``rerank=True``, the chunked k-reciprocal
    re-ranking (:func:`~src.metrics.rerank.evaluate_reranked`), optionally after alpha-query
    expansion (``aqe=True``) and with TPR at FPR 1e-4/1e-3/1e-2 (``roc=True``).

    Every rank computes the same result. It returns a dict of Python floats
    ``{"rank1", "rank5", "rank10", "mAP", "mINP"}`` (fractions in [0, 1]; with ``roc=True``
    also ``"TPR@FPR=1e-04"``, ``"TPR@FPR=1e-03"``, ``"TPR@FPR=1e-02"``); after it,
    :attr:`last_cmc` holds the CMC curve (numpy, length ``max_rank``) and :meth:`topk_gallery`
    gives rank lists for pictures (until :meth:`reset`).

    Args:
        metric: ``"euclidean"`` (squared) or ``"cosine"`` distance.
        normalize: L2-normalise features before the distance (the MAR protocol uses unit-norm
            features with cosine distance, for which it makes no difference).
        rerank: evaluate k-reciprocal re-ranked distances with ``k1``, ``k2``, ``lambda_value``
            (chunked: O((Q+G) k) memory plus one chunk; the cost is the (Q+G)^2 distances).
        aqe: alpha-query expansion of query and gallery features first (FastReID's ``aqe``
            with ``qe_times``, ``qe_k``, ``alpha``; FastReID config defaults 1, 5, 3.0).
        roc: also report TPR at FPR 1e-4, 1e-3, 1e-2 (:mod:`src.metrics.roc`).
        ap: ``"standard"`` or ``"market_trapezoid"`` (official Market-1501 AP, MAR paper).
        max_rank: length of :attr:`last_cmc` (ranks 1/5/10 are always reported).
        chunk_size: queries per chunk of the distance computation (None: automatic).
        flip: recorded only: flip averaging (mean of the features of an image and of its
            horizontal flip) happens in the caller's feature extraction, which can read it here.
        **kwargs: torchmetrics options, e.g. ``compute_on_cpu=True`` (move the stored features
            to CPU after each update, for galleries too large for the accelerator),
            ``sync_on_compute``, ``process_group``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    features: list[Tensor]
    pids: list[Tensor]
    camids: list[Tensor]
    is_query: list[Tensor]
    index: list[Tensor]

    def __init__(
        self,
        metric: str = "euclidean",
        normalize: bool = False,
        rerank: bool = False,
        k1: int = 20,
        k2: int = 6,
        lambda_value: float = 0.3,
        ap: str = "standard",
        max_rank: int = 50,
        chunk_size: int | None = None,
        flip: bool = False,
        aqe: bool = False,
        qe_times: int = 1,
        qe_k: int = 5,
        alpha: float = 3.0,
        roc: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_choice(metric, _METRICS, "metric")
        _check_choice(ap, _AP_VARIANTS, "ap")
        self.metric = metric
        self.normalize = bool(normalize)
        self.rerank = bool(rerank)
        self.k1, self.k2 = _check_positive_int(k1, "k1"), _check_positive_int(k2, "k2")
        if not 0.0 <= lambda_value <= 1.0:
            raise ValueError(f"lambda_value={lambda_value!r}: expected a value in [0, 1]")
        self.lambda_value = float(lambda_value)
        self.ap = ap
        self.max_rank = _check_positive_int(max_rank, "max_rank")
        if chunk_size is not None:
            _check_positive_int(chunk_size, "chunk_size")
        self.chunk_size = chunk_size
        self.flip = bool(flip)
        self.aqe = bool(aqe)
        self.qe_times = _check_positive_int(qe_times, "qe_times")
        self.qe_k = _check_positive_int(qe_k, "qe_k")
        self.alpha = float(alpha)
        self.roc = bool(roc)
        for name in ("features", "pids", "camids", "is_query", "index"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.last_cmc: np.ndarray | None = None
        self._evaluated: _Split | None = None

    def update(
        self, features: Tensor, pids: Tensor, camids: Tensor, is_query: Tensor, index: Tensor
    ) -> None:
        """Store a batch: features (B, D); pids, camids, is_query (bool), index: (B,)."""
        if features.dim() != 2:
            raise ValueError(f"features: expected (B, D), got shape {tuple(features.shape)}")
        batch = features.shape[0]
        for name, value in (("pids", pids), ("camids", camids), ("is_query", is_query)):
            if value.shape != (batch,):
                raise ValueError(f"{name}: expected shape ({batch},), got {tuple(value.shape)}")
        if index.shape != (batch,):
            raise ValueError(f"index: expected shape ({batch},), got {tuple(index.shape)}")
        self.features.append(features.detach())
        # int64 everywhere: every backend all-gathers it (gloo has no bool all_gather).
        self.pids.append(pids.detach().long())
        self.camids.append(camids.detach().long())
        self.is_query.append(is_query.detach().long())
        self.index.append(index.detach().long())

    def _deduplicated(self) -> _Split:
        if isinstance(self.features, list) and not self.features:
            raise ValueError("ReIDMetric.compute() called before any update()")
        feats = dim_zero_cat(self.features)
        feats = feats.float() if feats.dtype in (torch.float16, torch.bfloat16) else feats
        n = feats.shape[0]
        device = feats.device
        # An empty rank contributes float placeholders: cast the labels back to int64.
        pids, camids, is_query, index = (
            _as_labels(dim_zero_cat(state).long(), name, n, device)
            for name, state in (
                ("pids", self.pids),
                ("camids", self.camids),
                ("is_query", self.is_query),
                ("index", self.index),
            )
        )
        if n and int(index.min()) < 0:
            raise ValueError("index: dataset indices must be >= 0")
        # First occurrence of each (index, is_query), sorted by that key.
        key = index * 2 + (is_query != 0).long()
        order = torch.sort(key, stable=True).indices
        sorted_key = key[order]
        first = torch.ones(n, dtype=torch.bool, device=device)
        first[1:] = sorted_key[1:] != sorted_key[:-1]
        keep = order[first]
        group_keep = keep[torch.cumsum(first, 0) - 1]  # the kept sample of each sample's key
        bad = (pids[order] != pids[group_keep]) | (camids[order] != camids[group_keep])
        if bool(bad.any()):
            dup = int(index[order][bad][0])
            raise ValueError(
                f"index {dup} was updated twice with different pid/camid: repeated samples "
                "must be the same dataset record (check the `index` passed to update())"
            )
        query = is_query[keep] != 0
        q, g = keep[query], keep[~query]
        if len(q) == 0 or len(g) == 0:
            raise ValueError(
                f"ReIDMetric needs queries and gallery items, got {len(q)} queries and "
                f"{len(g)} gallery items (check is_query)"
            )
        if self.normalize:
            feats = F.normalize(feats, dim=1)
        return _Split(
            feats[q], feats[g], pids[q], pids[g], camids[q], camids[g], index[q], index[g]
        )

    def compute(self) -> dict[str, float]:
        split = self._deduplicated()
        if self.aqe:
            split.qf, split.gf = _aqe(split.qf, split.gf, self.qe_times, self.qe_k, self.alpha)
        num_q, num_g = len(split.q_pids), len(split.g_pids)
        max_rank = min(max(self.max_rank, 10), num_g)
        rows = _chunk_rows(self.chunk_size, num_q, num_g, split.qf.device)
        if self.rerank:
            split.reranking = _reranking(
                split.qf, split.gf, self.k1, self.k2, self.lambda_value, self.metric,
                self.chunk_size,
            )  # fmt: skip
            blocks = split.reranking.blocks(rows)
        else:
            blocks = _feature_blocks(split.qf, split.gf, self.metric, rows)
        roc = ROCAccumulator(split.labels, DEFAULT_FPRS) if self.roc else None
        acc = _Accumulator(self.ap)
        cmc, mAP, mINP = _evaluate_blocks(
            blocks, split.labels, max_rank, self.ap, "ReIDMetric", [roc] if roc else (), acc
        )
        split.query_ap = torch.from_numpy(acc.query_ap())
        self._evaluated = split
        self.last_cmc = cmc[: self.max_rank]

        def rank(k: int) -> float:  # CMC is 1 beyond the gallery size for valid queries
            return float(cmc[min(k, len(cmc)) - 1])

        out = {
            "rank1": rank(1),
            "rank5": rank(5),
            "rank10": rank(10),
            "mAP": float(mAP),
            "mINP": float(mINP),
        }
        if roc is not None:
            out.update(roc.result())
        return out

    def topk_gallery(self, k: int = 10) -> RankList:
        """Top-k gallery lists of every query of the last :meth:`compute`, ranked by the
        evaluation protocol (same-identity same-camera items skipped, ties by gallery order).
        """
        if self._evaluated is None:
            raise RuntimeError("topk_gallery() needs a compute() first (and no reset() since)")
        s = self._evaluated
        k = min(_check_positive_int(k, "k"), len(s.g_pids))
        rows = _chunk_rows(self.chunk_size, len(s.q_pids), len(s.g_pids), s.qf.device)
        if s.reranking is not None:
            blocks = s.reranking.blocks(rows)
        else:
            blocks = _feature_blocks(s.qf, s.gf, self.metric, rows)
        positions, matches, dists = _topk_blocks(blocks, s.labels, k)
        g_index = s.g_index.to(positions.device)
        gallery_index = torch.where(positions >= 0, g_index[positions.clamp(min=0)], -1)
        return RankList(s.q_index, gallery_index, matches, dists, s.query_ap)

    def reset(self) -> None:
        super().reset()
        self.last_cmc = None
        self._evaluated = None


def evaluate_split(
    qf: Tensor,
    gf: Tensor,
    labels: tuple[Tensor, Tensor, Tensor, Tensor],
    metric: str = "euclidean",
    ap: str = "standard",
    rerank: tuple[int, int, float] | None = None,
    aqe: bool = False,
    qe_times: int = 1,
    qe_k: int = 5,
    alpha: float = 3.0,
    roc: bool = False,
    chunk_size: int | None = None,
    topk: int | None = None,
) -> tuple[dict[str, float], RankList | None]:
    """One evaluation setting of a query/gallery split, chunked on the features' device.

    ``aqe``: alpha-query expansion first; ``rerank=(k1, k2, lambda)``: k-reciprocal re-ranking;
    ``roc``: TPR@FPR keys. Returns ``({"rank1", "rank5", "rank10", "mAP", "mINP"[, "TPR@…"]},
    rank lists)``: a :class:`RankList` on the CPU whose ``query_index`` is the query row
    (0..Q-1) and ``gallery_index`` the gallery row in rank order, with matches, distances and
    each query's AP; None without ``topk``.
    labels: (q_pids, g_pids, q_camids, g_camids).
    """
    if aqe:
        qf, gf = _aqe(qf, gf, qe_times, qe_k, alpha, chunk_size)
    num_q, num_g = qf.shape[0], gf.shape[0]
    rows = _chunk_rows(chunk_size, num_q, num_g, qf.device)
    if rerank is not None:
        state = _reranking(qf, gf, *rerank, metric, chunk_size)

        def blocks() -> Blocks:
            return state.blocks(rows)
    else:

        def blocks() -> Blocks:
            return _feature_blocks(qf, gf, metric, rows)

    labels = _labels(*labels, num_q, num_g, qf.device)
    roc_acc = ROCAccumulator(labels, DEFAULT_FPRS) if roc else None
    acc = _Accumulator(ap)
    cmc, mAP, mINP = _evaluate_blocks(
        blocks(), labels, min(50, num_g), ap, "evaluate_split", [roc_acc] if roc_acc else (), acc
    )
    out = {f"rank{k}": float(cmc[min(k, len(cmc)) - 1]) for k in (1, 5, 10)}
    out.update({"mAP": float(mAP), "mINP": float(mINP)})
    if roc_acc is not None:
        out.update(roc_acc.result())
    if topk is None:
        return out, None
    positions, matches, dists = _topk_blocks(blocks(), labels, min(topk, num_g))
    query_ap = torch.from_numpy(acc.query_ap())
    return out, RankList(torch.arange(num_q), positions.cpu(), matches.cpu(), dists.cpu(), query_ap)
