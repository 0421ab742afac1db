"""Optimizer helpers for re-ID models."""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

__all__ = ["NORM_LAYERS", "param_groups"]

# Normalisation layers whose affine parameters are excluded from the main weight decay.
NORM_LAYERS: tuple[type[nn.Module], ...] = (_NormBase, nn.GroupNorm, nn.LayerNorm)


def param_groups(
    module: nn.Module,
    weight_decay: float,
    bn_weight_decay: float = 0.0,
    bias_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``module`` into weight-decay groups.

    Decision (documented in docs/models.md): parameters of normalisation layers (BatchNorm,
    InstanceNorm, GroupNorm, LayerNorm: weight and bias) get ``bn_weight_decay`` (0 by default);
    every other parameter gets ``weight_decay``, including biases of conv/linear layers (unless
    ``bias_weight_decay`` is given) and the classifier weight. This is MAR's recipe (wd on
    non-BN parameters, the agents decayed too, BN not decayed) and the issue's "BN parameters
    excluded from weight decay". Bag of Tricks' reference code decays everything with the same
    value: use ``bn_weight_decay=weight_decay`` to reproduce it. Scalar parameters (GeM's
    exponent ``p``) are never decayed: decay would pull the exponent towards 0, which means
    nothing for an exponent.

    Frozen parameters (``requires_grad=False``, e.g. the BNNeck shift) are left out. Shared
    parameters appear once. Empty groups are dropped.

    Returns:
        list of ``{"params": [...], "weight_decay": float, "name": str}`` dicts for
        ``torch.optim`` (the extra ``name`` key is kept by optimizers and helps logging).
    """
    norm_params: list[nn.Parameter] = []
    bias_params: list[nn.Parameter] = []
    other_params: list[nn.Parameter] = []
    scalar_params: list[nn.Parameter] = []
    seen: set[int] = set()
    for submodule in module.modules():
        is_norm = isinstance(submodule, NORM_LAYERS)
        for name, param in submodule.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if is_norm:
                norm_params.append(param)
            elif param.ndim == 0:
                scalar_params.append(param)
            elif name == "bias" and bias_weight_decay is not None:
                bias_params.append(param)
            else:
                other_params.append(param)
    groups = [
        {"params": other_params, "weight_decay": float(weight_decay), "name": "decay"},
        {"params": norm_params, "weight_decay": float(bn_weight_decay), "name": "norm"},
    ]
    if bias_weight_decay is not None:
        groups.append(
            {"params": bias_params, "weight_decay": float(bias_weight_decay), "name": "bias"}
        )
    groups.append({"params": scalar_params, "weight_decay": 0.0, "name": "no_decay"})
    return [g for g in groups if g["params"]]
