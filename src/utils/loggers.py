"""Loggers that need more than a plain `_target_`: W&B offline fallback, and a CSV logger that
survives `ddp_spawn` (fit and test in separate worker processes appending to one file)."""

from __future__ import annotations

import csv
import netrc
import os
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as _LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from src.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


def wandb_api_key_configured() -> bool:
    """True when W&B can authenticate without asking: WANDB_API_KEY or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def make_wandb_logger(
    project: str = "marlin",
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    name: str | None = None,
    save_dir: str = ".",
    mode: str | None = None,
    log_model: bool = False,
    job_type: str = "train",
    sweep: str | None = None,
    **kwargs: Any,
) -> WandbLogger:
    """A WandbLogger that never prompts or hangs.

    `mode=None` picks "online" when an API key is configured and "offline" otherwise (the run
    is written under `save_dir/wandb` and can be uploaded later with `wandb sync`). An explicit
    `mode` ("online", "offline", "disabled") or the WANDB_MODE environment variable wins.

    `group` gathers the runs of one experiment; `sweep` (the multirun directory name, set by
    ``${sweep_id:}`` in conf/logger/wandb.yaml inside a multirun) adds the tag ``sweep:<name>``
    so that one sweep's jobs can be filtered and compared together.
    """
    mode = mode or os.environ.get("WANDB_MODE")
    if mode is None:
        mode = "online" if wandb_api_key_configured() else "offline"
        if mode == "offline":
            log.info("No W&B API key configured: logging offline (upload later with `wandb sync`)")
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(
        project=project,
        entity=entity,
        group=group,
        tags=_with_sweep_tag(tags, sweep),
        name=name,
        save_dir=save_dir,
        mode=mode,
        log_model=log_model,
        job_type=job_type,
        **kwargs,
    )


def _with_sweep_tag(tags: list[str] | None, sweep: str | None) -> list[str] | None:
    tags = [str(t) for t in tags] if tags else []
    if sweep:
        tags.append(f"sweep:{sweep}")
    # W&B limits a tag to 64 characters
    return [t[:64] for t in dict.fromkeys(tags)] or None


class _AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, but aware of the columns already in ``metrics.csv``.

    Under ``ddp_spawn`` every ``trainer.fit``/``trainer.test`` runs in fresh worker processes
    that receive the parent's writer, which never saw the columns the fit workers wrote. The stock
    writer then rewrites the file with only the new columns and fails ("dict contains fields not
    in fieldnames"). Reading the existing header first keeps every column.
    """

    def _record_new_keys(self) -> set[str]:
        if not self.metrics_keys and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(next(csv.reader(file), []))
        return super()._record_new_keys()


class CSVLogger(_LightningCSVLogger):
    """`lightning.pytorch.loggers.CSVLogger` whose ``metrics.csv`` can be appended to by a later
    stage running in other processes (``trainer.test`` after ``trainer.fit`` with ``ddp_spawn``).
    Same arguments and files as Lightning's."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
