"""Triplet margin loss on given (anchor, positive, negative) triplets (Schroff et al., FaceNet,
CVPR 2015), with the distance swap of Balntas et al. (BMVC 2016).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import FP32Loss

__all__ = ["TripletMarginLoss"]

_REDUCTIONS = ("mean", "sum", "none")


class TripletMarginLoss(FP32Loss):
    """``max(0, margin + d(a, p) − d(a, n))`` with ``d(u, v) = ‖u − v + eps‖_p``.

    Same function as :class:`torch.nn.TripletMarginLoss` for every option, in value and
    gradient (tested against it), but computed in fp32 under autocast. Note the ``eps`` is added
    to the *difference* (as in :func:`torch.pairwise_distance`), not to the norm. With
    ``swap=True`` the negative distance is ``min(d(a, n), d(p, n))``.

    Args:
        margin: must be > 0.
        p: norm degree of the pairwise distance.
        eps: added to the difference vectors before the norm.
        swap: use the distance swap.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Shapes: anchor, positive, negative ``(N, D)`` or ``(D,)`` (in general ``(*, D)``: the same
    number of dimensions, broadcastable); output ``()``, or ``(N,)``/``(*)`` for
    ``reduction="none"``.
    """

    def __init__(
        self,
        margin: float = 1.0,
        p: float = 2.0,
        eps: float = 1e-6,
        swap: bool = False,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if margin <= 0:
            raise ValueError(f"TripletMarginLoss: margin must be > 0, got {margin}")
        if reduction not in _REDUCTIONS:
            raise ValueError(
                f"TripletMarginLoss: reduction must be one of {_REDUCTIONS}, got {reduction!r}"
            )
        self.margin = margin
        self.p = p
        self.eps = eps
        self.swap = swap
        self.reduction = reduction

    def _dist(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.linalg.vector_norm(x - y + self.eps, ord=self.p, dim=-1)

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        if not anchor.dim() == positive.dim() == negative.dim():
            raise ValueError(
                "TripletMarginLoss: anchor, positive and negative must have the same number of "
                f"dimensions, got {anchor.dim()}D, {positive.dim()}D and {negative.dim()}D"
            )
        if anchor.dim() == 0:
            raise ValueError("TripletMarginLoss: inputs must have a feature dimension, got 0-d")
        dist_pos = self._dist(anchor, positive)
        dist_neg = self._dist(anchor, negative)
        if self.swap:
            dist_neg = torch.minimum(dist_neg, self._dist(positive, negative))
        loss = torch.clamp_min(self.margin + dist_pos - dist_neg, 0)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, p={self.p}, eps={self.eps}, swap={self.swap}, "
            f"reduction={self.reduction!r}"
        )
