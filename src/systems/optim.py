"""Learning-rate schedules and optimizer parameter groups used by the re-ID recipes.

Schedules are stepped once per epoch (Lightning ``interval: epoch``) unless they carry an
``interval`` attribute (``"step"``: once per optimizer step), which the system's
``configure_optimizers`` reads.
"""

from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from src.models.utils import param_groups


def _constant_one(step: int) -> float:
    return 1.0


def group_factors(
    optimizer: torch.optim.Optimizer, factor: Callable[[int], float]
) -> list[Callable[[int], float]]:
    """One `LambdaLR` factor per param group: `factor`, except for groups marked
    ``fixed_lr=True`` (e.g. the centre-loss centres, whose SGD lr the reference never
    schedules), which keep their lr."""
    return [_constant_one if g.get("fixed_lr") else factor for g in optimizer.param_groups]


class WarmupMultiStepLR(LambdaLR):
    """Linear warm-up from `warmup_factor * lr` to `lr` over `warmup_epochs`, then ×`gamma` at
    each milestone (the strong-baseline / BoT recipe: 10 warm-up epochs, decay at 40 and 70).

    ``factor(t) = (warmup_factor·(1 − t/W) + t/W if t < W else 1) · gamma^#{m ≤ t}`` with
    ``t = epoch + epoch_offset``. Lightning steps the scheduler at the end of each epoch, so the lr
    in force in (0-indexed) epoch ``e`` is ``lr · factor(e + epoch_offset)``.
    ``epoch_offset=1`` reproduces a reference that steps its scheduler at the *start* of every
    epoch (reid-strong-baseline ``engine/trainer.py``: ``scheduler.step()`` on
    ``Events.EPOCH_STARTED``): epoch 0 then runs at ``factor(1)`` and the decays take effect in
    epochs 39 and 69 for milestones (40, 70). ``epoch_offset=0``: epoch 0 runs at
    ``warmup_factor · lr``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_epochs: int = 10,
        warmup_factor: float = 0.01,
        epoch_offset: int = 0,
        last_epoch: int = -1,
    ) -> None:
        if list(milestones) != sorted(milestones):
            raise ValueError(f"scheduler.milestones must be increasing, got {list(milestones)}")
        if epoch_offset < 0:
            raise ValueError(f"scheduler.epoch_offset must be >= 0, got {epoch_offset}")
        self.milestones = list(milestones)
        self.gamma = gamma
        self.warmup_epochs = warmup_epochs
        self.warmup_factor = warmup_factor
        self.epoch_offset = epoch_offset
        super().__init__(optimizer, group_factors(optimizer, self._factor), last_epoch)

    def _factor(self, epoch: int) -> float:
        t = epoch + self.epoch_offset
        warm = 1.0
        if t < self.warmup_epochs:
            alpha = t / self.warmup_epochs
            warm = self.warmup_factor * (1 - alpha) + alpha
        decays = sum(t >= m for m in self.milestones)
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
        factors: list[Callable[[int], float]] = [
            _constant_one if g.get("fixed_lr") else partial(self._factor, i)
            for i, g in enumerate(optimizer.param_groups)
        ]
        super().__init__(optimizer, factors, last_epoch)

    def _factor(self, group: int, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            alpha = epoch / self.warmup_epochs
            return self.warmup_factor * (1 - alpha) + alpha
        span = max(1, self.max_epochs - self.warmup_epochs)
        progress = min(1.0, (epoch - self.warmup_epochs) / span)
        low = self._min_ratio[group]
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))


class ExponentialDecayLR(LambdaLR):
    """Hermans et al. 2017: constant until `decay_start`, then exponential decay that reaches
    `final_factor` at `decay_end` and stays there:

    ``factor(t) = final_factor ** clamp((t − decay_start) / (decay_end − decay_start), 0, 1)``

    where ``t`` counts scheduler steps: optimizer steps with ``interval="step"`` (TriNet:
    ``t`` = iterations done, ``tf.train.exponential_decay(lr, max(0, t − 15000), 10000, 0.001)``
    in the original ``train.py``), epochs with ``interval="epoch"`` (the lr in force in epoch
    ``e`` is ``lr · factor(e)``). ``interval`` is read by the system's ``configure_optimizers``.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        decay_start: int,
        decay_end: int,
        final_factor: float = 0.001,
        interval: str = "epoch",
        last_epoch: int = -1,
    ) -> None:
        if decay_start < 0 or decay_end <= decay_start:
            raise ValueError(
                f"scheduler: need 0 <= decay_start < decay_end, got decay_start={decay_start}, "
                f"decay_end={decay_end}"
            )
        if interval not in ("epoch", "step"):
            raise ValueError(f"scheduler.interval must be 'epoch' or 'step', got {interval!r}")
        self.decay_start = decay_start
        self.decay_end = decay_end
        self.final_factor = final_factor
        self.interval = interval
        super().__init__(optimizer, group_factors(optimizer, self._factor), last_epoch)

    def _factor(self, step: int) -> float:
        t = min(1.0, max(0.0, (step - self.decay_start) / (self.decay_end - self.decay_start)))
        return self.final_factor**t


class WithSGDGroups(torch.optim.Optimizer):
    """A main optimizer (e.g. Adam) plus param groups trained by their own plain SGD, as one
    ``torch.optim.Optimizer`` for Lightning (automatic optimisation takes a single optimizer).

    This is the centre-loss recipe of reid-strong-baseline (``solver/build.py``
    ``make_optimizer_with_center``, ``engine/trainer.py`` ``create_supervised_trainer_with_center``):
    the centres are not in the main optimizer; after ``backward`` the main optimizer steps, the
    centres' gradients are multiplied by ``grad_scale`` (``1 / CENTER_LOSS_WEIGHT``, undoing the
    loss weight) and a ``torch.optim.SGD(lr=CENTER_LR)`` steps them. Their lr is not scheduled:
    the groups are marked ``fixed_lr=True`` (the schedules in this module leave them alone; any
    other scheduler that changes them makes :meth:`step` fail).

    ``param_groups`` lists the main optimizer's groups, then the SGD groups (the same dicts, so
    schedulers, gradient scalers (AMP unscaling) and gradient clipping see every parameter).
    ``state_dict`` holds both optimizers' state dicts.

    Args:
        main: the optimizer of every other parameter.
        sgd_groups: ``{"params": [...], "lr": float, "grad_scale": float, "name": str}`` dicts
            (other SGD keys, e.g. ``momentum``, are passed on; the default is plain SGD).
    """

    def __init__(self, main: torch.optim.Optimizer, sgd_groups: Sequence[dict[str, Any]]) -> None:
        if not sgd_groups:
            raise ValueError("WithSGDGroups needs at least one SGD param group")
        groups = []
        for group in sgd_groups:
            group = dict(group)
            if "lr" not in group or "params" not in group:
                raise ValueError(f"an SGD param group needs `params` and `lr`, got {sorted(group)}")
            group.setdefault("grad_scale", 1.0)
            group["fixed_lr"] = True
            groups.append(group)
        self.main = main
        self.sgd = torch.optim.SGD(groups, lr=groups[0]["lr"])
        self._fixed_lrs = [float(g["lr"]) for g in self.sgd.param_groups]
        # Optimizer.__init__ appends the very group dicts it is given: they stay shared.
        super().__init__(self.main.param_groups + self.sgd.param_groups, defaults={})
        self._link()

    def _link(self) -> None:
        """Share the sub-optimizers' group dicts and state, in place (a holder of
        ``param_groups`` or ``state``, e.g. a wrapper made before a resume, sees the new ones)."""
        groups = self.main.param_groups + self.sgd.param_groups
        if isinstance(self.state, ChainMap):
            self.param_groups[:] = groups
            self.state.maps[:] = [self.main.state, self.sgd.state]
        else:  # first call, from __init__
            self.param_groups = groups
            self.state = ChainMap(self.main.state, self.sgd.state)  # type: ignore[assignment]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.main.step()
        for group, lr in zip(self.sgd.param_groups, self._fixed_lrs, strict=True):
            if group["lr"] != lr:
                raise ValueError(
                    f"the lr of the {group.get('name', 'SGD')!r} param group changed from {lr} to "
                    f"{group['lr']}: its lr is fixed (reid-strong-baseline never schedules the "
                    f"centre SGD); use a scheduler from src.systems.optim, which leaves "
                    f"fixed_lr groups alone"
                )
            if group["grad_scale"] != 1.0:
                for param in group["params"]:
                    if param.grad is not None:
                        param.grad.mul_(group["grad_scale"])
        self.sgd.step()
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"main": self.main.state_dict(), "sgd": self.sgd.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if set(state_dict) != {"main", "sgd"}:
            raise ValueError(
                "WithSGDGroups.load_state_dict expects the keys 'main' and 'sgd' (a checkpoint "
                f"of the same recipe), got {sorted(state_dict)}"
            )
        self.main.load_state_dict(state_dict["main"])
        self.sgd.load_state_dict(state_dict["sgd"])
        self._link()


# keys of the optimizer config that build_optimizer consumes (not passed to the optimizer)
GROUP_KEYS = ("norm_weight_decay", "bias_weight_decay")


def build_optimizer(
    model: nn.Module, optimizer_factory: Callable[..., torch.optim.Optimizer]
) -> torch.optim.Optimizer:
    """Instantiate a (Hydra-partial) optimizer over `model`'s parameter groups
    (`src.models.utils.param_groups`).

    The partial's ``weight_decay`` keyword is the decay of every parameter except normalisation
    layers, which get ``norm_weight_decay`` (0 unless the optimizer config sets it; BoT and
    AlignedReID decay them too), and conv/linear biases when ``bias_weight_decay`` is set.
    Those two keys are consumed here, not passed to the optimizer.

    Submodules with a ``sgd_param_group()`` method (:class:`~src.losses.CenterLoss`) keep their
    parameters out of the main optimizer: they are trained by their own SGD group
    (:class:`WithSGDGroups`).
    """
    factory = optimizer_factory
    kwargs: dict[str, Any] = {}
    if isinstance(factory, partial):
        kwargs = dict(factory.keywords)
        factory = partial(factory.func, *factory.args)
    extra = {key: kwargs.pop(key, None) for key in GROUP_KEYS}
    weight_decay = float(kwargs.get("weight_decay", 0.0))
    groups = param_groups(
        model,
        weight_decay=weight_decay,
        bn_weight_decay=float(extra["norm_weight_decay"] or 0.0),
        bias_weight_decay=extra["bias_weight_decay"],
    )
    sgd_groups = [
        m.sgd_param_group()
        for m in model.modules()
        if callable(getattr(m, "sgd_param_group", None))
    ]
    own = {id(p) for g in sgd_groups for p in g["params"]}
    if own:
        groups = [{**g, "params": [p for p in g["params"] if id(p) not in own]} for g in groups]
        groups = [g for g in groups if g["params"]]
    main = factory(params=groups, **kwargs)
    return WithSGDGroups(main, sgd_groups) if sgd_groups else main
