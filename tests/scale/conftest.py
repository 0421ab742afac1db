"""Fixtures of the scale-out tests: offline W&B in a temporary folder, a stage-1 checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.data import build_dataset
from tests.systems._mar_helpers import save_stage1


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    """Offline W&B with every W&B folder in tmp_path and no credentials."""
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, name in (
        ("WANDB_DIR", "wandb_dir"),
        ("WANDB_CACHE_DIR", "wandb_cache"),
        ("WANDB_CONFIG_DIR", "wandb_config"),
        ("WANDB_DATA_DIR", "wandb_data"),
    ):
        monkeypatch.setenv(var, str(tmp_path / name))
    yield
    if wandb.run is not None:  # a failed assertion must not leak a run into the next test
        wandb.finish()


@pytest.fixture
def stage1_ckpt(tiny_data_root: Path, tmp_path: Path) -> Path:
    """A stage-1-shaped checkpoint for the tiny source A (random weights: MAR stage 2 needs the
    architecture and one agent per source identity), as tests/systems builds it."""
    num_ids = build_dataset(
        "synthetic", tiny_data_root / "synthetic" / "A", domain="A", preset="tiny"
    ).num_train_pids
    return save_stage1(tmp_path / "stage1.ckpt", seed=0, num_classes=num_ids)
