"""Helpers shared by the entry points: the task wrapper, metric lookup, result tables."""

from __future__ import annotations

import functools
import logging
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig

from src.utils.pylogger import RankedLogger

log = RankedLogger(__name__)

RESULT_KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def close_loggers(exit_code: int = 0) -> None:
    """Finish every experiment tracker left open, so multirun jobs never leak into each other.

    A non-zero `exit_code` marks the W&B run as failed (a crashed job of a sweep shows as such).
    """
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            log.info("Closing the wandb run")
            wandb.finish(exit_code=exit_code)


def task_wrapper(task_func: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Run a task and always close the loggers, also when it raises.

    The exception is re-raised (a multirun then reports the failed job and, depending on the
    launcher, carries on with the next); its message is logged with the run directory first.
    """

    @functools.wraps(task_func)
    def wrapped(cfg: DictConfig) -> Any:
        exit_code = 1
        try:
            result = task_func(cfg)
            exit_code = 0
            return result
        except Exception:
            out = cfg.get("paths", {}).get("output_dir", "?")
            log.exception(f"Task failed; run directory: {out}")
            raise
        finally:
            close_loggers(exit_code)

    return wrapped


def extras(cfg: DictConfig) -> None:
    """Optional niceties before a task starts: silence known-noisy warnings, print a summary of
    the config (``extras.print_config=full``: the whole tree) and save the whole tree to
    `<run dir>/config_tree.txt`."""
    quiet_console()
    extra = cfg.get("extras")
    if not extra:
        return
    if extra.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extra.get("print_config"):
        from src.utils.rich_utils import print_config_summary, print_config_tree

        if extra.get("print_config") == "full":
            print_config_tree(cfg, save_to_file=True)
        else:
            print_config_summary(cfg, save_to_file=True)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


#: Console lines that tell a re-ID user nothing: Lightning's advertisement for its cloud logger
#: and a deprecation inside Lightning's own pytree helper (torch 2.14), printed at every fit.
_LIGHTNING_NOISE = ("\U0001f4a1 Tip:",)
_WARNING_NOISE = r".*isinstance\(treespec, LeafSpec\).*"


def quiet_console() -> None:
    """Drop the console noise above (idempotent); every other message and warning stays."""
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages(_LIGHTNING_NOISE))
    warnings.filterwarnings("ignore", message=_WARNING_NOISE)


def get_metric_value(metric_dict: Mapping[str, Any], metric_name: str | None) -> float | None:
    """Value of `metric_name` (e.g. `val/mAP_best`) for hyper-parameter sweepers.

    Raises a KeyError naming the available metrics when the name is not logged.
    """
    if not metric_name:
        return None
    if metric_name not in metric_dict:
        raise KeyError(
            f"optimized_metric={metric_name!r} was not logged. Logged metrics: "
            f"{sorted(metric_dict)}"
        )
    value = metric_dict[metric_name]
    return float(value.item() if hasattr(value, "item") else value)


def sweep_metric_value(metric_dict: Mapping[str, Any], metric_name: str | None) -> float | None:
    """The value returned to a Hydra sweeper: `metric_name`'s, or None with a warning when the run
    never logged it (a short or debug run that did not validate).

    A sweeper that optimises the value (Optuna) would record a meaningless trial: for it the
    missing metric stays an error (:func:`get_metric_value`'s KeyError)."""
    if not metric_name or metric_name in metric_dict or _sweeper_optimises():
        return get_metric_value(metric_dict, metric_name)
    log.warning(
        f"optimized_metric={metric_name!r} was not logged (no validation ran in this run?); "
        "nothing is returned to the sweeper"
    )
    return None


def _sweeper_optimises() -> bool:
    """Whether this is a Hydra multirun whose sweeper optimises the returned value (Optuna)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    sweeper = str(hydra_cfg.get("sweeper", {}).get("_target_", ""))
    return hydra_cfg.get("mode") == RunMode.MULTIRUN and "optuna" in sweeper.lower()
