"""Learning-rate schedules and optimizer parameter groups used by the re-ID recipes.

All schedules here are stepped once per epoch (Lightning `interval: epoch`), as in the papers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from src.models.utils import param_groups


class WarmupMultiStepLR(LambdaLR):
    """Linear warm-up from `warmup_factor * lr` to `lr` over `warmup_epochs`, then ×`gamma` at
    each milestone (the strong-baseline / BoT recipe: 10 warm-up epochs, decay at 40 and 70).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_epochs: int = 10,
        warmup_factor: float = 0.01,
        last_epoch: int = -1,
    ) -> None:
        if list(milestones) != sorted(milestones):
            raise ValueError(f"scheduler.milestones must be increasing, got {list(milestones)}")
        self.milestones = list(milestones)
        self.gamma = gamma
        self.warmup_epochs = warmup_epochs
        self.warmup_factor = warmup_factor
        super().__init__(optimizer, self._factor, last_epoch)

    def _factor(self, epoch: int) -> float:
        warm = 1.0
        if epoch < self.warmup_epochs:
            alpha = epoch / self.warmup_epochs
            warm = self.warmup_factor * (1 - alpha) + alpha
        decays = sum(epoch >= m for m in self.milestones)
        return warm * self.gamma**decays


class WarmupCosineLR(LambdaLR):
    """Linear warm-up, then cosine annealing from `lr` to `eta_min` at `max_epochs`."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_epochs: int,
        warmup_epochs: int = 5,
        warmup_factor: float = 0.01,
        eta_min: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.max_epochs = max_epochs
        self.warmup_epochs = warmup_epochs
        self.warmup_factor = warmup_factor
        base = [g["lr"] for g in optimizer.param_groups]
        # eta_min is absolute; LambdaLR multiplies the base lr, so express it as a ratio per group.
        self._min_ratio = [eta_min / lr if lr > 0 else 0.0 for lr in base]
        super().__init__(
            optimizer, [partial(self._factor, i) for i in range(len(base))], last_epoch
        )

    def _factor(self, group: int, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            alpha = epoch / self.warmup_epochs
            return self.warmup_factor * (1 - alpha) + alpha
        span = max(1, self.max_epochs - self.warmup_epochs)
        progress = min(1.0, (epoch - self.warmup_epochs) / span)
        low = self._min_ratio[group]
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))


class ExponentialDecayLR(LambdaLR):
    """Hermans et al. 2017: constant until `decay_start`, then
    lr · final_factor^((epoch − decay_start)/(max_epochs − decay_start))."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        decay_start: int,
        max_epochs: int,
        final_factor: float = 0.001,
        last_epoch: int = -1,
    ) -> None:
        # decay_start >= max_epochs (e.g. a shortened debug run) simply never decays.
        if decay_start < 0:
            raise ValueError(f"scheduler.decay_start must be >= 0, got {decay_start}")
        self.decay_start = decay_start
        self.max_epochs = max_epochs
        self.final_factor = final_factor
        super().__init__(optimizer, self._factor, last_epoch)

    def _factor(self, epoch: int) -> float:
        if epoch < self.decay_start:
            return 1.0
        t = min(1.0, (epoch - self.decay_start) / max(1, self.max_epochs - self.decay_start))
        return self.final_factor**t


def build_optimizer(
    model: nn.Module, optimizer_factory: Callable[..., torch.optim.Optimizer]
) -> torch.optim.Optimizer:
    """Instantiate a (Hydra-partial) optimizer with normalisation parameters excluded from
    weight decay (`src.models.utils.param_groups`). The decay value is read from the partial's
    `weight_decay` keyword."""
    weight_decay = 0.0
    if isinstance(optimizer_factory, partial):
        weight_decay = float(optimizer_factory.keywords.get("weight_decay", 0.0))
    return optimizer_factory(params=param_groups(model, weight_decay=weight_decay))
