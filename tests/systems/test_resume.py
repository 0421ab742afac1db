"""Exact resume: a run interrupted after a checkpoint and resumed from its `last.ckpt` (in a new
output folder) ends bit-identical to the uninterrupted run of the same seed, with augmentation on
(flip, pad-crop, random erasing), for the supervised system and MAR, with 0 and 2 loader workers,
from epoch-end and mid-epoch checkpoints. `last.ckpt` always holds the newest state.

Guards docs/guarantees.md "exact resume" and "last.ckpt".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from src.data import build_dataset
from src.train import train
from tests.conftest import tiny_mar_overrides, tiny_overrides
from tests.systems._interrupt import SimulatedCrashError
from tests.systems._mar_helpers import save_stage1

REPO = Path(__file__).resolve().parents[2]
CRASH = "tests.systems._interrupt.CrashAtStep"
RNG_USER = "+callbacks.rng_user._target_=tests.systems._interrupt.GlobalRngUser"
KILL = "tests.systems._interrupt.KillAtStep"
MAR_STATE = ("memory", "memory_visited", "mar_initialised", "discriminative_loss.threshold")


def supervised(data_root: Path, workers: int = 0) -> list[str]:
    """3 tiny epochs, validation every epoch, augmentation at its defaults (all on)."""
    return [
        *tiny_overrides(data_root),
        "trainer.max_epochs=3",
        "scheduler.warmup_epochs=1",
        "scheduler.milestones=[2]",
        "trainer.check_val_every_n_epoch=1",
        f"data.num_workers={workers}",
        "data.val_ids=0",  # all 12 tiny identities: 3 batches per epoch
    ]


def mar(data_root: Path, stage1: Path, workers: int = 0) -> list[str]:
    return [
        *tiny_mar_overrides(data_root, stage1),
        "trainer.max_epochs=2",
        "system.warmup_epochs=1",
        f"data.num_workers={workers}",
    ]


def run_in(make_cfg, overrides: list[str], out: Path):
    """`train` with its own output folder (runs sharing a folder prove nothing)."""
    cfg = make_cfg(overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
        cfg.pop("hydra", None)
    return train(cfg)


def assert_same_final_state(a: Path, b: Path) -> None:
    """The last.ckpt of two runs: weights, buffers (MAR memory), optimizer and scheduler states,
    loop counters and the test metrics are identical, bit for bit."""
    ca = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)
    cb = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)
    assert ca["global_step"] == cb["global_step"] and ca["epoch"] == cb["epoch"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key, value in ca["state_dict"].items():
        assert torch.equal(value, cb["state_dict"][key]), key
    for sa, sb in zip(ca["optimizer_states"], cb["optimizer_states"]):
        for pid, state in sa["state"].items():
            for name, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb["state"][pid][name]))
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    ma = json.loads((a / "metrics.json").read_text())
    mb = json.loads((b / "metrics.json").read_text())
    tests = {k: v for k, v in ma.items() if k.startswith("test/")}
    assert tests and tests == {k: v for k, v in mb.items() if k.startswith("test/")}


@pytest.fixture
def stage1(tiny_data_root: Path, tmp_path: Path) -> Path:
    num_ids = build_dataset(
        "synthetic", tiny_data_root / "synthetic" / "A", domain="A", preset="tiny"
    ).num_train_pids
    return save_stage1(tmp_path / "stage1.ckpt", seed=0, num_classes=num_ids)


@pytest.mark.parametrize(
    "every_n_steps, workers",
    [(None, 0), (2, 0), (None, 2)],
    ids=["epoch-end-ckpt", "mid-epoch-ckpt", "epoch-end-ckpt-2-workers"],
)
def test_supervised_resume_is_bit_identical(
    every_n_steps, workers, make_cfg, tiny_data_root, tmp_path
):
    """With 2 workers the resumed loader builds its iterator (and draws its first indices)
    before Lightning sets the epoch: the checkpointed resume point must already name it."""
    common = supervised(tiny_data_root, workers=workers) + [RNG_USER]
    if every_n_steps:
        common.append(f"callbacks.model_checkpoint.every_n_train_steps={every_n_steps}")
    _, full = run_in(make_cfg, common, tmp_path / "full")
    per_epoch = full["trainer"].num_training_batches
    assert per_epoch >= 3  # the crash below falls inside epoch 2, after a checkpoint
    crash_at = per_epoch + (2 if every_n_steps else 1)
    crash = [f"+callbacks.crash._target_={CRASH}", f"+callbacks.crash.step={crash_at}"]
    with pytest.raises(SimulatedCrashError):
        run_in(make_cfg, common + crash, tmp_path / "crashed")
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    saved_step = torch.load(last, weights_only=True)["global_step"]
    if every_n_steps:  # the newest save is a step-triggered one inside epoch 2
        assert saved_step == crash_at // every_n_steps * every_n_steps > per_epoch
        assert saved_step % per_epoch != 0
    else:
        assert saved_step == per_epoch
    torch.manual_seed(12345)  # the resumed process's generators start elsewhere: restored
    run_in(make_cfg, common + [f"ckpt_path={last}"], tmp_path / "resumed")
    assert_same_final_state(tmp_path / "full", tmp_path / "resumed")


def test_mar_resume_is_bit_identical(make_cfg, tiny_data_root, stage1, tmp_path):
    common = mar(tiny_data_root, stage1) + [
        "callbacks.model_checkpoint.every_n_train_steps=1",
        RNG_USER,
    ]
    _, full = run_in(make_cfg, common, tmp_path / "full")
    per_epoch = full["trainer"].num_training_batches
    crash = [f"+callbacks.crash._target_={CRASH}", f"+callbacks.crash.step={per_epoch + 1}"]
    with pytest.raises(SimulatedCrashError):
        run_in(make_cfg, common + crash, tmp_path / "crashed")
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == per_epoch + 1
    torch.manual_seed(999)
    _, resumed = run_in(make_cfg, common + [f"ckpt_path={last}"], tmp_path / "resumed")
    assert_same_final_state(tmp_path / "full", tmp_path / "resumed")
    memory = resumed["system"].memory
    assert torch.equal(memory, full["system"].memory) and memory.abs().sum() > 0


def _cli(overrides: list[str], out: Path, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "src.train",
        *overrides,
        f"paths.output_dir={out}",
        f"hydra.run.dir={out}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def _kill_and_resume(overrides: list[str], kill_at: int, tmp_path: Path) -> None:
    _cli(overrides, tmp_path / "full")
    killed = _cli(
        overrides + [f"+callbacks.kill._target_={KILL}", f"+callbacks.kill.step={kill_at}"],
        tmp_path / "killed",
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    _cli(overrides + [f"ckpt_path={last}"], tmp_path / "resumed")
    assert_same_final_state(tmp_path / "full", tmp_path / "resumed")


@pytest.mark.slow
def test_supervised_kill9_resume_with_two_workers(tiny_data_root, tmp_path):
    """A real `kill -9` of the CLI run, 2 loader workers (each process seeds its own workers)."""
    overrides = [
        *supervised(tiny_data_root, workers=2),
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]
    _kill_and_resume(overrides, kill_at=5, tmp_path=tmp_path)


@pytest.mark.slow
def test_mar_kill9_resume_with_two_workers(tiny_data_root, stage1, tmp_path):
    overrides = mar(tiny_data_root, stage1, workers=2)
    overrides += ["callbacks.model_checkpoint.every_n_train_steps=1"]
    _kill_and_resume(overrides, kill_at=2, tmp_path=tmp_path)


def test_last_ckpt_holds_the_final_step_not_the_best(make_cfg, tiny_data_root, tmp_path):
    """Validation every 2nd epoch of 3 and a held-out validation split: last.ckpt is the state
    after epoch 3, the best checkpoint is weights only, and the test reports last.ckpt."""
    overrides = supervised(tiny_data_root) + [
        "trainer.check_val_every_n_epoch=2",
        "data.val_ids=3",
    ]
    metrics, objects = run_in(make_cfg, overrides, tmp_path / "run")
    trainer = objects["trainer"]
    ckpts = tmp_path / "run" / "checkpoints"
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["global_step"] == trainer.global_step == 3 * trainer.num_training_batches
    assert last["epoch"] == 2 and "optimizer_states" in last
    (best,) = ckpts.glob("best_epoch_*.ckpt")
    assert best.name == "best_epoch_001.ckpt"  # the one validated epoch
    assert "optimizer_states" not in torch.load(best, weights_only=True)
    assert "val/mAP" in metrics and "test/mAP" in metrics
