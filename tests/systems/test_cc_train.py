"""Cluster contrast end to end through `src.train.train` on the tiny synthetic domains:
fast_dev_run, per-epoch clustering handed to the DataModule's P x K sampler, diagnostics, and a
mid-epoch resume that restores the memory and the pseudo-labels instead of re-clustering."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from omegaconf import open_dict

from src.models import ReIDNet
from src.systems import ClusterContrastModule
from src.train import train
from tests.systems._cc_helpers import tiny_cc_overrides, tiny_stage1


@pytest.fixture
def make_cfg(make_cfg):
    """The shared fixture minus the `hydra` node (as tests/systems/test_mar_train.py)."""

    def _make(*args, **kwargs):
        cfg = make_cfg(*args, **kwargs)
        with open_dict(cfg):
            cfg.pop("hydra", None)
        return cfg

    return _make


@pytest.fixture
def stage1_ckpt(tiny_data_root: Path, tmp_path: Path) -> Path:
    return tiny_stage1(tiny_data_root, tmp_path / "stage1.ckpt")


class Recorder(Callback):
    """Pseudo-labels of every training batch and the module state at each epoch's first batch."""

    def __init__(self) -> None:
        self.batch_labels: list[torch.Tensor] = []
        self.first: list[dict[str, torch.Tensor]] = []
        self.reclusters = 0

    def setup(self, trainer, pl_module, stage):
        original = pl_module.recluster

        def counted(datamodule):
            self.reclusters += 1
            return original(datamodule)

        pl_module.recluster = counted

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        labels = pl_module.pseudo_labels[batch["index"]].clone()
        self.batch_labels.append(labels)
        if batch_idx == 0 or not self.first or self.first[-1]["epoch"] != trainer.current_epoch:
            self.first.append(
                {
                    "epoch": trainer.current_epoch,
                    "memory": pl_module.memory.clone(),
                    "labels": pl_module.pseudo_labels.clone(),
                }
            )


def test_cc_fast_dev_run(tiny_data_root, stage1_ckpt, make_cfg):
    # loader workers: the training iterator draws indices before the first epoch starts, so
    # the first clustering must happen before it (on_fit_start)
    overrides = ["trainer.fast_dev_run=true", "data.num_workers=2"]
    cfg = make_cfg([*tiny_cc_overrides(tiny_data_root, stage1_ckpt), *overrides])
    with open_dict(cfg):
        cfg.callbacks.recorder = {"_target_": "tests.systems.test_cc_train.Recorder"}
    metrics, objects = train(cfg)
    system = objects["system"]
    assert isinstance(system, ClusterContrastModule)
    labels = system.pseudo_labels
    num = int(labels.max()) + 1
    assert system.memory.shape == (num, system.net.feat_dim)
    assert torch.allclose(system.memory.norm(dim=1), torch.ones(num), atol=1e-5)
    assert bool(system.weights_loaded) and int(system.clustered_epoch) == 0
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert metrics["cluster/num_clusters"] == num
    assert 0.0 <= metrics["cluster/purity"] <= 1.0 and 0.0 <= metrics["cluster/nmi"] <= 1.0
    # the sampler drew P x K batches of pseudo-identities, never an outlier
    recorder = next(c for c in objects["trainer"].callbacks if isinstance(c, Recorder))
    (batch,) = recorder.batch_labels
    assert (batch >= 0).all()
    p, k = 4, 4
    assert torch.equal(torch.bincount(batch)[torch.unique(batch)], torch.full((p,), k))


def test_cc_resume_mid_epoch_restores_memory_and_labels(
    tiny_data_root, stage1_ckpt, make_cfg, tmp_path
):
    """A checkpoint after step 1 of epoch 0, resumed: no re-clustering, the saved memory (already
    moved by a step) and pseudo-labels; the next epoch re-clusters."""
    overrides = [*tiny_cc_overrides(tiny_data_root, stage1_ckpt), "trainer.max_epochs=1",
                 "test=false", "trainer.limit_train_batches=2",
                 "+callbacks.steps._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                 "+callbacks.steps.dirpath=${paths.output_dir}/checkpoints",
                 "+callbacks.steps.save_top_k=-1", "+callbacks.steps.every_n_train_steps=1",
                 "+callbacks.steps.auto_insert_metric_name=false",
                 "+callbacks.steps.filename='step{step}'"]  # fmt: skip
    cfg = make_cfg(overrides)
    _, objects = train(cfg)
    ckpt = Path(cfg.paths.output_dir, "checkpoints", "step1.ckpt")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    # a fresh module restores the checkpointed memory shape (the epoch's cluster count)
    fresh = ClusterContrastModule(
        net=partial(ReIDNet, backbone="resnet18", last_stride=2, last_relu=False),
        optimizer=torch.optim.Adam,
        num_target_train=len(saved["pseudo_labels"]),
    )
    assert fresh.memory.shape[0] == 0 < saved["memory"].shape[0]
    fresh.load_state_dict(saved, strict=True)
    assert torch.equal(fresh.memory, saved["memory"])
    assert torch.equal(fresh.pseudo_labels, saved["pseudo_labels"])

    cfg2 = make_cfg([*overrides[:-5], "trainer.max_epochs=2", f"ckpt_path={ckpt}"])
    with open_dict(cfg2):
        cfg2.callbacks.recorder = {"_target_": "tests.systems.test_cc_train.Recorder"}
    _, objects2 = train(cfg2)
    recorder = next(c for c in objects2["trainer"].callbacks if isinstance(c, Recorder))
    resumed, next_epoch = recorder.first
    assert resumed["epoch"] == 0 and next_epoch["epoch"] == 1
    assert torch.equal(resumed["memory"], saved["memory"])
    assert torch.equal(resumed["labels"], saved["pseudo_labels"])
    assert recorder.reclusters == 1  # epoch 1 only
