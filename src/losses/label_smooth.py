"""Cross-entropy with label smoothing (Szegedy et al., "Rethinking the Inception Architecture
for Computer Vision", CVPR 2016), as torchreid / AlignedReID ``CrossEntropyLabelSmooth``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import FP32Loss

__all__ = ["CrossEntropyLabelSmooth"]


class CrossEntropyLabelSmooth(FP32Loss):
    """``mean_i Σ_k −q_ik log softmax(x_i)_k`` with ``q = (1 − ε)·onehot(y) + ε/K``.

    Equals ``F.cross_entropy(inputs, targets, label_smoothing=epsilon)``; computed in fp32
    under autocast so the log-softmax over many identities keeps its precision.

    Args:
        num_classes: K, the number of identities (must match ``inputs.size(1)``).
        epsilon: smoothing weight ε in [0, 1].

    Shapes: ``forward(inputs (N, K) logits, targets (N,) long in [0, K)) -> ()``. Targets out of
    range are not checked (that would need a host sync); they fail inside ``scatter``.
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(
                f"CrossEntropyLabelSmooth: num_classes must be >= 1, got {num_classes}"
            )
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"CrossEntropyLabelSmooth: epsilon must be in [0, 1], got {epsilon}")
        self.num_classes = num_classes
        self.epsilon = epsilon

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        if inputs.dim() != 2 or inputs.size(1) != self.num_classes:
            raise ValueError(
                f"CrossEntropyLabelSmooth: inputs must be logits (N, {self.num_classes}), got "
                f"shape {tuple(inputs.shape)}"
            )
        if targets.shape != inputs.shape[:1]:
            raise ValueError(
                f"CrossEntropyLabelSmooth: targets must have shape ({inputs.size(0)},), got "
                f"{tuple(targets.shape)}"
            )
        log_probs = torch.log_softmax(inputs, dim=1)
        one_hot = torch.zeros_like(log_probs).scatter_(
            1, targets.to(inputs.device).long().unsqueeze(1), 1.0
        )
        smoothed = (1 - self.epsilon) * one_hot + self.epsilon / self.num_classes
        return (-smoothed * log_probs).mean(0).sum()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, epsilon={self.epsilon}"
