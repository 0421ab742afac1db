"""MAR stage 2 (experiment=synthetic_mar) on 2 CPU processes (trainer=ddp_cpu) and in bf16
autocast, through `train(cfg)` on the tiny synthetic domains: the MAR buffers end identical on both
ranks, the test metrics equal a single-process evaluation of the saved checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.scale._helpers import mar_overrides, single_process_eval, train_recorded

BUFFERS = ("memory", "memory_visited", "threshold", "center_mean", "center_std")


def test_mar_ddp_spawn_two_cpu_processes(make_cfg, tiny_data_root, stage1_ckpt, tmp_path):
    """One epoch on 2 ranks (8 + 8 images per rank and step): after every step, each rank's
    own memory, T and centres (DDP does not broadcast them) equal the other rank's bitwise; the
    CML momentum is the global batch's; test metrics == single-process evaluation of
    last.ckpt."""
    cfg = make_cfg(
        [
            *mar_overrides(tiny_data_root, stage1_ckpt),
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "data.batch_size=8",
            "data.target_batch_size=8",
        ]
    )
    metrics, _, ranks = train_recorded(cfg, tmp_path / "ranks", ranks=2)
    steps = len(ranks[0]["pids"])
    assert steps == len(ranks[1]["pids"]) >= 2
    for rank in ranks:
        assert rank["world_size"] == 2
        assert len(rank["states"]) == steps
        # every step writes the 16 distinct target images of the global batch (no warm-up)
        assert rank["visited_rows"] >= 16
        # CML momentum from the global batch: (8 source + 8 target) x 2 ranks
        assert rank["cml_moment"] == pytest.approx(32 / 10000)
    for step in range(steps):
        for name in BUFFERS:
            ours, theirs = ranks[0]["states"][step][name], ranks[1]["states"][step][name]
            assert torch.equal(ours, theirs), (step, name)
    # the state really moved during the epoch (the comparison is not of untouched buffers)
    assert not torch.equal(ranks[0]["states"][0]["memory"], ranks[0]["states"][-1]["memory"])
    for key in ("train/loss_epoch", "train/loss_mdl_epoch", "train/loss_cml_epoch"):
        assert torch.isfinite(torch.tensor(metrics[key])), key

    ckpt = Path(cfg.paths.output_dir, "checkpoints", "last.ckpt")
    reference = single_process_eval(make_cfg, tiny_data_root, ckpt, mar=True)
    for key in ("rank1", "rank5", "mAP", "mINP"):
        assert metrics[f"test/{key}"] == pytest.approx(reference[key], abs=1e-6), key


def test_mar_bf16_mixed_cpu(make_cfg, tiny_data_root, stage1_ckpt, tmp_path):
    """trainer.precision=bf16-mixed: the backbone runs in bf16, every MAR loss term and
    diagnostic is finite, the buffers stay fp32, and the test metrics are the checkpoint's."""
    cfg = make_cfg(
        [
            *mar_overrides(tiny_data_root, stage1_ckpt),
            "trainer.precision=bf16-mixed",
            "trainer.limit_train_batches=2",
        ]
    )
    metrics, objects, (record,) = train_recorded(cfg, tmp_path / "ranks")
    assert record["precision"] == "bf16-mixed"
    assert record["feature_dtypes"] == ["torch.bfloat16"]
    for key in ("loss", "loss_al", "loss_rj", "loss_cml", "loss_mdl"):
        value = metrics[f"train/{key}_epoch"]
        assert torch.isfinite(torch.tensor(value)), key
    assert metrics["train/loss_mdl_epoch"] > 0
    system = objects["system"]
    assert system.memory.dtype == torch.float32 and int(system.memory_visited.sum()) == 32
    assert bool(torch.isfinite(system.memory).all())
    assert 0.0 <= metrics["test/mAP"] <= 1.0
