"""Read what a training run left on disk, without Lightning, Hydra or W&B.

A run directory (``logs/train/runs/<time>/`` or one job ``<multirun>/<n>/`` of a sweep) holds:

* ``csv/version_*/metrics.csv``: Lightning's ``CSVLogger`` (one file per fit; a resumed fit adds
  ``version_1``, ...). Every ``log`` call is a row with empty cells for the other columns; keys
  logged with ``on_step=True, on_epoch=True`` appear as ``<key>_step`` and ``<key>_epoch``, and
  ``LearningRateMonitor`` rows carry no ``epoch``.
* ``metrics.json``: the final metrics written by ``src.train`` / ``src.eval``, a flat
  ``{"val/mAP": 0.71, "val/mAP_best": 0.73, "test/rank1": 0.88, ...}``.
* ``.hydra/overrides.yaml`` (the command-line overrides, a list of ``key=value`` strings),
  ``.hydra/config.yaml`` (the composed config, interpolations not yet resolved) and
  ``.hydra/hydra.yaml`` (Hydra's own config, which ``${hydra:...}`` interpolations read).
* ``ranklist.png`` (written by ``src.eval``).

:func:`load_run` turns a directory into a :class:`Run`; :func:`load_multirun` reads every job of a
Hydra multirun. Only the standard library, numpy, omegaconf and hydra's override parser are used
(no pandas).
"""

from __future__ import annotations

import csv
import json
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf

__all__ = [
    "Run",
    "find_latest_multirun",
    "find_latest_run",
    "load_multirun",
    "load_run",
    "merge_epochs",
    "parse_override",
    "read_metrics_csv",
    "resolve_run_config",
]

CSV_DIR = "csv"
METRICS_JSON = "metrics.json"
HYDRA_DIR = ".hydra"
RANKLIST_PNG = "ranklist.png"

# Columns of a CSVLogger file that index the rows rather than hold a metric.
EPOCH_COL = "epoch"
STEP_COL = "step"
STEP_SUFFIX = "_step"
EPOCH_SUFFIX = "_epoch"


@dataclass
class Run:
    """Everything a run directory holds, already parsed.

    Attributes:
        path: the run directory.
        epochs: the per-epoch metrics table, one numpy array per column, all of the same length:
            ``"epoch"`` (int, increasing), ``"step"`` (last global step of the epoch) and one float
            array per metric (NaN where the metric was not logged that epoch, e.g. validation
            every other epoch). Step-level columns (``*_step``) are left out and ``*_epoch``
            columns lose the suffix (``train/loss_epoch`` → ``train/loss``). See
            :func:`merge_epochs`.
        rows: the raw CSV rows of every ``version_*`` file in order (NaN-free dicts: empty cells
            are absent), for step-level curves.
        final_metrics: ``metrics.json`` (empty if the run has none, e.g. it crashed).
        overrides: ``.hydra/overrides.yaml`` (empty without Hydra).
        config: the resolved ``.hydra/config.yaml`` as plain dicts and lists (``None`` without
            Hydra); see :func:`resolve_run_config`.
        raw_config: ``.hydra/config.yaml`` as written, an unresolved ``DictConfig``.
        ranklist: path of ``ranklist.png`` if the run has one.
    """

    path: Path
    epochs: dict[str, np.ndarray] = field(default_factory=dict)
    rows: list[dict[str, float]] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    config: dict[str, Any] | None = None
    raw_config: DictConfig | None = None
    ranklist: Path | None = None

    @property
    def name(self) -> str:
        """The directory name (the job number inside a multirun)."""
        return self.path.name

    @cached_property
    def params(self) -> dict[str, Any]:
        """The overrides as ``{key: value}``, values parsed like Hydra does (``0.1`` → float,
        ``null`` → None). ``+``/``++`` prefixes are dropped; ``~key`` deletions are skipped."""
        params: dict[str, Any] = {}
        for text in self.overrides:
            parsed = parse_override(text, source=self.path / HYDRA_DIR / "overrides.yaml")
            if parsed is not None:
                params[parsed[0]] = parsed[1]
        return params

    def param(self, key: str, default: Any = None) -> Any:
        """Value of a dotted config key for this run: the override if there is one (for a config
        group, the option chosen: ``model=resnet18`` gives ``"resnet18"``), else the value in the
        resolved config, else ``default``."""
        params = self.params
        if key in params:
            return params[key]
        node: Any = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def metric_names(self) -> list[str]:
        """Names accepted by :meth:`metric`: ``metrics.json`` keys and per-epoch columns."""
        epoch_cols = [k for k in self.epochs if k not in (EPOCH_COL, STEP_COL)]
        return sorted(set(self.final_metrics) | set(epoch_cols))

    def metric(self, name: str) -> float:
        """Final value of a metric: ``metrics.json[name]``, else the last logged epoch value.

        Raises:
            KeyError: naming the run and the metrics it has.
        """
        if name in self.final_metrics:
            return self.final_metrics[name]
        if name in self.epochs and name not in (EPOCH_COL, STEP_COL):
            values = self.epochs[name]
            logged = values[~np.isnan(values)]
            if logged.size:
                return float(logged[-1])
        raise KeyError(
            f"metric {name!r} not found in run {self.path}; available: "
            f"{', '.join(self.metric_names) or '(none)'}"
        )

    def curve(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(epochs, values)`` of a per-epoch metric, epochs where it was not logged dropped.

        ``name`` may be given with or without the ``_epoch`` suffix.

        Raises:
            KeyError: naming the run and its per-epoch columns.
        """
        key = name
        if key not in self.epochs and name.endswith(EPOCH_SUFFIX):
            key = name[: -len(EPOCH_SUFFIX)]
        if key not in self.epochs or key in (EPOCH_COL, STEP_COL):
            columns = [k for k in self.epochs if k not in (EPOCH_COL, STEP_COL)]
            raise KeyError(
                f"no per-epoch column {name!r} in the CSV logs of {self.path}; available: "
                f"{', '.join(columns) or '(no CSV logs)'}"
            )
        values = self.epochs[key]
        logged = ~np.isnan(values)
        return self.epochs[EPOCH_COL][logged], values[logged]

    def step_curve(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of a step-level metric (``train/loss`` finds ``train/loss_step``).

        Raises:
            KeyError: naming the run and its step-level columns.
        """
        key = name if name.endswith(STEP_SUFFIX) else name + STEP_SUFFIX
        points = [(r[STEP_COL], r[key]) for r in self.rows if key in r and STEP_COL in r]
        if not points:
            columns = sorted({k for r in self.rows for k in r if k.endswith(STEP_SUFFIX)})
            raise KeyError(
                f"no step-level column {key!r} in the CSV logs of {self.path}; available: "
                f"{', '.join(columns) or '(none)'}"
            )
        steps, values = zip(*points)
        return np.asarray(steps, dtype=np.int64), np.asarray(values, dtype=np.float64)


# ------------------------------------------------------------------------------------------------
# CSV logs
# ------------------------------------------------------------------------------------------------
def read_metrics_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a Lightning ``CSVLogger`` ``metrics.csv``; empty cells are left out of the dicts.

    ``epoch`` and ``step`` are ints, every other value a float.

    Raises:
        ValueError: naming the file, line and column of a cell that is not a number.
    """
    path = Path(path)
    rows: list[dict[str, float]] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        for raw in reader:
            line_no = reader.line_num
            row: dict[str, float] = {}
            for key, cell in raw.items():
                if key is None:
                    raise ValueError(f"{path}, line {line_no}: more cells than header columns")
                if cell is None or cell.strip() == "":
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    raise ValueError(
                        f"{path}, line {line_no}, column {key!r}: expected a number, got {cell!r}"
                    ) from None
                row[key] = int(value) if key in (EPOCH_COL, STEP_COL) else value
            if row:
                rows.append(row)
    return rows


def merge_epochs(rows: Iterable[dict[str, float]]) -> dict[str, np.ndarray]:
    """Collapse CSVLogger rows into one row per epoch.

    * A row without ``epoch`` (``LearningRateMonitor`` logs at the start of an epoch) belongs to
      the next row that has one; trailing rows to the last epoch seen (epoch 0 if none).
    * Within an epoch the last logged value of each column wins (so a resumed fit, read after
      the first, overrides the epochs it repeats).
    * Step-level columns (``*_step``) are dropped; ``<key>_epoch`` becomes ``<key>`` unless a
      column ``<key>`` exists too.

    Returns:
        ``{"epoch": int array, "step": int array (last step of the epoch, -1 if unknown),
        metric: float array with NaN where not logged}``, epochs increasing.
    """
    rows = list(rows)
    assigned: list[tuple[int, dict[str, float]]] = []
    pending: list[dict[str, float]] = []
    last_epoch = 0
    for row in rows:
        if EPOCH_COL in row:
            last_epoch = int(row[EPOCH_COL])
            assigned.extend((last_epoch, r) for r in pending)
            pending = []
            assigned.append((last_epoch, row))
        else:
            pending.append(row)
    assigned.extend((last_epoch, r) for r in pending)

    all_columns = {k for r in rows for k in r}
    rename: dict[str, str] = {}
    for col in sorted(all_columns):
        if col in (EPOCH_COL, STEP_COL) or col.endswith(STEP_SUFFIX):
            continue
        base = col[: -len(EPOCH_SUFFIX)] if col.endswith(EPOCH_SUFFIX) else col
        rename[col] = base if base == col or base not in all_columns else col

    by_epoch: dict[int, dict[str, float]] = {}
    for epoch, row in assigned:
        merged = by_epoch.setdefault(epoch, {})
        for col, value in row.items():
            if col == STEP_COL:
                merged[STEP_COL] = max(merged.get(STEP_COL, -1), value)
            elif col in rename and not math.isnan(value):
                merged[rename[col]] = value

    epochs = sorted(by_epoch)
    table: dict[str, np.ndarray] = {
        EPOCH_COL: np.asarray(epochs, dtype=np.int64),
        STEP_COL: np.asarray([by_epoch[e].get(STEP_COL, -1) for e in epochs], dtype=np.int64),
    }
    for col in sorted(set(rename.values())):
        table[col] = np.asarray([by_epoch[e].get(col, np.nan) for e in epochs], dtype=np.float64)
    return table


def _csv_files(run_dir: Path) -> list[Path]:
    """``csv/version_*/metrics.csv`` in version order; any ``*/version_*/metrics.csv`` when the
    CSV logger was given another name."""
    files = list(run_dir.glob(f"{CSV_DIR}/version_*/metrics.csv"))
    if not files:
        files = list(run_dir.glob("*/version_*/metrics.csv"))

    def version(path: Path) -> tuple[int, str]:
        match = re.fullmatch(r"version_(\d+)", path.parent.name)
        return (int(match.group(1)) if match else 1 << 30, str(path))

    return sorted(files, key=version)


# ------------------------------------------------------------------------------------------------
# metrics.json, Hydra files
# ------------------------------------------------------------------------------------------------
def _read_final_metrics(path: Path) -> dict[str, float]:
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a flat JSON object of metric -> number, got {type(data).__name__}"
        )
    metrics: dict[str, float] = {}
    for key, value in data.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{path}: metric {key!r} must be a number, got {value!r}")
        metrics[str(key)] = float(value)
    return metrics


def _read_overrides(path: Path) -> list[str]:
    # Plain YAML, not OmegaConf: an override may contain `${...}` text that must stay as written.
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML ({err})") from None
    if data is None:
        return []
    if not isinstance(data, list) or not all(isinstance(item, str) for item in data):
        raise ValueError(f"{path}: expected a YAML list of 'key=value' strings, got {data!r}")
    return data


def _read_yaml_mapping(path: Path, what: str) -> DictConfig | None:
    if not path.is_file():
        return None
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(loaded, DictConfig):
        raise ValueError(f"{path}: expected a YAML mapping ({what})")
    return loaded


_OVERRIDE_PARSER: Any = None


def parse_override(text: str, source: str | Path = "override") -> tuple[str, Any] | None:
    """``"loss.margin=0.3"`` → ``("loss.margin", 0.3)``, parsed with Hydra's override grammar
    (``+``/``++`` dropped, ``key@pkg`` kept as written, lists and dicts as Python containers).

    Returns ``None`` for a deletion (``~key``).

    Raises:
        ValueError: naming ``source`` when ``text`` is not an override.
    """
    global _OVERRIDE_PARSER
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if _OVERRIDE_PARSER is None:
        _OVERRIDE_PARSER = OverridesParser.create()
    try:
        override = _OVERRIDE_PARSER.parse_override(text)
    except HydraException as err:
        raise ValueError(f"{source}: cannot parse override {text!r}: {err}") from None
    if override.is_delete():
        return None
    key = override.get_key_element().lstrip("+")
    if override.is_sweep_override():
        # A job's overrides never hold a sweep; keep the text rather than a sweep object.
        return key, text.split("=", 1)[1]
    return key, override.value()


_HYDRA_RESOLVER = re.compile(r"\$\{hydra:\s*([^}]*?)\s*\}")
_HYDRA_NODE = "__hydra_yaml__"


def resolve_run_config(
    config: DictConfig, hydra_config: DictConfig | None = None
) -> dict[str, Any]:
    """Resolve a saved ``.hydra/config.yaml`` outside the Hydra app that wrote it.

    ``${hydra:key}`` interpolations read ``hydra_config`` (the ``hydra`` node of the run's
    ``.hydra/hydra.yaml``), so ``paths.output_dir`` becomes the run's directory as recorded,
    never the Hydra state of the current process. Leaves that still cannot be resolved (a
    resolver registered only by the training code, ``${hydra:...}`` without ``hydra.yaml``) keep
    their ``${...}`` text; everything else is resolved, leaf by leaf.

    Returns:
        The config as plain dicts and lists.
    """
    container = OmegaConf.to_container(config, resolve=False)
    if hydra_config is not None:
        container = _substitute_hydra(container)
        container[_HYDRA_NODE] = OmegaConf.to_container(hydra_config, resolve=False)
    resolved = _resolve_leaves(OmegaConf.create(container))
    resolved.pop(_HYDRA_NODE, None)
    return resolved


def _substitute_hydra(obj: Any) -> Any:
    """``${hydra:runtime.output_dir}`` -> ``${__hydra_yaml__.runtime.output_dir}``."""
    if isinstance(obj, str):
        return _HYDRA_RESOLVER.sub(lambda m: "${" + _HYDRA_NODE + "." + m.group(1) + "}", obj)
    if isinstance(obj, dict):
        return {k: _substitute_hydra(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute_hydra(v) for v in obj]
    return obj


def _resolve_leaves(node: Any) -> Any:
    """Plain containers from a ``DictConfig``/``ListConfig``, each leaf resolved on its own so
    that one unresolvable interpolation does not prevent the rest."""
    if isinstance(node, DictConfig):
        out: dict[str, Any] = {}
        for key in node:
            out[str(key)] = _resolve_child(node, key)
        return out
    if isinstance(node, ListConfig):
        return [_resolve_child(node, i) for i in range(len(node))]
    return node


def _resolve_child(parent: DictConfig | ListConfig, key: Any) -> Any:
    try:
        child = parent[key]
    except Exception:  # an interpolation that cannot be resolved outside the Hydra app
        raw = parent._get_node(key)
        if raw is None:
            return None
        return str(raw._value()).replace("${" + _HYDRA_NODE + ".", "${hydra:")
    if isinstance(child, DictConfig | ListConfig):
        return _resolve_leaves(child)
    return child


# ------------------------------------------------------------------------------------------------
# Runs and multiruns
# ------------------------------------------------------------------------------------------------
def _is_run_dir(path: Path) -> bool:
    return (path / HYDRA_DIR).is_dir() or (path / METRICS_JSON).is_file() or bool(_csv_files(path))


def _check_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"{what} must be a directory, got a file: {path}")


def load_run(run_dir: str | Path) -> Run:
    """Read one run directory (see the module docstring for what it may hold).

    Every part is optional except that at least one of ``.hydra/``, ``metrics.json`` or
    ``csv/version_*/metrics.csv`` must exist.

    Raises:
        FileNotFoundError / NotADirectoryError: naming ``run_dir``.
        ValueError: ``run_dir`` is not a run directory, or one of its files is malformed (the
            message names the file).
    """
    path = Path(run_dir)
    _check_dir(path, "run directory")
    if not _is_run_dir(path):
        raise ValueError(
            f"{path} is not a run directory: expected {HYDRA_DIR}/, {METRICS_JSON} or "
            f"{CSV_DIR}/version_*/metrics.csv inside it"
            + (" (it looks like a multirun: use load_multirun)" if _job_dirs(path) else "")
        )
    rows: list[dict[str, float]] = []
    for csv_path in _csv_files(path):
        rows.extend(read_metrics_csv(csv_path))
    final_path = path / METRICS_JSON
    overrides_path = path / HYDRA_DIR / "overrides.yaml"
    raw_config = _read_yaml_mapping(path / HYDRA_DIR / "config.yaml", "the composed config")
    hydra_yaml = _read_yaml_mapping(path / HYDRA_DIR / "hydra.yaml", "Hydra's config")
    hydra_config = hydra_yaml.get("hydra") if hydra_yaml is not None else None
    config = None
    if raw_config is not None:
        config = resolve_run_config(
            raw_config, hydra_config if isinstance(hydra_config, DictConfig) else None
        )
    run = Run(
        path=path,
        epochs=merge_epochs(rows) if rows else {},
        rows=rows,
        final_metrics=_read_final_metrics(final_path) if final_path.is_file() else {},
        overrides=_read_overrides(overrides_path) if overrides_path.is_file() else [],
        config=config,
        raw_config=raw_config,
        ranklist=path / RANKLIST_PNG if (path / RANKLIST_PNG).is_file() else None,
    )
    run.params  # noqa: B018  (parse now, so a malformed override fails here, naming the file)
    return run


def _job_sort_key(path: Path) -> tuple[int, int, str]:
    return (0, int(path.name), "") if path.name.isdigit() else (1, 0, path.name)


def _job_dirs(multirun_dir: Path) -> list[Path]:
    """Non-hidden subdirectories holding ``.hydra/``, numbered jobs first in numeric order."""
    subdirs = [p for p in multirun_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted((p for p in subdirs if (p / HYDRA_DIR).is_dir()), key=_job_sort_key)


def load_multirun(multirun_dir: str | Path) -> list[Run]:
    """Read every job of a Hydra multirun (``<dir>/0/``, ``<dir>/1/``, ... in numeric order).

    Subdirectories without ``.hydra/`` (not a job, or a job that never started) are skipped with
    a warning; hidden ones (``.submitit``) silently.

    Raises:
        FileNotFoundError / NotADirectoryError: naming ``multirun_dir``.
        ValueError: no job directory in ``multirun_dir`` (the message says when it is a single
            run instead).
    """
    path = Path(multirun_dir)
    _check_dir(path, "multirun directory")
    jobs = _job_dirs(path)
    if not jobs:
        hint = (
            " (it is a single run: use load_run)"
            if (path / HYDRA_DIR).is_dir()
            else " (expected numbered job folders 0/, 1/, ... each with .hydra/)"
        )
        raise ValueError(f"no Hydra job directories in {path}{hint}")
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if sub not in jobs:
            warnings.warn(
                f"skipping {sub}: no {HYDRA_DIR}/ inside, so not a Hydra job directory",
                stacklevel=2,
            )
    return [load_run(job) for job in jobs]


def find_latest_run(root: str | Path) -> Path | None:
    """The most recently modified run directory directly under ``root`` (e.g.
    ``logs/train/runs``), or ``None`` if ``root`` does not exist or holds no run."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if p.is_dir() and _is_run_dir(p)]
    return max(runs, key=lambda p: (p.stat().st_mtime, p.name)) if runs else None


def find_latest_multirun(root: str | Path) -> Path | None:
    """The most recently modified multirun directory directly under ``root`` (e.g.
    ``logs/train/multiruns``): one holding at least one job folder with ``.hydra/``."""
    root = Path(root)
    if not root.is_dir():
        return None
    sweeps = [p for p in root.iterdir() if p.is_dir() and _job_dirs(p)]
    return max(sweeps, key=lambda p: (p.stat().st_mtime, p.name)) if sweeps else None
