"""Config checks that must fail before training starts, resolvers, and hyper-parameter logging."""

from __future__ import annotations

import inspect
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
from lightning_utilities.core.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from src.utils.pylogger import RankedLogger

log = RankedLogger(__name__)

# Quantities only the data knows, handed to a system's constructor when it asks for them.
DATA_DERIVED_KWARGS = ("num_classes", "num_target_train", "num_target_cameras")


def sweep_id() -> str | None:
    """Name of the multirun directory inside a Hydra multirun job (e.g. ``2024-05-01_12-00-00``
    for ``logs/train/multiruns/2024-05-01_12-00-00``), None in a single run or outside Hydra.

    The same for every job of one sweep (Optuna trials included): W&B tags runs with it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.get("mode") != RunMode.MULTIRUN or not hydra_cfg.sweep.get("dir"):
        return None
    return Path(str(hydra_cfg.sweep.dir)).name


def register_resolvers() -> None:
    """`${mul:a,b}` (products of config values) and `${sweep_id:}` (see :func:`sweep_id`)."""
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", lambda a, b: a * b)
    if not OmegaConf.has_resolver("sweep_id"):
        OmegaConf.register_new_resolver("sweep_id", sweep_id)


def validate_config(cfg: DictConfig) -> None:
    """Fail fast, naming the key, on mistakes that would otherwise surface mid-training."""
    for key in ("data", "system", "trainer"):
        if cfg.get(key) is None or "_target_" not in cfg[key]:
            raise ValueError(
                f"Config `{key}` is missing or has no `_target_`; pick one with {key}=NAME"
            )
    check_argument_types(cfg)  # first: the checks below compare numbers
    data = cfg.data
    batch_size, k = data.get("batch_size"), data.get("num_instances")
    if batch_size is not None and k is not None and (k < 1 or batch_size % k != 0):
        raise ValueError(
            f"data.batch_size={batch_size} must be a multiple of data.num_instances={k} "
            f"(P identities x K instances per batch)"
        )
    if batch_size is not None and k is not None and batch_size // k < 2:
        # one identity per batch: no negatives, so a batch-hard triplet loss would be 0
        raise ValueError(
            f"data.batch_size={batch_size} / data.num_instances={k} gives P={batch_size // k} "
            "identity per batch: P x K batches need P >= 2"
        )
    trainer = cfg.trainer
    if trainer.get("use_distributed_sampler", True):
        raise ValueError(
            "trainer.use_distributed_sampler must be false: the P x K sampler shards itself; "
            "Lightning's DistributedSamplerWrapper would break P x K batches under DDP"
        )
    _check_ddp_in_multirun(trainer)
    _warn_oversubscribed_cpu(trainer)


def _launches_processes(trainer: DictConfig) -> bool:
    """Whether `trainer` is plain `ddp` on more than one process (Lightning then re-runs the
    command line once per extra process)."""
    if trainer.get("strategy") != "ddp":
        return False
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    if isinstance(devices, str):
        many = (
            devices in ("auto", "-1") or "," in devices or (devices.isdigit() and int(devices) > 1)
        )
    elif isinstance(devices, int):
        many = devices == -1 or devices > 1
    else:  # a list of device ids
        many = len(devices) > 1
    return many or nodes > 1


def _check_ddp_in_multirun(trainer: DictConfig) -> None:
    """Plain `ddp` in a local multirun would re-run the whole sweep in every child process."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not _launches_processes(trainer) or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    launcher = str(hydra_cfg.get("launcher", {}).get("_target_", ""))
    # under SLURM (submitit) the scheduler starts one process per GPU: plain ddp is right there
    if hydra_cfg.get("mode") == RunMode.MULTIRUN and "submitit" not in launcher:
        raise ValueError(
            "trainer.strategy=ddp inside a multirun: Lightning would start its extra processes "
            "by re-running this command line, i.e. the whole sweep. Use "
            "trainer.strategy=ddp_spawn for sweeps on one machine (docs/scaling.md), or submit "
            "the jobs with hydra/launcher=submitit_slurm"
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
    # Everything but Hydra's own node (whose sweep keys only resolve inside a multirun).
    keys = [k for k in cfg if k != "hydra"]
    hparams = OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)
    hparams["params/total"] = sum(p.numel() for p in system.parameters())
    hparams["params/trainable"] = sum(p.numel() for p in system.parameters() if p.requires_grad)
    for logger in trainer.loggers:
        logger.log_hyperparams(hparams)


def _warn_oversubscribed_cpu(trainer: DictConfig) -> None:
    """More CPU processes than cores: every process competes for the same cores."""
    if trainer.get("accelerator") != "cpu" or "ddp" not in str(trainer.get("strategy", "")):
        return
    devices, cores = trainer.get("devices", 1), os.cpu_count() or 1
    if isinstance(devices, int) and devices * (trainer.get("num_nodes") or 1) > cores:
        log.warning(
            f"trainer.devices={devices} CPU processes on {cores} core(s): the ranks share the "
            "cores and each runs slower than one process alone would"
        )


_NUMBER_TYPES = {int: "an integer", float: "a number"}


def check_argument_types(cfg: DictConfig) -> None:
    """A number-typed constructor argument given a string (``loss.margin=abc``) fails here,
    naming the config key, instead of deep inside the constructor with a bare TypeError.

    Every node with a ``_target_`` is checked against the target's signature (its annotations);
    interpolated values are checked where they are defined.
    """
    for key, node in _target_nodes(cfg):
        try:
            target = hydra.utils.get_object(node["_target_"])
            func = target.__init__ if inspect.isclass(target) else target
            hints = typing.get_type_hints(func)
        except Exception:  # an unimportable target fails with Hydra's own clear error later
            continue
        for name, hint in hints.items():
            expected = _number_type(hint)
            if expected is None or name not in node:
                continue
            shown = f"{key}.{name}"
            if OmegaConf.is_interpolation(node, name):
                # report the key the user sets: `${loss.margin}` -> loss.margin
                ref = re.fullmatch(r"\$\{([\w.]+)\}", str(node._get_node(name)._value()))
                shown = ref.group(1) if ref else shown
            try:
                value = node[name]
            except Exception:  # an unresolvable interpolation: Hydra reports it later
                continue
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if expected is int:
                ok = ok and float(value).is_integer()
            if value is not None and not ok:
                raise TypeError(
                    f"{shown}={value!r}: expected {_NUMBER_TYPES[expected]} "
                    f"({node['_target_']} argument {name!r})"
                )


def _number_type(hint: Any) -> type | None:
    """int or float when `hint` is int, float, or one of them | None; else None."""
    args = (
        typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
        else (hint,)
    )
    args = tuple(a for a in args if a is not type(None))
    if len(args) == 1 and args[0] in (int, float):
        return args[0]
    return None


def _target_nodes(cfg: DictConfig, prefix: str = "") -> list[tuple[str, DictConfig]]:
    found = []
    for key in cfg:
        if not prefix and key == "hydra":
            continue
        if OmegaConf.is_interpolation(cfg, key):
            continue
        child = cfg._get_node(key)  # type: ignore[union-attr]
        if isinstance(child, DictConfig):
            path = f"{prefix}{key}"
            if "_target_" in child:
                found.append((path, child))
            found += _target_nodes(child, f"{path}.")
    return found


_TILDE_VALUE = re.compile(r"^([+~]{0,2}[\w.@/-]+)=(~[^'\"]*)$")


def quote_home_paths(argv: Sequence[str]) -> list[str]:
    """Quote override values that start with ``~`` (``paths.data_dir=~/datasets``): Hydra's
    override grammar reads an unquoted ``~`` as a syntax error. The path is expanded where it
    is used (:func:`expand_path`)."""
    out = []
    for arg in argv:
        match = _TILDE_VALUE.match(arg)
        out.append(f"{match.group(1)}='{match.group(2)}'" if match else arg)
    return out


def expand_path(path: str | os.PathLike[str]) -> str:
    """``~`` and ``$VAR`` expanded."""
    return os.path.expandvars(os.path.expanduser(str(path)))
