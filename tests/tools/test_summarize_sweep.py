"""`python -m src.tools.summarize_sweep` on fake Hydra multiruns (tests/tools/conftest.py)."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from matplotlib.figure import Figure
from PIL import Image

from src.tools.summarize_sweep import main, plot_summary, summarize

from .fake_runs import BASE_OVERRIDES, GRID_MAP_BEST, write_hydra_run

# Jobs 0..3 hold GRID_MAP_BEST in insertion order; best first: 0.52 (job 2), 0.47 (job 1),
# 0.41 (job 0), 0.38 (job 3).
EXPECTED_ORDER = ["2", "1", "0", "3"]


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_on_a_2x2_grid(
    grid_multirun: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "120")  # rich sizes the table from the environment
    assert main([str(grid_multirun)]) == 0
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)  # in case colour is forced

    # The table: every job with its metric (4 decimals), best first.
    positions = [out.index(f"{best:.4f}") for best in sorted(GRID_MAP_BEST.values())[::-1]]
    assert positions == sorted(positions)
    table_rows = [line for line in out.splitlines() if re.search(r"0\.\d{4}\s*│\s*$", line)]
    assert len(table_rows) == 4
    cells = [[c.strip() for c in row.strip("│ ").split("│")] for row in table_rows]
    assert cells == [
        ["2", "0.3", "0.005", "0.5200"],
        ["1", "0.1", "0.01", "0.4700"],
        ["0", "0.1", "0.005", "0.4100"],
        ["3", "0.3", "0.01", "0.3800"],
    ]

    # The CSV: same rows, parameters that vary only, other final metrics as extra columns.
    rows = _read_csv(grid_multirun / "sweep_summary.csv")
    assert list(rows[0]) == [
        "job",
        "loss.margin",
        "loss.mining_ratio",
        "val/mAP_best",
        "test/rank1",
        "train/loss_epoch",
        "val/mAP",
    ]
    assert [r["job"] for r in rows] == EXPECTED_ORDER
    for row in rows:
        key = (float(row["loss.margin"]), float(row["loss.mining_ratio"]))
        assert float(row["val/mAP_best"]) == GRID_MAP_BEST[key]
        assert float(row["test/rank1"]) == GRID_MAP_BEST[key] + 0.2
        assert float(row["val/mAP"]) == GRID_MAP_BEST[key] - 0.01

    # The plot: a real PNG of the figure's size (6.4 x 4.2 in at 120 dpi), not a blank canvas.
    png = grid_multirun / "sweep_summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    with Image.open(png) as image:
        assert image.size == (768, 504)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert str(grid_multirun / "sweep_summary.csv") in out.replace("\n", "")


def test_summary_plot_has_one_line_per_mining_ratio(grid_multirun: Path) -> None:
    summary = summarize(grid_multirun)
    assert (summary.x, summary.line) == ("loss.margin", "loss.mining_ratio")
    assert summary.params == ["loss.margin", "loss.mining_ratio"]
    assert summary.best == {
        "job": "2",
        "loss.margin": 0.3,
        "loss.mining_ratio": 0.005,
        "val/mAP_best": 0.52,
    }
    fig = plot_summary(summary)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert sorted(lines) == ["loss.mining_ratio=0.005", "loss.mining_ratio=0.01"]
    np.testing.assert_array_equal(lines["loss.mining_ratio=0.005"].get_xdata(), [0.1, 0.3])
    np.testing.assert_array_equal(lines["loss.mining_ratio=0.005"].get_ydata(), [0.41, 0.52])
    np.testing.assert_array_equal(lines["loss.mining_ratio=0.01"].get_ydata(), [0.47, 0.38])
    assert ax.get_xlabel() == "loss.margin" and ax.get_ylabel() == "val/mAP_best"


def test_repeated_points_are_averaged_with_error_bars(tmp_path: Path) -> None:
    # margin sweep x 2 seeds, no mining ratio: one line, mean +- std per margin.
    values = {(0.1, 0): 0.40, (0.1, 1): 0.50, (0.5, 0): 0.30, (0.5, 1): 0.30}
    for job, ((margin, seed), value) in enumerate(values.items()):
        write_hydra_run(
            tmp_path / str(job), [f"loss.margin={margin}", f"seed={seed}"], {"val/mAP_best": value}
        )
    summary = summarize(tmp_path)
    assert summary.line is None
    assert summary.params == ["loss.margin", "seed"]
    fig = Figure()
    ax = fig.add_subplot()
    assert plot_summary(summary, ax=ax) is fig
    (line,) = ax.get_lines()[:1]
    np.testing.assert_array_equal(line.get_xdata(), [0.1, 0.5])
    np.testing.assert_allclose(line.get_ydata(), [0.45, 0.30])
    (container,) = ax.containers
    segments = container.lines[2][0].get_segments()  # error bars: mean -+ std
    np.testing.assert_allclose([s[:, 1] for s in segments], [[0.40, 0.50], [0.30, 0.30]])


def test_x_from_config_and_fallback(tmp_path: Path) -> None:
    # The margin is not overridden (it comes from .hydra/config.yaml) and the lr varies.
    for job, lr in enumerate([1e-3, 1e-4]):
        write_hydra_run(
            tmp_path / str(job),
            [f"optimizer.lr={lr}"],
            {"val/mAP_best": 0.1 * (job + 1)},
            config={"loss": {"margin": 0.3}, "optimizer": {"lr": lr}},
        )
    summary = summarize(tmp_path)
    assert summary.x == "loss.margin"  # present in the config of every job
    assert [r["loss.margin"] for r in summary.rows] == [0.3, 0.3]
    summary = summarize(tmp_path, x="optimizer.lr", line="loss.margin")
    assert summary.line == "loss.margin"
    assert [r["optimizer.lr"] for r in summary.rows] == [1e-4, 1e-3]
    with pytest.raises(KeyError, match="no job has the parameter 'loss.marign'.*optimizer.lr"):
        summarize(tmp_path, x="loss.marign")

    # No margin anywhere: the first numeric parameter that varies becomes x.
    lr_sweep = tmp_path / "lr_sweep"
    for job, lr in enumerate([1e-3, 1e-4]):
        write_hydra_run(
            lr_sweep / str(job),
            ["model=resnet18", f"optimizer.lr={lr}"],
            {"val/mAP_best": lr},
            config={"loss": {"label_smooth": 0.1}},
        )
    with pytest.warns(UserWarning, match="no 'loss.margin': plotting against 'optimizer.lr'"):
        summary = summarize(lr_sweep)
    assert summary.x == "optimizer.lr" and summary.params == ["optimizer.lr"]
    assert plot_summary(summary).axes[0].get_lines()[0].get_xdata().tolist() == [1e-4, 1e-3]


def test_optuna_results_are_printed(
    grid_multirun: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (grid_multirun / "optimization_results.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "optuna",
                "best_params": {"loss.margin": 0.3, "loss.mining_ratio": 0.005},
                "best_value": 0.52,
            }
        )
    )
    out_dir = tmp_path / "report"
    assert main([str(grid_multirun), "--out", str(out_dir), "--metric", "test/rank1"]) == 0
    out = capsys.readouterr().out
    assert "Optuna best value: 0.52  params: loss.margin=0.3, loss.mining_ratio=0.005" in out
    assert (out_dir / "sweep_summary.png").is_file()
    assert not (grid_multirun / "sweep_summary.csv").exists()
    rows = _read_csv(out_dir / "sweep_summary.csv")
    assert [r["job"] for r in rows] == EXPECTED_ORDER  # test/rank1 = val/mAP_best + 0.2


def test_ascending_and_failed_jobs(grid_multirun: Path) -> None:
    (grid_multirun / "1" / "metrics.json").unlink()  # a crashed job: CSV logs but no results
    with pytest.warns(UserWarning, match=r"1 job\(s\) .* have no 'val/mAP_best'.*: 1"):
        summary = summarize(grid_multirun, ascending=True)
    assert [r["job"] for r in summary.rows] == ["3", "0", "2", "1"]
    assert math.isnan(summary.rows[-1]["val/mAP_best"])
    # val/mAP falls back to the CSV logs for the crashed job (last validation: 0.4).
    summary = summarize(grid_multirun, metric="val/mAP")
    assert [r["val/mAP"] for r in summary.rows] == pytest.approx([0.51, 0.40, 0.40, 0.37])


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert f"no Hydra job directories in {empty}" in err.replace("\n", "")

    assert main([str(tmp_path / "missing")]) == 2
    assert "multirun directory not found" in capsys.readouterr().err

    write_hydra_run(
        tmp_path / "sweep" / "0", [*BASE_OVERRIDES, "loss.margin=0.1"], {"val/mAP": 0.1}
    )
    assert main([str(tmp_path / "sweep"), "--metric", "val/mAP_bset"]) == 2
    err = capsys.readouterr().err.replace("\n", "")
    assert "no job in" in err and "has the metric 'val/mAP_bset'" in err
    assert "available metrics: lr-Adam, train/loss, val/mAP" in err
    assert not (tmp_path / "sweep" / "sweep_summary.csv").exists()
