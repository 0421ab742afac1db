"""Shared pieces of the cluster-contrast tests: tiny overrides and a stage-1 checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback

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


class StateRecorder(Callback):
    """Per rank, to ``out_dir/rank{r}.pt``: the pseudo-labels and memory at the first training
    batch (right after the epoch's clustering and broadcast) and the memory at the end of
    training (after the last step's gathered update: nothing broadcasts it)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.start: dict[str, torch.Tensor] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.start is None:
            self.start = {
                "labels": pl_module.pseudo_labels.cpu().clone(),
                "memory": pl_module.memory.cpu().clone(),
            }

    def on_train_end(self, trainer, pl_module):
        result = {
            "world_size": trainer.world_size,
            "start": self.start,
            "end_memory": pl_module.memory.cpu().clone(),
            "steps": trainer.global_step,
        }
        Path(self.out_dir).mkdir(parents=True, exist_ok=True)
        torch.save(result, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")
