"""Training entry point: `python -m src.train [experiment=...] [key=value ...]`.

Only instantiates and wires: datamodule, system (LightningModule), callbacks, loggers, trainer;
fits; tests the last (or, with `test_ckpt=best`, the best-on-validation) checkpoint; returns the
metric named by `optimized_metric` for sweepers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from src.systems import checkpoint_meta  # issue 13: self-describing checkpoints
from src.utils import (
    RankedLogger,
    extras,
    instantiate_callbacks,
    instantiate_loggers,
    print_results_table,
    sweep_metric_value,
    task_wrapper,
)
from src.utils.checkpoints import check_checkpoint_file, check_test_ckpt, test_checkpoint
from src.utils.config import (
    data_kwargs_for,
    log_hyperparameters,
    quote_home_paths,
    register_resolvers,
    validate_config,
)

log = RankedLogger(__name__)
register_resolvers()


def _to_float_dict(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}


@task_wrapper
def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit and test the configured system. Returns (metrics, objects)."""
    if cfg.get("seed") is not None:  # 0 is a valid seed
        L.seed_everything(cfg.seed, workers=True)
    validate_config(cfg)

    log.debug(f"Instantiating datamodule <{cfg.data._target_}>")
    datamodule: L.LightningDataModule = hydra.utils.instantiate(cfg.data, _convert_="all")
    # The classifier size (and MAR's memory size) depend on the data: set up before the model.
    datamodule.prepare_data()
    datamodule.setup("fit")
    check_test_ckpt(cfg, datamodule)

    log.debug(f"Instantiating system <{cfg.system._target_}>")
    system: L.LightningModule = hydra.utils.instantiate(
        cfg.system, _convert_="all", **data_kwargs_for(cfg.system, datamodule)
    )
    system.run_config = checkpoint_meta.run_config(cfg)  # issue 13: self-describing checkpoints
    callbacks = instantiate_callbacks(
        cfg.get("callbacks"), cfg.trainer.get("enable_progress_bar", True)
    )
    loggers = instantiate_loggers(cfg.get("logger"))
    log.debug(f"Instantiating trainer <{cfg.trainer._target_}>")
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)

    objects = {"cfg": cfg, "datamodule": datamodule, "system": system, "trainer": trainer}
    log_hyperparameters(objects)

    if cfg.get("train"):
        ckpt_path = cfg.get("ckpt_path")
        if ckpt_path:
            ckpt_path = str(check_checkpoint_file(ckpt_path, "ckpt_path"))
        log.info("Starting training")
        trainer.fit(model=system, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = _to_float_dict(trainer.callback_metrics)

    if cfg.get("test"):
        label, ckpt_path = test_checkpoint(trainer, cfg.get("test_ckpt", "last"))
        log.info(f"Testing {label}" + (f": {ckpt_path}" if ckpt_path else ""))
        trainer.test(
            model=system,
            datamodule=datamodule,
            ckpt_path=ckpt_path,
            weights_only=False,
            verbose=False,  # the results table below says it once, with the checkpoint's name
        )
        test_metrics = _to_float_dict(trainer.callback_metrics)
        metrics.update({k: v for k, v in test_metrics.items() if k.startswith("test/")})
        rows = {f"test ({label})": {k[5:]: v for k, v in metrics.items() if k.startswith("test/")}}
        print_results_table(rows)

    if trainer.is_global_zero:
        Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(cfg.paths.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
    return metrics, objects


@hydra.main(version_base="1.3", config_path="../conf", config_name="train.yaml")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns the optimized metric for sweepers (Optuna)."""
    extras(cfg)
    metrics, _ = train(cfg)
    if not cfg.get("train"):  # a test-only run has no training metric to optimise
        return None
    return sweep_metric_value(metrics, cfg.get("optimized_metric"))


if __name__ == "__main__":
    sys.argv = quote_home_paths(sys.argv)
    main()
