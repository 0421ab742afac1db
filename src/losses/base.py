"""fp32 computation for losses: upcast half-precision inputs and switch autocast off.

Mixed-precision training runs the network in bf16/fp16, but re-ID losses sum or compare many
small numbers (distance matrices of 2048-d features, logs of soft multilabels, CML moments), which
lose too much precision or overflow in 16-bit. Everything in :mod:`src.losses` therefore computes
in fp32: :func:`fp32_compute` upcasts bf16/fp16 tensor arguments to fp32 and disables autocast on
the inputs' device for the duration of the call, so no matmul inside is cast back down. float64
inputs are left untouched (the exactness tests run in float64).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["BatchHardLoss", "FP32Loss", "fp32_compute", "upcast"]

F = TypeVar("F", bound=Callable[..., Any])

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def upcast(value: Any) -> Any:
    """Return ``value.float()`` for a bf16/fp16 tensor, anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dtype in _HALF_DTYPES:
        return value.float()
    return value


def _device_type(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
    return None


def fp32_compute(fn: F) -> F:
    """Decorate a function or method so that it computes in fp32 under autocast.

    bf16/fp16 tensor arguments (positional or keyword, not nested in containers) are upcast to
    fp32, and autocast is disabled on the device of the first tensor argument while ``fn`` runs.
    When autocast is off and no argument is half precision this adds only a few attribute
    checks, so it is cheap enough for a training step.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        args = tuple(upcast(a) for a in args)
        kwargs = {k: upcast(v) for k, v in kwargs.items()}
        device_type = _device_type(args, kwargs)
        if (
            device_type is None
            or not torch.amp.is_autocast_available(device_type)
            or not torch.is_autocast_enabled(device_type)
        ):
            return fn(*args, **kwargs)
        with torch.autocast(device_type=device_type, enabled=False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


class FP32Loss(nn.Module):
    """Base class of the losses: a subclass's ``forward`` always computes in fp32.

    ``__init_subclass__`` wraps the ``forward`` defined by each subclass with
    :func:`fp32_compute`; other public methods that compute a loss should use the decorator
    explicitly.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if forward is not None and not getattr(forward, "_fp32_compute", False):
            wrapped = fp32_compute(forward)
            wrapped._fp32_compute = True  # type: ignore[attr-defined]
            cls.forward = wrapped  # type: ignore[method-assign]


class BatchHardLoss(FP32Loss):
    """Base of the batch-hard triplet losses (:class:`~src.losses.TripletLoss`,
    :class:`~src.losses.AlignedTripletLoss`): their shared options and checks.

    Args:
        margin: hinge margin (>= 0), or ``None`` for the soft margin (softplus).
        normalize_feature: L2-normalise the features before computing distances.
        check_negatives: validate that the batch has >= 2 identities (one boolean host read).
    """

    def __init__(
        self,
        margin: float | None = 0.3,
        normalize_feature: bool = False,
        *,
        check_negatives: bool = True,
    ) -> None:
        super().__init__()
        if margin is not None and margin < 0:
            raise ValueError(
                f"{type(self).__name__}: margin must be >= 0 or None (soft margin), got {margin}"
            )
        self.margin = margin
        self.normalize_feature = normalize_feature
        self.check_negatives = check_negatives
