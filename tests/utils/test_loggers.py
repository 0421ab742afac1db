"""src/utils/loggers.py: the ddp_spawn-safe CSV logger, the W&B factory's mode and tags."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

from src.utils.loggers import CSVLogger, make_wandb_logger, wandb_api_key_configured


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_csv_logger_appends_from_a_copy_made_before_the_file_existed(tmp_path):
    """ddp_spawn: the fit workers and, later, the test workers each get a pickled copy of the
    parent's logger, which never saw the fit's columns. The test's rows must be appended with
    every column kept (Lightning's own writer raises "dict contains fields not in fieldnames")."""
    logger = CSVLogger(save_dir=tmp_path, name="csv")
    logger.log_hyperparams({"lr": 0.1})  # the parent creates the writer (src.train does)
    parent_copy = pickle.dumps(logger)

    fit_worker = pickle.loads(parent_copy)
    fit_worker.log_metrics({"train/loss": 1.5, "val/mAP": 0.25}, step=3)
    fit_worker.log_metrics({"train/loss": 1.0}, step=7)
    fit_worker.finalize("success")

    test_worker = pickle.loads(parent_copy)
    test_worker.log_metrics({"test/mAP": 0.5}, step=8)
    test_worker.finalize("success")

    header, rows = _rows(Path(logger.log_dir) / "metrics.csv")
    assert set(header) == {"step", "train/loss", "val/mAP", "test/mAP"}
    assert [(r["step"], r["train/loss"], r["val/mAP"], r["test/mAP"]) for r in rows] == [
        ("3", "1.5", "0.25", ""),
        ("7", "1.0", "", ""),
        ("8", "", "", "0.5"),
    ]


def test_wandb_mode_follows_the_api_key(monkeypatch, tmp_path):
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc entry either
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    assert not wandb_api_key_configured()
    logger = make_wandb_logger(save_dir=str(tmp_path / "run"), tags=["a"], sweep="2024-05-01")
    assert logger._wandb_init["mode"] == "offline"
    assert logger._wandb_init["tags"] == ["a", "sweep:2024-05-01"]
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_api_key_configured()
    assert make_wandb_logger(save_dir=str(tmp_path / "run"))._wandb_init["mode"] == "online"
    # an explicit mode (or WANDB_MODE) wins
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert make_wandb_logger(save_dir=str(tmp_path / "run"))._wandb_init["mode"] == "disabled"
    assert (
        make_wandb_logger(save_dir=str(tmp_path), mode="offline")._wandb_init["mode"] == "offline"
    )
