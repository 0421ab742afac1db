"""Console output: the resolved config tree and the result table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import rich
import rich.console
import rich.syntax
import rich.tree
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.table import Table

PRINT_ORDER = ("data", "model", "system", "loss", "optimizer", "scheduler", "trainer", "callbacks")


def _ordered_keys(cfg: Any) -> list:
    """Top-level keys, the groups of :data:`PRINT_ORDER` first."""
    return [k for k in PRINT_ORDER if k in cfg] + [k for k in cfg if k not in PRINT_ORDER]


def config_tree(cfg: DictConfig) -> rich.tree.Tree:
    """The resolved config as a rich tree, groups in :data:`PRINT_ORDER` first."""
    tree = rich.tree.Tree("CONFIG", style="dim", guide_style="dim")
    for key in _ordered_keys(cfg):
        branch = tree.add(str(key), style="dim", guide_style="dim")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    return tree


@rank_zero_only
def print_config_tree(cfg: DictConfig, save_to_file: bool = False) -> None:
    """Print the whole resolved config as a tree (and save it as `config_tree.txt`)."""
    rich.print(config_tree(cfg))
    if save_to_file:
        save_config_tree(cfg)


def save_config_tree(cfg: DictConfig) -> Path | None:
    """Write the whole resolved config (YAML, groups in :data:`PRINT_ORDER` first) to
    `<run dir>/config_tree.txt`; Hydra's `.hydra/config.yaml` keeps the unresolved one."""
    out_dir = cfg.get("paths", {}).get("output_dir")
    if not out_dir:
        return None
    path = Path(out_dir, "config_tree.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # e.g. ${hydra:...} outside a Hydra run: keep what cannot be resolved
        resolved = OmegaConf.to_container(cfg, resolve=False)
    with open(path, "w") as f:
        for key in _ordered_keys(resolved):
            f.write(OmegaConf.to_yaml({key: resolved[key]}))
    return path


def _short_target(node: Any) -> str | None:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    return str(target).rsplit(".", 1)[-1] if target else None


def _targets(node: Any) -> list[str]:
    """Class names of every `_target_` under `node`, depth first, without repeats."""
    found: list[str] = []
    if isinstance(node, DictConfig):
        short = _short_target(node)
        if short:
            found.append(short)
        for key in node:
            if key != "_target_":
                found += [t for t in _targets(node.get(key)) if t not in found]
    return found


def _value(cfg: DictConfig, key: str) -> Any:
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=False)
    except Exception:  # an interpolation that does not resolve outside a run
        return None


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)) or OmegaConf.is_list(value):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _keys(cfg: DictConfig, prefix: str, keys: Sequence[tuple[str, str]]) -> list[str]:
    """``label value`` for each (key, label) of `cfg.<prefix>` that is set (not null)."""
    out = []
    for key, label in keys:
        value = _value(cfg, f"{prefix}.{key}")
        if value is not None and not isinstance(value, DictConfig):
            out.append(f"{label} {_fmt(value)}" if label else _fmt(value))
    return out


def _choice(group: str) -> str | None:
    """The option Hydra composed for `group` (e.g. data=synthetic_a), when Hydra runs."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None
    except Exception:
        return None


def config_summary(cfg: DictConfig) -> list[str]:
    """A few lines that say what this run is: data, model, loss, optimisation, trainer."""
    lines = []

    def add(name: str, parts: list[str]) -> None:
        parts = [p for p in parts if p]
        if parts:
            lines.append(f"{name:<10}" + " · ".join(parts))

    run = [str(cfg.get("task_name", "run"))]
    if cfg.get("experiment_name"):
        run.append(f"experiment {cfg.experiment_name}")
    if "seed" in cfg:
        run.append(f"seed {cfg.seed}")
    if cfg.get("ckpt_path"):
        run.append(f"from {cfg.ckpt_path}")
    add("run", run)
    if cfg.get("task_name") == "eval":
        # src.eval takes data, model and protocol from the checkpoint: the composed defaults
        # would be misleading here; it prints what it evaluated (protocol_summary) itself
        out_dir = cfg.get("paths", {}).get("output_dir")
        if out_dir:
            add("run dir", [str(out_dir), "full config in config_tree.txt"])
        return lines
    if "data" in cfg:
        domains = []
        for side in ("source", "target"):
            name = _value(cfg, f"data.{side}.name")
            if name:
                domain = _value(cfg, f"data.{side}.domain")
                domains.append(f"{name}{' ' + str(domain) if domain else ''}")
        size = [f"{_value(cfg, 'data.height')}x{_value(cfg, 'data.width')}"]
        batch, k = _value(cfg, "data.batch_size"), _value(cfg, "data.num_instances")
        if batch and k:
            size.append(f"batch {batch} (P x K {batch // k} x {k})")
        add("data", [" -> ".join(domains), *size, *_keys(cfg, "data", [("val_ids", "val_ids"),
            ("num_workers", "workers")])])  # fmt: skip
    if "model" in cfg:
        add("model", [_short_target(cfg.model) or "", *_keys(cfg, "model", [
            ("backbone.name", ""), ("backbone.pretrained", "pretrained"),
            ("backbone.last_stride", "last stride"), ("pooling", "pooling"), ("neck", "neck"),
        ])])  # fmt: skip
    if "loss" in cfg:
        scalars = [
            f"{k} {_fmt(v)}"
            for k, v in cfg.loss.items_ex(resolve=False)
            if not isinstance(v, DictConfig) and v is not None and not OmegaConf.is_list(v)
        ]
        add("loss", [_choice("loss") or "", ", ".join(_targets(cfg.loss)), *scalars[:6]])
    if "optimizer" in cfg:
        sched = _short_target(cfg.get("scheduler")) if cfg.get("scheduler") else None
        add("optimizer", [_short_target(cfg.optimizer) or "", *_keys(cfg, "optimizer", [
            ("lr", "lr"), ("weight_decay", "wd")]), f"scheduler {sched}" if sched else ""])  # fmt: skip
    if "system" in cfg:
        add("system", [_short_target(cfg.system) or "", *_keys(cfg, "system", [
            ("eval_metric", "eval"), ("eval_ap", "AP"), ("flip_test", "flip"),
            ("rerank", "re-rank"),
        ])])  # fmt: skip
    if "trainer" in cfg:
        devices = f"{_value(cfg, 'trainer.accelerator')} x {_value(cfg, 'trainer.devices')}"
        add("trainer", [*_keys(cfg, "trainer", [("max_epochs", "epochs")]), devices,
            *_keys(cfg, "trainer", [("strategy", "strategy"), ("precision", "precision")]),
            f"test checkpoint {cfg.test_ckpt}" if cfg.get("test_ckpt") else ""])  # fmt: skip
    out_dir = cfg.get("paths", {}).get("output_dir")
    if out_dir:
        add("run dir", [str(out_dir), "full config in config_tree.txt"])
    return lines


@rank_zero_only
def print_config_summary(cfg: DictConfig, save_to_file: bool = True) -> None:
    """Print :func:`config_summary` (the whole tree goes to `<run dir>/config_tree.txt`)."""
    print("\n".join(config_summary(cfg)), flush=True)
    if save_to_file:
        save_config_tree(cfg)


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
