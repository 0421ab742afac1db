"""Distances and hard-example mining shared by the metric-learning losses.

Semantics follow the open-reid / AlignedReID-Re-Production-Pytorch reference code (function names
and signatures are kept so code written against them ports by changing an import), with two
deliberate differences, both documented where they occur:

* mining is mask-based, so identities may have different numbers of samples in a batch (the
  reference's ``dist_mat[is_pos].view(N, -1)`` requires equal counts);
* the AlignedReID element distance (eᵈ−1)/(eᵈ+1) is computed as the identical tanh(d/2), which
  does not overflow to inf/inf = NaN for d > 88 in fp32.

Every public function computes in fp32 under autocast (see :mod:`src.losses.base`); float64
inputs stay float64. Shapes: N, M batch sizes, D feature dimension, m, n numbers of stripes,
d stripe channels.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import fp32_compute

__all__ = [
    "batch_euclidean_dist",
    "batch_local_dist",
    "cosine_dist",
    "euclidean_dist",
    "global_loss",
    "hard_example_mining",
    "local_dist",
    "normalize",
    "shortest_path",
    "triplet_ranking_loss",
]

# Reference (open-reid) constants: added to the norm in `normalize`, lower clamp of the squared
# distance before the sqrt (keeps the sqrt's gradient finite at zero distance).
NORM_EPS = 1e-12
SQUARED_DIST_MIN = 1e-12


@fp32_compute
def normalize(x: Tensor, axis: int = -1) -> Tensor:
    """Scale ``x`` to unit L2 norm along ``axis``: ``x / (‖x‖ + 1e-12)`` (open-reid).

    Unlike :func:`torch.nn.functional.normalize` (which clamps the norm), the reference adds
    1e-12 to it; the two differ only for norms near 1e-12. A zero vector maps to zero with a
    finite gradient. Shape is preserved.
    """
    return x / (torch.linalg.vector_norm(x, ord=2, dim=axis, keepdim=True) + NORM_EPS)


@fp32_compute
def euclidean_dist(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise Euclidean distances, ``(M, D), (N, D) -> (M, N)``.

    ``sqrt(clamp(‖x‖² + ‖y‖² − 2·x·yᵀ, min=1e-12))`` exactly as open-reid. The clamp also makes
    the gradient finite when two rows coincide: the sqrt is evaluated at ≥ 1e-12 (derivative
    ≤ 5e5) and entries that were clamped get zero gradient, so identical features never produce
    NaN gradients.
    """
    _check_matrix("x", x)
    _check_matrix("y", y)
    if x.size(1) != y.size(1):
        raise ValueError(
            f"euclidean_dist: x and y must have the same feature dimension, got x {tuple(x.shape)}"
            f" and y {tuple(y.shape)}"
        )
    xx = x.pow(2).sum(dim=1, keepdim=True)  # (M, 1)
    # Within-batch distances (y is x, the usual case) reuse the squared norms.
    yy = xx.t() if y is x else y.pow(2).sum(dim=1, keepdim=True).t()  # (1, N)
    dist = torch.addmm(xx + yy, x, y.t(), beta=1, alpha=-2)
    return dist.clamp(min=SQUARED_DIST_MIN).sqrt()


@fp32_compute
def batch_euclidean_dist(x: Tensor, y: Tensor) -> Tensor:
    """Per-sample pairwise Euclidean distances, ``(N, m, d), (N, n, d) -> (N, m, n)``.

    Batched version of :func:`euclidean_dist` (same clamp before the sqrt).
    """
    _check_local("x", x)
    _check_local("y", y)
    if x.size(0) != y.size(0) or x.size(2) != y.size(2):
        raise ValueError(
            "batch_euclidean_dist: x and y must share the batch and channel sizes, got "
            f"x {tuple(x.shape)} and y {tuple(y.shape)}"
        )
    xx = x.pow(2).sum(dim=-1, keepdim=True)  # (N, m, 1)
    yy = y.pow(2).sum(dim=-1, keepdim=True).transpose(1, 2)  # (N, 1, n)
    dist = torch.baddbmm(xx + yy, x, y.transpose(1, 2), beta=1, alpha=-2)
    return dist.clamp(min=SQUARED_DIST_MIN).sqrt()


@fp32_compute
def cosine_dist(x: Tensor, y: Tensor) -> Tensor:
    """Pairwise cosine distances ``1 − cos(x_i, y_j)``, ``(M, D), (N, D) -> (M, N)``, in [0, 2].

    Rows are normalised with :func:`normalize`; a zero row has distance 1 to everything.
    """
    _check_matrix("x", x)
    _check_matrix("y", y)
    if x.size(1) != y.size(1):
        raise ValueError(
            f"cosine_dist: x and y must have the same feature dimension, got x {tuple(x.shape)}"
            f" and y {tuple(y.shape)}"
        )
    return 1.0 - normalize(x, axis=1) @ normalize(y, axis=1).t()


@fp32_compute
def hard_example_mining(
    dist_mat: Tensor,
    labels: Tensor,
    return_inds: bool = False,
    *,
    check_negatives: bool = True,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor, Tensor]:
    """Hardest positive and hardest negative of every anchor (batch-hard mining).

    Args:
        dist_mat: ``(N, N)`` distances between the samples of a batch.
        labels: ``(N,)`` identity labels (any integer dtype).
        return_inds: also return the batch indices of the selected samples.
        check_negatives: raise ``ValueError`` when some anchor has no negative, i.e. when all
            labels are equal (an anchor lacks a negative exactly in that case). The check costs
            one host read of a single boolean computed from ``labels`` (free on CPU, one small
            device-to-host copy on an accelerator). Pass ``False`` in a training step that
            must never synchronise and whose sampler guarantees ≥ 2 identities; an anchor
            without a negative then gets ``dist_an = +inf`` (hinge term 0).

    Returns:
        ``dist_ap (N,)`` = max distance to a sample of the same label (the anchor itself
        included, so an anchor whose only positive is itself gets its self-distance, as in the
        reference code), ``dist_an (N,)`` = min distance to a sample of another label, and with
        ``return_inds`` also ``p_inds, n_inds`` (``(N,)`` long, indices into the batch). Ties
        resolve to the lowest index, like the reference's ``torch.max`` over the compacted row.
        Gradients reach ``dist_mat`` only at the selected entries.

    Mining is mask-based (masked argmax/argmin over full rows, then a gather), so identities
    may have different numbers of samples, unlike the reference's ``view(N, -1)``.
    """
    if dist_mat.dim() != 2 or dist_mat.size(0) != dist_mat.size(1):
        raise ValueError(
            f"hard_example_mining: dist_mat must be a square (N, N) matrix, got shape "
            f"{tuple(dist_mat.shape)}"
        )
    n = dist_mat.size(0)
    if labels.dim() != 1 or labels.size(0) != n:
        raise ValueError(
            f"hard_example_mining: labels must have shape ({n},) to match dist_mat, got "
            f"{tuple(labels.shape)}"
        )
    labels = labels.to(dist_mat.device)
    if check_negatives and (n == 0 or bool((labels == labels[0]).all())):
        raise ValueError(
            "hard_example_mining: every anchor needs a negative, but the batch has a single "
            f"identity (labels all equal to {labels[0].item() if n else 'n/a'}, batch size {n}); "
            "sample at least two identities per batch (P >= 2)"
        )
    is_pos = labels.unsqueeze(0) == labels.unsqueeze(1)  # [i, j]: labels[i] == labels[j]
    # Select indices without autograd, then gather: the backward is a single scatter per
    # selection instead of max/min backward plus masked_fill backward over (N, N).
    with torch.no_grad():
        p_inds = dist_mat.masked_fill(~is_pos, float("-inf")).argmax(dim=1)
        n_inds = dist_mat.masked_fill(is_pos, float("inf")).argmin(dim=1)
    dist_ap = dist_mat.gather(1, p_inds.unsqueeze(1)).squeeze(1)
    dist_an = dist_mat.gather(1, n_inds.unsqueeze(1)).squeeze(1)
    if not check_negatives:
        # argmin of an all-inf row is 0: report the missing negative as +inf instead.
        dist_an = torch.where(is_pos.all(dim=1), float("inf"), dist_an)
    if return_inds:
        return dist_ap, dist_an, p_inds, n_inds
    return dist_ap, dist_an


@fp32_compute
def triplet_ranking_loss(dist_ap: Tensor, dist_an: Tensor, margin: float | None) -> Tensor:
    """Mean triplet hinge on mined distances, ``(N,), (N,) -> ()``.

    ``margin`` a float: ``mean(max(0, dist_ap − dist_an + margin))``, which is
    ``nn.MarginRankingLoss(margin)(dist_an, dist_ap, y=1)`` bit for bit. ``margin=None``: the
    soft margin of Hermans et al., ``mean(softplus(dist_ap − dist_an))`` =
    ``nn.SoftMarginLoss()(dist_an − dist_ap, y=1)``, computed with softplus so that it cannot
    overflow to inf for large distances.
    """
    if margin is None:
        return torch.nn.functional.softplus(dist_ap - dist_an).mean()
    return (dist_ap - dist_an + margin).clamp_min(0).mean()


@fp32_compute
def global_loss(
    tri_loss: Any,
    global_feat: Tensor,
    labels: Tensor,
    normalize_feature: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Batch-hard triplet loss on global features (AlignedReID-Re-Production ``global_loss``).

    Args:
        tri_loss: the ranking criterion applied to the mined distances: a
            :class:`~src.losses.TripletLoss` (its ``from_distances`` is used, so its own
            ``normalize_feature`` is ignored here) or any callable ``(dist_ap, dist_an) -> loss``
            such as the reference code's ``TripletLoss`` object.
        global_feat: ``(N, D)`` features.
        labels: ``(N,)`` identity labels.
        normalize_feature: L2-normalise the features before the distances (reference default).

    Returns:
        ``loss`` (scalar), ``p_inds, n_inds`` (``(N,)`` long), ``dist_ap, dist_an`` (``(N,)``),
        ``dist_mat`` (``(N, N)``).
    """
    _check_matrix("global_feat", global_feat)
    if normalize_feature:
        global_feat = normalize(global_feat, axis=-1)
    dist_mat = euclidean_dist(global_feat, global_feat)
    dist_ap, dist_an, p_inds, n_inds = hard_example_mining(dist_mat, labels, return_inds=True)
    criterion: Callable[[Tensor, Tensor], Tensor] = getattr(tri_loss, "from_distances", tri_loss)
    loss = criterion(dist_ap, dist_an)
    return loss, p_inds, n_inds, dist_ap, dist_an, dist_mat


@fp32_compute
def shortest_path(cost: Tensor) -> Tensor:
    """Minimal path cost through a grid, ``(..., m, n) -> (...)``.

    The path starts at ``[0, 0]``, ends at ``[m-1, n-1]`` and moves one step down or right;
    its cost is the sum of the visited entries (AlignedReID's alignment of m stripes of one
    image with n stripes of another). The dynamic programme
    ``D[i, j] = min(D[i-1, j], D[i, j-1]) + cost[i, j]`` runs over the m + n − 1 anti-diagonals,
    each step vectorised over the diagonal and all leading dimensions. It performs the same
    additions and minima as the reference's double loop, so values and gradients (including the
    even split of ``torch.minimum`` at ties) are the same.

    Note the layout: the grid is in the *last* two dimensions (the reference ``shortest_dist``
    takes ``[m, n, *]``).
    """
    if cost.dim() < 2 or cost.size(-1) == 0 or cost.size(-2) == 0:
        raise ValueError(
            f"shortest_path: cost must have shape (..., m, n) with m, n >= 1, got "
            f"{tuple(cost.shape)}"
        )
    m, n = cost.shape[-2:]
    batch_shape = cost.shape[:-2]
    rows = torch.arange(m, device=cost.device)
    diagonals = torch.arange(m + n - 1, device=cost.device)
    cols = diagonals.unsqueeze(0) - rows.unsqueeze(1)  # (m, m+n-1): column of cell (i, k - i)
    inf = torch.full((), float("inf"), dtype=cost.dtype, device=cost.device)
    # Cells outside the grid cost +inf: they never win a minimum against a cell inside the grid
    # (every inside cell but [0, 0] has an inside neighbour), so they receive no gradient.
    outside = torch.where((cols >= 0) & (cols < n), 0.0, inf)
    # skewed[..., i, k] = cost[..., i, k - i]: anti-diagonal k becomes column k.
    skewed = cost.gather(-1, cols.clamp(0, n - 1).expand(*batch_shape, m, m + n - 1)) + outside
    pad = inf.expand(*batch_shape, 1)
    prev = skewed[..., 0]  # D on anti-diagonal 0, indexed by row: only [0, 0] is inside
    for k in range(1, m + n - 1):
        up = torch.cat([pad, prev[..., :-1]], dim=-1)  # D[i-1, k-i] sits at row i-1 of diag k-1
        prev = torch.minimum(up, prev) + skewed[..., k]  # prev[i] = D[i, k-1-i] (left)
    return prev[..., m - 1]


@fp32_compute
def local_dist(x: Tensor, y: Tensor) -> Tensor:
    """AlignedReID local distance between all pairs, ``(M, m, d), (N, n, d) -> (M, N)``.

    Element distances between stripes are Euclidean, normalised to [0, 1) with
    ``(eᵈ − 1)/(eᵈ + 1)`` (evaluated as the identical ``tanh(d/2)``, which cannot overflow),
    then the shortest path (:func:`shortest_path`) aligns the stripes.
    """
    _check_local("x", x)
    _check_local("y", y)
    if x.size(2) != y.size(2):
        raise ValueError(
            f"local_dist: x and y must have the same stripe channels, got x {tuple(x.shape)} and "
            f"y {tuple(y.shape)}"
        )
    M, m, d = x.shape
    N, n, _ = y.shape
    dist = euclidean_dist(x.reshape(M * m, d), y.reshape(N * n, d))  # (M*m, N*n)
    dist = torch.tanh(dist / 2)
    return shortest_path(dist.view(M, m, N, n).permute(0, 2, 1, 3))


@fp32_compute
def batch_local_dist(x: Tensor, y: Tensor) -> Tensor:
    """AlignedReID local distance of paired samples, ``(N, m, d), (N, n, d) -> (N,)``.

    Same as ``local_dist(x, y).diagonal()`` without computing the other pairs.
    """
    dist = torch.tanh(batch_euclidean_dist(x, y) / 2)  # (N, m, n)
    return shortest_path(dist)


def _check_matrix(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be a (N, D) matrix, got shape {tuple(t.shape)}")


def _check_local(name: str, t: Tensor) -> None:
    if t.dim() != 3:
        raise ValueError(
            f"{name} must be local features shaped (N, m stripes, d channels), got shape "
            f"{tuple(t.shape)}"
        )


_MAR_HELPERS = ("soft_multilabel", "log_soft_multilabel", "pairwise_agreement")


def __getattr__(name: str) -> Any:
    # The MAR soft-multilabel helpers live in `mar.py` (which imports this module); re-export
    # them lazily so `src.losses.functional` offers every functional piece without an import
    # cycle.
    if name in _MAR_HELPERS:
        from . import mar

        return getattr(mar, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
