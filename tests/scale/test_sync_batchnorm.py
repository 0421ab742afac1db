"""`trainer.sync_batchnorm=true` on CPU processes: `DeviceSyncBatchNorm` gives the statistics,
outputs and gradients of one BatchNorm over the global batch (2 gloo processes), and both systems
train with it under trainer=ddp_cpu."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from src.systems.sync_batchnorm import DeviceSyncBatchNorm, SyncBatchNormPlugin
from tests.conftest import tiny_overrides
from tests.scale._helpers import DDP_DATA, mar_overrides, train_recorded

WORLD = 2


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(2 * WORLD, 3, 4, 5, generator=g, dtype=torch.float64) * 3 + 1


def _layer() -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(3, momentum=0.2).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
        layer.bias.copy_(torch.tensor([0.1, 0.0, -0.3]))
    return layer


def _run(layer: nn.Module, x: torch.Tensor, rows: slice = slice(None)) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    # a loss that weighs every element of the global batch differently, non-linearly
    weights = torch.arange(1, _batch().numel() + 1, dtype=y.dtype).reshape(_batch().shape)
    (y.pow(2) * weights[rows]).sum().backward()
    return {
        "y": y.detach(),
        "x_grad": x.grad,
        "w_grad": layer.weight.grad,
        "b_grad": layer.bias.grad,
        "running_mean": layer.running_mean,
        "running_var": layer.running_var,
    }


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        layer = SyncBatchNormPlugin().apply(nn.Sequential(_layer()))[0]
        layer.weight.grad = None
        assert type(layer) is DeviceSyncBatchNorm
        rows = slice(2 * rank, 2 * rank + 2)
        torch.save(_run(layer, _batch()[rows], rows), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_device_sync_batchnorm_equals_batchnorm_of_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    ref = _run(_layer(), _batch())  # one process, the whole batch
    for rank, got in enumerate(ranks):
        rows = slice(2 * rank, 2 * rank + 2)
        torch.testing.assert_close(got["y"], ref["y"][rows])
        # each rank's loss is its own rows' share; DDP sums/averages the parameter gradients
        torch.testing.assert_close(got["running_mean"], ref["running_mean"])
        torch.testing.assert_close(got["running_var"], ref["running_var"])
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), ref["x_grad"])
    torch.testing.assert_close(ranks[0]["w_grad"] + ranks[1]["w_grad"], ref["w_grad"])
    torch.testing.assert_close(ranks[0]["b_grad"] + ranks[1]["b_grad"], ref["b_grad"])


def test_plugin_follows_the_trainer_flag_and_reverts():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    reference = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    reference.load_state_dict(model.state_dict())
    assert type(SyncBatchNormPlugin(enabled=False).apply(model)[1]) is nn.BatchNorm2d
    converted = SyncBatchNormPlugin(enabled=True).apply(model)
    assert type(converted[1]) is DeviceSyncBatchNorm
    x = torch.randn(4, 3, 2, 2)  # single process: plain BatchNorm maths, running stats too
    torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted[1].running_var, reference[1].running_var)
    assert type(SyncBatchNormPlugin().revert(converted)[1]) is nn.BatchNorm2d


def _train_synced(cfg, out_dir: Path) -> dict:
    """Train with the recorder; every rank's BatchNorm layers were DeviceSyncBatchNorm."""
    metrics, _, ranks = train_recorded(cfg, out_dir, ranks=WORLD)
    for rank in ranks:
        assert rank["world_size"] == WORLD
        assert rank["batchnorm_types"] == ["DeviceSyncBatchNorm"], rank["batchnorm_types"]
    return metrics


@pytest.mark.slow
def test_supervised_ddp_cpu_with_sync_batchnorm(make_cfg, tiny_data_root, tmp_path):
    cfg = make_cfg(
        [
            *tiny_overrides(tiny_data_root),
            *DDP_DATA,
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "trainer.sync_batchnorm=true",
            "trainer.max_epochs=1",
            "trainer.check_val_every_n_epoch=1",
            "trainer.limit_train_batches=2",
            "scheduler.warmup_epochs=0",
            "test=false",
        ]
    )
    metrics = _train_synced(cfg, tmp_path / "ranks")
    assert torch.isfinite(torch.tensor(metrics["train/loss_epoch"]))
    assert 0.0 <= metrics["val/mAP"] <= 1.0


@pytest.mark.slow
def test_mar_ddp_cpu_with_sync_batchnorm(make_cfg, tiny_data_root, stage1_ckpt, tmp_path):
    cfg = make_cfg(
        [
            *mar_overrides(tiny_data_root, stage1_ckpt),
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "trainer.sync_batchnorm=true",
            "data.batch_size=8",
            "data.target_batch_size=8",
            "trainer.limit_train_batches=2",
            "test=false",
        ]
    )
    metrics = _train_synced(cfg, tmp_path / "ranks")
    for key in ("train/loss_epoch", "train/loss_mdl_epoch"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
