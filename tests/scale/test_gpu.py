"""GPU-only checks (marked `gpu`, deselected by default, skipped without CUDA): fp16 AMP on CUDA for
both modes, and real CUDA DDP (NCCL) on 2 GPUs. Run with `pytest -m gpu tests/scale`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.scale._helpers import DDP_DATA, mar_overrides, single_process_eval, train_recorded

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

GPU = ["trainer.accelerator=gpu", "trainer.devices=1"]
ONE_EPOCH = ["trainer.max_epochs=1", "trainer.check_val_every_n_epoch=1"]


def test_supervised_fp16_amp_on_cuda(make_cfg, tiny_data_root, tmp_path):
    cfg = make_cfg(
        [
            *tiny_overrides(tiny_data_root),
            *GPU,
            *ONE_EPOCH,
            "trainer.precision=16-mixed",
            "scheduler.warmup_epochs=0",
        ]
    )
    metrics, objects, (record,) = train_recorded(cfg, tmp_path / "ranks")
    assert record["precision"] == "16-mixed" and record["feature_dtypes"] == ["torch.float16"]
    assert objects["trainer"].precision_plugin.scaler is not None  # dynamic loss scaling
    for key in ("train/loss_epoch", "train/loss_tri_epoch", "train/loss_ce_epoch"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    # fp16 features rank (almost) as the fp32 evaluation of the same checkpoint
    ckpt = Path(cfg.paths.output_dir, "checkpoints", "last.ckpt")
    reference = single_process_eval(make_cfg, tiny_data_root, ckpt)
    assert metrics["val/mAP"] == pytest.approx(reference["mAP"], abs=0.02)


def test_mar_fp16_amp_on_cuda(make_cfg, tiny_data_root, stage1_ckpt, tmp_path):
    cfg = make_cfg(
        [
            *mar_overrides(tiny_data_root, stage1_ckpt),
            *GPU,
            "trainer.precision=16-mixed",
            "trainer.limit_train_batches=2",
        ]
    )
    metrics, objects, (record,) = train_recorded(cfg, tmp_path / "ranks")
    assert record["feature_dtypes"] == ["torch.float16"]
    for key in ("loss", "loss_al", "loss_rj", "loss_cml", "loss_mdl"):
        assert torch.isfinite(torch.tensor(metrics[f"train/{key}_epoch"])), key
    system = objects["system"]
    assert system.memory.dtype == torch.float32 and bool(torch.isfinite(system.memory).all())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_supervised_cuda_ddp_two_gpus(make_cfg, tiny_data_root, tmp_path):
    """trainer=ddp on 2 GPUs (NCCL; ddp_spawn because plain ddp would relaunch pytest)."""
    cfg = make_cfg(
        [
            *tiny_overrides(tiny_data_root),
            *DDP_DATA,
            *ONE_EPOCH,
            "trainer=ddp",
            "trainer.devices=2",
            "trainer.strategy=ddp_spawn",
            "scheduler.warmup_epochs=0",
        ]
    )
    metrics, _, ranks = train_recorded(cfg, tmp_path / "ranks", ranks=2)
    for step in range(len(ranks[0]["pids"])):
        pids = [set(r["pids"][step].tolist()) for r in ranks]
        assert not pids[0] & pids[1], step
    ckpt = Path(cfg.paths.output_dir, "checkpoints", "last.ckpt")
    reference = single_process_eval(make_cfg, tiny_data_root, ckpt)
    for key in ("rank1", "mAP"):
        assert metrics[f"test/{key}"] == pytest.approx(reference[key], abs=1e-3), key


def test_training_steps_have_no_host_sync_on_cuda(make_cfg, tiny_data_root, stage1_ckpt):
    """Both systems' training_step + backward under set_sync_debug_mode("error") and the
    Python-level guard (tests/scale/_sync.py), on the GPU's code paths (dense RJ, no CPU checks)."""
    from omegaconf import open_dict

    from src.train import train
    from tests.scale._sync import NoHostSyncInStep

    runs = {
        "supervised": [*tiny_overrides(tiny_data_root), "scheduler.warmup_epochs=0", "test=false"],
        "mar": [
            *mar_overrides(tiny_data_root, stage1_ckpt),
            "system.init_cache_dir=null",
            "test=false",
        ],
    }
    for name, overrides in runs.items():
        cfg = make_cfg([*overrides, *GPU, "trainer.max_epochs=1", "trainer.limit_train_batches=2"])
        with open_dict(cfg):
            cfg.callbacks.no_host_sync = {"_target_": "tests.scale._sync.NoHostSyncInStep"}
        _, objects = train(cfg)
        (guard,) = [c for c in objects["trainer"].callbacks if isinstance(c, NoHostSyncInStep)]
        assert guard.steps == 2, name
