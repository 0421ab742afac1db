"""Self-describing checkpoints: what a checkpoint needs to rebuild its network and protocol.

Every checkpoint a marlin system writes carries ``checkpoint["marlin"]`` (plain Python
primitives, so ``torch.load(path, weights_only=True)`` reads it)::

    format: 1
    marlin_version, git_commit         # the code that wrote it ("unknown" outside a git checkout)
    experiment_name
    system: {...}                      # the resolved `system` config: `net` is the model config,
                                       #   losses, optimizer, scheduler as their Hydra configs
    data: {...}                        # the resolved `data` config of the run
    input: {height, width, mean, std, interpolation}   # the evaluation domain's test transform
    protocol: {feature, metric, ap, flip, rerank}      # how the system evaluates
    datasets: {source, target, eval}   # dataset names

`src.train` hands the resolved config to the system (:func:`run_config`); the system's
``on_save_checkpoint`` adds the rest (:func:`write_metadata`). :func:`init_factories` rebuilds the
constructor's Hydra partials from it, which is what makes ``TripletReIDModule.load_from_checkpoint
(path)`` / ``MARModule.load_from_checkpoint(path)`` work with only a path.
"""

from __future__ import annotations

import copy
import functools
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

META_KEY = "marlin"
FORMAT = 1
# `_target_`s a checkpoint may ask to instantiate (a checkpoint is data: no arbitrary code).
ALLOWED_TARGET_PREFIXES = ("src.", "torch.optim.", "torch.nn.")
PROTOCOL_KEYS = ("feature", "metric", "ap", "flip", "rerank")


class MissingMetadataError(ValueError):
    """A checkpoint written before checkpoints carried their config (or not by marlin)."""


def old_checkpoint_message(path: str | os.PathLike[str]) -> str:
    return (
        f"{path} carries no marlin metadata (checkpoint['{META_KEY}']): it was written before "
        "checkpoints described themselves, or not by src.train. Pass the config it was trained "
        "with: python -m src.eval ckpt_path=... experiment=<its experiment> [data=... model=...] "
        "(src.extract/src.export/src.search and FeatureExtractor need a checkpoint with metadata; "
        "re-save it by loading it with src.eval's config and trainer.save_checkpoint)"
    )


@functools.cache
def code_version() -> tuple[str, str]:
    """(marlin package version, git commit of the source tree or "unknown")."""
    try:
        from importlib.metadata import version

        pkg = version("marlin")
    except Exception:  # noqa: BLE001 - not installed: the source tree only
        pkg = "unknown"
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return pkg, commit or "unknown"


def run_config(cfg: Any) -> dict[str, Any]:
    """The part of a composed run config a checkpoint keeps: resolved `system` and `data`
    (primitives), the experiment name and seed."""
    from omegaconf import OmegaConf

    keep = {}
    for key in ("system", "data"):
        node = cfg.get(key)
        keep[key] = None if node is None else OmegaConf.to_container(node, resolve=True)
    keep["experiment_name"] = cfg.get("experiment_name")
    keep["seed"] = cfg.get("seed")
    return keep


def _feature_name(net: Any) -> str:
    if getattr(net, "embedding", "global") == "bn" and getattr(net, "neck", None) is not None:
        return "bn"
    return "global"


def _input_spec(system: Any, data_cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Test transform of the evaluation domain: the datamodule's resolved statistics when the
    trainer has one, else the data config's (ImageNet for "imagenet")."""
    from src.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    trainer = getattr(system, "_trainer", None)
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    data_cfg = dict(data_cfg or {})
    if dm is not None and getattr(dm, "stats", None):
        domain = "target" if getattr(dm, "target_data", None) is not None else "source"
        mean, std = dm.stats.get(domain, next(iter(dm.stats.values())))
        height, width = dm.height, dm.width
        interpolation = dm.augment.get("interpolation", "bilinear")
    elif data_cfg:
        mean, std = data_cfg.get("mean", "imagenet"), data_cfg.get("std", "imagenet")
        if mean == "auto":
            return None
        mean = IMAGENET_MEAN if mean in (None, "imagenet") else mean
        std = IMAGENET_STD if std in (None, "imagenet") else std
        height, width = data_cfg.get("height", 256), data_cfg.get("width", 128)
        interpolation = data_cfg.get("interpolation", "bilinear")
    else:
        return None
    return {
        "height": int(height),
        "width": int(width),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "interpolation": str(interpolation),
    }


def build_metadata(system: Any) -> dict[str, Any]:
    """``checkpoint["marlin"]`` for `system` (a :class:`ReIDSystem`), primitives only."""
    cfg = getattr(system, "run_config", None) or {}
    hp = system.hparams
    version, commit = code_version()
    data = cfg.get("data") or {}
    source = (data.get("source") or {}).get("name")
    target = (data.get("target") or {}).get("name")
    return {
        "format": FORMAT,
        "marlin_version": version,
        "git_commit": commit,
        "experiment_name": cfg.get("experiment_name"),
        "system": copy.deepcopy(cfg.get("system")),
        "data": copy.deepcopy(cfg.get("data")),
        "input": _input_spec(system, data),
        "protocol": {
            "feature": _feature_name(system.net),
            "metric": str(hp.get("eval_metric", "euclidean")),
            "ap": str(hp.get("eval_ap", "standard")),
            "flip": bool(hp.get("flip_test", False)),
            "rerank": bool(hp.get("rerank", False)),
        },
        "datasets": {"source": source, "target": target, "eval": target or source},
    }


def write_metadata(system: Any, checkpoint: dict[str, Any]) -> None:
    """The system's ``on_save_checkpoint``: add ``checkpoint["marlin"]``."""
    checkpoint[META_KEY] = build_metadata(system)


def restore_run_config(system: Any, checkpoint: Mapping[str, Any]) -> None:
    """The system's ``on_load_checkpoint``: keep the checkpoint's config (so a re-saved module
    stays self-describing) unless this run already set its own."""
    meta = checkpoint.get(META_KEY)
    if getattr(system, "run_config", None) is None and meta and meta.get("system"):
        system.run_config = {
            "system": meta["system"],
            "data": meta.get("data"),
            "experiment_name": meta.get("experiment_name"),
        }


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors naming the file (missing,
    empty or truncated files: :func:`src.utils.checkpoints.check_checkpoint_file`)."""
    from src.utils.checkpoints import check_checkpoint_file

    path = check_checkpoint_file(path, "ckpt_path")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - re-raised naming the file
        raise ValueError(f"ckpt_path={path} could not be read as a checkpoint: {err}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"ckpt_path={path} is not a Lightning checkpoint (no 'state_dict' key)")
    return checkpoint


def read_metadata(checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """``checkpoint["marlin"]``, or a :class:`MissingMetadataError` saying what to pass."""
    meta = checkpoint.get(META_KEY)
    if not meta or not meta.get("system"):
        raise MissingMetadataError(old_checkpoint_message(path))
    if meta.get("format", 0) > FORMAT:
        raise ValueError(
            f"{path}: metadata format {meta['format']} is newer than this code's ({FORMAT}): "
            "update marlin"
        )
    return meta


def _check_targets(node: Any, path: str) -> None:
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if target is not None and not str(target).startswith(ALLOWED_TARGET_PREFIXES):
            raise ValueError(
                f"{path}: the checkpoint asks to instantiate {target!r}; only targets under "
                f"{ALLOWED_TARGET_PREFIXES} are built from checkpoints"
            )
        for value in node.values():
            _check_targets(value, path)
    elif isinstance(node, list):
        for value in node:
            _check_targets(value, path)


def inference_system_config(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's system config with what must not run at load time switched off: no
    ImageNet download or backbone file (the weights come from the checkpoint), no compile."""
    cfg = copy.deepcopy(dict(meta["system"]))
    net = cfg.get("net")
    if isinstance(net, dict):
        backbone = net.get("backbone")
        if isinstance(backbone, dict):
            backbone["pretrained"] = False
            backbone["weights_path"] = None
        else:
            net["pretrained"] = False
            net["weights_path"] = None
    if "compile" in cfg:
        cfg["compile"] = False
    return cfg


def init_factories(
    checkpoint: Mapping[str, Any], path: str | os.PathLike[str], cls: type | None = None
) -> dict[str, Any]:
    """The constructor arguments a checkpoint's ``hyper_parameters`` leave out (the network,
    losses, optimizer and scheduler: Hydra objects), rebuilt from its metadata.

    Raises:
        MissingMetadataError: for a checkpoint without metadata.
        ValueError: when the checkpoint's system is not `cls` (or a subclass).
    """
    import hydra

    meta = read_metadata(checkpoint, path)
    cfg = inference_system_config(meta)
    _check_targets(cfg, str(path))
    target = cfg.get("_target_", "")
    if cls is not None:
        saved_cls = hydra.utils.get_class(target)
        if not issubclass(saved_cls, cls):
            raise ValueError(
                f"{path} is a {target} checkpoint, not a {cls.__module__}.{cls.__qualname__} one: "
                f"load it with {saved_cls.__name__}.load_from_checkpoint"
            )
    saved = checkpoint.get("hyper_parameters", {})
    return {
        key: hydra.utils.instantiate(value, _convert_="all")
        for key, value in cfg.items()
        if not key.startswith("_") and key not in saved
    }


def load_system(path: str | os.PathLike[str], map_location: Any = "cpu", **overrides: Any) -> Any:
    """The :class:`ReIDSystem` of a self-describing checkpoint (class from its metadata), in eval
    mode, weights loaded strictly. `overrides` go to the constructor (e.g. ``flip_test``)."""
    import hydra

    checkpoint = load_checkpoint(path)
    meta = read_metadata(checkpoint, path)
    _check_targets(meta["system"], str(path))
    cls = hydra.utils.get_class(meta["system"]["_target_"])
    system = cls.load_from_checkpoint(path, map_location=map_location, **overrides)
    return system.eval()
