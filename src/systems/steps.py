"""Step logic of the systems as plain functions, testable without a Trainer."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from src.losses import AlignedTripletLoss, TripletLoss


@torch.no_grad()
def extract_embeddings(net: nn.Module, images: Tensor, flip: bool = False) -> Tensor:
    """Retrieval features of a batch, (N, 3, H, W) -> (N, D).

    `flip=True` averages the features of the image and its horizontal mirror (test-time flip).
    """
    feats = net.embed(images)
    if flip:
        feats = (feats + net.embed(torch.flip(images, dims=[3]))) / 2
    return feats.float()


def supervised_objective(
    outputs: Mapping[str, Tensor | None],
    pids: Tensor,
    metric_loss: TripletLoss | AlignedTripletLoss | None,
    ce_loss: nn.Module | None,
    weights: Mapping[str, float],
    center_loss: nn.Module | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the metric-learning loss, the (label-smoothed) CE and the center loss.

    Args:
        outputs: `ReIDNet.forward` dict: "global_feat" (N, D) feeds the triplet loss (before the
            BNNeck, as in the strong baseline); "logits" (N, C) feed the CE; "local_feat"
            (N, m, d) feeds the aligned local loss.
        pids: (N,) identity labels.
        weights: keys "metric", "ce" and, for AlignedReID, "local"; "center" with a center loss.
        center_loss: `CenterLoss` on "global_feat" (before BNNeck, as reid-strong-baseline).

    Returns:
        (total loss, detached terms for logging: loss_tri / loss_local / loss_ce / loss_center /
        dist_ap / dist_an / acc).
    """
    total = outputs["global_feat"].new_zeros((), dtype=torch.float32)
    terms: dict[str, Tensor] = {}
    if metric_loss is not None:
        if isinstance(metric_loss, AlignedTripletLoss):
            if outputs.get("local_feat") is None:
                raise ValueError("loss=aligned needs local features: set model.local_branch=true")
            stats = metric_loss.forward_with_stats(
                outputs["global_feat"], outputs["local_feat"], pids
            )
            total = total + weights.get("metric", 1.0) * stats.global_loss
            total = total + weights.get("local", 1.0) * stats.local_loss
            terms["loss_tri"] = stats.global_loss.detach()
            terms["loss_local"] = stats.local_loss.detach()
        else:
            stats = metric_loss.forward_with_stats(outputs["global_feat"], pids)
            total = total + weights.get("metric", 1.0) * stats.loss
            terms["loss_tri"] = stats.loss.detach()
        terms["dist_ap"] = stats.dist_ap.detach().mean()
        terms["dist_an"] = stats.dist_an.detach().mean()
    if ce_loss is not None:
        logits = outputs.get("logits")
        if logits is None:
            raise ValueError(
                "a CE loss is configured but the model has no classifier (num_classes=0)"
            )
        loss_c = ce_loss(logits, pids)
        total = total + weights.get("ce", 1.0) * loss_c
        terms["loss_ce"] = loss_c.detach()
        terms["acc"] = (logits.detach().argmax(1) == pids).float().mean()
    if center_loss is not None:
        loss_center = center_loss(outputs["global_feat"], pids)
        total = total + weights["center"] * loss_center
        terms["loss_center"] = loss_center.detach()
    terms["loss"] = total.detach()
    return total, terms
