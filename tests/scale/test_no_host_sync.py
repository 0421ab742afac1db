"""No host sync in either training step: `training_step` and `backward` of both systems run
under a guard that fails on `.item()`, `bool()`, `nonzero`, `.cpu()`, boolean-mask indexing, ...
of a device tensor (tests/scale/_sync.py; on CUDA also `set_sync_debug_mode("error")`, in
tests/scale/test_gpu.py)."""

from __future__ import annotations

import pytest
import torch
from omegaconf import open_dict

from src.losses.mar import JointLoss
from src.train import train
from tests.conftest import tiny_overrides
from tests.scale._helpers import mar_overrides
from tests.scale._sync import HostSyncError, NoHostSyncInStep, forbid_host_sync


@pytest.mark.parametrize(
    "read",
    [
        lambda t: t.sum().item(),
        lambda t: bool(t.sum() > 0),
        lambda t: t.nonzero(),
        lambda t: torch.nonzero(t),
        lambda t: t.cpu(),
        lambda t: t.tolist(),
        lambda t: float(t.sum()),
        lambda t: t[t > 0],
        lambda t: torch.unique(t),
    ],
)
def test_guard_catches_every_host_read(read):
    t = torch.randn(5)
    with forbid_host_sync("cpu"), pytest.raises(HostSyncError):
        read(t)
    read(t)  # restored afterwards
    log: list[str] = []
    with forbid_host_sync("cpu", log=log):
        read(t)
    assert len(log) >= 1
    with forbid_host_sync("cuda"):  # CPU tensors do not count on a CUDA run
        read(t)


def test_guard_lets_device_side_work_through():
    x = torch.randn(6, 4, requires_grad=True)
    with forbid_host_sync("cpu"):
        y = torch.where(x > 0, x, 0).sum(1)
        index = torch.tensor([0, 2])
        z = x.index_select(0, index).mean() + y.max()
        z.backward()
    assert x.grad is not None


def _guarded_train(make_cfg, overrides):
    cfg = make_cfg(overrides)
    with open_dict(cfg):
        cfg.callbacks.no_host_sync = {"_target_": "tests.scale._sync.NoHostSyncInStep"}
    _, objects = train(cfg)
    trainer = objects["trainer"]
    (guard,) = [c for c in trainer.callbacks if isinstance(c, NoHostSyncInStep)]
    # the progress bar reads its metrics on the host every batch: no per-step metric on it
    assert not [k for k in trainer.progress_bar_metrics if k.startswith("train/")]
    return guard


def test_supervised_training_step_has_no_host_sync(make_cfg, tiny_data_root):
    guard = _guarded_train(
        make_cfg,
        [
            *tiny_overrides(tiny_data_root),
            "trainer.limit_train_batches=2",
            "trainer.max_epochs=1",
            "trainer.limit_val_batches=0",
            "test=false",
        ],
    )
    assert guard.steps == 2


def test_mar_training_step_has_no_host_sync(make_cfg, tiny_data_root, stage1_ckpt, monkeypatch):
    """Warm-up epoch (no MDL, no memory write) then an MDL epoch, both guarded. RJ's sparse CPU
    path (`JointLoss.sparse_on_cpu`: gathers the hard pairs, only taken on the CPU, where there
    is no device to wait for) is switched off: the dense path is the one accelerators run."""
    monkeypatch.setattr(JointLoss, "sparse_on_cpu", False)
    guard = _guarded_train(
        make_cfg,
        [
            *mar_overrides(tiny_data_root, stage1_ckpt),
            "system.warmup_epochs=1",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=0",
            "system.init_cache_dir=null",
            "test=false",
        ],
    )
    assert guard.steps == 2
