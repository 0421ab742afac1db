"""Fake run and multirun directories laid out exactly as Hydra and Lightning's CSVLogger write
them (tests/tools/test_run_reader.py checks the reader on a verbatim CSVLogger file too)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


def write_lightning_csv(
    path: Path, epochs: Sequence[dict[str, float]], steps_per_epoch: int = 4
) -> None:
    """Write ``metrics.csv`` as CSVLogger does for a module that logs ``train/loss`` with
    ``on_step=True, on_epoch=True`` every 2 steps, validation metrics at the end of each epoch,
    and a ``LearningRateMonitor(logging_interval="epoch")``.

    ``epochs[e]`` holds the epoch-level values: ``train/loss``, ``lr-Adam``, and optionally
    ``val/*`` (omitted → no validation that epoch).
    """
    rows: list[dict[str, Any]] = []
    for epoch, values in enumerate(epochs):
        first_step = epoch * steps_per_epoch
        last_step = first_step + steps_per_epoch - 1
        if "lr-Adam" in values:  # LR monitor: logged at epoch start, without an epoch cell
            rows.append({"lr-Adam": values["lr-Adam"], "step": first_step})
        for step in range(first_step + 1, last_step + 1, 2):  # log_every_n_steps=2
            rows.append({"epoch": epoch, "step": step, "train/loss_step": 10.0 + step})
        val = {k: v for k, v in values.items() if k.startswith("val/")}
        if val:
            rows.append({"epoch": epoch, "step": last_step, **val})
        rows.append({"epoch": epoch, "step": last_step, "train/loss_epoch": values["train/loss"]})
    columns = sorted({k for r in rows for k in r})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def write_hydra_run(
    run_dir: Path,
    overrides: Sequence[str],
    final_metrics: dict[str, float] | None,
    config: dict[str, Any] | None = None,
    epochs: Sequence[dict[str, float]] | None = None,
) -> Path:
    """A Hydra job directory: .hydra/{overrides,config,hydra}.yaml, metrics.json (unless
    ``final_metrics`` is None) and csv/version_0/metrics.csv."""
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True)
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    cfg = {
        "task_name": "train",
        "loss": {"margin": 0.3, "label_smooth": 0.1},
        "paths": {"output_dir": "${hydra:runtime.output_dir}", "log_dir": "logs"},
    }
    cfg.update(config or {})
    (hydra_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (hydra_dir / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"output_dir": str(run_dir)}}})
    )
    if final_metrics is not None:
        (run_dir / "metrics.json").write_text(json.dumps(final_metrics, indent=2, sort_keys=True))
    if epochs is None:
        epochs = [
            {"train/loss": 2.0, "lr-Adam": 1e-3, "val/mAP": 0.2},
            {"train/loss": 1.0, "lr-Adam": 1e-3, "val/mAP": 0.4},
        ]
    write_lightning_csv(run_dir / "csv" / "version_0" / "metrics.csv", epochs)
    (run_dir / "train.log").write_text("")
    return run_dir


# The 2 x 2 grid of the sweep tests: (margin, mining_ratio) -> val/mAP_best.
GRID_MAP_BEST = {
    (0.1, 0.005): 0.41,
    (0.1, 0.01): 0.47,
    (0.3, 0.005): 0.52,
    (0.3, 0.01): 0.38,
}
BASE_OVERRIDES = ["experiment=synthetic_mar", "+data.source.preset=tiny", "trainer.max_epochs=2"]


def write_grid_multirun(sweep: Path) -> Path:
    """A 2 x 2 margin x mining-ratio multirun in ``sweep`` (jobs 0..3 in Hydra's sweep order,
    ``val/mAP_best`` from GRID_MAP_BEST)."""
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"mode": "MULTIRUN"}}))
    for job, ((margin, ratio), best) in enumerate(GRID_MAP_BEST.items()):
        write_hydra_run(
            sweep / str(job),
            [*BASE_OVERRIDES, f"loss.margin={margin}", f"loss.mining_ratio={ratio}"],
            {
                "val/mAP": best - 0.01,
                "val/mAP_best": best,
                "test/rank1": best + 0.2,
                "train/loss_epoch": 1.5,
            },
            config={"loss": {"margin": margin, "mining_ratio": ratio}},
        )
    return sweep
