"""Evaluation entry point: `python -m src.eval ckpt_path=PATH` (or `run_dir=DIR`).

A self-describing checkpoint (src/systems/checkpoint_meta.py) is evaluated on its own run's data
with its own protocol (feature, distance, AP variant, flip, re-ranking); explicit overrides win
(`data=NAME` / `experiment=NAME` pick other data, `data.x=...` edits the run's, `metric=`, `ap=`,
`flip=`, `rerank=` change the protocol). A checkpoint without metadata needs the config it was
trained with (`experiment=NAME`, ...). Extracts (optionally flip-averaged) features of query and
gallery, evaluates with the Market-1501 protocol (and k-reciprocal re-ranking when asked), prints
a table and writes `metrics.json` and the rank lists `ranklist.png` / `.tsv` (and
`ranklist_reranked.*` with `rerank=true`) into the run directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import rich
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from src.metrics.ranklist import RankListRows, write_ranklist
from src.metrics.reid_metric import RankList, evaluate_split
from src.systems import checkpoint_meta
from src.systems.steps import extract_embeddings
from src.utils import RankedLogger, extras, print_results_table, task_wrapper
from src.utils.config import (
    DATA_DERIVED_KWARGS,
    data_kwargs_for,
    quote_home_paths,
    register_resolvers,
)
from src.utils.rich_utils import format_results_table

log = RankedLogger(__name__)
register_resolvers()


# Protocol keys of conf/eval.yaml -> (checkpoint protocol key, system config key).
PROTOCOL_KEYS = {
    "metric": ("metric", "eval_metric"),
    "ap": ("ap", "eval_ap"),
    "flip": ("flip", "flip_test"),
    "rerank": ("rerank", "rerank"),
}


def resolve_ckpt_path(cfg: DictConfig) -> Path:
    """`ckpt_path`, or for `run_dir=DIR` the checkpoint that run tested: `DIR/checkpoints/last.ckpt`
    (`test_ckpt: last`, the default), or the best one its best-checkpoint callback recorded when
    the run had `test_ckpt: best`."""
    if cfg.get("ckpt_path"):
        return Path(cfg.ckpt_path)
    if not cfg.get("run_dir"):
        raise ValueError("pass ckpt_path=PATH (a .ckpt file) or run_dir=DIR (a src.train run)")
    last = Path(cfg.run_dir, "checkpoints", "last.ckpt")
    if not last.is_file():
        raise FileNotFoundError(f"run_dir={cfg.run_dir}: no checkpoints/last.ckpt in this folder")
    run_cfg = Path(cfg.run_dir, ".hydra", "config.yaml")
    if not run_cfg.is_file() or OmegaConf.load(run_cfg).get("test_ckpt", "last") != "best":
        return last
    states = checkpoint_meta.load_checkpoint(last).get("callbacks", {})
    for state in states.values():
        best = state.get("best_model_path") if state.get("monitor") else None
        if best and Path(best).is_file():
            return Path(best)
    return last


def explicit_overrides(cfg: DictConfig) -> list[str]:
    """Keys the user set on the command line (`data`, `data.height`, `metric`, ...)."""
    from hydra.core.hydra_config import HydraConfig

    if "hydra" in cfg and cfg.hydra.get("overrides") is not None:
        task = list(cfg.hydra.overrides.task)
    elif HydraConfig.initialized():
        task = list(HydraConfig.get().overrides.task)
    else:
        task = []
    return [item.split("=", 1)[0].lstrip("+~") for item in task]


def eval_data_config(cfg: DictConfig, meta: dict[str, Any] | None, keys: list[str]) -> Any:
    """The checkpoint run's data config with the command line's `data.*` edits applied, unless
    `data=NAME` / `experiment=NAME` picked other data (or the checkpoint has none)."""
    if meta is None or not meta.get("data") or {"data", "experiment"} & set(keys):
        return cfg.data
    data = OmegaConf.create(meta["data"])
    for key in keys:
        if key.startswith("data."):
            OmegaConf.update(data, key[5:], OmegaConf.select(cfg, key), force_add=True)
    return data


def resolve_protocol(cfg: DictConfig, meta: dict[str, Any] | None) -> None:
    """Fill `cfg.metric/ap/flip/rerank` left null: from the checkpoint's protocol, else from the
    configured system (the experiment's evaluation settings)."""
    with open_dict(cfg):
        for key, (meta_key, system_key) in PROTOCOL_KEYS.items():
            if cfg.get(key) is not None:
                continue
            if meta is not None:
                cfg[key] = meta["protocol"][meta_key]
            else:
                cfg[key] = cfg.system.get(system_key)


def protocol_summary(cfg: DictConfig, ckpt: Path, meta: dict[str, Any] | None, data: Any) -> str:
    """What the results table was computed from, one line per item."""
    source = (data.get("source") or {}).get("name")
    target = (data.get("target") or {}).get("name") if data.get("target") else None
    dataset = f"{target} (target; source {source})" if target else str(source)
    feature = meta["protocol"]["feature"] if meta is not None else cfg.model.get("embed")
    return (
        f"checkpoint: {ckpt}\ndataset: {dataset}\n"
        f"distance: {cfg.metric} | AP: {cfg.ap} | flip: {cfg.flip} | re-ranking: {cfg.rerank} | "
        f"feature: {feature}"
    )


def load_described_system(
    cfg: DictConfig, ckpt: Path, checkpoint: dict[str, Any], keys: list[str]
) -> L.LightningModule:
    """A self-describing checkpoint's system, with the command line's `model.*` / `system.*`
    edits applied to its config (a changed architecture then fails the strict load)."""
    meta = checkpoint_meta.read_metadata(checkpoint, ckpt)
    system_cfg = OmegaConf.create(meta["system"])
    for key in keys:
        for prefix, target in (("model.", "net."), ("system.", "")):
            if key.startswith(prefix):
                value = OmegaConf.select(cfg, key)
                OmegaConf.update(system_cfg, target + key[len(prefix) :], value, force_add=True)
    patched = {**meta, "system": OmegaConf.to_container(system_cfg, resolve=True)}
    factories = checkpoint_meta.init_factories(
        {**checkpoint, checkpoint_meta.META_KEY: patched}, ckpt
    )
    cls = hydra.utils.get_class(patched["system"]["_target_"])
    try:
        system = cls.load_from_checkpoint(ckpt, map_location="cpu", compile=False, **factories)
    except RuntimeError as err:
        summary = "\n".join(str(err).splitlines()[:6])
        raise ValueError(
            f"ckpt_path={ckpt} does not match the model config (overrides {keys}).\n{summary}"
        ) from err
    return system


def load_system_from_checkpoint(
    cfg: DictConfig, datamodule: Any, checkpoint: dict[str, Any] | None = None
) -> L.LightningModule:
    """A checkpoint without metadata: instantiate `cfg.system` and load `cfg.ckpt_path` into it,
    with errors naming the file."""
    path = Path(cfg.ckpt_path)
    if checkpoint is None:
        checkpoint = checkpoint_meta.load_checkpoint(path)
    # Data-derived sizes (classifier rows, MAR memory) come from the checkpoint when it saved
    # them, so a model trained on one dataset can be evaluated on another.
    kwargs = data_kwargs_for(cfg.system, datamodule)
    saved = checkpoint.get("hyper_parameters", {})
    kwargs.update({k: saved[k] for k in DATA_DERIVED_KWARGS if k in saved and k in kwargs})
    system = hydra.utils.instantiate(cfg.system, _convert_="all", **kwargs)
    try:
        system.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        summary = "\n".join(str(err).splitlines()[:6])
        raise ValueError(
            f"ckpt_path={path} does not match the model config (system={cfg.system._target_}, "
            f"model.backbone={cfg.model.get('backbone')}): pass the experiment/model the "
            f"checkpoint was trained with.\n{summary}"
        ) from err
    return system


@torch.no_grad()
def extract_split_features(
    system: L.LightningModule, loader: Any, device: torch.device, flip: bool
) -> dict[str, torch.Tensor]:
    """Features and labels of the evaluation loader (query + gallery), in loader order."""
    system.eval().to(device)
    chunks: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("feat", "pid", "camid", "is_query", "index")
    }
    for batch in loader:
        # features stay on the device: the evaluation runs there (chunked)
        chunks["feat"].append(extract_embeddings(system.net, batch["img"].to(device), flip))
        for key in ("pid", "camid", "is_query", "index"):
            chunks[key].append(batch[key].to(device))
    return {k: torch.cat(v) for k, v in chunks.items()}


def evaluate_features_table(
    data: dict[str, torch.Tensor], cfg: DictConfig, topk: int = 10
) -> tuple[dict[str, dict[str, float]], dict[str, RankList]]:
    """Metrics without (and optionally with) re-ranking, plus each setting's top-`topk` rank
    lists (gallery rows, matches, distances and every query's AP).

    Chunked on the features' device (src.metrics.reid_metric.evaluate_split): no query x
    gallery matrix is built. ``cfg.aqe`` expands the features first, ``cfg.roc`` adds TPR@FPR.
    """
    q, g = data["is_query"], ~data["is_query"]
    labels = (data["pid"][q], data["pid"][g], data["camid"][q], data["camid"][g])
    options = {
        "metric": cfg.metric,
        "ap": cfg.ap,
        "aqe": cfg.get("aqe", False),
        "qe_times": cfg.get("aqe_times", 1),
        "qe_k": cfg.get("aqe_k", 5),
        "alpha": cfg.get("aqe_alpha", 3.0),
        "roc": cfg.get("roc", False),
    }
    rows, ranklists = {}, {}
    settings = {"plain": None}
    if cfg.rerank:
        settings["re-ranked"] = (cfg.rerank_k1, cfg.rerank_k2, cfg.rerank_lambda)
    for name, rerank in settings.items():
        rows[name], ranklists[name] = evaluate_split(
            data["feat"][q], data["feat"][g], labels, rerank=rerank, topk=topk, **options
        )
    return rows, ranklists


def write_ranklists(
    out_dir: Path, data: dict[str, torch.Tensor], records: list, ranklists: dict, cfg: DictConfig
) -> list[Path]:
    """`ranklist.png` (+ `.tsv`) of the plain ranking, `ranklist_reranked.png` of the re-ranked
    one: the worst queries by AP and a seeded random sample (src.metrics.ranklist)."""
    q, g = data["is_query"], ~data["is_query"]

    def rows(mask: torch.Tensor) -> RankListRows:
        return RankListRows.from_records([records[i] for i in data["index"][mask].tolist()])

    queries, gallery = rows(q), rows(g)
    written = []
    for name, ranks in ranklists.items():
        stem = "ranklist" if name == "plain" else "ranklist_reranked"
        png, _ = write_ranklist(
            out_dir / f"{stem}.png", queries, gallery, ranks.gallery_index, ranks.matches,
            ranks.distances, ranks.ap, num_worst=cfg.ranklist_worst,
            num_random=cfg.ranklist_random, seed=cfg.get("seed") or 0,
        )  # fmt: skip
        written.append(png)
    return written


@task_wrapper
def evaluate(cfg: DictConfig) -> dict[str, dict[str, float]]:
    """Evaluate `cfg.ckpt_path`; returns {setting: {metric: value}}."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    ckpt = resolve_ckpt_path(cfg)
    checkpoint = checkpoint_meta.load_checkpoint(ckpt)
    keys = explicit_overrides(cfg)
    meta = checkpoint.get(checkpoint_meta.META_KEY) or None
    if meta is None and not {"experiment", "model", "system"} & {k.split(".")[0] for k in keys}:
        raise checkpoint_meta.MissingMetadataError(checkpoint_meta.old_checkpoint_message(ckpt))
    with open_dict(cfg):
        cfg.ckpt_path = str(ckpt)
    data_cfg = eval_data_config(cfg, meta, keys)
    resolve_protocol(cfg, meta)
    datamodule = hydra.utils.instantiate(data_cfg, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("test")
    if meta is not None:
        system = load_described_system(cfg, ckpt, checkpoint, keys)
    else:
        system = load_system_from_checkpoint(cfg, datamodule, checkpoint)

    use_gpu = torch.cuda.is_available() and cfg.trainer.get("accelerator") in (
        "gpu",
        "cuda",
        "auto",
    )
    device = torch.device("cuda" if use_gpu else "cpu")
    data = extract_split_features(system, datamodule.test_dataloader(), device, cfg.flip)
    rows, ranklists = evaluate_features_table(data, cfg)
    summary = protocol_summary(cfg, ckpt, meta, data_cfg)
    log.info(f"Evaluated\n{summary}")
    print(summary)
    print_results_table(rows)
    if cfg.get("roc", False):
        rich.print(format_results_table(rows, keys=[k for k in rows["plain"] if "TPR@" in k]))

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.json", "w") as f:
        protocol = {key: cfg[key] for key in PROTOCOL_KEYS}
        json.dump({"ckpt_path": str(ckpt), "protocol": protocol, **rows}, f, indent=2)
    # Evaluation indices run over query then gallery (ImageDataset.query_gallery).
    records = [*datamodule.eval_data.query, *datamodule.eval_data.gallery]
    pictures = write_ranklists(out_dir, data, records, ranklists, cfg)
    log.info(f"Wrote {out_dir / 'metrics.json'} and " + ", ".join(str(p) for p in pictures))
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    extras(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    sys.argv = quote_home_paths(sys.argv)
    main()
