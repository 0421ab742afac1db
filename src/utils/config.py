"""Config checks that must fail before training starts, resolvers, and hyper-parameter logging."""

from __future__ import annotations

import inspect
from typing import Any

import hydra
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from src.utils.pylogger import RankedLogger

log = RankedLogger(__name__)

# Quantities only the data knows, handed to a system's constructor when it asks for them.
DATA_DERIVED_KWARGS = ("num_classes", "num_target_train", "num_target_cameras")


def register_resolvers() -> None:
    """`${eval_int:'a // b'}`-style arithmetic is not needed; we only add `${mul:a,b}`."""
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda a, b: a * b)


def validate_config(cfg: DictConfig) -> None:
    """Fail fast, naming the key, on mistakes that would otherwise surface mid-training."""
    for key in ("data", "system", "trainer"):
        if cfg.get(key) is None or "_target_" not in cfg[key]:
            raise ValueError(
                f"Config `{key}` is missing or has no `_target_`; pick one with {key}=NAME"
            )
    data = cfg.data
    batch_size, k = data.get("batch_size"), data.get("num_instances")
    if batch_size is not None and k is not None and (k < 1 or batch_size % k != 0):
        raise ValueError(
            f"data.batch_size={batch_size} must be a multiple of data.num_instances={k} "
            f"(P identities x K instances per batch)"
        )
    trainer = cfg.trainer
    if trainer.get("use_distributed_sampler", True):
        raise ValueError(
            "trainer.use_distributed_sampler must be false: the P x K sampler shards itself; "
            "Lightning's DistributedSamplerWrapper would break P x K batches under DDP"
        )


def data_kwargs_for(system_cfg: DictConfig, datamodule: Any) -> dict[str, Any]:
    """The data-derived constructor arguments (e.g. `num_classes`) the configured system accepts."""
    cls = hydra.utils.get_class(system_cfg._target_)
    params = inspect.signature(cls.__init__).parameters
    return {
        name: getattr(datamodule, name)
        for name in DATA_DERIVED_KWARGS
        if name in params and getattr(datamodule, name, None) is not None
    }


@rank_zero_only
def log_hyperparameters(objects: dict[str, Any]) -> None:
    """Send the resolved config (plain containers) and parameter counts to every logger."""
    cfg: DictConfig = objects["cfg"]
    trainer = objects["trainer"]
    system = objects["system"]
    if not trainer.logger:
        return
    hparams = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    hparams.pop("hydra", None)
    hparams["params/total"] = sum(p.numel() for p in system.parameters())
    hparams["params/trainable"] = sum(p.numel() for p in system.parameters() if p.requires_grad)
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)
