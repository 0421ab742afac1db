"""Callbacks that end a training run abruptly at a given optimizer step (for resume tests).

Used through Hydra, e.g. ``+callbacks.kill._target_=tests.systems._interrupt.KillAtStep
+callbacks.kill.step=5``: the process dies before training the batch of that step, with nothing
saved beyond what the checkpoint callbacks had already written."""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback


class SimulatedCrashError(RuntimeError):
    """Raised by :class:`CrashAtStep`."""


class CrashAtStep(Callback):
    """Raise :class:`SimulatedCrashError` when `step` optimizer steps are done (in-process tests)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise SimulatedCrashError(f"simulated crash at step {self.step}")


class KillAtStep(CrashAtStep):
    """``kill -9`` of the training process itself when `step` optimizer steps are done."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
