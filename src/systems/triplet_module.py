"""Supervised metric-learning re-ID: batch-hard triplet (or AlignedReID) + label-smoothed CE."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from src.systems.base import ReIDSystem
from src.systems.steps import supervised_objective


class TripletReIDModule(ReIDSystem):
    """LightningModule holding a `ReIDNet`, a metric loss and an optional CE loss.

    Args:
        net: factory (Hydra partial of `src.models.ReIDNet`) called with `num_classes`.
        metric_loss: `TripletLoss` / `AlignedTripletLoss` (None: CE only).
        optimizer, scheduler: Hydra partials (the scheduler is stepped per epoch).
        ce_loss: factory (partial of `CrossEntropyLabelSmooth` or a torch CE) called with
            `num_classes`, or None for a pure metric-learning run.
        num_classes: number of training identities (filled in from the datamodule).
        loss_weights: {"metric": w, "ce": w, "local": w, "center": w}.
        center_loss: factory (partial of `CenterLoss`) called with `num_classes` and the
            network's `feat_dim`, or None. Its weight must equal `loss_weights["center"]` (its
            centre gradient is rescaled by 1 / weight, reid-strong-baseline).
        compile: apply `torch.compile` to the backbone only (checkpoints keep plain names).
    """

    def __init__(
        self,
        net: Callable[..., nn.Module],
        metric_loss: nn.Module | None,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., Any] | None = None,
        ce_loss: Callable[..., nn.Module] | None = None,
        num_classes: int = 0,
        loss_weights: Mapping[str, float] | None = None,
        flip_test: bool = False,
        eval_metric: str = "euclidean",
        rerank: bool = False,
        eval_ap: str = "standard",
        compile: bool = False,
        center_loss: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__(optimizer, scheduler, flip_test, eval_metric, rerank, eval_ap)
        # Primitives only: checkpoints must load with torch's weights_only safe loading.
        self.save_hyperparameters(
            ignore=["net", "metric_loss", "ce_loss", "center_loss", "optimizer", "scheduler"],
            logger=False,
        )
        if ce_loss is not None and num_classes < 1:
            raise ValueError("system.ce_loss is set but num_classes < 1 (no training identities?)")
        self.net = net(num_classes=num_classes if ce_loss is not None else 0)
        self.metric_loss = metric_loss
        if metric_loss is not None:  # P x K batches have P >= 2 ids: no bool() host sync per step
            metric_loss.check_negatives = False
        self.ce_loss = ce_loss(num_classes=num_classes) if ce_loss is not None else None
        self.loss_weights = dict(loss_weights or {"metric": 1.0, "ce": 1.0})
        self.center_loss = None
        if center_loss is not None:
            if num_classes < 1:
                raise ValueError("system.center_loss is set but num_classes < 1")
            self.center_loss = center_loss(num_classes=num_classes, feat_dim=self.net.feat_dim)
            if self.loss_weights.get("center") != self.center_loss.weight:
                raise ValueError(
                    f"loss.weights.center ({self.loss_weights.get('center')}) must equal the "
                    f"center loss weight ({self.center_loss.weight}): its centre gradient is "
                    f"rescaled by 1 / weight; set both with loss.center_weight"
                )
        if compile:
            self.net.compile_backbone()

    def forward(self, images: Tensor) -> Tensor:
        """Retrieval embedding, (N, 3, H, W) -> (N, D)."""
        return self.net.embed(images)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        outputs = self.net(batch["img"])
        loss, terms = supervised_objective(
            outputs,
            batch["pid"],
            self.metric_loss,
            self.ce_loss,
            self.loss_weights,
            center_loss=self.center_loss,
        )
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, on_step=True, on_epoch=True)
        return loss
