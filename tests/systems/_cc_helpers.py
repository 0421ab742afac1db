"""Shared pieces of the cluster-contrast tests: tiny overrides and a stage-1 checkpoint."""

from __future__ import annotations

from pathlib import Path

from src.data import build_dataset
from tests.conftest import tiny_overrides
from tests.systems._mar_helpers import save_stage1


def tiny_cc_overrides(data_root: Path, pretrained: Path | str) -> list[str]:
    """experiment=synthetic_cc on the tiny A -> B data (12 target ids of 4-6 images): P x K =
    4 x 4, 3 iterations per epoch, k1 = 6 / k2 = 2 for the 60-image target, and an eps that gives
    the random stage-1 features at least P clusters."""
    return [
        "experiment=synthetic_cc",
        *tiny_overrides(data_root),
        "+data.target.preset=tiny",
        "data.iters_per_epoch=3",
        f"system.pretrained_ckpt={pretrained}",
        "system.k1=6",
        "system.k2=2",
        "system.eps=0.6",
        "system.min_samples=2",
        "scheduler.milestones=[1]",
    ]


def tiny_stage1(data_root: Path, path: Path, seed: int = 0) -> Path:
    """A stage-1-shaped (MAR network) checkpoint with one agent per tiny source identity."""
    num_ids = build_dataset(
        "synthetic", data_root / "synthetic" / "A", domain="A", preset="tiny"
    ).num_train_pids
    return save_stage1(path, seed=seed, num_classes=num_ids)
