"""A run a person can read: the config summary (whole tree in config_tree.txt), the whole-run
progress (a bar on a terminal, plain lines otherwise), no sanity-check warning, no duplicated
test table or Lightning advertisement."""

from __future__ import annotations

import csv
import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import src.callbacks.progress as progress_module
from src.callbacks.progress import RunProgress, format_duration
from src.train import train
from src.utils.instantiators import instantiate_callbacks
from src.utils.rich_utils import config_summary
from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(r"epoch (\d+)/(\d+) · step (\d+)/(\d+) \((\d+)%\) · loss ([0-9.]+)")


def test_format_duration():
    assert format_duration(0) == "0:00"
    assert format_duration(59.6) == "1:00"
    assert format_duration(3599) == "59:59"
    assert format_duration(3600 * 2 + 61) == "2:01:01"
    assert format_duration(float("inf")) == "?" and format_duration(-1) == "?"


def test_train_status_eta_is_for_the_whole_run(monkeypatch):
    """20 of 100 steps in 10 s since this session's start at step 0: 2 steps/s, 80 steps left."""
    bar = RunProgress(mode="lines")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=3.5e-4)
    trainer = SimpleNamespace(global_step=20, max_epochs=5, current_epoch=1, optimizers=[optimizer])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: 110.0)
    bar._fit_start, bar._start_step, bar._total, bar._loss = 100.0, 0, 100.0, 0.42
    status = bar.train_status(trainer)
    assert status == (
        "epoch 2/5 · step 20/100 (20%) · loss 0.4200 · lr 3.50e-04 · 2.00 steps/s · 0:10 elapsed "
        "· ETA 0:40"
    )
    # a resumed run: the speed counts only this session's steps (resumed at step 10)
    bar._start_step = 10
    assert "1.00 steps/s" in bar.train_status(trainer) and "ETA 1:20" in bar.train_status(trainer)


def test_progress_arguments_and_disable():
    with pytest.raises(ValueError, match="mode"):
        RunProgress(mode="fancy")
    with pytest.raises(ValueError, match="every_n_steps"):
        RunProgress(every_n_steps=0)
    cfg = {"progress_bar": {"_target_": "src.callbacks.progress.RunProgress"}}
    from omegaconf import OmegaConf

    assert len(instantiate_callbacks(OmegaConf.create(cfg))) == 1
    # trainer.enable_progress_bar=false: Lightning refuses a bar callback, so none is built
    assert instantiate_callbacks(OmegaConf.create(cfg), enable_progress_bar=False) == []


def test_lines_mode_logs_the_run_at_the_logging_cadence(
    make_cfg, tiny_data_root, caplog, monkeypatch
):
    """Non-TTY progress: a line every log_every_n_steps steps whose loss is the logged loss of
    that step, the whole run's step count, a validation line; the loss read back only then."""
    reads = []
    real = progress_module._loss_value
    monkeypatch.setattr(progress_module, "_loss_value", lambda out: reads.append(1) or real(out))
    cfg = make_cfg(
        [
            *tiny_overrides(tiny_data_root),
            "trainer.max_epochs=2",
            "trainer.log_every_n_steps=2",
            "trainer.check_val_every_n_epoch=1",
            "callbacks.progress_bar.mode=lines",
        ]
    )
    with caplog.at_level(logging.INFO, logger="src.callbacks.progress"):
        metrics, objects = train(cfg)
    trainer = objects["trainer"]
    per_epoch, total = trainer.num_training_batches, trainer.global_step
    messages = [r.getMessage() for r in caplog.records if r.name == "src.callbacks.progress"]
    assert any(m.endswith(f"training: {total} steps (2 epochs)") for m in messages)
    steps = [STEP_LINE.search(m) for m in messages if STEP_LINE.search(m)]
    expected_steps = sorted(
        {e * per_epoch + i + 1 for e in range(2) for i in range(per_epoch)
         if (i + 1) % 2 == 0 or i + 1 == per_epoch}
    )  # fmt: skip
    assert [int(m.group(3)) for m in steps] == expected_steps
    assert all(int(m.group(4)) == total and m.group(2) == "2" for m in steps)
    assert len(reads) == len(expected_steps)  # the only device reads of the loss
    # the loss shown is the loss the CSV logger recorded at that step
    with open(next(Path(cfg.paths.output_dir, "csv").rglob("metrics.csv"))) as f:
        logged = {
            int(row["step"]): float(row["train/loss_step"])
            for row in csv.DictReader(f)
            if row.get("train/loss_step")
        }
    compared = 0
    for m in steps:
        step = int(m.group(3))
        if step - 1 in logged:  # Lightning logs the step before global_step increments
            assert float(m.group(6)) == pytest.approx(logged[step - 1], abs=6e-5)
            compared += 1
    assert compared >= 2
    val = [m for m in messages if "val after epoch" in m]
    assert len(val) == 2
    assert f"mAP {100 * metrics['val/mAP']:.1f}%" in val[-1]
    assert any("training done" in m for m in messages)


def test_bar_mode_runs_and_reports_validation(make_cfg, tiny_data_root, capsys):
    cfg = make_cfg(
        [
            *tiny_overrides(tiny_data_root),
            "trainer.max_epochs=1",
            "trainer.check_val_every_n_epoch=1",
            "callbacks.progress_bar.mode=bar",
        ]
    )
    train(cfg)
    out = capsys.readouterr().out
    assert "val after epoch 1: rank-1" in out and "training done" in out


def test_no_warning_from_the_sanity_check(make_cfg, tiny_data_root, recwarn):
    """Lightning's sanity check (num_sanity_val_steps > 0) sees a few batches: nothing is
    evaluated or warned about (the full split is checked at setup)."""
    cfg = make_cfg(
        [
            *tiny_overrides(tiny_data_root),
            "trainer.max_epochs=1",
            "trainer.num_sanity_val_steps=1",
            "data.test_batch_size=4",  # one batch of 4 queries: nothing it could score
            "trainer.check_val_every_n_epoch=1",
        ]
    )
    metrics, _ = train(cfg)
    assert "val/mAP" in metrics
    assert not [w for w in recwarn if "evaluation skipped" in str(w.message)]


def test_config_summary_says_what_the_run_is(make_cfg, tiny_data_root):
    cfg = make_cfg([*tiny_overrides(tiny_data_root), "experiment=market_bot"])
    lines = config_summary(cfg)
    text = "\n".join(lines)
    assert len(lines) <= 10
    assert "experiment market_bot" in lines[0]
    assert "market1501" in text and "32x16" in text and "P x K 4 x 4" in text
    assert "resnet50" in text and "last stride 1" in text and "neck bnneck" in text
    assert "CenterLoss" in text and "Adam" in text and "eval cosine" in text
    assert "config_tree.txt" in lines[-1]


def test_cli_console_is_short_and_the_whole_tree_is_saved(tiny_data_root, tmp_path):
    """The CLI as a user runs it, stdout piped (non-TTY): summary, progress lines, one results
    table; the whole resolved config in config_tree.txt."""
    out = tmp_path / "run"
    args = [a for a in tiny_overrides(tiny_data_root) if a != "extras.print_config=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", *args, "trainer.max_epochs=1",
         f"paths.output_dir={out}", f"hydra.run.dir={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert "run dir" in console and "full config in config_tree.txt" in console
    assert "_target_" not in console  # the tree is not printed
    tree = (out / "config_tree.txt").read_text()
    assert "_target_: src.data.ReIDDataModule" in tree and "${" not in tree  # resolved
    assert "training: " in console and STEP_LINE.search(console)
    assert console.count("test (last checkpoint)") == 1
    assert "Test metric" not in console  # Lightning's duplicate of the results table
    assert "Tip:" not in console and "LeafSpec" not in console
    assert (out / "train.log").read_text().count("step ") >= 1  # the lines land in train.log too


def test_eval_summary_does_not_show_the_composed_defaults(make_cfg):
    """src.eval evaluates with the checkpoint's data and model: the summary names the run and
    the checkpoint only (the protocol summary says what was evaluated)."""
    cfg = make_cfg(["ckpt_path=/some/run/last.ckpt"], config_name="eval")
    lines = config_summary(cfg)
    assert lines[0].startswith("run") and "from /some/run/last.ckpt" in lines[0]
    assert not any(line.startswith(("data", "model", "loss")) for line in lines)
