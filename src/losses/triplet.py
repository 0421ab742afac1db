"""Batch-hard triplet loss (Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for Person
Re-Identification", arXiv:1703.07737), as implemented in open-reid / torchreid ``TripletLoss``.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .base import BatchHardLoss, fp32_compute
from .functional import euclidean_dist, hard_example_mining, normalize, triplet_ranking_loss

__all__ = ["TripletLoss", "TripletStats"]


class TripletStats(NamedTuple):
    """Result of :meth:`TripletLoss.forward_with_stats` (all tensors on the input's device).

    ``loss`` scalar; ``dist_ap``/``dist_an`` ``(N,)`` distance of each anchor to its hardest
    positive/negative (carry gradient: ``.detach()`` before logging); ``p_inds``/``n_inds``
    ``(N,)`` long batch indices of those samples.
    """

    loss: Tensor
    dist_ap: Tensor
    dist_an: Tensor
    p_inds: Tensor
    n_inds: Tensor


class TripletLoss(BatchHardLoss):
    """Batch-hard triplet loss with hard or soft margin.

    For each anchor the hardest positive (largest Euclidean distance, the anchor itself
    included) and hardest negative (smallest distance) in the batch are mined, then

    * ``margin`` a float: ``mean(max(0, d_ap − d_an + margin))``
      (``nn.MarginRankingLoss(margin)(d_an, d_ap, 1)``, the reference semantics);
    * ``margin=None``: soft margin ``mean(softplus(d_ap − d_an))``.

    Mining is mask-based, so identities may have different numbers of samples in the batch. A
    batch with a single identity raises ``ValueError`` (see
    :func:`~src.losses.functional.hard_example_mining` and ``check_negatives``).

    Args:
        margin: hinge margin, or ``None`` for the soft margin.
        normalize_feature: L2-normalise the features before computing distances.
        check_negatives: validate that the batch has ≥ 2 identities (one boolean host read).

    Shapes: ``forward(inputs (N, D), targets (N,)) -> ()``. Computes in fp32 under autocast.
    """

    @fp32_compute
    def from_distances(self, dist_ap: Tensor, dist_an: Tensor) -> Tensor:
        """The ranking part alone on already mined distances, ``(N,), (N,) -> ()``.

        This is the reference code's ``TripletLoss.__call__(dist_ap, dist_an)``; it is what
        :func:`~src.losses.functional.global_loss` calls.
        """
        return triplet_ranking_loss(dist_ap, dist_an, self.margin)

    @fp32_compute
    def forward_with_stats(self, inputs: Tensor, targets: Tensor) -> TripletStats:
        """Loss plus the mining results, for logging (see :class:`TripletStats`)."""
        if self.normalize_feature:
            inputs = normalize(inputs, axis=-1)
        dist_mat = euclidean_dist(inputs, inputs)
        dist_ap, dist_an, p_inds, n_inds = hard_example_mining(
            dist_mat, targets, return_inds=True, check_negatives=self.check_negatives
        )
        loss = triplet_ranking_loss(dist_ap, dist_an, self.margin)
        return TripletStats(loss, dist_ap, dist_an, p_inds, n_inds)

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Scalar loss for features ``(N, D)`` and labels ``(N,)``."""
        return self.forward_with_stats(inputs, targets).loss

    def extra_repr(self) -> str:
        return f"margin={self.margin}, normalize_feature={self.normalize_feature}"
