"""Center loss (Wen et al., "A Discriminative Feature Learning Approach for Deep Face
Recognition", ECCV 2016), as the last trick of Bag of Tricks (Luo et al. 2019,
reid-strong-baseline ``layers/center_loss.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .base import FP32Loss

__all__ = ["CenterLoss"]


class CenterLoss(FP32Loss):
    """``L_C = (1/N) Σ_i ‖x_i − c_{y_i}‖²`` with one learnable centre ``c_k`` per identity.

    As reid-strong-baseline: centres initialised from N(0, 1); each sample's squared distance
    clamped to [1e-12, 1e12]; the loss enters the objective with weight ``weight`` (5e-4) and
    the centres are trained by their **own SGD** at ``lr`` (0.5), unscheduled, on the gradient
    of the *unweighted* loss: the reference multiplies the centre gradient by ``1 / weight``
    before its ``optimizer_center.step()``. :meth:`sgd_param_group` hands that group to
    :func:`src.systems.optim.build_optimizer`, which keeps the centres out of the main
    optimizer. The reference's masked distance matrix also adds ``(K − 1)·1e-12`` per sample
    (the clamped zeros of the other identities): a constant without gradient, left out here.

    Args:
        num_classes: K identities.
        feat_dim: D, the feature dimension (the pooled feature before BNNeck, as the reference).
        weight: the loss weight in the objective (``loss.weights.center``); the centre gradient
            is rescaled by ``1 / weight``.
        lr: SGD learning rate of the centres.

    Shapes: ``forward(features (N, D), labels (N,) long in [0, K)) -> ()``.
    """

    def __init__(
        self, num_classes: int, feat_dim: int, weight: float = 5e-4, lr: float = 0.5
    ) -> None:
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(
                f"CenterLoss: num_classes and feat_dim must be >= 1, got {num_classes}, {feat_dim}"
            )
        if weight <= 0 or lr <= 0:
            raise ValueError(
                f"CenterLoss: weight (loss.center_weight) and lr (loss.center.lr) must be > 0, "
                f"got weight={weight}, lr={lr}"
            )
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.weight = float(weight)
        self.lr = float(lr)
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: Tensor, labels: Tensor) -> Tensor:
        if features.dim() != 2 or features.size(1) != self.feat_dim:
            raise ValueError(
                f"CenterLoss: features must be (N, {self.feat_dim}), got {tuple(features.shape)}"
            )
        if labels.shape != features.shape[:1]:
            raise ValueError(
                f"CenterLoss: labels must have shape ({features.size(0)},), got "
                f"{tuple(labels.shape)}"
            )
        diff = features - self.centers.float()[labels.long()]  # (N, D)
        dist = diff.pow(2).sum(1).clamp(min=1e-12, max=1e12)  # (N,)
        return dist.mean()

    def sgd_param_group(self) -> dict[str, Any]:
        """The centres' optimizer group: plain SGD at ``lr`` on ``grad / weight``."""
        return {
            "params": [self.centers],
            "lr": self.lr,
            "grad_scale": 1.0 / self.weight,
            "weight_decay": 0.0,
            "name": "center",
        }

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, feat_dim={self.feat_dim}, weight={self.weight}, "
            f"lr={self.lr}"
        )
