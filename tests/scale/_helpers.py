"""Shared pieces of the scale-out tests: overrides, single-process references, W&B run files."""

from __future__ import annotations

import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, open_dict

from src.eval import evaluate, extract_split_features, load_system_from_checkpoint
from src.train import train
from tests.conftest import tiny_mar_overrides, tiny_overrides
from tests.scale._wandb_file import OfflineRun, read_offline_run

# P x K = 4 x 2 per rank: the 12 tiny identities (4-6 images each) give 3 global batches.
DDP_DATA = ["data.batch_size=8", "data.num_instances=2"]


def mar_overrides(data_root: Path, stage1: Path) -> list[str]:
    """MAR stage 2, one epoch without warm-up, on the tiny A -> B data from a stage-1 checkpoint."""
    return [
        *tiny_mar_overrides(data_root, stage1),
        "system.warmup_epochs=0",
        "trainer.max_epochs=1",
    ]


def attach_recorder(cfg: DictConfig, out_dir: Path) -> None:
    """Add tests.scale._callbacks.BatchRecorder (per-rank files in `out_dir`) to `cfg`."""
    with open_dict(cfg):
        cfg.callbacks.batch_recorder = {
            "_target_": "tests.scale._callbacks.BatchRecorder",
            "out_dir": str(out_dir),
        }


def train_recorded(cfg: DictConfig, out_dir: Path, ranks: int = 1) -> tuple[dict, dict, list]:
    """Train `cfg` with the BatchRecorder attached; returns (metrics, objects, the per-rank
    records `rank{r}.pt` of ranks 0..ranks-1)."""
    attach_recorder(cfg, out_dir)
    metrics, objects = train(cfg)
    records = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(ranks)]
    return metrics, objects, records


def single_process_eval(
    make_cfg, data_root: Path, ckpt: Path, mar: bool = False
) -> dict[str, float]:
    """`src.eval` of `ckpt` in this process (plain rows: rank1, rank5, rank10, mAP, mINP)."""
    overrides = [*tiny_overrides(data_root, train=False), f"ckpt_path={ckpt}"]
    if mar:
        overrides = ["experiment=synthetic_mar", *overrides, "+data.target.preset=tiny"]
        overrides.append("metric=cosine")
    return evaluate(make_cfg(overrides, config_name="eval"))["plain"]


def reference_features(make_cfg, data_root: Path, ckpt: Path) -> tuple[dict, object]:
    """Features of the supervised `ckpt` extracted in one process, in evaluation-index order
    (query then gallery), and the DataModule."""
    cfg = make_cfg(
        [*tiny_overrides(data_root, train=False), f"ckpt_path={ckpt}"], config_name="eval"
    )
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("test")
    system = load_system_from_checkpoint(cfg, datamodule)
    data = extract_split_features(system, datamodule.test_dataloader(), torch.device("cpu"), False)
    assert torch.equal(data["index"], torch.arange(len(data["index"])))  # query then gallery
    return data, datamodule


def offline_runs(run_dir: Path, timeout: float = 30.0) -> list[OfflineRun]:
    """The offline W&B runs under `run_dir`, once each has its exit record (wandb-core appends
    it shortly after `wandb.finish()` returns)."""
    deadline = time.monotonic() + timeout
    while True:
        files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        try:
            runs = [read_offline_run(f) for f in files]
            if all(run.exit_code is not None for run in runs):
                return runs
        except ValueError:  # still being written
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            return runs
        time.sleep(0.2)
