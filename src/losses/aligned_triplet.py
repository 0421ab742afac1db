"""AlignedReID triplet loss (Zhang et al., "AlignedReID: Surpassing Human-Level Performance in
Person Re-Identification", arXiv:1711.08184), as in AlignedReID-Re-Production-Pytorch
(``global_loss`` + ``local_loss`` with the global hard-example indices).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from .base import BatchHardLoss, fp32_compute
from .functional import (
    batch_local_dist,
    euclidean_dist,
    hard_example_mining,
    normalize,
    triplet_ranking_loss,
)

__all__ = ["AlignedTripletLoss", "AlignedTripletStats"]


class AlignedTripletStats(NamedTuple):
    """Result of :meth:`AlignedTripletLoss.forward_with_stats`.

    ``global_loss``, ``local_loss`` scalars; ``dist_ap``/``dist_an`` ``(N,)`` global distances
    to the mined positive/negative; ``local_dist_ap``/``local_dist_an`` ``(N,)`` aligned local
    distances of the same pairs; ``p_inds``/``n_inds`` ``(N,)`` long batch indices.
    """

    global_loss: Tensor
    local_loss: Tensor
    dist_ap: Tensor
    dist_an: Tensor
    local_dist_ap: Tensor
    local_dist_an: Tensor
    p_inds: Tensor
    n_inds: Tensor


class AlignedTripletLoss(BatchHardLoss):
    """Global batch-hard triplet loss plus the aligned local triplet loss of the same triplets.

    Hard positives/negatives are mined on the global Euclidean distances only (as in the
    paper, where the local branch does not take part in mining); the local loss applies the same
    hinge to :func:`~src.losses.functional.batch_local_dist` between each anchor and the samples
    mined for it, so gradients reach the local features of the anchor and of the mined samples.

    Args:
        margin: hinge margin of both losses, or ``None`` for the soft margin.
        normalize_feature: L2-normalise global features (over D) and each stripe of the local
            features (over d) first (the reference's ``normalize_feature`` option).
        check_negatives: validate that the batch has ≥ 2 identities (one boolean host read).

    Shapes: ``forward(global_feat (N, D), local_feat (N, m, d), targets (N,))`` returns
    ``(global_loss, local_loss)``, two scalars; the caller weights and sums them. Computes in
    fp32 under autocast.
    """

    @fp32_compute
    def forward_with_stats(
        self, global_feat: Tensor, local_feat: Tensor, targets: Tensor
    ) -> AlignedTripletStats:
        """Both losses plus the mining results (see :class:`AlignedTripletStats`)."""
        if local_feat.dim() != 3 or local_feat.size(0) != global_feat.size(0):
            raise ValueError(
                "AlignedTripletLoss: local_feat must be (N, m stripes, d channels) with the batch "
                f"size of global_feat {tuple(global_feat.shape)}, got {tuple(local_feat.shape)}"
            )
        if self.normalize_feature:
            global_feat = normalize(global_feat, axis=-1)
            local_feat = normalize(local_feat, axis=-1)
        dist_mat = euclidean_dist(global_feat, global_feat)
        dist_ap, dist_an, p_inds, n_inds = hard_example_mining(
            dist_mat, targets, return_inds=True, check_negatives=self.check_negatives
        )
        local_dist_ap = batch_local_dist(local_feat, local_feat[p_inds])
        local_dist_an = batch_local_dist(local_feat, local_feat[n_inds])
        global_loss = triplet_ranking_loss(dist_ap, dist_an, self.margin)
        local_loss = triplet_ranking_loss(local_dist_ap, local_dist_an, self.margin)
        return AlignedTripletStats(
            global_loss,
            local_loss,
            dist_ap,
            dist_an,
            local_dist_ap,
            local_dist_an,
            p_inds,
            n_inds,
        )

    def forward(
        self, global_feat: Tensor, local_feat: Tensor, targets: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``(global_loss, local_loss)`` for ``(N, D)``, ``(N, m, d)`` features and ``(N,)``."""
        stats = self.forward_with_stats(global_feat, local_feat, targets)
        return stats.global_loss, stats.local_loss

    def extra_repr(self) -> str:
        return f"margin={self.margin}, normalize_feature={self.normalize_feature}"
