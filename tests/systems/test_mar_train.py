"""MAR end to end through `src.train.train` on the tiny synthetic domains: stage 1 and stage 2
fast_dev_run, a resumed stage 2 that neither reloads the pretrained weights nor recomputes the
initialisation, and `src.eval` on a stage-2 checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback
from omegaconf import open_dict

from src.data import build_dataset
from src.systems import MARModule, TripletReIDModule
from src.train import train
from tests.conftest import tiny_mar_overrides, tiny_overrides
from tests.systems._mar_helpers import save_stage1


@pytest.fixture
def make_cfg(make_cfg):
    """The shared fixture, minus the `hydra` node: `log_hyperparameters` resolves the whole config
    and `hydra.sweep.subdir` cannot be resolved outside a Hydra job."""

    def _make(*args, **kwargs):
        cfg = make_cfg(*args, **kwargs)
        with open_dict(cfg):
            cfg.pop("hydra", None)
        return cfg

    return _make


@pytest.fixture
def stage1_ckpt(tiny_data_root: Path, tmp_path: Path) -> Path:
    """A stage-1-shaped checkpoint for the tiny source A (random weights: stage 2 only needs the
    architecture and one agent per source identity)."""
    num_ids = build_dataset(
        "synthetic", tiny_data_root / "synthetic" / "A", domain="A", preset="tiny"
    ).num_train_pids
    return save_stage1(tmp_path / "stage1.ckpt", seed=0, num_classes=num_ids)


def test_stage1_source_pretrain_fast_dev_run(tiny_data_root, make_cfg, tmp_path):
    cfg = make_cfg(
        [
            "experiment=synthetic_source_pretrain",
            *tiny_overrides(tiny_data_root),
            "trainer.fast_dev_run=true",
        ]
    )
    metrics, objects = train(cfg)
    system = objects["system"]
    assert isinstance(system, TripletReIDModule)
    net = system.net
    # the MAR network: bias-free classifier over the source ids, no BNNeck, plain CE
    assert net.classifier.bias is None and net.neck is None
    assert net.classifier.weight.shape[0] == objects["datamodule"].num_classes
    assert system.ce_loss.epsilon == 0.0 and system.metric_loss is None
    assert "train/loss_ce_step" in metrics
    # its weights load into the stage-2 module
    path = tmp_path / "stage1_from_run.ckpt"
    torch.save({"state_dict": system.state_dict()}, path)
    stage2 = make_cfg(tiny_mar_overrides(tiny_data_root, path))
    assert stage2.system.pretrained_ckpt == str(path)


def test_stage2_fast_dev_run(tiny_data_root, make_cfg, stage1_ckpt):
    cfg = make_cfg(
        [
            *tiny_mar_overrides(tiny_data_root, stage1_ckpt),
            "trainer.fast_dev_run=true",
            "system.warmup_epochs=0",
        ]
    )
    metrics, objects = train(cfg)
    system = objects["system"]
    assert isinstance(system, MARModule) and system.initialised
    assert int(system.memory_visited.sum()) == 16  # one step of 16 distinct target images
    for key in (
        "train/loss_al",
        "train/loss_rj",
        "train/loss_cml",
        "train/loss_mdl",
        "train/loss",
        "mar/threshold",
        "mar/num_pos",
        "mar/num_neg",
        "mar/tp_rate",
        "mar/active_agents",
    ):
        assert f"{key}_step" in metrics, (key, sorted(metrics))
    assert metrics["mar/num_pos_step"] + metrics["mar/num_neg_step"] == 6
    assert len(list(Path(cfg.system.init_cache_dir).glob("mar_init_*.pt"))) == 1


def test_stage2_missing_pretrained_fails_before_training(tiny_data_root, make_cfg, tmp_path):
    missing = tmp_path / "no_stage1.ckpt"
    cfg = make_cfg([*tiny_mar_overrides(tiny_data_root, missing), "trainer.fast_dev_run=true"])
    with pytest.raises(FileNotFoundError, match=str(missing)):
        train(cfg)


def test_stage2_resume_restores_state(tiny_data_root, make_cfg, stage1_ckpt, tmp_path, monkeypatch):
    base = [
        *tiny_mar_overrides(tiny_data_root, stage1_ckpt),
        "trainer.limit_train_batches=1",
        "test=false",
        "system.warmup_epochs=0",
    ]
    _, first = train(make_cfg([*base, "trainer.max_epochs=1"]))
    last = Path(first["cfg"].paths.output_dir) / "checkpoints" / "last.ckpt"
    assert last.is_file()
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    for name in (
        "memory",
        "memory_visited",
        "mar_initialised",
        "discriminative_loss.threshold",
        "multilabel_loss.center_mean",
        "multilabel_loss.center_std",
    ):
        assert torch.equal(saved[name], first["system"].state_dict()[name]), name
    assert int(saved["memory_visited"].sum()) == 16

    def fail(*args, **kwargs):
        raise AssertionError("the initialisation ran again on resume")

    monkeypatch.setattr(MARModule, "compute_init_state", fail)
    # the pretrained checkpoint is not needed (nor read) when resuming
    cfg = make_cfg(
        [
            *base,
            "trainer.max_epochs=2",
            f"ckpt_path={last}",
            f"system.pretrained_ckpt={tmp_path / 'gone.ckpt'}",
        ]
    )
    _, resumed = train(cfg)
    system = resumed["system"]
    assert system.global_step == 2 and system.initialised
    # rows written in the first run stayed visited; the second epoch wrote more
    assert bool(system.memory_visited[saved["memory_visited"]].all())
    assert int(system.memory_visited.sum()) >= 16


def test_eval_on_a_stage2_checkpoint(tiny_data_root, make_cfg, stage1_ckpt):
    from src.eval import evaluate

    base = [
        *tiny_mar_overrides(tiny_data_root, stage1_ckpt),
        "trainer.limit_train_batches=1",
        "test=false",
        "trainer.max_epochs=1",
    ]
    _, objects = train(make_cfg(base))
    last = Path(objects["cfg"].paths.output_dir) / "checkpoints" / "last.ckpt"
    eval_overrides = [o for o in tiny_overrides(tiny_data_root) if not o.startswith("callbacks")]
    cfg = make_cfg(
        [
            "experiment=synthetic_mar",
            *eval_overrides,
            "+data.target.preset=tiny",
            f"ckpt_path={last}",
            "metric=cosine",
        ],
        config_name="eval",
    )
    rows = evaluate(cfg)
    assert set(rows["plain"]) >= {"rank1", "mAP"}
    assert all(v == v and v >= 0 for v in rows["plain"].values())  # finite, non-negative


class _CrossRankStateCheck(Callback):
    """At the end of training, every rank compares its MAR state with rank 0's and writes the
    comparison to a file (the parent process of ddp_spawn reads it)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        state = {
            "memory": pl_module.memory,
            "visited": pl_module.memory_visited.to(torch.uint8),
            "threshold": pl_module.discriminative_loss.threshold.reshape(1),
            "center_mean": pl_module.multilabel_loss.center_mean,
            "center_std": pl_module.multilabel_loss.center_std,
        }
        same = {}
        for name, value in state.items():
            reference = value.clone()
            torch.distributed.broadcast(reference, src=0)
            same[name] = bool(torch.equal(reference, value))
        same["visited_rows"] = int(pl_module.memory_visited.sum())
        same["initialised"] = pl_module.initialised
        torch.save(same, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_stage2_ddp_spawn_two_cpu_processes(tiny_data_root, make_cfg, stage1_ckpt, tmp_path):
    """Real Lightning DDP (ddp_spawn, gloo): the init gathers/broadcasts across ranks, and memory,
    T and centres end identical on both ranks after global-batch steps."""
    cfg = make_cfg(
        [
            *tiny_mar_overrides(tiny_data_root, stage1_ckpt),
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "trainer.fast_dev_run=true",
            "system.warmup_epochs=0",
            "data.batch_size=8",
            "data.target_batch_size=8",
            "test=false",
        ]
    )
    with open_dict(cfg):
        cfg.callbacks.cross_rank = {
            "_target_": f"{__name__}._CrossRankStateCheck",
            "out_dir": str(tmp_path),
        }
    train(cfg)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["initialised"]
        assert result["visited_rows"] == 16  # one global target batch of 2 x 8 images
        assert all(
            result[k] for k in ("memory", "visited", "threshold", "center_mean", "center_std")
        ), result
