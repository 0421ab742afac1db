"""The supervised system end to end through the Hydra entry points, on tiny synthetic data."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
import torch
from hydra.errors import ConfigCompositionException

from src.eval import evaluate
from src.train import train
from tests.conftest import CONF_DIR, tiny_overrides

# MAR stage 2 runs in test_mar_train.py, cluster contrast (*_cc) in test_cc_train.py; the MSMT17
# recipes set MSMT17-only source options.
SUPERVISED_EXPERIMENTS = sorted(
    p.stem
    for p in Path(CONF_DIR, "experiment").glob("*.yaml")
    if not p.stem.endswith(("_mar", "_cc")) and not p.stem.startswith("msmt17")
)
ALL_EXPERIMENTS = sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml"))
SCHEDULERS = sorted(p.stem for p in Path(CONF_DIR, "scheduler").glob("*.yaml"))


def test_default_run_end_to_end(make_cfg, tiny_data_root):
    """`python -m src.train` (experiment=synthetic_triplet) on tiny data: trains, validates,
    tests the best checkpoint and writes metrics.json, checkpoints and the CSV log."""
    cfg = make_cfg(
        tiny_overrides(tiny_data_root)
        + ["trainer.max_epochs=2", "scheduler.warmup_epochs=1", "scheduler.milestones=[1]"]
    )
    assert cfg.experiment_name == "synthetic_triplet"
    metrics, objects = train(cfg)
    out = Path(cfg.paths.output_dir)
    for key in ("val/mAP", "val/rank1", "val/mINP", "val/mAP_best", "test/mAP", "test/rank1"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    assert metrics["train/loss_tri_epoch"] > 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test/mAP"] == pytest.approx(metrics["test/mAP"])
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert list(out.glob("csv/version_*/metrics.csv"))
    # Checkpoints hold only primitives: torch's safe loading accepts them.
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["num_classes"] == objects["datamodule"].num_classes


@pytest.mark.parametrize("experiment", SUPERVISED_EXPERIMENTS)
def test_every_supervised_experiment_composes_and_runs_one_step(
    experiment, make_cfg, tiny_data_root
):
    cfg = make_cfg(
        [f"experiment={experiment}"]
        + tiny_overrides(tiny_data_root)
        + [
            # the real-dataset experiments run on the tiny synthetic data instead
            "data=synthetic_a",
            "model.backbone.pretrained=false",
            "debug=fdr",
            "test=false",
        ]
    )
    assert cfg.experiment_name == experiment
    metrics, _ = train(cfg)
    assert metrics["train/loss_step"] > 0


@pytest.mark.parametrize("experiment", ALL_EXPERIMENTS)
def test_every_experiment_composes_with_its_recipe(experiment, make_cfg):
    """Every experiment composes (the MAR ones run in tests/systems/test_mar_train.py and
    tests/scale/; the real-data ones need datasets, so their recipes are checked here)."""
    cfg = make_cfg([f"experiment={experiment}"])
    assert cfg.experiment_name == experiment
    assert cfg.data.batch_size % cfg.data.num_instances == 0
    recipes = {
        "market_bot": ("scheduler.milestones", [40, 70]),
        "msmt17_to_market_mar": ("data.target_batch_size", 184),
        "msmt17_to_duke_mar": ("data.height", 384),
        "synthetic_triplet": ("loss.margin", 0.3),
        # the recipes' schedules are scheduler options of their own (see the test below)
        "market_triplet": ("scheduler.decay_start", 15000),
        "market_aligned": ("scheduler.decay_start", 74),
        "msmt17_source_pretrain": ("scheduler.milestones", [30]),
        "synthetic_source_pretrain": ("scheduler.milestones", [8, 11]),
        "synthetic_mar": ("scheduler.milestones", [11, 16]),
        "synthetic_cc": ("scheduler.milestones", [8, 16]),
        "market_usl_cc": ("data.num_instances", 16),
        "msmt17_to_market_cc": ("scheduler.milestones", [20, 40]),
    }
    if experiment in recipes:
        key, value = recipes[experiment]
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == value, key


@pytest.mark.parametrize("experiment", ALL_EXPERIMENTS)
def test_every_scheduler_option_composes_on_top_of_every_experiment(experiment, make_cfg):
    """`experiment=X scheduler=Y` must work for every pair: an experiment that overrode fields of
    its own scheduler (e.g. `decay_start`) would inject them into Y and break its constructor."""
    for scheduler in SCHEDULERS:
        cfg = make_cfg([f"experiment={experiment}", f"scheduler={scheduler}"])
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        sched = hydra.utils.instantiate(cfg.scheduler)(optimizer)
        assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler), (experiment, scheduler)


def test_resume_restores_training_exactly(make_cfg, tiny_data_root, tmp_path):
    """2 epochs in one go == 1 epoch + resume for 1 (optimizer, scheduler, sampler epoch)."""
    common = tiny_overrides(tiny_data_root) + [
        "scheduler.warmup_epochs=1",
        "scheduler.milestones=[1]",
        "data.random_erasing_p=0.0",
        "test=false",
        "trainer.deterministic=true",
    ]
    full_cfg = make_cfg(common + ["trainer.max_epochs=2"])
    _, full = train(full_cfg)
    first_cfg = make_cfg(common + ["trainer.max_epochs=1"])
    _, first = train(first_cfg)
    last = Path(first_cfg.paths.output_dir, "checkpoints", "last.ckpt")
    resumed_cfg = make_cfg(common + ["trainer.max_epochs=2", f"ckpt_path={last}"])
    _, resumed = train(resumed_cfg)
    a = full["system"].state_dict()
    b = resumed["system"].state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_eval_entry_point_on_the_produced_checkpoint(make_cfg, tiny_data_root):
    cfg = make_cfg(tiny_overrides(tiny_data_root) + ["trainer.max_epochs=1", "test=false"])
    train(cfg)
    ckpt = Path(cfg.paths.output_dir, "checkpoints", "last.ckpt")
    eval_cfg = make_cfg(
        tiny_overrides(tiny_data_root, train=False)
        + [f"ckpt_path={ckpt}", "flip=true", "rerank=true"],
        config_name="eval",
    )
    rows = evaluate(eval_cfg)
    assert set(rows) == {"plain", "re-ranked"}
    for row in rows.values():
        assert 0 <= row["mAP"] <= 1 and row["rank1"] <= row["rank5"] <= row["rank10"]
    out = Path(eval_cfg.paths.output_dir)
    assert json.loads((out / "metrics.json").read_text())["plain"]["mAP"] == rows["plain"]["mAP"]
    assert (out / "ranklist.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_errors_name_the_checkpoint(make_cfg, tiny_data_root, tmp_path):
    missing = tmp_path / "nope.ckpt"
    cfg = make_cfg(tiny_overrides(tiny_data_root, train=False) + [f"ckpt_path={missing}"], "eval")
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        evaluate(cfg)
    # A checkpoint of another architecture: a clear mismatch error.
    train_cfg = make_cfg(tiny_overrides(tiny_data_root) + ["trainer.max_epochs=1", "test=false"])
    train(train_cfg)
    ckpt = Path(train_cfg.paths.output_dir, "checkpoints", "last.ckpt")
    cfg = make_cfg(
        tiny_overrides(tiny_data_root, train=False)
        + [f"ckpt_path={ckpt}", "model.backbone.name=resnet34"],
        "eval",
    )
    with pytest.raises(ValueError, match="does not match the model config"):
        evaluate(cfg)


def test_config_errors_fail_before_training(make_cfg, tiny_data_root, tmp_path):
    with pytest.raises(ConfigCompositionException, match="data"):
        make_cfg(["data=no_such_dataset"])
    cfg = make_cfg(tiny_overrides(tiny_data_root) + ["data.batch_size=18"])
    with pytest.raises(
        ValueError, match="data.batch_size=18 must be a multiple of data.num_instances=4"
    ):
        train(cfg)
    missing = tmp_path / "missing_market"
    overrides = [o for o in tiny_overrides(tiny_data_root) if "preset" not in o]
    cfg = make_cfg(overrides + ["data=market1501", f"data.source.root={missing}"])
    with pytest.raises(FileNotFoundError, match="missing_market"):
        train(cfg)


@pytest.mark.parametrize("debug", ["overfit", "limit", "profiler"])
def test_debug_configs_compose_and_run(debug, make_cfg, tiny_data_root):
    overrides = tiny_overrides(tiny_data_root)
    if debug == "overfit":  # it drops every callback itself
        overrides = [o for o in overrides if not o.startswith("callbacks")]
    if debug == "limit":  # fractions of the tiny loaders round to zero batches
        overrides += ["trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    cfg = make_cfg(overrides + [f"debug={debug}", "trainer.max_epochs=1", "test=false"])
    assert cfg.task_name == "debug" and cfg.trainer.detect_anomaly
    metrics, _ = train(cfg)
    assert metrics["train/loss_epoch"] > 0
