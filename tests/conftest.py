"""Shared fixtures: tiny synthetic datasets and Hydra configs composed as the CLI would."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from src.utils.config import register_resolvers

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# Two cores: keep each test process to a couple of threads so parallel jobs don't thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))
register_resolvers()


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the tiny synthetic domains A and B (generated once per session)."""
    from src.data.synthetic import SyntheticReID

    root = tmp_path_factory.mktemp("data")
    for domain in ("A", "B"):
        SyntheticReID(root / "synthetic" / domain, domain=domain, seed=0, preset="tiny")
    return root


def tiny_overrides(data_root: Path, train: bool = True) -> list[str]:
    """Overrides that shrink any experiment to the tiny synthetic data and a CPU-sized model
    (`train=False` for conf/eval.yaml, which has no callbacks)."""
    overrides = [
        f"paths.data_dir={data_root}",
        "+data.source.preset=tiny",
        "data.height=32",
        "data.width=16",
        "data.batch_size=16",
        "data.num_instances=4",
        "data.num_workers=0",
        "data.test_batch_size=64",
        # validation on the test split, as the tests compare it with src.eval of the checkpoint
        # (the default run holds out 10 % of the ids: tests/systems/test_run_guards.py)
        "data.val_ids=0",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "extras.print_config=false",
    ]
    if train:
        # rank lists (on by default) cost a figure per evaluation: their own tests turn them on
        overrides += ["logger=csv", "callbacks.ranklist.enabled=false"]
    return overrides


def tiny_mar_overrides(data_root: Path, pretrained: Path | str) -> list[str]:
    """MAR stage 2 (experiment=synthetic_mar) on the tiny A -> B data from a stage-1 checkpoint."""
    return [
        "experiment=synthetic_mar",
        *tiny_overrides(data_root),
        "+data.target.preset=tiny",
        "data.target_batch_size=16",
        f"system.pretrained_ckpt={pretrained}",
        # 16 target images: C(16,2) x 0.005 = 0 pairs; 0.05 mines 6 pairs per step
        "loss.mining_ratio=0.05",
    ]


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Compose `conf/<config_name>.yaml` with overrides, as `python -m src.train` would."""

    def _make(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                config_name=config_name, return_hydra_config=True, overrides=list(overrides)
            )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.log_dir = str(tmp_path / "logs")
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        HydraConfig().set_config(cfg)
        return cfg

    yield _make
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None  # later tests must not see this run's Hydra config
