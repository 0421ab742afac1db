"""Console output: the resolved config tree and the result table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import rich
import rich.syntax
import rich.tree
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

PRINT_ORDER = ("data", "model", "system", "loss", "optimizer", "scheduler", "trainer", "callbacks")


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_to_file: bool = False) -> None:
    """Print the resolved config as a tree (and save it as `config_tree.log` in the run dir)."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    keys = [k for k in PRINT_ORDER if k in cfg] + [k for k in cfg if k not in PRINT_ORDER]
    for key in keys:
        branch = tree.add(str(key), style="dim", guide_style="dim")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)
    if save_to_file and cfg.get("paths", {}).get("output_dir"):
        with open(Path(cfg.paths.output_dir, "config_tree.log"), "w") as f:
            rich.print(tree, file=f)


def format_results_table(
    rows: Mapping[str, Mapping[str, Any]],
    keys: Sequence[str] = ("rank1", "rank5", "rank10", "mAP", "mINP"),
) -> Table:
    """A rich table: one row per evaluated setting, metrics in percent."""
    table = Table(title="Re-ID evaluation")
    table.add_column("setting")
    for key in keys:
        table.add_column(key, justify="right")
    for name, metrics in rows.items():
        cells = []
        for key in keys:
            value = metrics.get(key)
            if value is None:
                cells.append("-")
            else:
                value = float(value.item() if hasattr(value, "item") else value)
                cells.append(f"{100 * value:.2f}")
        table.add_row(name, *cells)
    return table


@rank_zero_only
def print_results_table(rows: Mapping[str, Mapping[str, Any]]) -> None:
    """Print the result table to the console."""
    rich.print(format_results_table(rows))
