"""Every conf/data option composes into a ReIDDataModule that reads its real layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from src.train import train
from tests.conftest import tiny_overrides

# The data dir each real-dataset config expects under paths.data_dir.
REAL_ROOTS = {
    "market1501": "Market-1501-v15.09.15",
    "dukemtmc": "DukeMTMC-reID",
    "msmt17": "MSMT17_V1",
    "custom": "custom",
}


def _overrides(data_root: Path, data: str) -> list[str]:
    base = [o for o in tiny_overrides(data_root) if "preset" not in o]
    return base + [f"data={data}", "data.height=32", "data.width=16", "debug=fdr", "test=false"]


def test_market1501_config_trains_on_a_market_layout(make_cfg, tiny_data_root, tmp_path):
    """The tiny synthetic domain is written in the Market-1501 layout: the market1501 config's
    real parser reads it."""
    data_dir = tmp_path / "datasets"
    shutil.copytree(tiny_data_root / "synthetic" / "A", data_dir / REAL_ROOTS["market1501"])
    overrides = _overrides(tiny_data_root, "market1501") + [f"paths.data_dir={data_dir}"]
    metrics, objects = train(make_cfg(overrides))
    assert metrics["train/loss_step"] > 0
    assert type(objects["datamodule"].source_data).__name__ == "Market1501"


@pytest.mark.parametrize("data", ["dukemtmc", "msmt17", "custom"])
def test_real_dataset_configs_name_the_missing_root(data, make_cfg, tiny_data_root, tmp_path):
    overrides = _overrides(tiny_data_root, data) + [f"paths.data_dir={tmp_path}"]
    with pytest.raises(FileNotFoundError, match=REAL_ROOTS[data]):
        train(make_cfg(overrides))


def test_synthetic_b_config_runs(make_cfg, tiny_data_root):
    cfg = make_cfg(tiny_overrides(tiny_data_root) + ["data=synthetic_b", "debug=fdr", "test=false"])
    assert cfg.data.source.domain == "B"
    metrics, objects = train(cfg)
    assert metrics["train/loss_step"] > 0
    assert Path(objects["datamodule"].source_data.train[0].img_path).parts[-3] == "B"


def test_many_loggers_config_runs_offline(make_cfg, tiny_data_root, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    overrides = tiny_overrides(tiny_data_root) + [
        "logger=many_loggers",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "test=false",
    ]
    cfg = make_cfg(overrides)
    assert set(cfg.logger) == {"csv", "wandb"}
    _, objects = train(cfg)
    names = {type(lg).__name__ for lg in objects["trainer"].loggers}
    assert names == {"CSVLogger", "WandbLogger"}
