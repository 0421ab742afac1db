"""Distance matrices between query and gallery features (torchreid's conventions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from src.metrics._inputs import _METRICS, ArrayLike, Metric, _as_features, _check_choice

__all__ = ["compute_distance_matrix"]


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
