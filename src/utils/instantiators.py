"""Build callbacks and loggers from their Hydra config groups (every object from a `_target_`)."""

from __future__ import annotations

import hydra
from lightning.pytorch import Callback
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from src.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


def _instantiate_group(group_cfg: DictConfig | None, key: str) -> list:
    objects: list = []
    if not group_cfg:
        return objects
    if not isinstance(group_cfg, DictConfig):
        raise TypeError(f"Config `{key}` must be a mapping of named entries, got {type(group_cfg)}")
    for name, entry in group_cfg.items():
        if isinstance(entry, DictConfig) and "_target_" in entry:
            log.debug(f"Instantiating {key}.{name} <{entry._target_}>")
            objects.append(hydra.utils.instantiate(entry, _convert_="all"))
    return objects


def instantiate_callbacks(
    callbacks_cfg: DictConfig | None, enable_progress_bar: bool = True
) -> list[Callback]:
    """Instantiate every `_target_` entry under `callbacks`.

    With ``enable_progress_bar=False`` (``trainer.enable_progress_bar=false``) the progress bar
    callback is left out: Lightning refuses a progress bar callback when bars are disabled.
    """
    callbacks = _instantiate_group(callbacks_cfg, "callbacks")
    if not enable_progress_bar:
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return callbacks


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    """Instantiate every `_target_` entry under `logger`."""
    return _instantiate_group(logger_cfg, "logger")
