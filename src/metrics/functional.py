"""Re-ID evaluation: distance matrices, the Market-1501 ranking protocol, k-reciprocal re-ranking.

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
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "SkippedQueriesWarning",
    "compute_distance_matrix",
    "evaluate_features",
    "evaluate_rank",
    "re_ranking",
    "topk_gallery",
]

ArrayLike = np.ndarray | Tensor | Sequence
Metric = Literal["euclidean", "cosine"]
APVariant = Literal["standard", "market_trapezoid"]

#: Default size of one query chunk, in distance-matrix elements (rows = this // num_gallery).
#: 2**23 float32 distances are 32 MiB; the ranking temporaries of a float32 chunk stay below
#: ~16 bytes per element (~130 MiB), those of a float64 chunk (full sort) below ~60.
DEFAULT_CHUNK_ELEMENTS = 2**23
#: The pruned path runs while at most this fraction of a chunk's distances lie at or before the
#: last true match of their row; beyond it, sorting them costs more than the histogram pass.
_PRUNE_MAX_FRACTION = 0.2
#: Bins per row of the dense counting pass (see _less_by_histogram).
_HIST_BINS = 4096
_INT64_MAX = torch.iinfo(torch.int64).max
_METRICS = ("euclidean", "cosine")
_AP_VARIANTS = ("standard", "market_trapezoid")


class SkippedQueriesWarning(UserWarning):
    """Some queries have no true match left in the gallery and were left out of the averages."""


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------
def _as_tensor(x: ArrayLike, name: str) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x))
    try:
        return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(x)}") from err


def _as_labels(x: ArrayLike, name: str, length: int, device: torch.device) -> Tensor:
    t = _as_tensor(x, name)
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(
            f"{name}: expected a 1-D array of length {length}, got shape {tuple(t.shape)}"
        )
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected integer labels, got dtype {t.dtype}")
    return t.to(device=device, dtype=torch.int64)


def _as_features(x: ArrayLike, name: str) -> Tensor:
    t = _as_tensor(x, name)
    if t.dim() != 2:
        raise ValueError(
            f"{name}: expected a 2-D (num, dim) feature matrix, got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected floating-point features, got dtype {t.dtype}")
    # fp16/bf16 features are compared in fp32 (exact upcast); fp64 stays fp64.
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_choice(value: str, choices: Sequence[str], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of {list(choices)}")


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive int")
    return int(value)


def _chunk_rows(chunk_size: int | None, num_rows: int, num_cols: int) -> int:
    if chunk_size is None:
        return max(1, min(num_rows, DEFAULT_CHUNK_ELEMENTS // max(num_cols, 1)))
    return min(_check_positive_int(chunk_size, "chunk_size"), max(num_rows, 1))


# --------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------
def _prepare_gallery(y: Tensor, metric: str) -> tuple[Tensor, Tensor | None]:
    """Per-gallery quantities computed once: (features used in the product, squared norms)."""
    if metric == "cosine":
        return F.normalize(y, dim=1), None
    return y, y.pow(2).sum(dim=1)


def _distance_block(x: Tensor, y: Tensor, y_sqnorm: Tensor | None, metric: str) -> Tensor:
    """Distances (len(x), len(y)) from queries x to a gallery prepared by _prepare_gallery."""
    if metric == "cosine":
        dist = F.normalize(x, dim=1) @ y.t()
        return dist.mul_(-1.0).add_(1.0)
    dist = x.pow(2).sum(dim=1, keepdim=True) + y_sqnorm.unsqueeze(0)
    # ||x||^2 + ||y||^2 - 2 x.y can come out slightly negative in floating point.
    return dist.addmm_(x, y.t(), beta=1.0, alpha=-2.0).clamp_(min=0.0)


def _feature_pair(x: ArrayLike, y: ArrayLike, names: tuple[str, str]) -> tuple[Tensor, Tensor]:
    xt, yt = _as_features(x, names[0]), _as_features(y, names[1])
    if xt.shape[1] != yt.shape[1]:
        raise ValueError(
            f"feature dims differ: {names[0]} is {tuple(xt.shape)}, {names[1]} is {tuple(yt.shape)}"
        )
    if xt.device != yt.device:
        raise ValueError(f"{names[0]} is on {xt.device} but {names[1]} is on {yt.device}")
    dtype = torch.promote_types(xt.dtype, yt.dtype)
    return xt.to(dtype), yt.to(dtype)


def compute_distance_matrix(x: ArrayLike, y: ArrayLike, metric: Metric = "euclidean") -> Tensor:
    """Pairwise distances between the rows of ``x`` (m, d) and ``y`` (n, d) -> (m, n) tensor.

    * ``"euclidean"`` returns the **squared** Euclidean distance ``||x||^2 + ||y||^2 - 2 x.y``
      clamped at 0 (torchreid's convention; rankings equal those of the plain distance, and
      :func:`re_ranking` expects this input to reproduce toolbox numbers).
    * ``"cosine"`` returns ``1 - cos(x, y)`` (rows L2-normalised first; not clamped).

    Runs on the inputs' device (both must be on the same one). fp16/bf16 inputs are computed in
    fp32; fp64 stays fp64. numpy inputs are accepted; the result is always a torch tensor.
    """
    _check_choice(metric, _METRICS, "metric")
    xt, yt = _feature_pair(x, y, ("x", "y"))
    prepared, sqnorm = _prepare_gallery(yt, metric)
    return _distance_block(xt, prepared, sqnorm, metric)


# --------------------------------------------------------------------------------------------
# Ranking kernel
# --------------------------------------------------------------------------------------------
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

    def add(self, ranks: np.ndarray, count: np.ndarray) -> None:
        valid = count > 0
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
    blocks: Blocks, labels: Labels, max_rank: int, ap: str, caller: str
) -> tuple[np.ndarray, float, float]:
    q_pids, g_pids, q_camids, g_camids = labels
    index = _GalleryIndex(g_pids, g_camids)
    acc = _Accumulator(ap)
    for start, stop, dist in blocks:
        acc.add(*_chunk_ranks(dist, q_pids[start:stop], q_camids[start:stop], index))
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
    rows = _chunk_rows(chunk_size, num_q, num_g)
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
    default) and its ranking temporaries are alive at once, never the full matrix or an argsort
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
    rows = _chunk_rows(chunk_size, num_q, num_g)
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
    rows = _chunk_rows(chunk_size, num_q, num_g)
    return _topk_blocks(_distmat_blocks(d, rows), labels, k)


def _topk_features(
    qf: Tensor, gf: Tensor, labels: Labels, metric: str, k: int, chunk_size: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """topk_gallery of compute_distance_matrix(qf, gf, metric), chunk by chunk."""
    k = min(_check_positive_int(k, "k"), gf.shape[0])
    rows = _chunk_rows(chunk_size, qf.shape[0], gf.shape[0])
    return _topk_blocks(_feature_blocks(qf, gf, metric, rows), labels, k)


# --------------------------------------------------------------------------------------------
# k-reciprocal re-ranking (Zhong et al., CVPR 2017)
# --------------------------------------------------------------------------------------------
def _as_numpy_2d(x: ArrayLike, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    if arr.ndim != 2 or (shape is not None and arr.shape != shape):
        expected = f"shape {shape}" if shape is not None else "a 2-D matrix"
        raise ValueError(f"{name}: expected {expected}, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    return arr


def _nearest_neighbours(dist: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of each row's k smallest entries, ascending, ties by column (stable)."""
    n = dist.shape[1]
    pos_bits = max(1, (n - 1).bit_length())
    out = np.empty((dist.shape[0], k), dtype=np.int64)
    cols = torch.arange(n)
    step = max(1, 2**22 // n)
    for start in range(0, dist.shape[0], step):
        block = torch.from_numpy(dist[start : start + step])
        key = _rank_keys(block, cols, pos_bits)
        out[start : start + len(block)] = torch.topk(key, k, dim=1, largest=False).indices.numpy()
    return out


def _reciprocal(neighbours: np.ndarray) -> np.ndarray:
    """mask[i, t]: item i is also among the neighbours of its t-th neighbour."""
    n, width = neighbours.shape
    mask = np.empty(neighbours.shape, dtype=bool)
    step = max(1, 2**22 // (width * width))
    for start in range(0, n, step):
        nb = neighbours[start : start + step]
        me = np.arange(start, start + len(nb))[:, None, None]
        mask[start : start + len(nb)] = (neighbours[nb] == me).any(axis=2)
    return mask


def _normalised_squared(qg: np.ndarray, qq: np.ndarray, gg: np.ndarray) -> np.ndarray:
    """d[i, j] = D[j, i]^2 / max_k D[k, i]^2 for the block matrix D = [[qq, qg], [qg^T, gg]].

    This is what the reference computes (column-normalise, then transpose); squares are taken
    in the inputs' precision, the result is float32.
    """
    num_q, num_g = qg.shape
    n = num_q + num_g
    dtype = np.result_type(qg.dtype, qq.dtype, gg.dtype)
    dist = np.empty((n, n), dtype=np.float32)
    step = max(1, 2**22 // n)
    for start in range(0, n, step):
        stop = min(start + step, n)
        rows = np.empty((stop - start, n), dtype=dtype)
        a, b = start, min(stop, num_q)  # query rows: [qq^T | qg]
        if a < b:
            rows[: b - a, :num_q] = qq[:, a:b].T
            rows[: b - a, num_q:] = qg[a:b]
        a, b = max(start, num_q), stop  # gallery rows: [qg^T | gg^T]
        if a < b:
            rows[a - start :, :num_q] = qg[:, a - num_q : b - num_q].T
            rows[a - start :, num_q:] = gg[:, a - num_q : b - num_q].T
        dist[start:stop] = np.square(rows)
    row_max = dist.max(axis=1, keepdims=True)
    row_max[row_max == 0] = 1.0  # an all-zero row stays zero instead of becoming NaN
    dist /= row_max
    return dist


def re_ranking(
    q_g_dist: ArrayLike,
    q_q_dist: ArrayLike,
    g_g_dist: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
) -> np.ndarray:
    """k-reciprocal re-ranking with Jaccard distance (Zhong et al., CVPR 2017).

    The variant the re-ID toolboxes ship (Zhong's released code, torchreid, reid-strong-baseline):

    1. ``d`` = the (q+g)x(q+g) matrix of the given distances, **squared**, each row divided by
       its maximum (so inputs from :func:`compute_distance_matrix` reproduce torchreid numbers).
    2. ``N(i, k)`` = the k+1 nearest items of i (i itself included); the k-reciprocal set
       ``R(i) = {j in N(i, k1): i in N(j, k1)}``.
    3. Expansion: for each ``c in R(i)``, ``R(i) |= R(c, round(k1/2))`` when strictly more than
       2/3 of ``R(c, round(k1/2))`` lies in ``R(i)``.
    4. ``V[i, j] = exp(-d[i, j]) / sum_j exp(-d[i, j])`` over the expanded set (0 elsewhere).
    5. Local query expansion (k2 > 1): ``V[i] <- mean of V over the k2 nearest items of i``.
    6. Jaccard ``dJ(i, j) = 1 - sum min(V_i, V_j) / sum max(V_i, V_j)`` (sparse, by columns).
    7. Result ``(1 - lambda) * dJ + lambda * d`` on the query-gallery block.

    Ties in the neighbour lists are broken by index (the reference's argsort is unspecified).
    Memory is O((q+g)^2) float32 for ``d`` (1.5 GB at Market size); V stays sparse.

    Args:
        q_g_dist (num_q, num_g), q_q_dist (num_q, num_q), g_g_dist (num_g, num_g): distances,
            numpy or torch.
        k1, k2, lambda_value: paper defaults 20, 6, 0.3.

    Returns:
        (num_q, num_g) float32 numpy array of re-ranked distances.
    """
    qg = _as_numpy_2d(q_g_dist, "q_g_dist")
    num_q, num_g = qg.shape
    qq = _as_numpy_2d(q_q_dist, "q_q_dist", (num_q, num_q))
    gg = _as_numpy_2d(g_g_dist, "g_g_dist", (num_g, num_g))
    k1, k2 = _check_positive_int(k1, "k1"), _check_positive_int(k2, "k2")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value={lambda_value!r}: expected a value in [0, 1]")
    n = num_q + num_g
    if max(k1 + 1, k2) > n:
        raise ValueError(f"k1+1={k1 + 1} and k2={k2} must not exceed num_q+num_g={n}")

    dist = _normalised_squared(qg, qq, gg)

    # Neighbour lists and k-reciprocal sets (full k1 and half k1).
    k_half = int(np.around(k1 / 2.0))
    nn = _nearest_neighbours(dist, max(k1 + 1, k2))
    forward, half = nn[:, : k1 + 1], nn[:, : k_half + 1]
    recip, recip_half = _reciprocal(forward), _reciprocal(half)
    half_size = recip_half.sum(axis=1)

    # Expansion: |R(c, k1/2) & R(i, k1)| for each c = forward[i, t] in R(i, k1), by binary
    # search of the codes i * n + u (u in R(c, k1/2)) among the sorted codes of R(i, k1).
    owner = np.broadcast_to(np.arange(n)[:, None], forward.shape)
    codes = np.sort(owner[recip] * n + forward[recip])
    member = half[forward]  # (n, k1+1, k_half+1)
    member_ok = recip_half[forward]
    probe = np.arange(n)[:, None, None] * n + member
    if codes.size:
        slot = np.minimum(np.searchsorted(codes, probe), codes.size - 1)
        inside = (codes[slot] == probe) & member_ok
    else:  # degenerate: no item is among its own k1+1 nearest (massive zero-distance ties)
        inside = np.zeros(probe.shape, dtype=bool)
    accept = recip & (inside.sum(axis=2) > 2.0 / 3 * half_size[forward])
    acc_i, acc_t = np.nonzero(accept)
    extra = np.repeat(acc_i, member.shape[2]) * n + member[acc_i, acc_t].ravel()
    pair_codes = np.unique(np.concatenate([codes, extra[member_ok[acc_i, acc_t].ravel()]]))
    rows_v, cols_v = pair_codes // n, pair_codes % n

    # Gaussian-kernel weights, normalised per row.
    weight = np.exp(-dist[rows_v, cols_v])
    row_sum = np.bincount(rows_v, weights=weight, minlength=n)
    values = (weight / row_sum[rows_v]).astype(np.float32)
    V = sparse.csr_matrix((values, (rows_v, cols_v)), shape=(n, n), dtype=np.float32)

    # Local query expansion over the k2 nearest items (the item itself first).
    if k2 != 1:
        expand = sparse.csr_matrix(
            (np.ones(n * k2, dtype=np.float32), (np.repeat(np.arange(n), k2), nn[:, :k2].ravel())),
            shape=(n, n),
        )
        V = (expand @ V).tocsr()
        V.data /= np.float32(k2)

    jaccard = _jaccard_query_gallery(V, num_q)
    original = dist[:num_q, num_q:]
    return (jaccard * (1.0 - lambda_value) + original * lambda_value).astype(np.float32)


def _jaccard_query_gallery(V: sparse.csr_matrix, num_q: int) -> np.ndarray:
    """1 - s / (2 - s) with s = sum_k min(V[i, k], V[j, k]), queries i x gallery items j.

    Rows of V sum to 1, so sum_k max(...) = 2 - s. The pairs (i, j) sharing a non-zero column k
    are enumerated through the gallery's columns (an inverted index), a chunk of queries at a
    time, and their minima summed with one bincount per chunk.
    """
    n = V.shape[0]
    num_g = n - num_q
    Vq = V[:num_q].tocsr()
    Vq.sort_indices()
    Vg = V[num_q:].tocsc()
    Vg.sort_indices()
    col_count = np.diff(Vg.indptr)
    # pairs of a query = sum over its non-zero columns of that column's gallery non-zeros
    pairs_cum = np.concatenate([[0], np.cumsum(col_count[Vq.indices])])
    query_cum = pairs_cum[Vq.indptr[1:]]
    out = np.empty((num_q, num_g), dtype=np.float32)
    budget = 2**23
    max_rows = max(1, budget // max(num_g, 1))  # also bounds the dense (rows, num_g) block
    start = 0
    while start < num_q:
        done = pairs_cum[Vq.indptr[start]]
        fit = int(np.searchsorted(query_cum, done + budget, side="right")) - start
        stop = min(start + max(1, fit), start + max_rows, num_q)
        a, b = Vq.indptr[start], Vq.indptr[stop]
        q_row = np.repeat(np.arange(stop - start), np.diff(Vq.indptr[start : stop + 1]))
        q_col, q_val = Vq.indices[a:b], Vq.data[a:b]
        reps = col_count[q_col]
        within = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)
        pos = np.repeat(Vg.indptr[q_col], reps) + within
        mins = np.minimum(np.repeat(q_val, reps), Vg.data[pos])
        flat = np.repeat(q_row, reps) * num_g + Vg.indices[pos]
        shared = np.bincount(flat, weights=mins, minlength=(stop - start) * num_g)
        shared = shared.reshape(stop - start, num_g)
        out[start:stop] = 1.0 - shared / (2.0 - shared)
        start = stop
    return out
