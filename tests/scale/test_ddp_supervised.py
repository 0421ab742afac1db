"""The supervised mode on 2 CPU processes (trainer=ddp_cpu: ddp_spawn + gloo) through `train(cfg)`
and in bf16 autocast: P x K batches with disjoint identities per rank, and validation/test
metrics equal to a single-process evaluation of the saved checkpoint."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from src.train import train
from tests.conftest import tiny_overrides
from tests.scale._helpers import (
    DDP_DATA,
    attach_recorder,
    offline_runs,
    reference_features,
    single_process_eval,
    train_recorded,
)


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


def _check_disjoint_pk_batches(out_dir: Path) -> None:
    """Every step: each rank's batch is P = 4 identities x K = 2 images, the ranks' identities
    are disjoint."""
    ranks = [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    steps = len(ranks[0]["pids"])
    assert steps == len(ranks[1]["pids"]) >= 2
    for step in range(steps):
        pids = [r["pids"][step] for r in ranks]
        for p in pids:
            counts = torch.unique(p, return_counts=True)[1]
            assert len(counts) == 4 and bool((counts == 2).all()), p
        assert not set(pids[0].tolist()) & set(pids[1].tolist()), (step, pids)


def test_supervised_ddp_fit_two_cpu_processes(make_cfg, tiny_data_root, tmp_path):
    """The quick DDP check (fit only): disjoint identities per rank in every step, and the
    validation metrics of the 2-process run equal a single-process evaluation of its checkpoint."""
    cfg = make_cfg(
        [
            *tiny_overrides(tiny_data_root),
            *DDP_DATA,
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "trainer.max_epochs=1",
            "trainer.check_val_every_n_epoch=1",
            "scheduler.warmup_epochs=0",
            "test=false",
        ]
    )
    attach_recorder(cfg, tmp_path / "ranks")
    metrics, _ = train(cfg)
    _check_disjoint_pk_batches(tmp_path / "ranks")
    ckpt = Path(cfg.paths.output_dir, "checkpoints", "last.ckpt")
    reference = single_process_eval(make_cfg, tiny_data_root, ckpt)
    for key in ("rank1", "rank5", "mAP", "mINP"):
        assert metrics[f"val/{key}"] == pytest.approx(reference[key], abs=1e-6), key


@pytest.mark.slow
def test_supervised_ddp_spawn_two_cpu_processes(make_cfg, tiny_data_root, tmp_path, wandb_offline):
    """The full run on 2 ranks (fit, then test in new worker processes): disjoint identities
    per rank in every step; the logged val/test metrics, and the features gathered for the
    pictures (de-duplicated over the padded shards), are those of a single-process evaluation of
    the saved checkpoint; the fit's and the test's workers log into one CSV file and one W&B
    run."""
    cfg = make_cfg(
        [
            *tiny_overrides(tiny_data_root),
            "logger=[csv,wandb]",
            *DDP_DATA,
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "trainer.max_epochs=1",
            "trainer.check_val_every_n_epoch=1",
            "scheduler.warmup_epochs=0",
            "callbacks.ranklist.enabled=true",
            "callbacks.embedding_projection.enabled=true",
        ]
    )
    attach_recorder(cfg, tmp_path / "ranks")
    start = time.perf_counter()
    metrics, objects = train(cfg)
    print(f"ddp run: {time.perf_counter() - start:.1f}s")

    _check_disjoint_pk_batches(tmp_path / "ranks")

    out = Path(cfg.paths.output_dir)
    ckpt = out / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    reference = single_process_eval(make_cfg, tiny_data_root, ckpt)
    for key in ("rank1", "rank5", "mAP", "mINP"):
        assert metrics[f"val/{key}"] == pytest.approx(reference[key], abs=1e-6), key
        assert metrics[f"test/{key}"] == pytest.approx(reference[key], abs=1e-6), key

    # the evaluation outputs gathered on both ranks: every query/gallery image exactly once,
    # with the features a single process extracts from the checkpoint
    data, _ = reference_features(make_cfg, tiny_data_root, ckpt)
    gathered = [
        torch.load(tmp_path / "ranks" / f"rank{r}_test.pt", weights_only=True) for r in (0, 1)
    ]
    for rank in gathered:
        assert torch.equal(rank["index"], data["index"])  # de-duplicated, in index order
        assert torch.equal(rank["is_query"], data["is_query"])
        torch.testing.assert_close(rank["features"], data["feat"], rtol=1e-5, atol=1e-6)
    assert torch.equal(gathered[0]["gallery_index"], gathered[1]["gallery_index"])
    for png in ("ranklists/val_epoch000.png", "ranklists/test.png", "embedding_test.png"):
        assert (out / png).is_file(), png
    # fit and test ran in different worker processes, both logged into one CSV file
    header = (out / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/mAP", "test/mAP", "train/loss_epoch"} <= set(header)
    (run,) = offline_runs(out)
    assert run.exit_code == 0
    assert {"val/mAP", "test/mAP", "train/loss_epoch", "test/embedding_pca/filenames"} <= (
        run.history_keys
    )
    assert run.summary["test/mAP"] == pytest.approx(metrics["test/mAP"])


def test_supervised_bf16_mixed_cpu(make_cfg, tiny_data_root, tmp_path):
    """trainer.precision=bf16-mixed: the backbone runs in bf16 under autocast, the losses stay
    finite fp32, and the metrics are those of the saved (fp32) checkpoint evaluated in bf16."""
    cfg = make_cfg(
        [
            *tiny_overrides(tiny_data_root),
            "trainer.precision=bf16-mixed",
            "trainer.max_epochs=1",
            "trainer.check_val_every_n_epoch=1",
            "scheduler.warmup_epochs=0",
            "test=false",
        ]
    )
    metrics, objects, (record,) = train_recorded(cfg, tmp_path / "ranks")
    assert record["precision"] == "bf16-mixed"
    assert record["feature_dtypes"] == ["torch.bfloat16"]
    for key in ("train/loss_epoch", "train/loss_tri_epoch", "train/loss_ce_epoch"):
        assert torch.isfinite(torch.tensor(metrics[key])) and metrics[key] > 0, key
    assert 0.0 < metrics["val/mAP"] <= 1.0
    # the weights stay fp32: the checkpoint is an ordinary fp32 one
    state = objects["system"].state_dict()
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
