"""Session-wide tiny checkpoints (supervised BNNeck and MAR stage 2) trained through src.train."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from src.data import build_dataset
from tests.conftest import CONF_DIR, tiny_mar_overrides, tiny_overrides
from tests.systems._mar_helpers import save_stage1


def compose_cfg(
    overrides: Sequence[str], out_dir: Path, config_name: str = "train", keep_hydra: bool = True
) -> DictConfig:
    """`conf/<config_name>.yaml` with overrides, as the CLI composes it, writing to `out_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, return_hydra_config=True, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.log_dir = str(out_dir / "logs")
        cfg.hydra.runtime.output_dir = str(out_dir)
    HydraConfig().set_config(cfg)
    if not keep_hydra:  # log_hyperparameters cannot resolve hydra.sweep outside a Hydra job
        with open_dict(cfg):
            cfg.pop("hydra")
    return cfg


def _train(overrides: Sequence[str], out_dir: Path) -> Path:
    from src.train import train

    cfg = compose_cfg(overrides, out_dir, keep_hydra=False)
    try:
        train(cfg)
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    return out_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def supervised_ckpt(tiny_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Triplet + CE, ResNet-18 with BNNeck (embed=bn, euclidean), one epoch on the tiny A."""
    out = tmp_path_factory.mktemp("supervised_run")
    return _train([*tiny_overrides(tiny_data_root), "trainer.max_epochs=1", "test=false"], out)


@pytest.fixture(scope="session")
def mar_ckpt(tiny_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MAR stage 2 (no BNNeck, cosine) A -> B, one step from a random stage-1 network."""
    out = tmp_path_factory.mktemp("mar_run")
    num_ids = build_dataset(
        "synthetic", tiny_data_root / "synthetic" / "A", domain="A", preset="tiny"
    ).num_train_pids
    stage1 = save_stage1(out / "stage1.ckpt", seed=0, num_classes=num_ids)
    overrides = [
        *tiny_mar_overrides(tiny_data_root, stage1),
        "trainer.limit_train_batches=1",
        "trainer.max_epochs=1",
        "test=false",
        "system.warmup_epochs=0",
        "system.init_cache_dir=null",
    ]
    return _train(overrides, out / "run")
