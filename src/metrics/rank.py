"""The Market-1501 ranking protocol: CMC, mAP and mINP, chunked; top-k gallery lists.

Protocol (single-query Market-1501, as torchreid / FastReID / the official MATLAB code):

* For each query, the gallery items with the same identity *and* the same camera are removed
  ("junk"); every other gallery item stays, distractors included.
* The remaining gallery is ranked by increasing distance. Ties are broken by gallery position
  (a stable sort), so results never depend on the platform's sort.
* A query without a remaining true match is skipped (a :class:`SkippedQueriesWarning` says how
  many); CMC, mAP and mINP are averaged over the other ("valid") queries.

Implementation. Queries are processed in chunks of rows and no per-query Python loop runs. For
float32 (and lower precision) distances no row is sorted: the gallery items of each query's
identity are known in advance (a pid-grouped gallery index), so only the ranks of those few
items are needed, and the rank of an item is the number of gallery items with a smaller
``(distance, gallery position)`` key; both are packed into one int64 key. Usually a row's last
true match is near the top, so only the items not farther than it are gathered and sorted
(once, for the whole chunk). When too many are (poor features), a histogram of each row over
the top bits of the distances' integer codes counts the items below each true match's bin in a
few linear passes, and only the items sharing a bin with a true match are compared exactly.
Float64 distances, which do not fit a packed key, use two stable sorts for the near items and a
full stable sort of every row as the fallback. All paths give the same ranks, hence the same
numbers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from src.metrics._inputs import (
    _AP_VARIANTS,
    _METRICS,
    APVariant,
    ArrayLike,
    Metric,
    _as_labels,
    _as_tensor,
    _check_choice,
    _check_positive_int,
    _chunk_rows,
)
from src.metrics.distance import _distance_block, _feature_pair, _prepare_gallery

__all__ = [
    "SkippedQueriesWarning",
    "evaluate_features",
    "evaluate_rank",
    "topk_gallery",
]

#: The pruned path runs while at most this fraction of a chunk's distances lie at or before the
#: last true match of their row; beyond it, sorting them costs more than the histogram pass.
_PRUNE_MAX_FRACTION = 0.2
#: Bins per row of the dense counting pass (see _less_by_histogram).
_HIST_BINS = 4096
_INT64_MAX = torch.iinfo(torch.int64).max


class SkippedQueriesWarning(UserWarning):
    """Some queries have no true match left in the gallery and were left out of the averages."""


def _rank_keys(dist: Tensor, pos: Tensor, pos_bits: int) -> Tensor:
    """int64 keys ordered exactly like the pairs (dist, pos); equal pairs give equal keys.

    dist: float32 (any shape); pos: int64 in [0, 2**pos_bits), broadcastable to dist. The float
    bits are mapped to an order-preserving integer in [0, 2**32) (-0.0 counts as +0.0) placed
    above the position bits. Large non-negative inputs take a 3-pass shortcut.
    """
    if dist.numel() > 2**16 and bool(dist.min() >= 0):
        bits = dist.view(torch.int32) & 0x7FFFFFFF  # non-negative floats order like their bits
    else:
        bits = (dist + 0.0).view(torch.int32)  # x + 0.0 turns -0.0 into +0.0
        # Negative floats: flip the magnitude bits so that a larger magnitude maps lower.
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    # key = (bits + 2**31) * 2**pos_bits + pos, with the offset folded into pos.
    return torch.add(pos + (2**31 << pos_bits), bits.to(torch.int64), alpha=1 << pos_bits)


class _GalleryIndex:
    """Gallery positions grouped by identity, to list each query's same-pid items directly."""

    def __init__(self, g_pids: Tensor, g_camids: Tensor) -> None:
        self.g_pids, self.g_camids = g_pids, g_camids
        self.order = torch.sort(g_pids, stable=True).indices
        self.uniq, self.counts = torch.unique_consecutive(g_pids[self.order], return_counts=True)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def candidates(self, q_pids: Tensor, q_camids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(cand (B, M) gallery positions, is_true (B, M), is_junk (B, M)); padding is neither.

        M is the largest number of same-pid gallery items among these queries (at least 1).
        """
        slot = torch.searchsorted(self.uniq, q_pids).clamp_(max=self.uniq.numel() - 1)
        count = torch.where(self.uniq[slot] == q_pids, self.counts[slot], 0)
        width = max(int(count.max()), 1)
        offset = torch.arange(width, device=q_pids.device)
        in_segment = offset.unsqueeze(0) < count.unsqueeze(1)
        flat = (self.starts[slot].unsqueeze(1) + offset).clamp_(max=self.order.numel() - 1)
        cand = self.order[flat]
        same_cam = self.g_camids[cand] == q_camids.unsqueeze(1)
        return cand, in_segment & ~same_cam, in_segment & same_cam


def _compact_true(values: Tensor, is_true: Tensor) -> tuple[Tensor, Tensor]:
    """Move the values at true entries (in order) to the front of each row -> (ranks, counts)."""
    B, M = is_true.shape
    ordinal = torch.cumsum(is_true, dim=1) - 1
    slot = torch.where(is_true, ordinal, M)  # everything else goes to a dropped column
    out = torch.zeros(B, M + 1, dtype=torch.int64, device=values.device)
    out.scatter_(1, slot, values)
    return out[:, :M], is_true.sum(dim=1)


def _ranks_float32(
    dist: Tensor, cand: Tensor, is_true: Tensor, is_junk: Tensor
) -> tuple[Tensor, Tensor]:
    """0-based ranks (among non-junk items) of each row's true matches, ascending.

    dist (B, G) float32. Returns (ranks (B, M) int64, valid where column < count; count (B,)).
    """
    B, G = dist.shape
    M = cand.shape[1]
    device = dist.device
    pos_bits = max(1, (G - 1).bit_length())
    cand_dist = dist.gather(1, cand)
    cand_key = _rank_keys(cand_dist, cand, pos_bits)
    cand_key = cand_key.masked_fill_(~(is_true | is_junk), _INT64_MAX)
    cand_key, perm = torch.sort(cand_key, dim=1, stable=True)
    true_s, junk_s = is_true.gather(1, perm), is_junk.gather(1, perm)
    # Only items at or before a row's last true match can change the ranks of its true matches.
    threshold = torch.where(true_s, cand_dist.gather(1, perm), -math.inf).amax(dim=1)
    near = dist <= threshold.unsqueeze(1)
    num_near = int(torch.count_nonzero(near))
    row_bits = 32 + pos_bits
    keys_fit = (B << row_bits) <= 2**63  # (row, distance, position) packs into an int64
    if num_near <= _PRUNE_MAX_FRACTION * B * G and keys_fit:
        # Gather the near items of the whole chunk, key them by (row, distance, position) and
        # sort once; a true match's rank is then the number of keys before it in its row.
        row, col = near.nonzero(as_tuple=True)
        near_key = _rank_keys(dist.view(-1)[row * G + col], (row << row_bits) + col, pos_bits)
        # stable=True: measured faster than the default CPU sort (keys are unique: same order)
        near_key = torch.sort(near_key, stable=True).values
        rows = torch.arange(B, device=device, dtype=torch.int64) << row_bits
        row_start = torch.searchsorted(near_key, rows)
        query_key = torch.where(true_s, cand_key, 0) + rows.unsqueeze(1)  # padding: unused
        less = torch.searchsorted(near_key, query_key) - row_start.unsqueeze(1)
    elif keys_fit and B * (_HIST_BINS + 1) < 2**31:
        less = _less_by_histogram(dist, cand_key, true_s, pos_bits, row_bits)
    else:  # astronomically large galleries: bucket every item among the row's sorted keys
        key = _rank_keys(dist, torch.arange(G, device=device), pos_bits)
        bucket = torch.searchsorted(cand_key, key, out_int32=True)
        del key
        bucket += (torch.arange(B, device=device, dtype=torch.int32) * (M + 1)).unsqueeze(1)
        hist = torch.bincount(bucket.view(-1), minlength=B * (M + 1)).view(B, M + 1)
        # cumsum(hist)[j] counts the items with key <= key_j, item j itself included.
        less = torch.cumsum(hist, dim=1)[:, :M] - 1
    junk_before = torch.cumsum(junk_s, dim=1) - junk_s.long()
    return _compact_true(less - junk_before, true_s)


def _ordered_i32(dist: Tensor) -> Tensor:
    """float32 -> int32 with the same order (-0.0 counts as +0.0); the high half of the keys."""
    if dist.numel() > 2**16 and bool(dist.min() >= 0):
        return dist.view(torch.int32) & 0x7FFFFFFF
    bits = (dist + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def _less_by_histogram(
    dist: Tensor, keys: Tensor, wanted: Tensor, pos_bits: int, row_bits: int
) -> Tensor:
    """less[b, j] = #{g : key(dist[b, g], g) < keys[b, j]} where ``wanted`` (other entries: 0).

    Dense counting in a few linear passes: every distance gets a bin from the top bits of its
    order-preserving integer code (about _HIST_BINS bins over each row's range, so bins are
    ordered like distances); one bincount gives, for each entry, the number of items in lower
    bins. Only the items that share a bin with a wanted entry are compared exactly, on their
    full keys. keys (B, M) int64 as _rank_keys; wanted (B, M) bool.
    """
    B, G = dist.shape
    device = dist.device
    nb = _HIST_BINS + 1
    code = _ordered_i32(dist)
    low, high = torch.aminmax(code, dim=1)
    span = high.long() - low.long()  # < 2**32
    # the smallest shift with span >> shift < _HIST_BINS (log2 via float, then corrected)
    bit_length = torch.log2(span.double() + 1.0).ceil().long()
    shift = (bit_length - (_HIST_BINS.bit_length() - 1)).clamp_(min=0)
    shift += (span >> shift) >= _HIST_BINS
    shift32 = shift.int().unsqueeze(1)
    base = (low.unsqueeze(1) >> shift32) - (
        torch.arange(B, device=device, dtype=torch.int32) * nb
    ).unsqueeze(1)
    # (code >> s) - (low >> s) lies in [0, _HIST_BINS]: a monotone bin; flat = bin + row * nb
    flat = (code >> shift32).sub_(base)
    del code
    hist = torch.bincount(flat.view(-1), minlength=B * nb).view(B, nb)
    below = torch.cumsum(hist, dim=1) - hist  # items in lower bins
    # bins of the wanted entries, from the high half of their keys
    key_code = ((keys >> pos_bits) - 2**31).clamp_(min=-(2**31), max=2**31 - 1)
    key_bin = (key_code >> shift.unsqueeze(1)) - (low.long().unsqueeze(1) >> shift.unsqueeze(1))
    key_bin = torch.where(wanted, key_bin, 0)
    marked = torch.zeros(B, nb, dtype=torch.bool, device=device)
    marked[wanted.nonzero(as_tuple=True)[0], key_bin[wanted]] = True
    # items in marked bins, compared on full (row, distance, position) keys
    selected = marked.view(-1).index_select(0, flat.view(-1)).view(B, G)
    del flat
    row, col = selected.nonzero(as_tuple=True)
    sel_key = _rank_keys(dist.view(-1)[row * G + col], (row << row_bits) + col, pos_bits)
    sel_key = torch.sort(sel_key, stable=True).values
    rows = torch.arange(B, device=device, dtype=torch.int64) << row_bits
    row_start = torch.searchsorted(sel_key, rows)
    sel_less = torch.searchsorted(sel_key, torch.where(wanted, keys, 0) + rows.unsqueeze(1))
    sel_less -= row_start.unsqueeze(1)
    # selected items in lower bins are already in `below`
    marked_hist = hist * marked
    sel_below = torch.cumsum(marked_hist, dim=1) - marked_hist
    less = below.gather(1, key_bin) + sel_less - sel_below.gather(1, key_bin)
    return torch.where(wanted, less, 0)


def _ranks_sorted(
    dist: Tensor, q_pids: Tensor, q_camids: Tensor, g_pids: Tensor, g_camids: Tensor, M: int
) -> tuple[Tensor, Tensor]:
    """Same output as _ranks_float32, by a stable sort of every row (any floating dtype)."""
    order = torch.sort(dist, dim=1, stable=True).indices
    same_pid = g_pids[order] == q_pids.unsqueeze(1)
    junk = same_pid & (g_camids[order] == q_camids.unsqueeze(1))
    true = same_pid & ~junk
    kept_rank = torch.cumsum(~junk, dim=1) - 1
    ranks, count = _compact_true(kept_rank, true)
    return ranks[:, :M], count


def _ranks_any_float(
    dist: Tensor,
    cand: Tensor,
    is_true: Tensor,
    is_junk: Tensor,
    q_pids: Tensor,
    q_camids: Tensor,
    index: _GalleryIndex,
) -> tuple[Tensor, Tensor]:
    """Same output as _ranks_float32 for distances that do not fit a packed key (float64)."""
    B, G = dist.shape
    # cand lists each row's positions in increasing order (padding last), so a stable sort by
    # distance orders them by (distance, position).
    cand_dist = dist.gather(1, cand).masked_fill_(~(is_true | is_junk), math.inf)
    cand_dist, perm = torch.sort(cand_dist, dim=1, stable=True)
    cand, true_s, junk_s = cand.gather(1, perm), is_true.gather(1, perm), is_junk.gather(1, perm)
    threshold = torch.where(true_s, cand_dist, -math.inf).amax(dim=1)
    near = dist <= threshold.unsqueeze(1)
    if int(torch.count_nonzero(near)) > _PRUNE_MAX_FRACTION * B * G:
        return _ranks_sorted(dist, q_pids, q_camids, index.g_pids, index.g_camids, cand.shape[1])
    # Order the near items by (row, distance, position) with two stable sorts (nonzero lists
    # them by row, then position), and read each true match's place within its row.
    row, col = near.nonzero(as_tuple=True)
    order = torch.sort(dist.view(-1)[row * G + col], stable=True).indices
    order = order[torch.sort(row[order], stable=True).indices]
    row, col = row[order], col[order]
    row_start = torch.searchsorted(row, torch.arange(B, device=dist.device))
    place = torch.zeros(B, G, dtype=torch.int64, device=dist.device)
    place[row, col] = torch.arange(len(row), device=dist.device) - row_start[row]
    less = torch.where(true_s, place.gather(1, cand), 0)
    junk_before = torch.cumsum(junk_s, dim=1) - junk_s.long()
    return _compact_true(less - junk_before, true_s)


def _check_no_nan(dist: Tensor) -> None:
    # The sum is NaN whenever an element is (or +inf meets -inf): one cheap reduction first.
    if torch.isnan(dist.sum()) and torch.isnan(dist).any():
        raise ValueError("distance matrix contains NaN")


def _chunk_ranks(
    dist: Tensor, q_pids: Tensor, q_camids: Tensor, index: _GalleryIndex
) -> tuple[np.ndarray, np.ndarray]:
    """Ranks of the true matches of a chunk of queries, as CPU numpy (ranks (B, M), counts (B,))."""
    _check_no_nan(dist)
    dist = dist.contiguous()  # a no-op for row blocks of a contiguous matrix
    cand, is_true, is_junk = index.candidates(q_pids, q_camids)
    if dist.dtype == torch.float32:
        ranks, count = _ranks_float32(dist, cand, is_true, is_junk)
    else:
        ranks, count = _ranks_any_float(dist, cand, is_true, is_junk, q_pids, q_camids, index)
    return ranks.cpu().numpy(), count.cpu().numpy()


class _Accumulator:
    """Per-query statistics gathered chunk by chunk, in query order."""

    def __init__(self, ap: str) -> None:
        self.ap = ap
        self.first: list[np.ndarray] = []
        self.count: list[np.ndarray] = []
        self.inp: list[np.ndarray] = []
        self.ap_values: list[np.ndarray] = []
        self.valid: list[np.ndarray] = []

    def add(self, ranks: np.ndarray, count: np.ndarray) -> None:
        valid = count > 0
        self.valid.append(valid)
        ranks, count = ranks[valid], count[valid]
        if count.size == 0:
            return
        ordinal = np.arange(1, ranks.shape[1] + 1, dtype=np.float64)  # j + 1
        is_match = ordinal[None, :] <= count[:, None]
        precision = ordinal / (ranks + 1.0)  # precision at the j-th true match
        if self.ap == "market_trapezoid":
            # Official Market-1501 AP: mean over true matches of the average of the precision
            # at the match and just before it (j / pos_j; 1 for a match at rank 0).
            before = np.divide(ordinal - 1.0, ranks, out=np.ones_like(precision), where=ranks > 0)
            precision = 0.5 * (before + precision)
        terms = np.where(is_match, precision, 0.0)
        # A sequential sum (cumsum) does not depend on the padded width of the chunk.
        self.ap_values.append(np.cumsum(terms, axis=1)[:, -1] / count)
        last = ranks[np.arange(len(count)), count - 1]
        self.inp.append(count / (last + 1.0))
        self.first.append(ranks[:, 0])
        self.count.append(count)

    def query_ap(self) -> np.ndarray:
        """(num_queries,) float64: each query's AP, in query order; NaN for a query without a
        true match in the gallery (skipped by the metrics)."""
        valid = np.concatenate(self.valid) if self.valid else np.zeros(0, bool)
        out = np.full(valid.shape, np.nan)
        if self.ap_values:
            out[valid] = np.concatenate(self.ap_values)
        return out

    def result(
        self, max_rank: int, num_queries: int, caller: str
    ) -> tuple[np.ndarray, float, float]:
        num_valid = int(sum(len(c) for c in self.count))
        if num_valid == 0:
            raise ValueError(
                f"{caller}: none of the {num_queries} queries has a true match in the gallery "
                "(same identity, different camera); check the query/gallery pids and camids"
            )
        skipped = num_queries - num_valid
        if skipped:
            warnings.warn(
                f"{caller}: {skipped} of {num_queries} queries have no true match in the gallery "
                f"after removing same-identity same-camera items; they are skipped (metrics "
                f"averaged over {num_valid} queries)",
                SkippedQueriesWarning,
                stacklevel=3,
            )
        first = np.concatenate(self.first)
        hits = np.bincount(np.minimum(first, max_rank), minlength=max_rank + 1)[:max_rank]
        cmc = np.cumsum(hits) / float(num_valid)
        mAP = float(np.mean(np.concatenate(self.ap_values)))
        mINP = float(np.mean(np.concatenate(self.inp)))
        return cmc, mAP, mINP


def _check_max_rank(max_rank: int, num_gallery: int, caller: str) -> int:
    max_rank = _check_positive_int(max_rank, "max_rank")
    if max_rank > num_gallery:
        warnings.warn(
            f"{caller}: max_rank={max_rank} exceeds the gallery size {num_gallery}; "
            f"using max_rank={num_gallery}",
            UserWarning,
            stacklevel=3,
        )
        return num_gallery
    return max_rank


Labels = tuple[Tensor, Tensor, Tensor, Tensor]


def _labels(
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    num_q: int,
    num_g: int,
    device: torch.device,
) -> Labels:
    return (
        _as_labels(q_pids, "q_pids", num_q, device),
        _as_labels(g_pids, "g_pids", num_g, device),
        _as_labels(q_camids, "q_camids", num_q, device),
        _as_labels(g_camids, "g_camids", num_g, device),
    )


Blocks = Iterator[tuple[int, int, Tensor]]


def _evaluate_blocks(
    blocks: Blocks,
    labels: Labels,
    max_rank: int,
    ap: str,
    caller: str,
    observers: Sequence[Callable[[int, int, Tensor], None]] = (),
    acc: _Accumulator | None = None,
) -> tuple[np.ndarray, float, float]:
    """Rank each block; ``observers(start, stop, dist)`` see the same blocks (e.g. ROC).
    ``acc``: the accumulator to fill (keep it to read :meth:`_Accumulator.query_ap`)."""
    q_pids, g_pids, q_camids, g_camids = labels
    index = _GalleryIndex(g_pids, g_camids)
    acc = _Accumulator(ap) if acc is None else acc
    for start, stop, dist in blocks:
        acc.add(*_chunk_ranks(dist, q_pids[start:stop], q_camids[start:stop], index))
        for observe in observers:
            observe(start, stop, dist)
    return acc.result(max_rank, len(q_pids), caller)


def _distmat_blocks(distmat: Tensor, rows: int) -> Blocks:
    for start in range(0, distmat.shape[0], rows):
        block = distmat[start : start + rows]
        if block.dtype in (torch.float16, torch.bfloat16):
            block = block.float()
        yield start, start + block.shape[0], block


def _feature_blocks(qf: Tensor, gf: Tensor, metric: str, rows: int) -> Blocks:
    prepared, sqnorm = _prepare_gallery(gf, metric)
    for start in range(0, qf.shape[0], rows):
        block = _distance_block(qf[start : start + rows], prepared, sqnorm, metric)
        yield start, start + block.shape[0], block


def _as_distmat(distmat: ArrayLike) -> Tensor:
    d = _as_tensor(distmat, "distmat")
    if d.dim() != 2:
        raise ValueError(
            f"distmat: expected a 2-D (num_query, num_gallery) matrix, got {tuple(d.shape)}"
        )
    if 0 in d.shape:
        raise ValueError(f"distmat: empty query or gallery, shape {tuple(d.shape)}")
    return d if d.is_floating_point() else d.double()


def evaluate_rank(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    max_rank: int = 50,
    ap: APVariant = "standard",
    chunk_size: int | None = None,
) -> tuple[np.ndarray, float, float]:
    """Market-1501 single-query evaluation of a query-gallery distance matrix.

    Args:
        distmat: (num_q, num_g) distances, numpy or torch (any device); smaller = more similar.
            float32/16 use packed int64 keys, float64 stable sorts (same numbers, slower).
        q_pids, g_pids: (num_q,), (num_g,) integer identities.
        q_camids, g_camids: (num_q,), (num_g,) integer camera ids.
        max_rank: length of the returned CMC curve (shrunk, with a warning, to num_g if larger).
        ap: ``"standard"`` non-interpolated AP (mean of the precision at each true match; sklearn,
            torchreid, FastReID) or ``"market_trapezoid"``, the official Market-1501 AP
            ``(1/n) sum_j (prec_{j-1} + prec_j) / 2`` used by the MAR paper.
        chunk_size: queries per chunk (None: ~2**23 distances per chunk). Results do not depend
            on it.

    Returns:
        ``(cmc, mAP, mINP)``: cmc a float64 numpy array of length max_rank (cmc[k] = fraction of
        valid queries whose first true match is within the top k+1), mAP and mINP floats.
        mINP = mean of (number of true matches) / (1 + rank of the hardest true match).

    Raises:
        ValueError: inconsistent shapes, NaN distances, unknown option, or no valid query.
    """
    _check_choice(ap, _AP_VARIANTS, "ap")
    d = _as_distmat(distmat)
    num_q, num_g = d.shape
    labels = _labels(q_pids, g_pids, q_camids, g_camids, num_q, num_g, d.device)
    max_rank = _check_max_rank(max_rank, num_g, "evaluate_rank")
    rows = _chunk_rows(chunk_size, num_q, num_g, d.device)
    return _evaluate_blocks(_distmat_blocks(d, rows), labels, max_rank, ap, "evaluate_rank")


def evaluate_features(
    qf: ArrayLike,
    gf: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    metric: Metric = "euclidean",
    chunk_size: int | None = None,
    max_rank: int = 50,
    ap: APVariant = "standard",
) -> tuple[np.ndarray, float, float]:
    """:func:`evaluate_rank` of ``compute_distance_matrix(qf, gf, metric)`` without building it.

    The distances of one chunk of queries at a time are computed on the features' device (so on
    the GPU when the features are there) and ranked there; only a chunk (~2**23 distances by
    default on the CPU, 1/64 of the free memory on a GPU) and its ranking temporaries are alive at once, never the full matrix or an argsort
    of it. qf (num_q, d), gf (num_g, d); other arguments and the result as :func:`evaluate_rank`.
    """
    _check_choice(metric, _METRICS, "metric")
    _check_choice(ap, _AP_VARIANTS, "ap")
    q, g = _feature_pair(qf, gf, ("qf", "gf"))
    num_q, num_g = q.shape[0], g.shape[0]
    if num_q == 0 or num_g == 0:
        raise ValueError(f"empty query ({num_q}) or gallery ({num_g}) features")
    labels = _labels(q_pids, g_pids, q_camids, g_camids, num_q, num_g, q.device)
    max_rank = _check_max_rank(max_rank, num_g, "evaluate_features")
    rows = _chunk_rows(chunk_size, num_q, num_g, q.device)
    blocks = _feature_blocks(q, g, metric, rows)
    return _evaluate_blocks(blocks, labels, max_rank, ap, "evaluate_features")


# --------------------------------------------------------------------------------------------
# Top-k gallery lists (rank-list pictures)
# --------------------------------------------------------------------------------------------
def _topk_block(
    dist: Tensor, q_pids: Tensor, q_camids: Tensor, g_pids: Tensor, g_camids: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor]:
    _check_no_nan(dist)
    G = dist.shape[1]
    same_pid = g_pids.unsqueeze(0) == q_pids.unsqueeze(1)
    junk = same_pid & (g_camids.unsqueeze(0) == q_camids.unsqueeze(1))
    if dist.dtype == torch.float32:
        pos_bits = max(1, (G - 1).bit_length())
        key = _rank_keys(dist, torch.arange(G, device=dist.device), pos_bits)
        key.masked_fill_(junk, _INT64_MAX)
        order = torch.topk(key, k, dim=1, largest=False, sorted=True).indices
    else:
        order = torch.sort(dist.masked_fill(junk, math.inf), dim=1, stable=True).indices[:, :k]
    kept = ~junk.gather(1, order)  # False only where fewer than k non-junk items exist
    positions = torch.where(kept, order, -1)
    return positions, same_pid.gather(1, order) & kept, dist.gather(1, order)


def _topk_blocks(blocks: Blocks, labels: Labels, k: int) -> tuple[Tensor, Tensor, Tensor]:
    q_pids, g_pids, q_camids, g_camids = labels
    parts = [
        _topk_block(dist, q_pids[a:b], q_camids[a:b], g_pids, g_camids, k) for a, b, dist in blocks
    ]
    positions, matches, distances = (torch.cat([p[i] for p in parts]) for i in range(3))
    return positions, matches, distances


def topk_gallery(
    distmat: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    k: int = 10,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The k nearest gallery items of each query, ranked as :func:`evaluate_rank` ranks them.

    Junk items (same identity and camera as the query) are skipped; ties go to the lower
    gallery position.

    Returns ``(positions (num_q, k) int64, matches (num_q, k) bool, distances (num_q, k))``:
    gallery row positions in rank order (-1 where fewer than k non-junk items exist), whether
    each is a true match (same pid), and its distance. k is capped at num_g.
    """
    d = _as_distmat(distmat)
    num_q, num_g = d.shape
    labels = _labels(q_pids, g_pids, q_camids, g_camids, num_q, num_g, d.device)
    k = min(_check_positive_int(k, "k"), num_g)
    rows = _chunk_rows(chunk_size, num_q, num_g, d.device)
    return _topk_blocks(_distmat_blocks(d, rows), labels, k)


def _topk_features(
    qf: Tensor, gf: Tensor, labels: Labels, metric: str, k: int, chunk_size: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """topk_gallery of compute_distance_matrix(qf, gf, metric), chunk by chunk."""
    k = min(_check_positive_int(k, "k"), gf.shape[0])
    rows = _chunk_rows(chunk_size, qf.shape[0], gf.shape[0], qf.device)
    return _topk_blocks(_feature_blocks(qf, gf, metric, rows), labels, k)
