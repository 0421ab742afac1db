"""W&B in offline mode through `train(cfg)`: the run file it writes holds the run's group and tags,
the resolved config, every loss term, the validation metrics and their best values, learning
rates and the pictures; the run is finished when `train` returns, and marked failed when it
raises; `logger=[csv,wandb]` writes both."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch import Callback

from src.train import train
from tests.conftest import tiny_overrides
from tests.scale._helpers import offline_runs


def test_wandb_offline_run_with_csv(make_cfg, tiny_data_root, wandb_offline):
    import wandb

    cfg = make_cfg(
        [
            *tiny_overrides(tiny_data_root),
            "logger=[csv,wandb]",
            "callbacks.ranklist.enabled=true",  # the default (tiny_overrides turns it off)
            "trainer.max_epochs=1",
            "trainer.check_val_every_n_epoch=1",
            "trainer.log_every_n_steps=1",
            "scheduler.warmup_epochs=0",
        ]
    )
    metrics, _ = train(cfg)
    assert wandb.run is None  # finished by the task wrapper
    out = Path(cfg.paths.output_dir)
    assert list(out.glob("csv/version_0/metrics.csv"))  # the CSV logger ran alongside

    (run,) = offline_runs(out)
    assert (run.project, run.group, run.job_type) == ("marlin", "train-synthetic_triplet", "train")
    assert run.tags == ["synthetic", "triplet"] and run.exit_code == 0
    # the resolved config (no interpolations left) and the parameter count
    assert run.config["loss"]["margin"] == 0.3
    assert run.config["paths"]["output_dir"] == str(out)
    assert run.config["params/total"] > 0
    expected = {
        "train/loss_step",
        "train/loss_tri_step",
        "train/loss_ce_epoch",
        "train/dist_ap_epoch",
        "train/dist_an_epoch",
        "val/mAP",
        "val/rank1",
        "val/mINP",
        "val/mAP_best",
        "val/rank1_best",
        "test/mAP",
        "lr-Adam/decay",
        "lr-Adam/norm",
        "val/ranklist/filenames",
        "test/ranklist/filenames",
        "test/embedding_pca/filenames",
    }
    assert expected <= run.history_keys, sorted(expected - run.history_keys)
    for key in ("val/mAP", "val/mAP_best", "test/mAP"):
        assert run.summary[key] == pytest.approx(metrics[key]), key
    media = out.glob("wandb/offline-run-*/files/media/images")
    (images,) = list(media)
    assert list(images.glob("val/ranklist_*.png")) and list(images.glob("test/embedding_pca_*.png"))
    # ... and the same pictures in the run directory (the embedding's enabled=auto: on with W&B)
    assert (out / "ranklists" / "val_epoch000.png").is_file()
    assert (out / "embedding_test.png").is_file()


class _Crash(Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        raise RuntimeError("boom")


def test_wandb_run_of_a_failed_task_is_finished_as_failed(make_cfg, tiny_data_root, wandb_offline):
    import wandb
    from omegaconf import open_dict

    cfg = make_cfg(
        [*tiny_overrides(tiny_data_root), "logger=wandb", "trainer.limit_train_batches=1"]
    )
    with open_dict(cfg):
        cfg.callbacks.crash = {"_target_": f"{__name__}._Crash"}
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg)
    assert wandb.run is None
    (run,) = offline_runs(Path(cfg.paths.output_dir))
    assert run.exit_code == 1
