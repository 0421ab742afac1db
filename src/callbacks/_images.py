"""Where evaluation pictures go: a PNG in the run directory, plus every logger that takes images."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from src.systems.base import ReIDSystem

IMAGE_LOGGERS = (WandbLogger, TensorBoardLogger)
Enabled = bool | Literal["auto"]


def has_image_logger(trainer: Trainer) -> bool:
    """Whether some logger of `trainer` shows pictures (W&B or TensorBoard)."""
    return any(isinstance(logger, IMAGE_LOGGERS) for logger in trainer.loggers)


class EvalPictureCallback(Callback):
    """Base of the callbacks that draw from the evaluation outputs of a `ReIDSystem`.

    ``enabled="auto"`` draws only when a logger shows pictures (W&B, TensorBoard): runs with the
    CSV logger alone pay nothing (no top-k pass, no feature gather, no matplotlib). ``True``
    always draws (PNGs in the run directory), ``False`` never.
    """

    def __init__(self, enabled: Enabled = "auto") -> None:
        if enabled not in (True, False, "auto"):
            raise ValueError(f"enabled must be true, false or 'auto', got {enabled!r}")
        self.enabled = enabled
        self.active = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.active = has_image_logger(trainer) if self.enabled == "auto" else bool(self.enabled)
        if self.active:
            self.request(require_reid_system(pl_module, type(self).__name__))

    def request(self, system: ReIDSystem) -> None:
        """Ask `system` for the evaluation outputs this callback draws from."""
        raise NotImplementedError


def image_dir(trainer: Trainer, dirpath: str | None, default_name: str) -> Path:
    """`dirpath`, or `<trainer.default_root_dir>/<default_name>` (the run directory)."""
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / default_name


def require_reid_system(pl_module: LightningModule, callback: str) -> ReIDSystem:
    if not isinstance(pl_module, ReIDSystem):
        raise TypeError(
            f"{callback} needs a src.systems.ReIDSystem (it reads the evaluation outputs), got "
            f"{type(pl_module).__name__}"
        )
    return pl_module


def log_png(trainer: Trainer, key: str, path: Path, caption: str) -> None:
    """Send the PNG at `path` to the W&B and TensorBoard loggers of `trainer` (others: the file
    in the run directory is the record)."""
    loggers: Sequence = trainer.loggers
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(
                key=key, images=[str(path)], step=trainer.global_step, caption=[caption]
            )
        elif isinstance(logger, TensorBoardLogger):
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))
            logger.experiment.add_image(key, pixels, trainer.global_step, dataformats="HWC")
