"""Sweeps: the swept keys reach the objects that train, the Optuna search spaces and the SLURM
launcher config are valid (in-process); a 2-job multirun with W&B and a 2-trial Optuna search with
SQLite storage through the real CLI (`python -m src.train -m ...` in a subprocess, as Hydra's
multirun needs); `make sweep-demo --quick` (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import yaml
from omegaconf import OmegaConf

from src.tools import summarize_sweep, sweep_demo
from tests.conftest import CONF_DIR, tiny_overrides
from tests.scale._helpers import offline_runs

REPO = Path(CONF_DIR).parent


def run_cli(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> str:
    """`python -m src.train ARGS` from the repository root; returns its output, fails loudly."""
    proc = subprocess.run(
        [sys.executable, "-m", "src.train", *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "2", **(env or {})},
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-5000:]
    return output


def cli_overrides(data_root: Path, tmp_path: Path) -> list[str]:
    return [
        *tiny_overrides(data_root),
        "trainer.max_epochs=1",
        "trainer.check_val_every_n_epoch=1",
        "scheduler.warmup_epochs=0",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]


# ------------------------------------------------------------------------------------- quick
def test_swept_keys_reach_the_trained_objects(make_cfg, tiny_data_root):
    """loss.margin / optimizer.lr (supervised) and loss.margin / loss.mining_ratio /
    loss.lambda_cml (MAR) are interpolated into the system's constructor arguments."""
    cfg = make_cfg([*tiny_overrides(tiny_data_root), "loss.margin=0.7", "optimizer.lr=0.002"])
    assert cfg.system.metric_loss.margin == 0.7 and cfg.system.optimizer.lr == 0.002
    cfg = make_cfg(
        [
            "experiment=synthetic_mar",
            *tiny_overrides(tiny_data_root),
            "loss.margin=0.6",
            "loss.mining_ratio=0.01",
            "loss.lambda_cml=0.001",
        ]
    )
    assert cfg.system.joint_loss.margin == 0.6
    assert cfg.system.discriminative_loss.mining_ratio == 0.01
    assert cfg.system.lambda_cml == 0.001
    system_args = hydra.utils.instantiate(cfg.system.discriminative_loss)
    assert system_args.mining_ratio == 0.01


@pytest.mark.parametrize(
    ("overrides", "metric", "space"),
    [
        (
            ["hparams_search=triplet_optuna"],
            "val/mAP_best",
            {"loss.margin": (0.1, 1.0, False), "optimizer.lr": (1e-4, 3e-3, True)},
        ),
        (
            ["experiment=synthetic_mar", "hparams_search=mar_optuna"],
            "test/mAP",
            {
                "loss.mining_ratio": (1e-3, 5e-2, True),
                "loss.lambda_cml": (2e-5, 2e-3, True),
                "loss.margin": (0.5, 1.5, False),
            },
        ),
    ],
)
def test_optuna_search_spaces(make_cfg, overrides, metric, space):
    """The search spaces parse into the intended Optuna distributions over keys that exist."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import (
        create_optuna_distribution_from_override,
    )

    cfg = make_cfg(overrides)
    sweeper = cfg.hydra.sweeper
    assert cfg.optimized_metric == metric and str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    assert sweeper.direction == "maximize" and sweeper.storage is None
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed
    parser = OverridesParser.create()
    assert set(sweeper.params) == set(space)
    for key, (low, high, log) in space.items():
        assert OmegaConf.select(cfg, key) is not None, key  # a key of the composed config
        (override,) = parser.parse_overrides([f"{key}={sweeper.params[key]}"])
        dist = create_optuna_distribution_from_override(override)
        assert (dist.low, dist.high) == pytest.approx((low, high)), key
        assert ("Log" in type(dist).__name__) == log, (key, type(dist).__name__)


def test_submitit_slurm_launcher_config(make_cfg, tmp_path, monkeypatch):
    """hydra/launcher=submitit_slurm with trainer=ddp_multinode: one task per GPU on every node,
    and submitit accepts every key (sbatch script built with a stand-in `srun`)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")

    cfg = make_cfg(
        [
            "hydra/launcher=submitit_slurm",
            "trainer=ddp_multinode",
            "hydra.launcher.partition=gpu",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ]
    )
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    params = launcher.params
    assert params["nodes"] == cfg.trainer.num_nodes == 2
    assert params["tasks_per_node"] == params["gpus_per_node"] == cfg.trainer.devices == 8
    # what the launcher does before submitting (hydra_submitit_launcher.BaseSubmititLauncher)
    executor = submitit.AutoExecutor(
        folder=params["submitit_folder"], cluster="slurm", slurm_max_num_timeout=0
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(
        **{
            (k if k in base else f"slurm_{k}"): v
            for k, v in params.items()
            if k not in ("submitit_folder", "max_num_timeout")
        }
    )
    script = executor._executor._make_submission_file_text("python -m src.train", "uid")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=1440",
    ):
        assert line in script, (line, script)


def test_sweep_demo_plan_composes(make_cfg, tmp_path):
    """Both stages of `make sweep-demo` compose with Hydra (normal and --quick), and the stage-2
    grid is margin x mining ratio."""
    for argv in ([], ["--quick"]):
        args = sweep_demo._parse_args([*argv, "--out", str(tmp_path / "demo")])
        plan = sweep_demo.build_plan(args)
        stage1 = make_cfg(plan.stage1)
        assert stage1.experiment_name == "synthetic_source_pretrain"
        grid = [o for o in plan.stage2 if o.startswith(("loss.margin=", "loss.mining_ratio="))]
        single = [o for o in plan.stage2 if o not in grid]
        stage2 = make_cfg([*single, "loss.margin=1.0", "loss.mining_ratio=0.05"])
        assert stage2.experiment_name == "synthetic_mar"
        assert stage2.system.pretrained_ckpt == str(plan.stage1_ckpt)
        assert stage2.data.height == args.image_size[0]
        assert len(grid) == 2 and all(len(o.split("=")[1].split(",")) == 2 for o in grid)


# ------------------------------------------------------------------- through the real CLI
def test_multirun_two_jobs_with_csv_and_wandb(tiny_data_root, tmp_path):
    """`python -m src.train -m experiment=synthetic_triplet loss.margin=0.2,0.4` with
    logger=[csv,wandb] offline: one directory per job with its own metrics, checkpoint and W&B
    run (distinct runs, finished in turn, both tagged with the sweep), summarised by
    summarize_sweep."""
    sweep_dir = tmp_path / "multirun"
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_API_KEY": "",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }
    run_cli(
        [
            "-m",
            "experiment=synthetic_triplet",
            "loss.margin=0.2,0.4",
            *cli_overrides(tiny_data_root, tmp_path),
            "logger=[csv,wandb]",
            "test=false",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        tmp_path,
        env,
    )
    runs = []
    for job, margin in ((0, 0.2), (1, 0.4)):
        job_dir = sweep_dir / str(job)
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        assert f"loss.margin={margin}" in overrides
        config = yaml.safe_load((job_dir / ".hydra" / "config.yaml").read_text())
        assert config["loss"]["margin"] == margin
        metrics = json.loads((job_dir / "metrics.json").read_text())
        assert 0 <= metrics["val/mAP_best"] <= 1
        assert (job_dir / "checkpoints" / "last.ckpt").is_file()
        assert list(job_dir.glob("csv/version_0/metrics.csv"))
        (run,) = offline_runs(job_dir)
        assert run.exit_code == 0 and f"sweep:{sweep_dir.name}" in run.tags
        assert run.group == "train-synthetic_triplet"
        assert run.config["loss"]["margin"] == margin
        assert run.summary["val/mAP_best"] == pytest.approx(metrics["val/mAP_best"])
        runs.append(run)
    assert runs[0].run_id != runs[1].run_id

    summary = summarize_sweep.summarize(sweep_dir, metric="val/mAP_best")
    assert sorted(row["loss.margin"] for row in summary.rows) == [0.2, 0.4]


def test_optuna_two_trials_with_sqlite_storage(tiny_data_root, tmp_path):
    """hparams_search=triplet_optuna, 2 trials, persisted in SQLite: the study holds both trials
    with the values the jobs returned, and optimization_results.yaml names the best."""
    import optuna

    sweep_dir = tmp_path / "optuna"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    run_cli(
        [
            "hparams_search=triplet_optuna",
            "hydra.sweeper.n_trials=2",
            f"hydra.sweeper.storage={storage}",
            "hydra.sweeper.study_name=test_study",
            *cli_overrides(tiny_data_root, tmp_path),
            "test=false",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        tmp_path,
    )
    study = optuna.load_study(study_name="test_study", storage=storage)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2
    for job, trial in enumerate(trials):
        metrics = json.loads((sweep_dir / str(job) / "metrics.json").read_text())
        assert trial.value == pytest.approx(metrics["val/mAP_best"])
        config = yaml.safe_load((sweep_dir / str(job) / ".hydra" / "config.yaml").read_text())
        assert config["loss"]["margin"] == pytest.approx(trial.params["loss.margin"])
        assert config["optimizer"]["lr"] == pytest.approx(trial.params["optimizer.lr"])
        assert 0.1 <= trial.params["loss.margin"] <= 1.0
        assert 1e-4 <= trial.params["optimizer.lr"] <= 3e-3
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(t.value for t in trials))
    assert results["best_params"] == study.best_trial.params


@pytest.mark.slow
def test_sweep_demo_quick(tmp_path):
    """`python -m src.tools.sweep_demo --quick`: stage 1, a 2 x 2 MAR multirun, the summary."""
    out = tmp_path / "demo"
    assert sweep_demo.main(["--quick", "--out", str(out)]) == 0
    sweep = out / "sweep"
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    grid = set()
    for job in jobs:
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        grid.add((config["loss"]["margin"], config["loss"]["mining_ratio"]))
        assert 0 <= json.loads((job / "metrics.json").read_text())["test/mAP"] <= 1
    assert grid == {(0.5, 0.05), (0.5, 0.1), (1.0, 0.05), (1.0, 0.1)}
    assert (sweep / "sweep_summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = (sweep / "sweep_summary.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("job,loss.margin,loss.mining_ratio,test/mAP")
