"""Which checkpoint a run tests, and checks of checkpoint files with errors that name them."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from src.callbacks.checkpoint import LastCheckpoint, VerifiedModelCheckpoint

TEST_CKPT_CHOICES = ("last", "best")


def check_checkpoint_file(path: str | os.PathLike[str], key: str = "ckpt_path") -> Path:
    """Fail, naming `key` and the file, when `path` is not a readable, complete checkpoint.

    Catches a missing, empty or truncated file (a copy cut short, a crash mid-write) before
    Lightning's loader fails on it with a bare ``EOFError``/``BadZipFile``.
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise FileNotFoundError(f"{key}={path} does not exist (expected a Lightning .ckpt file)")
    if p.stat().st_size == 0:
        raise ValueError(f"{key}={path} is an empty file (an interrupted copy or save?)")
    if zipfile.is_zipfile(p):
        try:
            with zipfile.ZipFile(p) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ValueError(f"{key}={path} is a damaged checkpoint archive: {err}") from err
        if bad is not None:
            raise ValueError(f"{key}={path} is truncated or damaged (bad member {bad!r})")
        return p
    # not a zip: the legacy pickle format, or a truncated zip (its directory is at the end)
    try:
        import torch

        torch.load(p, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError, OSError) as err:
        raise ValueError(
            f"{key}={path} is not a complete checkpoint (truncated or not a torch file): {err}"
        ) from err
    return p


def check_test_ckpt(cfg: DictConfig, datamodule: Any) -> None:
    """`test_ckpt` must be "last" or "best", and "best" needs a held-out validation split:
    choosing the best epoch by test-split metrics and reporting it is test-set selection."""
    choice = cfg.get("test_ckpt", "last")
    if choice not in TEST_CKPT_CHOICES:
        raise ValueError(f"test_ckpt must be one of {TEST_CKPT_CHOICES}, got {choice!r}")
    if choice == "best" and cfg.get("test") and getattr(datamodule, "val_is_test", False):
        raise ValueError(
            "test_ckpt=best would report the checkpoint chosen on the test split (validation runs "
            "on it: data.val_ids=0 or domain adaptation). Hold out training identities with "
            "data.val_ids=N (or a fraction), or test the last checkpoint (test_ckpt=last)"
        )


def _callbacks(trainer: L.Trainer, kind: type) -> list[Any]:
    return [cb for cb in trainer.callbacks if isinstance(cb, kind)]  # type: ignore[attr-defined]


def test_checkpoint(trainer: L.Trainer, choice: str) -> tuple[str, str | None]:
    """(label for the results table, checkpoint path or None for the current weights).

    "last": the LastCheckpoint's file when it was written, else the current (final) weights;
    "best": the best monitored checkpoint (:class:`VerifiedModelCheckpoint` with a monitor).
    """
    if trainer.fast_dev_run:  # Lightning writes no checkpoint in a fast_dev_run
        return "final weights (fast_dev_run: no checkpoints)", None
    if choice == "best":
        best = [
            cb
            for cb in _callbacks(trainer, VerifiedModelCheckpoint)
            if cb.monitor is not None and cb.best_model_path
        ]
        if not best:
            raise RuntimeError(
                "test_ckpt=best: no best checkpoint was saved (is callbacks.best_checkpoint on, "
                "and did a validation run log its monitor?)"
            )
        label = f"best checkpoint by {best[0].monitor} on the validation split"
        return label, best[0].best_model_path
    last = [cb for cb in _callbacks(trainer, LastCheckpoint) if os.path.isfile(cb.last_path)]
    if last:
        return "last checkpoint", last[0].last_path
    return "final weights", None
