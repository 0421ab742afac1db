"""Host-sync guard for the training-step tests: every Tensor method that copies a device value to
the host (or needs one to size its output) raises while the guard is active.

On a CPU run the CPU is the device, so the guard counts every tensor: what it catches here is
exactly what would stall a CUDA stream (`.item()`, `bool(t)`, `t.tolist()`, `.cpu()`,
`nonzero`, boolean-mask indexing, ...). On CUDA the `gpu` tests also use
``torch.cuda.set_sync_debug_mode("error")``, which sees syncs inside C++ kernels as well.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

# Tensor methods that read a device value on the host (or size an output from one).
_METHODS = (
    "item",
    "tolist",
    "numpy",
    "cpu",
    "nonzero",
    "unique",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
)
_FUNCTIONS = ("nonzero", "unique", "masked_select", "equal", "argwhere")


# Reads that the code makes only when the tensors are on the CPU (there is no device to wait for),
# in branches an accelerator never takes: (file suffix, function).
CPU_ONLY_READS = {
    ("src/losses/mar.py", "_view_onehot"),  # CML's camera-range check, `views.device == cpu`
}


def _cpu_only_caller() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if any(code.co_filename.endswith(f) and code.co_name == n for f, n in CPU_ONLY_READS):
            return True
        frame = frame.f_back
    return False


class HostSyncError(AssertionError):
    """A training step read a device value on the host."""


def _is_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


@contextlib.contextmanager
def forbid_host_sync(device_type: str = "cpu", log: list[str] | None = None) -> Iterator[None]:
    """Raise `HostSyncError` on any host read of a tensor on ``device_type`` while active.

    Args:
        device_type: the device whose tensors count ("cpu" on a CPU run, "cuda" on a GPU).
        log: when given, violations are appended to it instead of raising (counting mode).
    """

    def violation(what: str) -> None:
        if device_type == "cpu" and _cpu_only_caller():
            return
        if log is not None:
            log.append(what)
            return
        raise HostSyncError(f"host sync in a training step: {what}")

    def on_device(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type == device_type

    saved: list[tuple[Any, str, Any]] = []

    def patch(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        original = getattr(owner, name)
        saved.append((owner, name, original))
        setattr(owner, name, make(original))

    def method_guard(name: str) -> Callable[[Any], Any]:
        def make(original: Any) -> Any:
            @functools.wraps(original)
            def guarded(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if on_device(self):
                    violation(f"Tensor.{name}() of a {self.device} tensor {tuple(self.shape)}")
                return original(self, *args, **kwargs)

            return guarded

        return make

    def function_guard(name: str) -> Callable[[Any], Any]:
        def make(original: Any) -> Any:
            @functools.wraps(original)
            def guarded(*args: Any, **kwargs: Any) -> Any:
                if any(on_device(a) for a in args):
                    violation(f"torch.{name}() of a {device_type} tensor")
                return original(*args, **kwargs)

            return guarded

        return make

    def index_guard(name: str) -> Callable[[Any], Any]:
        def make(original: Any) -> Any:
            @functools.wraps(original)
            def guarded(self: torch.Tensor, index: Any, *args: Any) -> Any:
                if on_device(self) and _is_bool_index(index):
                    violation(f"Tensor.{name} with a boolean mask (data-dependent shape)")
                return original(self, index, *args)

            return guarded

        return make

    try:
        for name in _METHODS:
            patch(torch.Tensor, name, method_guard(name))
        for name in _FUNCTIONS:
            patch(torch, name, function_guard(name))
        for name in ("__getitem__", "__setitem__"):
            patch(torch.Tensor, name, index_guard(name))
        yield
    finally:
        for owner, name, original in reversed(saved):
            setattr(owner, name, original)


class NoHostSyncInStep(Callback):
    """Runs the module's ``training_step`` and ``backward`` under `forbid_host_sync` (and, on
    CUDA, ``torch.cuda.set_sync_debug_mode("error")``): a host read there fails the run.
    ``steps`` counts the guarded training steps."""

    def __init__(self) -> None:
        self.steps = 0

    @contextlib.contextmanager
    def _guard(self, module: LightningModule) -> Iterator[None]:
        device_type = module.device.type
        if device_type == "cuda":
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                with forbid_host_sync(device_type):
                    yield
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        else:
            with forbid_host_sync(device_type):
                yield

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        step, backward = pl_module.training_step, pl_module.backward

        def guarded_step(*args: Any, **kwargs: Any) -> Any:
            with self._guard(pl_module):
                out = step(*args, **kwargs)
            self.steps += 1
            return out

        def guarded_backward(*args: Any, **kwargs: Any) -> Any:
            with self._guard(pl_module):
                return backward(*args, **kwargs)

        pl_module.training_step = guarded_step  # type: ignore[method-assign]
        pl_module.backward = guarded_backward  # type: ignore[method-assign]
