"""Summarise a Hydra multirun from its run logs: a table, a CSV and a plot, no W&B needed.

Usage::

    python -m src.tools.summarize_sweep logs/train/multiruns/2024-05-01_12-00-00
    python -m src.tools.summarize_sweep DIR --metric val/mAP --x loss.margin \\
        --line loss.mining_ratio --out reports/

Every job folder (``0/``, ``1/``, ...) contributes its parameters (``.hydra/overrides.yaml``,
falling back to ``.hydra/config.yaml`` for a key that was not overridden) and its final metric
(``metrics.json``, falling back to the last value in the CSV logs). The table is printed sorted by
the metric (best first), and ``sweep_summary.csv`` and ``sweep_summary.png`` (the metric against
``--x``, one line per value of ``--line``; mean ± std where several jobs share a point) are
written into the multirun directory or ``--out``. When the sweep was an Optuna search,
``optimization_results.yaml`` is read and its best parameters printed.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console
from rich.table import Table

from src.tools.run_reader import Run, load_multirun

__all__ = [
    "DEFAULT_LINE",
    "DEFAULT_METRIC",
    "DEFAULT_X",
    "SweepSummary",
    "format_table",
    "main",
    "plot_summary",
    "read_optuna_results",
    "summarize",
    "write_csv",
]

DEFAULT_METRIC = "val/mAP_best"
DEFAULT_X = "loss.margin"
DEFAULT_LINE = "loss.mining_ratio"
CSV_NAME = "sweep_summary.csv"
PNG_NAME = "sweep_summary.png"
OPTUNA_RESULTS = "optimization_results.yaml"


@dataclass
class SweepSummary:
    """One row per job, best first.

    Attributes:
        multirun_dir: the directory summarised.
        metric: the metric the rows are sorted by.
        params: parameter columns: the override keys that differ between jobs, plus ``x`` and
            ``line`` when some job has them.
        rows: per job ``{"job": name, <param>: value, <metric>: float (NaN if missing)}``,
            sorted by the metric (NaN last).
        x: the x-axis key of the plot.
        line: the key whose values make the lines of the plot, ``None`` for a single line.
        final_metrics: every job's ``metrics.json``, in the order of ``rows``.
        optuna: the content of ``optimization_results.yaml`` if the sweep was an Optuna search.
        ascending: the rows are sorted lowest first (a loss) instead of highest first.
    """

    multirun_dir: Path
    metric: str
    params: list[str]
    rows: list[dict[str, Any]]
    x: str
    line: str | None
    final_metrics: list[dict[str, float]] = field(default_factory=list)
    optuna: dict[str, Any] | None = None
    ascending: bool = False

    @property
    def best(self) -> dict[str, Any] | None:
        """The first row (best metric), ``None`` if no job has the metric."""
        if self.rows and not math.isnan(self.rows[0][self.metric]):
            return self.rows[0]
        return None


def read_optuna_results(multirun_dir: str | Path) -> dict[str, Any] | None:
    """``optimization_results.yaml`` of hydra-optuna-sweeper as a dict, ``None`` if absent.

    Single objective: ``{"name": "optuna", "best_params": {...}, "best_value": float}``;
    several objectives: ``{"name": "optuna", "solutions": [{"params": ..., "values": ...}]}``.

    Raises:
        ValueError: naming the file when it is not a YAML mapping.
    """
    path = Path(multirun_dir) / OPTUNA_RESULTS
    if not path.is_file():
        return None
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping with best_params/best_value or solutions")
    return data


def _hashable(value: Any) -> Any:
    if isinstance(value, list | dict | tuple):
        return repr(value)
    return value


def _varying_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose value is not the same in every job, in first-seen order."""
    keys: list[str] = []
    for run in runs:
        keys.extend(k for k in run.params if k not in keys)
    missing = object()
    return [
        key
        for key in keys
        if len({_hashable(run.params.get(key, missing)) for run in runs}) > 1
        or any(key not in run.params for run in runs)
    ]


def _has_key(runs: Sequence[Run], key: str) -> bool:
    return any(run.param(key) is not None for run in runs)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def summarize(
    multirun_dir: str | Path,
    metric: str = DEFAULT_METRIC,
    x: str | None = None,
    line: str | None = DEFAULT_LINE,
    ascending: bool = False,
) -> SweepSummary:
    """Read every job of ``multirun_dir`` and tabulate ``metric`` against its parameters.

    Args:
        multirun_dir: a Hydra multirun directory (numbered job folders).
        metric: a key of the jobs' ``metrics.json`` (or a per-epoch CSV column).
        x: the plot's x-axis key. ``None`` means ``loss.margin`` if the jobs have it, else the
            first numeric parameter that varies (a warning says which).
        line: one plot line per value of this key; ignored (a single line) when no job has it.
        ascending: sort lowest first, for a metric where lower is better.

    Raises:
        FileNotFoundError, NotADirectoryError, ValueError: no multirun there (see
            :func:`~src.tools.run_reader.load_multirun`).
        KeyError: no job has ``metric`` (the message lists the metrics the jobs have), or an
            explicit ``x`` that no job has (the message lists the parameters).
    """
    runs = load_multirun(multirun_dir)
    values: list[float] = []
    for run in runs:
        try:
            values.append(float(run.metric(metric)))
        except KeyError:
            values.append(math.nan)
    if all(math.isnan(v) for v in values):
        available = sorted({name for run in runs for name in run.metric_names})
        raise KeyError(
            f"no job in {multirun_dir} has the metric {metric!r}; available metrics: "
            f"{', '.join(available) or '(none: no metrics.json or CSV logs in any job)'}"
        )
    missing = [run.name for run, v in zip(runs, values) if math.isnan(v)]
    if missing:
        warnings.warn(
            f"{len(missing)} job(s) of {multirun_dir} have no {metric!r} (failed or still "
            f"running?): {', '.join(missing)}",
            stacklevel=2,
        )

    varying = _varying_keys(runs)
    x = _pick_x(runs, x, varying)
    line = line if line is not None and line != x and _has_key(runs, line) else None
    params = list(varying)
    for key in (x, line):
        if key is not None and key not in params and _has_key(runs, key):
            params.append(key)

    rows = []
    for run, value in zip(runs, values):
        row: dict[str, Any] = {"job": run.name}
        row.update({key: run.param(key) for key in params})
        row[metric] = value
        rows.append(row)

    def sort_key(i: int) -> tuple[bool, float]:
        value = values[i]
        if math.isnan(value):
            return (True, 0.0)  # jobs without the metric go last, in job order
        return (False, value if ascending else -value)

    order = sorted(range(len(rows)), key=sort_key)
    return SweepSummary(
        multirun_dir=Path(multirun_dir),
        metric=metric,
        params=params,
        rows=[rows[i] for i in order],
        x=x,
        line=line,
        final_metrics=[runs[i].final_metrics for i in order],
        optuna=read_optuna_results(multirun_dir),
        ascending=ascending,
    )


def _pick_x(runs: Sequence[Run], x: str | None, varying: Sequence[str]) -> str:
    if x is not None:
        if not _has_key(runs, x):
            raise KeyError(
                f"no job has the parameter {x!r}; parameters that vary: "
                f"{', '.join(varying) or '(none)'}"
            )
        return x
    if _has_key(runs, DEFAULT_X):
        return DEFAULT_X
    for key in varying:
        if all(_is_number(run.param(key)) for run in runs):
            warnings.warn(
                f"the jobs have no {DEFAULT_X!r}: plotting against {key!r} instead", stacklevel=3
            )
            return key
    return "job"


def _format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def format_table(summary: SweepSummary) -> Table:
    """A rich table of the summary: job, parameters, metric (4 decimals), best first."""
    order = "lowest" if summary.ascending else "highest"
    table = Table(title=f"{summary.metric}, {order} first", caption=str(summary.multirun_dir))
    table.add_column("job", justify="right")
    for key in summary.params:
        table.add_column(key, justify="right")
    table.add_column(summary.metric, justify="right", style="bold")
    for row in summary.rows:
        value = row[summary.metric]
        table.add_row(
            str(row["job"]),
            *(_format_value(row[key]) for key in summary.params),
            "-" if math.isnan(value) else f"{value:.4f}",
        )
    return table


def write_csv(summary: SweepSummary, path: str | Path) -> Path:
    """Write the rows (plus every job's other final metrics as extra columns) to ``path``."""
    path = Path(path)
    extra = sorted({k for m in summary.final_metrics for k in m} - {summary.metric})
    columns = ["job", *summary.params, summary.metric, *extra]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row, metrics in zip(summary.rows, summary.final_metrics):
            value = row[summary.metric]
            cells = [row["job"], *(row[k] for k in summary.params)]
            cells.append("" if math.isnan(value) else repr(value))
            cells.extend(repr(metrics[k]) if k in metrics else "" for k in extra)
            writer.writerow(["" if c is None else c for c in cells])
    return path


def _axis_positions(values: Sequence[Any]) -> tuple[dict[Any, float], list[str] | None]:
    """Numeric x values map to themselves; otherwise categories map to 0, 1, ... (labels
    returned for the ticks)."""
    if all(_is_number(v) for v in values):
        return {v: float(v) for v in values}, None
    categories = sorted({_hashable(v) for v in values}, key=str)
    return {c: float(i) for i, c in enumerate(categories)}, [str(c) for c in categories]


def plot_summary(summary: SweepSummary, ax: Any = None) -> Any:
    """Plot the metric against ``summary.x``, one line per value of ``summary.line``.

    Jobs sharing an (x, line) point (seeds, other parameters) are averaged, with the standard
    deviation as error bar. Jobs without the metric are left out.

    Args:
        summary: from :func:`summarize`.
        ax: a matplotlib ``Axes`` to draw on; ``None`` creates a standalone ``Figure`` (no
            pyplot, so nothing changes the interactive backend).

    Returns:
        The ``Figure`` drawn on.
    """
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(6.4, 4.2), layout="constrained")
        ax = fig.add_subplot()
    fig = ax.figure

    def x_of(row: dict[str, Any]) -> Any:
        if summary.x == "job":  # no usable parameter: one point per job number
            return int(row["job"]) if str(row["job"]).isdigit() else str(row["job"])
        return row[summary.x]

    rows = [r for r in summary.rows if not math.isnan(r[summary.metric])]
    rows = [r for r in rows if x_of(r) is not None]
    positions, tick_labels = _axis_positions([x_of(r) for r in rows])

    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in rows:
        key = _hashable(row[summary.line]) if summary.line else None
        groups.setdefault(key, []).append(row)
    line_keys = sorted(groups, key=lambda k: (not _is_number(k), k if _is_number(k) else str(k)))
    for key in line_keys:
        points: dict[float, list[float]] = {}
        for row in groups[key]:
            points.setdefault(positions[_hashable(x_of(row))], []).append(row[summary.metric])
        xs = np.asarray(sorted(points))
        means = np.asarray([np.mean(points[p]) for p in xs])
        stds = np.asarray([np.std(points[p]) for p in xs])
        label = f"{summary.line}={_format_value(key)}" if summary.line else summary.metric
        if np.any(stds > 0):
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
        else:
            ax.plot(xs, means, marker="o", label=label)
    if tick_labels is not None:
        ax.set_xticks(range(len(tick_labels)), tick_labels)
    elif 0 < len(positions) <= 12:  # a grid sweep: tick exactly the swept values
        ax.set_xticks(sorted(set(positions.values())))
    ax.set_xlabel(summary.x)
    ax.set_ylabel(summary.metric)
    ax.set_title(f"{summary.metric} vs {summary.x} ({len(rows)} jobs)")
    ax.grid(True, alpha=0.3)
    if summary.line or len(line_keys) > 1:
        ax.legend(title=None, fontsize="small")
    return fig


def format_optuna(results: dict[str, Any]) -> str:
    """A short text of Optuna's best value and parameters (or its Pareto front)."""
    if "best_params" in results:
        params = ", ".join(f"{k}={_format_value(v)}" for k, v in results["best_params"].items())
        return f"Optuna best value: {_format_value(results.get('best_value'))}  params: {params}"
    solutions = results.get("solutions") or []
    lines = [f"Optuna Pareto front ({len(solutions)} solutions):"]
    for sol in solutions:
        params = ", ".join(f"{k}={_format_value(v)}" for k, v in sol.get("params", {}).items())
        lines.append(f"  values={sol.get('values')}  params: {params}")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m src.tools.summarize_sweep",
        description="Table, CSV and plot of a Hydra multirun's final metric against its "
        "parameters (from each job's .hydra/ and metrics.json).",
    )
    parser.add_argument("multirun_dir", type=Path, help="the multirun directory (job folders)")
    parser.add_argument(
        "--metric", default=DEFAULT_METRIC, help=f"metric to compare (default {DEFAULT_METRIC})"
    )
    parser.add_argument(
        "--x",
        default=None,
        help=f"x-axis parameter (default {DEFAULT_X}, else the first numeric swept parameter)",
    )
    parser.add_argument(
        "--line",
        default=DEFAULT_LINE,
        help=f"one line per value of this parameter (default {DEFAULT_LINE}; one line if absent)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output directory (default: the multirun dir)"
    )
    parser.add_argument(
        "--ascending", action="store_true", help="lower is better (sort lowest first)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (2 with a message on stderr for bad input)."""
    args = _parse_args(argv)
    console = Console()
    try:
        summary = summarize(
            args.multirun_dir, args.metric, x=args.x, line=args.line, ascending=args.ascending
        )
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"summarize_sweep: error: {message}", file=sys.stderr)
        return 2
    out_dir = args.out if args.out is not None else args.multirun_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    console.print(format_table(summary))
    if summary.optuna is not None:
        console.print(format_optuna(summary.optuna), highlight=False, markup=False, soft_wrap=True)
    csv_path = write_csv(summary, out_dir / CSV_NAME)
    png_path = out_dir / PNG_NAME
    plot_summary(summary).savefig(png_path, dpi=120)
    console.print(f"wrote {csv_path} and {png_path}", highlight=False, markup=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
