"""Checkpoint callbacks whose files can be trusted.

- :class:`VerifiedModelCheckpoint`: Lightning's ``ModelCheckpoint`` that checks its folder is
  writable before training and, after every save, that the file was really (re)written; Lightning
  2.6's ``_atomic_save`` swallows ``PermissionError``, so without this an unwritable folder trains
  to the end and saves nothing. A monitored metric that was not logged (a truncated or skipped
  evaluation) skips that save with a warning instead of stopping the run.
- :class:`LastCheckpoint`: writes ``last.ckpt`` with the newest state, at the end of every
  training epoch (after its validation), optionally every N training steps, and when training
  ends. ``ModelCheckpoint(monitor=..., save_last=True)`` writes ``last.ckpt`` only when the
  monitored checkpoint is saved, so a resume from it could silently rewind to the best epoch.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn


class CheckpointWriteError(OSError):
    """A checkpoint file could not be written (the message names the path)."""


def _file_signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class VerifiedModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with verified writes (same arguments as Lightning's).

    Raises :class:`CheckpointWriteError` naming the path, on every rank, when the checkpoint folder
    is not writable at the start of fitting or a saved file is missing, empty or unchanged.

    Args:
        require_validation_split: a monitored (best-k) checkpoint that must not rank epochs by
            metrics of the test split: when the DataModule validates on its test split
            (``val_is_test``), it disables itself with a warning.
        **kwargs: ``ModelCheckpoint``'s.
    """

    def __init__(self, *args: Any, require_validation_split: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.require_validation_split = require_validation_split

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.dirpath is None:
            return
        if self.require_validation_split and getattr(trainer.datamodule, "val_is_test", False):
            rank_zero_warn(
                f"validation runs on the test split (data.val_ids=0 or domain adaptation): "
                f"no best checkpoint by {self.monitor!r} is kept (selecting on the test split "
                "is test-set model selection); last.ckpt is the result"
            )
            self.save_top_k = 0
            return
        error = None
        if trainer.is_global_zero:
            error = _check_writable(str(self.dirpath))
        error = trainer.strategy.broadcast(error, src=0)
        if error:
            raise CheckpointWriteError(error)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        before = _file_signature(filepath) if trainer.is_global_zero else None
        super()._save_checkpoint(trainer, filepath)
        error = None
        if trainer.is_global_zero:
            after = _file_signature(filepath)
            if after is None or after[2] == 0 or after == before:
                state = (
                    "is missing" if after is None else "is empty" if after[2] == 0 else "unchanged"
                )
                error = (
                    f"checkpoint {filepath} was not written ({state} after the save): check that "
                    f"{os.path.dirname(filepath) or '.'} is writable and the disk is not full"
                )
        error = trainer.strategy.broadcast(error, src=0)
        if error:
            raise CheckpointWriteError(error)

    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        if self.monitor is not None and self.monitor not in monitor_candidates:
            # a truncated or skipped evaluation logged nothing: nothing to rank this epoch by
            rank_zero_warn(
                f"{type(self).__name__}: {self.monitor!r} was not logged at step "
                f"{trainer.global_step}; no best-checkpoint candidate saved this time"
            )
            return
        super()._save_topk_checkpoint(trainer, monitor_candidates)


class LastCheckpoint(VerifiedModelCheckpoint):
    """Keeps ``<dirpath>/<filename>.ckpt`` (default ``last.ckpt``) equal to the newest state.

    Saved at the end of every training epoch (after that epoch's validation, so the file also
    holds its metrics), every `every_n_train_steps` optimizer steps when set (a crash then loses at
    most that many steps), and when training ends; the ``global_step`` stored in the file is the
    trainer's at the save. The file is overwritten in place (no ``-v1`` versions).

    Args:
        dirpath: checkpoint folder.
        filename: file name without ``.ckpt``.
        every_n_train_steps: also save every N optimizer steps (None or 0: epoch ends only).
        save_weights_only: keep only the weights (no optimizer state: cannot resume training).
    """

    def __init__(
        self,
        dirpath: str,
        filename: str = "last",
        every_n_train_steps: int | None = None,
        save_weights_only: bool = False,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            filename=filename,
            monitor=None,
            save_top_k=1,
            save_last=False,
            save_weights_only=save_weights_only,
            every_n_train_steps=every_n_train_steps or None,
            every_n_epochs=None if every_n_train_steps else 1,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
            auto_insert_metric_name=False,
        )

    @property
    def last_path(self) -> str:
        """Path of the file this callback writes."""
        return os.path.join(str(self.dirpath), f"{self.filename}{self.FILE_EXTENSION}")

    def _save_newest(self, trainer: L.Trainer) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._save_none_monitor_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Always, even if a step-triggered save happened at this step: the epoch's validation
        # (metrics, best-so-far values) ran after it.
        self._save_newest(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # the epoch-end save above follows every end-of-epoch validation

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step:
            self._save_newest(trainer)


def _check_writable(folder: str) -> str | None:
    """None when `folder` can be created and written, else an error message naming it."""
    probe = os.path.join(folder, f".write-test-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"ok")
        os.remove(probe)
    except OSError as err:
        return (
            f"checkpoint folder {folder} is not writable ({err.strerror or err}): fix its "
            "permissions or pick another one (paths.output_dir=... or "
            "callbacks.model_checkpoint.dirpath=...)"
        )
    return None
