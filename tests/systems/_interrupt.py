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


class GlobalRngUser(Callback):
    """Draws from python's, numpy's and torch's global generators at every training batch and
    nudges one weight by the draws, as dropout or a user's augmentation would: a resume that
    does not restore those generators (or lets something else draw from them) then diverges."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import random

        import numpy as np
        import torch

        draw = torch.rand(()) + float(np.random.rand()) + random.random()
        param = next(pl_module.parameters())
        with torch.no_grad():
            param.view(-1)[0].add_(1e-4 * draw)
