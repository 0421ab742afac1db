"""Utilities shared by the entry points (instantiation, logging, result tables)."""

from src.utils.instantiators import instantiate_callbacks, instantiate_loggers
from src.utils.pylogger import RankedLogger
from src.utils.rich_utils import print_config_summary, print_config_tree, print_results_table
from src.utils.utils import (
    close_loggers,
    extras,
    get_metric_value,
    sweep_metric_value,
    task_wrapper,
)

__all__ = [
    "print_config_summary",
    "RankedLogger",
    "close_loggers",
    "extras",
    "get_metric_value",
    "instantiate_callbacks",
    "instantiate_loggers",
    "print_config_tree",
    "print_results_table",
    "sweep_metric_value",
    "task_wrapper",
]
