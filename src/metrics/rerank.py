"""k-reciprocal encoding (Zhong et al., CVPR 2017) in bounded memory: Jaccard distances and re-ranking.

One core serves two callers:

* :func:`k_reciprocal_jaccard` -- the sparse (N, N) Jaccard distance of a feature set, with the
  conventions of cluster-contrast-reid's ``compute_jaccard_distance`` (the distance that
  clustering-based unsupervised re-ID feeds to DBSCAN);
* :func:`evaluate_reranked` / :func:`re_ranking_features` -- the evaluation re-ranking of a
  query/gallery split, equal to the dense :func:`re_ranking` (torchreid's ``re_ranking``), fed to
  the ranking chunk by chunk.

The core, from per-item neighbour lists of width ``W`` (a chunked, keyed top-k over row blocks
of the distances, so ties go to the lower index):

1. ``R(i, k) = {j in N(i, k) : i in N(j, k)}`` for the forward width and for the half width;
2. expansion ``R*(i) = R(i) ∪ R(c, half)`` for each ``c in R(i)`` with
   ``|R(c, half) ∩ R(i)| > 2/3 |R(c, half)|`` (strict, as both reference codes);
3. sparse ``V[i, j] = exp(-d(i, j)) / sum_{j' in R*(i)} exp(-d(i, j'))`` (CSR, O(N k) entries);
4. local query expansion ``V[i] <- mean_{t < k2} V[N(i)[t]]`` (skipped when k2 == 1);
5. ``s(i, j) = sum_k min(V[i, k], V[j, k])`` through an inverted index of V's columns (only the
   pairs sharing a non-zero column are ever enumerated), and, since V's rows sum to 1,
   ``jaccard = 1 - s / (2 - s)``; every pair sharing no column has jaccard exactly 1.

Everything runs on the features' device (torch), in row chunks; nothing of size N x N (or
query x gallery) is ever allocated.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import sparse
from torch import Tensor

from src.metrics._inputs import (
    _AP_VARIANTS,
    _METRICS,
    APVariant,
    ArrayLike,
    Metric,
    _as_features,
    _check_choice,
    _check_positive_int,
    chunk_elements,
)
from src.metrics.distance import _distance_block, _feature_pair, _prepare_gallery
from src.metrics.rank import Blocks, _check_max_rank, _evaluate_blocks, _labels, _rank_keys

__all__ = [
    "evaluate_reranked",
    "k_reciprocal_jaccard",
    "re_ranking",
    "re_ranking_features",
]

KNN = Literal["auto", "torch", "faiss"]
_KNN = ("auto", "torch", "faiss")
#: knn="auto" uses faiss (when importable, features on the CPU) from this many items on.
FAISS_MIN_ITEMS = 50_000
#: Pairs (i, k, j) of the inverted-index Jaccard enumerated at once (~6 temporaries each).
_PAIR_BUDGET = 2**22
#: Elements of the (rows, width, width) comparison temporaries of the reciprocal tests.
_SET_BUDGET = 2**22


# --------------------------------------------------------------------------------------------
# Neighbour lists
# --------------------------------------------------------------------------------------------
def _block_rows(chunk_size: int | None, num_rows: int, num_cols: int, device: torch.device) -> int:
    if chunk_size is None:
        return max(1, min(num_rows, chunk_elements(device) // max(num_cols, 1)))
    return min(_check_positive_int(chunk_size, "chunk_size"), max(num_rows, 1))


def _check_finite(x: Tensor, name: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contain NaN or inf values")


def _topk_keyed(d: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(indices, values) of each row's ``width`` smallest entries, ascending, ties by column."""
    n = d.shape[1]
    key = _rank_keys(d, torch.arange(n, device=d.device), max(1, (n - 1).bit_length()))
    idx = torch.topk(key, width, dim=1, largest=False, sorted=True).indices
    return idx, d.gather(1, idx)


class _Neighbours(NamedTuple):
    index: Tensor  # (N, W) int64, nearest first, ties by index
    dist: Tensor  # (N, W) float32, the distances d(i, index[i, t]) used for the weights


def _square_side(chunk_size: int | None, num: int, device: torch.device) -> int:
    """Side of the square distance blocks of the neighbour search (chunk_size if given)."""
    if chunk_size is None:
        return max(1, min(num, math.isqrt(chunk_elements(device))))
    return min(_check_positive_int(chunk_size, "chunk_size"), num)


def _merge_top(
    keys: Tensor, vals: Tensor, new_keys: Tensor, new_vals: Tensor, width: int
) -> tuple[Tensor, Tensor]:
    keys, vals = torch.cat([keys, new_keys], dim=1), torch.cat([vals, new_vals], dim=1)
    if keys.shape[1] <= width:
        return keys, vals
    top = torch.topk(keys, width, dim=1, largest=False, sorted=False).indices
    return keys.gather(1, top), vals.gather(1, top)


def _knn_symmetric(
    block: Callable[[int, int, int, int], Tensor],
    num: int,
    width: int,
    side: int,
    normalise: bool,
    device: torch.device,
) -> tuple[_Neighbours, Tensor]:
    """Neighbour lists of a symmetric distance from the upper triangle of square blocks.

    ``block(a, b, c, e)`` gives the raw values (b - a, e - c) between items [a, b) and [c, e);
    each block with c >= a serves rows [a, b) and, transposed, rows [c, e) (half the products
    of a full pass). Lists are ordered by (value, index). With ``normalise``, the order is that
    of ``raw / row_max(raw)`` in float32 (the dense reference's): the ``width + 4`` smallest by
    raw value are kept, re-keyed after the division, and a row whose last kept candidate ties
    the width-th after it (rounding can merge close values) is recomputed exactly.
    Returns (neighbours with the (normalised) values, row maxima of the raw values).
    """
    keep = min(num, width + (4 if normalise else 0))
    pos_bits = max(1, (num - 1).bit_length())
    starts = list(range(0, num, side))
    keys = [torch.empty(min(side, num - a), 0, dtype=torch.int64, device=device) for a in starts]
    vals = [torch.empty(k.shape[0], 0, dtype=torch.float32, device=device) for k in keys]
    row_max = torch.zeros(num, dtype=torch.float32, device=device)

    def feed(i: int, raw: Tensor, first_col: int) -> None:
        a = starts[i]
        stop = a + raw.shape[0]
        row_max[a:stop] = torch.maximum(row_max[a:stop], raw.amax(dim=1))
        if raw.shape[1] > keep:
            # float top-(keep+1); where the (keep+1)-th ties the keep-th, the kept set depends
            # on the tie order: those rows are redone on (value, index) keys
            val, top = torch.topk(raw, keep + 1, dim=1, largest=False, sorted=True)
            tied = torch.nonzero(val[:, keep] == val[:, keep - 1]).flatten()
            val, top = val[:, :keep], top[:, :keep]
            if tied.numel():
                sub = raw[tied].contiguous()
                cols = torch.arange(raw.shape[1], device=device)
                fix = torch.topk(_rank_keys(sub, cols, pos_bits), keep, dim=1, largest=False)
                top[tied] = fix.indices
                val[tied] = sub.gather(1, fix.indices)
        else:
            val = raw
            top = torch.arange(raw.shape[1], device=device).expand(raw.shape[0], -1)
        key = _rank_keys(val.contiguous(), top + first_col, pos_bits)
        keys[i], vals[i] = _merge_top(keys[i], vals[i], key, val, keep)

    for i, a in enumerate(starts):
        b = min(a + side, num)
        for j in range(i, len(starts)):
            c = starts[j]
            raw = block(a, b, c, min(c + side, num))
            feed(i, raw, c)
            if j != i:
                feed(j, raw.t().contiguous(), a)  # (faster than a strided top-k)
    key = torch.cat(keys)
    order = torch.sort(key, dim=1).indices
    raw = torch.cat(vals).gather(1, order)
    index = key.gather(1, order) & ((1 << pos_bits) - 1)
    if not normalise:
        return _Neighbours(index[:, :width], raw[:, :width]), row_max
    scale = torch.where(row_max == 0, torch.ones_like(row_max), row_max).unsqueeze(1)
    d = raw / scale
    order = torch.sort(_rank_keys(d, index, pos_bits), dim=1).indices
    index, d_sorted = index.gather(1, order), d.gather(1, order)
    if keep < num:
        unsure = torch.nonzero(d_sorted[:, width - 1] >= d[:, -1]).flatten().tolist()
        for r in unsure:  # exact: the whole row
            row = block(r, r + 1, 0, num) / scale[r]
            i, v = _topk_keyed(row, keep)
            index[r], d_sorted[r] = i[0], v[0]
    return _Neighbours(index[:, :width], d_sorted[:, :width]), row_max


# --------------------------------------------------------------------------------------------
# Sparse rows (CSR as three tensors) and the core
# --------------------------------------------------------------------------------------------
class _CSR(NamedTuple):
    crow: Tensor  # (N+1,) int64
    col: Tensor  # (nnz,) int64, ascending within each row
    val: Tensor  # (nnz,) float32


def _gather_rows(m: _CSR, src: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Entries of rows ``src`` (M,) of m: (owner in [0, M), column, value), row by row."""
    starts, lens = m.crow[src], m.crow[src + 1] - m.crow[src]
    total = int(lens.sum())
    owner = torch.repeat_interleave(torch.arange(len(src), device=src.device), lens)
    offset = torch.arange(total, device=src.device) - (torch.cumsum(lens, 0) - lens)[owner]
    pos = starts[owner] + offset
    return owner, m.col[pos], m.val[pos]


def _csr_from_sorted(rows: Tensor, cols: Tensor, vals: Tensor, num_rows: int) -> _CSR:
    counts = torch.bincount(rows, minlength=num_rows)
    crow = torch.zeros(num_rows + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(counts, 0)
    return _CSR(crow, cols, vals)


def _reciprocal_mask(nn: Tensor, width: int) -> Tensor:
    """mask[i, t]: i is among the first ``width`` neighbours of its t-th neighbour."""
    n = nn.shape[0]
    fwd = nn[:, :width]
    out = torch.empty(n, width, dtype=torch.bool, device=nn.device)
    rows = max(1, _SET_BUDGET // (width * width))
    for a in range(0, n, rows):
        f = fwd[a : a + rows]
        me = torch.arange(a, a + len(f), device=nn.device).view(-1, 1, 1)
        out[a : a + len(f)] = (fwd[f] == me).any(dim=2)
    return out


def _k_reciprocal_v(
    nn: _Neighbours,
    k_fwd: int,
    k_half: int,
    k2: int,
    pair_dist: Callable[[Tensor, Tensor], Tensor],
) -> _CSR:
    """The (N, N) k-reciprocal weight matrix V (after local query expansion when k2 > 1).

    nn: neighbour lists of width >= max(k_fwd, k2); N(i, fwd) = nn.index[i, :k_fwd],
    N(i, half) = nn.index[i, :k_half]. pair_dist(rows, cols) gives d for pairs missing from the
    lists (members brought in by the expansion).
    """
    index = nn.index
    n, device = index.shape[0], index.device
    recip = _reciprocal_mask(index, k_fwd)
    recip_half = _reciprocal_mask(index, k_half)
    half_size = recip_half.sum(dim=1).double()
    fwd, half = index[:, :k_fwd], index[:, :k_half]
    rows_v, cols_v, vals_v = [], [], []
    step = max(1, _SET_BUDGET // (k_fwd * k_half))
    for a in range(0, n, step):
        b = min(a + step, n)
        f, r = fwd[a:b], recip[a:b]
        ids = torch.arange(a, b, device=device)
        # R(i) as a sorted row (non-members -> n, past every index)
        members = torch.sort(torch.where(r, f, n), dim=1).values
        cand = half[f]  # (B, k_fwd, k_half): N(c, half) of each c = f[i, t]
        cand_ok = recip_half[f]  # ... restricted to R(c, half)
        flat = cand.reshape(len(f), -1)
        slot = torch.searchsorted(members, flat).clamp_(max=k_fwd - 1)
        inside = (members.gather(1, slot) == flat).view_as(cand) & cand_ok
        accept = r & (inside.sum(dim=2).double() > (2.0 / 3.0) * half_size[f])
        base = ids.view(-1, 1) * n
        codes = torch.cat(
            [(base + f)[r], (base.unsqueeze(2) + cand)[accept.unsqueeze(2) & cand_ok]]
        )
        codes = torch.unique(codes)  # sorted: by row, then column
        row, col = codes // n, codes % n
        # d for the pairs: from the neighbour lists where present, else computed
        nn_codes = base + index[a:b]
        nn_codes, order = torch.sort(nn_codes.view(-1))
        slot = torch.searchsorted(nn_codes, codes).clamp_(max=nn_codes.numel() - 1)
        found = nn_codes[slot] == codes
        d = nn.dist[a:b].reshape(-1)[order[slot]]
        if not bool(found.all()):
            missing = ~found
            d = d.clone()
            d[missing] = pair_dist(row[missing], col[missing])
        weight = torch.exp(-d)
        row_sum = torch.zeros(b - a, dtype=torch.float64, device=device)
        row_sum.index_add_(0, row - a, weight.double())
        rows_v.append(row)
        cols_v.append(col)
        vals_v.append((weight.double() / row_sum[row - a]).float())
    V = _csr_from_sorted(torch.cat(rows_v), torch.cat(cols_v), torch.cat(vals_v), n)
    if k2 == 1:
        return V
    return _query_expansion(V, index[:, :k2], n)


def _query_expansion(V: _CSR, nearest: Tensor, n: int) -> _CSR:
    """V_qe[i] = mean over t of V[nearest[i, t]] (sums in float64)."""
    k2 = nearest.shape[1]
    lens = (V.crow[1:] - V.crow[:-1])[nearest].sum(dim=1)  # entries gathered per row
    rows_out, cols_out, vals_out = [], [], []
    a = 0
    cum = torch.cumsum(lens, 0)
    while a < n:
        done = int(cum[a - 1]) if a else 0
        b = int(torch.searchsorted(cum, done + _PAIR_BUDGET, right=True))
        b = min(max(b, a + 1), n)
        owner, col, val = _gather_rows(V, nearest[a:b].reshape(-1))
        codes = (owner // k2 + a) * n + col
        codes, inverse = torch.unique(codes, return_inverse=True)
        total = torch.zeros(len(codes), dtype=torch.float64, device=col.device)
        total.index_add_(0, inverse, val.double())
        rows_out.append(codes // n)
        cols_out.append(codes % n)
        vals_out.append((total / k2).float())
        a = b
    return _csr_from_sorted(torch.cat(rows_out), torch.cat(cols_out), torch.cat(vals_out), n)


class _InvertedIndex:
    """The columns of V restricted to rows [first, N): for each column, its (row, value) list."""

    def __init__(self, V: _CSR, first: int = 0) -> None:
        n = V.crow.numel() - 1
        row = torch.repeat_interleave(
            torch.arange(n, device=V.col.device), V.crow[1:] - V.crow[:-1]
        )
        keep = row >= first
        row, col, val = row[keep], V.col[keep], V.val[keep]
        order = torch.sort(col, stable=True).indices  # by column, rows ascending within
        self.first, self.num = first, n - first
        self.index = _csr_from_sorted(col[order], row[order], val[order], n)
        self.count = self.index.crow[1:] - self.index.crow[:-1]

    def pairs_per_row(self, V: _CSR, rows: slice) -> Tensor:
        """Number of (k, j) pairs that rows of V enumerate (cumulative, over rows)."""
        a, b = V.crow[rows.start], V.crow[rows.stop]
        owner = torch.repeat_interleave(
            torch.arange(rows.stop - rows.start, device=V.col.device),
            V.crow[rows.start + 1 : rows.stop + 1] - V.crow[rows.start : rows.stop],
        )
        per = torch.zeros(rows.stop - rows.start, dtype=torch.int64, device=V.col.device)
        per.index_add_(0, owner, self.count[V.col[a:b]])
        return torch.cumsum(per, 0)

    def shared(self, V: _CSR, a: int, b: int) -> tuple[Tensor, Tensor, Tensor]:
        """All (local row i - a, target j - first, min(V[i, k], V[j, k])) for rows [a, b)."""
        owner, col, val = _gather_rows(V, torch.arange(a, b, device=V.col.device))
        owner2, target, tval = _gather_rows(self.index, col)
        mins = torch.minimum(val[owner2], tval)
        return owner[owner2], target - self.first, mins


def _row_chunks(cum_pairs: Tensor, start: int, max_rows: int) -> Iterator[tuple[int, int]]:
    """Split rows [start, start + len(cum_pairs)) into runs of at most _PAIR_BUDGET pairs."""
    n = cum_pairs.numel()
    a = 0
    while a < n:
        done = int(cum_pairs[a - 1]) if a else 0
        b = int(torch.searchsorted(cum_pairs, done + _PAIR_BUDGET, right=True))
        b = min(max(b, a + 1), a + max_rows, n)
        yield start + a, start + b
        a = b


def _pairwise(x: Tensor, sqnorm: Tensor | None, rows: Tensor, cols: Tensor, kind: str) -> Tensor:
    """d(rows[p], cols[p]) for listed pairs, in chunks of pairs (O(chunk * D) memory).

    kind "sq_euclidean": ||x||^2 + ||y||^2 - 2 x.y clamped at 0; "unit_cosine2": 2 - 2 x.y of
    (already normalised) rows; "cosine": 1 - x.y of normalised rows.
    """
    out = torch.empty(rows.numel(), dtype=x.dtype, device=x.device)
    step = max(1, _SET_BUDGET // max(x.shape[1], 1))
    for a in range(0, rows.numel(), step):
        r, c = rows[a : a + step], cols[a : a + step]
        dot = (x[r] * x[c]).sum(dim=1)
        if kind == "sq_euclidean":
            out[a : a + step] = (sqnorm[r] + sqnorm[c] - 2.0 * dot).clamp_(min=0.0)
        elif kind == "unit_cosine2":
            out[a : a + step] = 2.0 - 2.0 * dot
        else:
            out[a : a + step] = 1.0 - dot
    return out


# --------------------------------------------------------------------------------------------
# Jaccard distance of one feature set (clustering)
# --------------------------------------------------------------------------------------------
def _faiss_neighbours(x: Tensor, k: int) -> Tensor:
    import faiss  # optional dependency

    xs = np.ascontiguousarray(x.detach().cpu().numpy().astype(np.float32))
    index = faiss.IndexFlatL2(xs.shape[1])
    index.add(xs)
    _, idx = index.search(xs, k)
    return torch.from_numpy(idx.astype(np.int64)).to(x.device)


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def k_reciprocal_jaccard(
    features: ArrayLike,
    k1: int = 30,
    k2: int = 6,
    metric: Metric = "euclidean",
    chunk_size: int | None = None,
    knn: KNN = "auto",
    max_distance: float | None = None,
) -> sparse.csr_matrix:
    """Sparse k-reciprocal Jaccard distance of a feature set (N, D) -> csr_matrix (N, N) float32.

    The distance clustering-based unsupervised re-ID clusters with (cluster-contrast-reid's
    ``compute_jaccard_distance``, Zhong et al. 2017's k-reciprocal encoding without the final
    mix with the original distance). Only the pairs whose Jaccard distance is < 1 are stored;
    every pair not stored is at distance exactly 1 (it shares no k-reciprocal neighbour). The
    diagonal is always stored, as an explicit 0, so that a ``metric="precomputed"`` sparse
    neighbourhood search (e.g. DBSCAN) sees each item as its own neighbour. Rows are sorted.

    Definitions (d = the distance below, neighbour lists sorted by (d, index)):

    * ``d(i, j)``: ``"euclidean"`` the squared Euclidean distance ``||x_i - x_j||^2``;
      ``"cosine"`` ``2 - 2 cos(x_i, x_j)``, the squared Euclidean distance of the L2-normalised
      features. Neighbours and the weights both use d.
    * ``N(i)`` = the k1 nearest items of i, i itself included (usually first);
      ``R(i) = {j in N(i) : i in N(j)}``; ``R_half(i)`` the same with the first
      ``round(k1/2) + 1`` items (capped at k1).
    * ``R*(i) = R(i) ∪ R_half(c)`` for each ``c in R(i)`` with
      ``|R_half(c) ∩ R(i)| > 2/3 |R_half(c)|``.
    * ``V[i, j] = exp(-d(i, j)) / sum_{j' in R*(i)} exp(-d(i, j'))`` for j in R*(i), else 0.
    * ``k2 > 1``: ``V[i] <- mean of V over the first min(k2, k1) items of N(i)``.
    * ``jaccard(i, j) = max(0, 1 - s / (2 - s))``, ``s = sum_k min(V[i, k], V[j, k])``.

    Against the reference (``compute_jaccard_distance(features, k1, k2)``, faiss flat-L2
    search, dense N x N float32 V and output): equal to float32 rounding on L2-normalised
    features (what the reference is given) with either metric, when no two neighbour
    distances tie. Deviations: (1) ties in the neighbour lists go to the lower index here (the
    reference's order under ties is faiss's); (2) the reference ranks by faiss's L2 distance
    but weights by ``2 - 2 x.y``, which agree only on unit-norm features: here both use d (so
    "euclidean" on unnormalised features differs from it by design; "cosine" equals it on
    any features, normalised); (3) the min-sums and V's query expansion are accumulated in
    float64 (the reference: float32), and ``exp / sum`` replaces ``softmax`` (equal up to
    rounding); (4) the diagonal is exactly 0 (the reference's is 0 up to rounding, or 1 for
    an item with an empty V row); (5) memory is O(N k) plus the output instead of O(N^2).

    Args:
        features: (N, D) float features, numpy or torch (any device: computed there).
        k1, k2: neighbourhood sizes (cluster-contrast defaults 30 and 6); k1 <= N.
        metric: ``"euclidean"`` or ``"cosine"`` (see above).
        chunk_size: rows per distance block for the neighbour search (None: from the device's
            free memory on CUDA, ~2**23 distances on the CPU). Results do not depend on it.
        knn: neighbour search: ``"torch"`` exact chunked top-k on the features' device;
            ``"faiss"`` faiss-cpu ``IndexFlatL2`` (a dependency, imported lazily; CPU, ties in
            faiss's order); ``"auto"``: faiss when it is importable, the features are on the
            CPU and N >= FAISS_MIN_ITEMS, else torch.
        max_distance: store only the pairs at distance <= this (None: every pair < 1). What a
            DBSCAN with ``eps = max_distance`` reads is then unchanged, and the output shrinks
            from every pair sharing a k-reciprocal neighbour (thousands per row) to the pairs
            within eps; computed row block by row block, so the others are never all held.

    Returns:
        scipy.sparse.csr_matrix (N, N), float32, sorted indices, explicit zero diagonal.
    """
    x = _as_features(features, "features")
    _check_choice(metric, _METRICS, "metric")
    _check_choice(knn, _KNN, "knn")
    k1, k2 = _check_positive_int(k1, "k1"), _check_positive_int(k2, "k2")
    n = x.shape[0]
    if n == 0:
        raise ValueError("features: empty feature matrix")
    if k1 > n:
        raise ValueError(f"k1={k1} must not exceed the number of features {n}")
    _check_finite(x, "features")
    if max_distance is not None and not 0.0 <= float(max_distance) <= 1.0:
        raise ValueError(f"max_distance={max_distance} must be in [0, 1] (or None)")
    if knn == "faiss" and not _faiss_available():
        raise ImportError(
            "knn='faiss' needs the optional package faiss-cpu (pip install faiss-cpu)"
        )
    use_faiss = knn == "faiss" or (
        knn == "auto" and x.device.type == "cpu" and n >= FAISS_MIN_ITEMS and _faiss_available()
    )
    if metric == "cosine":
        x = F.normalize(x, dim=1)
        sqnorm, kind = None, "unit_cosine2"
    else:
        sqnorm, kind = x.pow(2).sum(dim=1), "sq_euclidean"

    def pair_dist(r: Tensor, c: Tensor) -> Tensor:
        return _pairwise(x, sqnorm, r, c, kind).float()

    if use_faiss:
        index = _faiss_neighbours(x, k1)
        rows = torch.arange(n, device=x.device).repeat_interleave(k1)
        nn = _Neighbours(index, pair_dist(rows, index.reshape(-1)).view(n, k1))
    else:

        def block(a: int, b: int, c: int, e: int) -> Tensor:
            if metric == "cosine":
                return (x[a:b] @ x[c:e].t()).mul_(-2.0).add_(2.0).float()
            return _distance_block(x[a:b], x[c:e], sqnorm[c:e], "euclidean").float()

        side = _square_side(chunk_size, n, x.device)
        nn, _ = _knn_symmetric(block, n, k1, side, False, x.device)
    k_half = min(int(round(k1 / 2)) + 1, k1)
    V = _k_reciprocal_v(nn, k1, k_half, min(k2, k1), pair_dist)
    return _sparse_jaccard(V, n, max_distance)


def _sparse_jaccard(V: _CSR, n: int, max_distance: float | None = None) -> sparse.csr_matrix:
    inv = _InvertedIndex(V, 0)
    cum = inv.pairs_per_row(V, slice(0, n))
    rows_out, cols_out, vals_out = [], [], []
    device = V.col.device
    for a, b in _row_chunks(cum, 0, n):
        owner, target, mins = inv.shared(V, a, b)
        codes = (owner + a) * n + target
        # every row's own diagonal, even when its V row is empty
        diag = torch.arange(a, b, device=device) * (n + 1)
        codes = torch.cat([codes, diag])
        mins = torch.cat([mins.double(), torch.zeros(b - a, dtype=torch.float64, device=device)])
        codes, inverse = torch.unique(codes, return_inverse=True)
        s = torch.zeros(len(codes), dtype=torch.float64, device=device).index_add_(0, inverse, mins)
        jac = (1.0 - s / (2.0 - s)).clamp_(min=0.0).float()
        row, col = codes // n, codes % n
        jac[row == col] = 0.0
        keep = jac < 1.0 if max_distance is None else jac <= max_distance
        rows_out.append(row[keep])
        cols_out.append(col[keep])
        vals_out.append(jac[keep])
    row = torch.cat(rows_out).cpu().numpy()
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=n), out=indptr[1:])
    cols = torch.cat(cols_out).cpu().numpy()
    vals = torch.cat(vals_out).cpu().numpy()
    if n < 2**31 and cols.size < 2**31:
        indptr, cols = indptr.astype(np.int32), cols.astype(np.int32)
    out = sparse.csr_matrix((vals, cols, indptr), shape=(n, n))
    out.has_sorted_indices = True
    return out


# --------------------------------------------------------------------------------------------
# Evaluation re-ranking (Zhong et al.; torchreid's re_ranking), chunk by chunk
# --------------------------------------------------------------------------------------------
class _Reranking:
    """The state of a chunked re-ranking of queries ``qf`` against gallery ``gf``.

    Holds O((q+g) k) numbers: the neighbour lists, the row maxima of the squared distances,
    the sparse V and its gallery inverted index. :meth:`blocks` yields the re-ranked
    (rows, num_g) distances of consecutive query chunks, computed on demand.
    """

    def __init__(
        self,
        qf: Tensor,
        gf: Tensor,
        k1: int,
        k2: int,
        lambda_value: float,
        metric: str,
        chunk_size: int | None,
    ) -> None:
        self.q, self.g = qf, gf
        self.num_q, self.num_g = qf.shape[0], gf.shape[0]
        n = self.num_q + self.num_g
        self.lambda_value, self.metric, self.chunk_size = lambda_value, metric, chunk_size
        x = torch.cat([qf, gf])
        prepared, sqnorm = _prepare_gallery(x, metric)

        def block(a: int, b: int, c: int, e: int) -> Tensor:
            # squared distances; d = this / its row maximum, as the dense reference (float32)
            sq = None if sqnorm is None else sqnorm[c:e]
            return _distance_block(x[a:b], prepared[c:e], sq, metric).square_().float()

        side = _square_side(chunk_size, n, x.device)
        nn, row_max = _knn_symmetric(block, n, max(k1 + 1, k2), side, True, x.device)
        self.row_max = torch.where(row_max == 0, torch.ones_like(row_max), row_max)
        kind = "cosine" if metric == "cosine" else "sq_euclidean"

        def pair_dist(r: Tensor, c: Tensor) -> Tensor:
            dist = _pairwise(prepared, sqnorm, r, c, kind).square_().float()
            return dist / self.row_max[r]

        k_half = int(round(k1 / 2)) + 1
        self.V = _k_reciprocal_v(nn, k1 + 1, k_half, k2, pair_dist)
        self.inv = _InvertedIndex(self.V, self.num_q)
        self.cum_pairs = self.inv.pairs_per_row(self.V, slice(0, self.num_q))
        self.g_prepared, self.g_sqnorm = _prepare_gallery(gf, metric)

    def blocks(self, rows: int) -> Blocks:
        G = self.num_g
        for a in range(0, self.num_q, rows):
            b = min(a + rows, self.num_q)
            d = _distance_block(self.q[a:b], self.g_prepared, self.g_sqnorm, self.metric)
            d = d.square_().float().div_(self.row_max[a:b].unsqueeze(1))
            shared = torch.zeros((b - a) * G, dtype=torch.float64, device=d.device)
            cum = self.cum_pairs[a:b] - (self.cum_pairs[a - 1] if a else 0)
            for c0, c1 in _row_chunks(cum, a, b - a):
                owner, target, mins = self.inv.shared(self.V, c0, c1)
                shared.index_add_(0, (owner + (c0 - a)) * G + target, mins.double())
            shared = shared.view(b - a, G)
            jaccard = (1.0 - shared / (2.0 - shared)).float()
            del shared
            yield a, b, jaccard.mul_(1.0 - self.lambda_value).add_(d.mul_(self.lambda_value))


def _reranking(
    qf: ArrayLike,
    gf: ArrayLike,
    k1: int,
    k2: int,
    lambda_value: float,
    metric: str,
    chunk_size: int | None,
) -> _Reranking:
    _check_choice(metric, _METRICS, "metric")
    q, g = _feature_pair(qf, gf, ("qf", "gf"))
    if q.shape[0] == 0 or g.shape[0] == 0:
        raise ValueError(f"empty query ({q.shape[0]}) or gallery ({g.shape[0]}) features")
    _check_finite(q, "qf")
    _check_finite(g, "gf")
    k1, k2 = _check_positive_int(k1, "k1"), _check_positive_int(k2, "k2")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value={lambda_value!r}: expected a value in [0, 1]")
    n = q.shape[0] + g.shape[0]
    if max(k1 + 1, k2) > n:
        raise ValueError(f"k1+1={k1 + 1} and k2={k2} must not exceed num_q+num_g={n}")
    return _Reranking(q, g, k1, k2, float(lambda_value), metric, chunk_size)


def re_ranking_features(
    qf: ArrayLike,
    gf: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: Metric = "euclidean",
    chunk_size: int | None = None,
) -> Tensor:
    """``re_ranking(D(q, g), D(q, q), D(g, g))`` with ``D = compute_distance_matrix(.., metric)``.

    Computed from the features in bounded memory (only the returned (num_q, num_g) float32
    matrix is of that size; use :func:`evaluate_reranked` to avoid even that). Runs on the
    features' device and returns a tensor there. chunk_size: rows per distance block.
    """
    rr = _reranking(qf, gf, k1, k2, lambda_value, metric, chunk_size)
    rows = _block_rows(chunk_size, rr.num_q, rr.num_g, rr.q.device)
    return torch.cat([block for _, _, block in rr.blocks(rows)])


def evaluate_reranked(
    qf: ArrayLike,
    gf: ArrayLike,
    q_pids: ArrayLike,
    g_pids: ArrayLike,
    q_camids: ArrayLike,
    g_camids: ArrayLike,
    k1: int = 20,
    k2: int = 6,
    lambda_value: float = 0.3,
    metric: Metric = "euclidean",
    chunk_size: int | None = None,
    max_rank: int = 50,
    ap: APVariant = "standard",
) -> tuple[np.ndarray, float, float]:
    """:func:`~src.metrics.rank.evaluate_rank` of :func:`re_ranking_features`, chunk by chunk.

    Neither the (q+g)^2 nor the q x g matrix is ever held: the re-ranked distances of one chunk
    of queries are computed, ranked and dropped. Memory: O((q+g) k1 k2) for the k-reciprocal
    state plus one chunk (``chunk_size`` rows; None: ~2**23 distances, more on a GPU with free
    memory). Results equal the dense :func:`re_ranking` to float32 rounding.
    """
    _check_choice(ap, _AP_VARIANTS, "ap")
    rr = _reranking(qf, gf, k1, k2, lambda_value, metric, chunk_size)
    labels = _labels(q_pids, g_pids, q_camids, g_camids, rr.num_q, rr.num_g, rr.q.device)
    max_rank = _check_max_rank(max_rank, rr.num_g, "evaluate_reranked")
    rows = _block_rows(chunk_size, rr.num_q, rr.num_g, rr.q.device)
    return _evaluate_blocks(rr.blocks(rows), labels, max_rank, ap, "evaluate_reranked")


# --------------------------------------------------------------------------------------------
# Dense re-ranking (the test reference; O((q+g)^2) memory)
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
