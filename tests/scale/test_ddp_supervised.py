"""The supervised mode on 2 CPU processes (trainer=ddp_cpu: ddp_spawn + gloo) through `train(cfg)`
and in bf16 autocast: P x K batches with disjoint identities per rank, and validation/test
metrics equal to a single-process evaluation of the saved checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from src.eval import evaluate
from src.train import train
from tests.conftest import tiny_overrides

# P x K = 4 x 2 per rank: the 12 tiny identities (4-6 images each) give 3 global batches.
DDP_DATA = ["data.batch_size=8", "data.num_instances=2"]


def _recorder(cfg, out_dir: Path) -> None:
    with open_dict(cfg):
        cfg.callbacks.batch_recorder = {
            "_target_": "tests.scale._callbacks.BatchRecorder",
            "out_dir": str(out_dir),
        }


def _single_process_eval(make_cfg, data_root: Path, ckpt: Path, extra=()) -> dict[str, float]:
    cfg = make_cfg(
        [*tiny_overrides(data_root, train=False), *extra, f"ckpt_path={ckpt}"], config_name="eval"
    )
    return evaluate(cfg)["plain"]


def test_ddp_cpu_config_builds_a_two_process_spawn_trainer(make_cfg, tiny_data_root):
    """trainer=ddp_cpu gives 2 gloo CPU processes via ddp_spawn, and Lightning must not wrap
    our P x K sampler (quick: nothing is spawned)."""
    import hydra
    from lightning.pytorch.accelerators import CPUAccelerator
    from lightning.pytorch.strategies import DDPStrategy

    cfg = make_cfg([*tiny_overrides(tiny_data_root), "trainer=ddp_cpu", "trainer.devices=2"])
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    strategy = trainer.strategy
    assert isinstance(strategy, DDPStrategy) and strategy._start_method == "spawn"
    # on CPU, Lightning's DDP picks the gloo backend
    assert isinstance(trainer.accelerator, CPUAccelerator)
    assert trainer.num_devices == 2 and trainer.world_size == 2
    assert trainer._accelerator_connector.use_distributed_sampler is False


def test_supervised_ddp_spawn_two_cpu_processes(make_cfg, tiny_data_root, tmp_path):
    """One epoch on 2 ranks: disjoint identities per rank in every step, and the logged
    val/test metrics are those of a single-process evaluation of the saved checkpoint."""
    cfg = make_cfg(
        [
            *tiny_overrides(tiny_data_root),
            *DDP_DATA,
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "trainer.max_epochs=1",
            "scheduler.warmup_epochs=0",
        ]
    )
    _recorder(cfg, tmp_path / "ranks")
    start = time.perf_counter()
    metrics, objects = train(cfg)
    print(f"ddp run: {time.perf_counter() - start:.1f}s")

    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    steps = len(ranks[0]["pids"])
    assert steps == len(ranks[1]["pids"]) >= 2
    for step in range(steps):
        pids = [r["pids"][step] for r in ranks]
        for p in pids:  # P = 4 identities x K = 2 images each
            counts = torch.unique(p, return_counts=True)[1]
            assert len(counts) == 4 and bool((counts == 2).all()), p
        assert not set(pids[0].tolist()) & set(pids[1].tolist()), (step, pids)

    ckpt = Path(cfg.paths.output_dir, "checkpoints", "last.ckpt")
    assert ckpt.is_file()
    reference = _single_process_eval(make_cfg, tiny_data_root, ckpt)
    for key in ("rank1", "rank5", "mAP", "mINP"):
        assert metrics[f"val/{key}"] == pytest.approx(reference[key], abs=1e-6), key
        assert metrics[f"test/{key}"] == pytest.approx(reference[key], abs=1e-6), key


def test_supervised_bf16_mixed_cpu(make_cfg, tiny_data_root, tmp_path):
    """trainer.precision=bf16-mixed: the backbone runs in bf16 under autocast, the losses stay
    finite fp32, and the metrics are those of the saved (fp32) checkpoint evaluated in bf16."""
    cfg = make_cfg(
        [
            *tiny_overrides(tiny_data_root),
            "trainer.precision=bf16-mixed",
            "trainer.max_epochs=1",
            "scheduler.warmup_epochs=0",
            "test=false",
        ]
    )
    _recorder(cfg, tmp_path / "ranks")
    metrics, objects = train(cfg)
    record = torch.load(tmp_path / "ranks" / "rank0.pt", weights_only=True)
    assert record["precision"] == "bf16-mixed"
    assert record["feature_dtypes"] == ["torch.bfloat16"]
    for key in ("train/loss_epoch", "train/loss_tri_epoch", "train/loss_ce_epoch"):
        assert torch.isfinite(torch.tensor(metrics[key])) and metrics[key] > 0, key
    assert 0.0 < metrics["val/mAP"] <= 1.0
    # the weights stay fp32: the checkpoint is an ordinary fp32 one
    state = objects["system"].state_dict()
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
