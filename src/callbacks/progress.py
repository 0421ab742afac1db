"""`RunProgress`: one progress display for the whole run, readable on a terminal and in a log.

Lightning's bars restart at every epoch and every validation, show no ETA for the run, and on a
non-terminal (SLURM, `| tee`, CI) print carriage-return garbage or nothing. This callback shows
the run as a whole: steps done out of the run's total (``trainer.estimated_stepping_batches``, so
``max_steps``, ``limit_train_batches`` and gradient accumulation are counted), the epoch, the
training loss, the learning rate, the speed and an ETA for the *whole* run (validation time
included, since it is measured from the start of training).

- ``mode="bar"`` (default on a terminal): a rich progress bar, plus a transient bar for each
  validation / test.
- ``mode="lines"`` (default when stdout is not a terminal): one plain log line every
  ``every_n_steps`` steps (default: the trainer's ``log_every_n_steps``), through the logging
  system, so it also lands in the run's ``train.log``.

In both modes every validation ends with one line (rank-1, mAP, mINP, best mAP, its duration).

Host syncs: the loss is read back (``float``) only every ``every_n_steps`` steps, the cadence at
which the loggers already read it; nothing else here touches a device tensor during training.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Literal

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks.progress import ProgressBar

from src.utils.pylogger import RankedLogger

log = RankedLogger(__name__)

Mode = Literal["auto", "bar", "lines"]
MODES = ("auto", "bar", "lines")


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``M:SS`` under an hour); ``?`` for an unknown or infinite duration."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RunProgress(ProgressBar):
    """Progress of the whole run: steps, epoch, loss, lr, speed, ETA (see the module docstring).

    Args:
        mode: "auto" (bar on a terminal, lines otherwise), "bar" or "lines".
        every_n_steps: how often the loss is read and, in lines mode, a line is written
            (None: ``trainer.log_every_n_steps``).
    """

    def __init__(self, mode: Mode = "auto", every_n_steps: int | None = None) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"RunProgress: mode must be one of {MODES}, got {mode!r}")
        if every_n_steps is not None and int(every_n_steps) < 1:
            raise ValueError(f"RunProgress: every_n_steps must be >= 1, got {every_n_steps}")
        self.mode = mode
        self.every_n_steps = None if every_n_steps is None else int(every_n_steps)
        self._enabled = True
        self._progress: Any = None  # rich.progress.Progress in bar mode
        self._run_task: Any = None
        self._eval_task: Any = None
        self._fit_start = 0.0
        self._start_step = 0
        self._total = math.inf
        self._loss: float | None = None
        self._eval_start = 0.0

    # ------------------------------------------------------------------ Lightning's interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress.console.print(*args, **kwargs)
        else:
            print(*args, **kwargs)

    # ------------------------------------------------------------------ what is shown
    def resolved_mode(self) -> str:
        """ "bar" or "lines": ``mode``, with "auto" decided by whether stdout is a terminal."""
        if self.mode != "auto":
            return self.mode
        return "bar" if sys.stdout.isatty() else "lines"

    def cadence(self, trainer: Trainer) -> int:
        return self.every_n_steps or max(1, int(trainer.log_every_n_steps))

    def train_status(self, trainer: Trainer) -> str:
        """The one-line state of the run, e.g. ``epoch 3/20 · step 150/1,500 (10%) · loss 0.4213
        · lr 3.50e-04 · 4.1 steps/s · 0:37 elapsed · ETA 5:29``."""
        step = trainer.global_step
        max_epochs = trainer.max_epochs
        epochs = f"/{max_epochs}" if max_epochs is not None and max_epochs > 0 else ""
        parts = [f"epoch {trainer.current_epoch + 1}{epochs}"]
        if math.isfinite(self._total):
            total = int(self._total)
            parts.append(f"step {step:,}/{total:,} ({100 * step / max(total, 1):.0f}%)")
        else:
            parts.append(f"step {step:,}")
        if self._loss is not None:
            parts.append(f"loss {self._loss:.4f}")
        lr = self.learning_rate(trainer)
        if lr is not None:
            parts.append(f"lr {lr:.2e}")
        elapsed = time.perf_counter() - self._fit_start
        done = step - self._start_step
        rate = done / elapsed if elapsed > 0 else 0.0
        if done > 0:
            parts.append(f"{rate:.2f} steps/s" if rate < 10 else f"{rate:.0f} steps/s")
        parts.append(f"{format_duration(elapsed)} elapsed")
        if done > 0 and math.isfinite(self._total):
            parts.append(f"ETA {format_duration((self._total - step) / rate)}")
        return " · ".join(parts)

    @staticmethod
    def learning_rate(trainer: Trainer) -> float | None:
        """The first parameter group's lr (a Python float: no device read)."""
        if not trainer.optimizers:
            return None
        lr = trainer.optimizers[0].param_groups[0].get("lr")
        return lr if isinstance(lr, float | int) else None

    @staticmethod
    def validation_status(trainer: Trainer, seconds: float) -> str | None:
        """``val after epoch 3: rank-1 67.0% · mAP 55.2% · mINP 31.9% · best mAP 55.2% · 2.3 s``,
        or None when the validation logged nothing (truncated)."""
        metrics = trainer.callback_metrics
        if "val/mAP" not in metrics:
            return None
        parts = []
        for key, name in (("rank1", "rank-1"), ("mAP", "mAP"), ("mINP", "mINP")):
            if f"val/{key}" in metrics:
                parts.append(f"{name} {100 * float(metrics[f'val/{key}']):.1f}%")
        if "val/mAP_best" in metrics:
            parts.append(f"best mAP {100 * float(metrics['val/mAP_best']):.1f}%")
        parts.append(f"{seconds:.1f} s")
        return f"val after epoch {trainer.current_epoch + 1}: " + " · ".join(parts)

    # ------------------------------------------------------------------ rich bar
    def _start_bar(self) -> None:
        if self._progress is not None:
            return
        from rich.progress import BarColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=30),
            TextColumn("{task.fields[info]}"),
            refresh_per_second=4,
        )
        self._progress.start()

    def _stop_bar(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = self._run_task = self._eval_task = None

    def _active(self, trainer: Trainer) -> bool:
        return self._enabled and not trainer.sanity_checking

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._enabled:
            return
        self._fit_start = time.perf_counter()
        self._start_step = trainer.global_step
        self._loss = None
        total = trainer.estimated_stepping_batches
        self._total = float(total) if total is not None else math.inf
        steps = f"{int(self._total):,} steps" if math.isfinite(self._total) else "no step limit"
        resumed = f", resuming at step {self._start_step:,}" if self._start_step else ""
        message = f"training: {steps} ({trainer.max_epochs} epochs){resumed}"
        if self.resolved_mode() == "bar":
            self._start_bar()
            self.print(message)
            self._run_task = self._progress.add_task(
                "train",
                total=self._total if math.isfinite(self._total) else None,
                completed=self._start_step,
                info=self.train_status(trainer),
            )
        else:
            log.info(message)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if not self._enabled:
            return
        step = trainer.global_step
        if (idx + 1) % self.cadence(trainer) == 0 or idx + 1 == trainer.num_training_batches:
            self._loss = _loss_value(outputs)  # the one device read, at the logging cadence
            if self.resolved_mode() == "lines":
                log.info(self.train_status(trainer))
        if self._run_task is not None:
            self._progress.update(self._run_task, completed=step, info=self.train_status(trainer))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._enabled:
            return
        elapsed = format_duration(time.perf_counter() - self._fit_start)
        done = trainer.global_step - self._start_step
        message = f"training done: {done:,} steps in {elapsed}"
        if self._progress is not None:
            self.print(message)
            self._stop_bar()
        else:
            log.info(message)

    # ------------------------------------------------------------------ evaluation
    def _eval_start_hook(self, trainer: Trainer, name: str, total: float) -> None:
        self._eval_start = time.perf_counter()
        if self.resolved_mode() != "bar":
            return
        self._start_bar()
        self._eval_task = self._progress.add_task(
            name, total=total if math.isfinite(total) else None, info=""
        )

    def _eval_batch_hook(self) -> None:
        if self._eval_task is not None:
            self._progress.advance(self._eval_task)

    def _eval_end_hook(self) -> None:
        if self._eval_task is not None:
            self._progress.remove_task(self._eval_task)
            self._eval_task = None
        if self._run_task is None:  # a test or validation outside a fit: the bar was its own
            self._stop_bar()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._active(trainer):
            self._eval_start_hook(trainer, "validate", float(sum(trainer.num_val_batches)))

    def on_validation_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if self._active(trainer):
            self._eval_batch_hook()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active(trainer):
            return
        self._eval_end_hook()
        status = self.validation_status(trainer, time.perf_counter() - self._eval_start)
        if status is None:
            return
        if self._progress is not None:
            self.print(status)
        else:
            log.info(status)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enabled:
            self._eval_start_hook(trainer, "test", float(sum(trainer.num_test_batches)))

    def on_test_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            self._eval_batch_hook()

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._enabled:
            self._eval_end_hook()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exc: BaseException
    ) -> None:
        self._stop_bar()

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._stop_bar()


def _loss_value(outputs: Any) -> float | None:
    """The training step's loss as a float (its output dict's "loss", or the tensor itself)."""
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    if loss is None:
        return None
    try:
        return float(loss)
    except (TypeError, ValueError):
        return None
