"""Evaluation entry point: `python -m src.eval ckpt_path=PATH` (or `run_dir=DIR`).

A self-describing checkpoint (src/systems/checkpoint_meta.py) is evaluated on its own run's data
with its own protocol (feature, distance, AP variant, flip, re-ranking); explicit overrides win
(`data=NAME` / `experiment=NAME` pick other data, `data.x=...` edits the run's, `metric=`, `ap=`,
`flip=`, `rerank=` change the protocol). A checkpoint without metadata needs the config it was
trained with (`experiment=NAME`, ...). Extracts (optionally flip-averaged) features of query and
gallery, evaluates with the Market-1501 protocol (and k-reciprocal re-ranking when asked), prints
a table and writes `metrics.json` and `ranklist.png` into the run directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from src.metrics.functional import (
    compute_distance_matrix,
    evaluate_rank,
    re_ranking,
    topk_gallery,
)
from src.metrics.ranklist import plot_ranklist
from src.systems import checkpoint_meta
from src.systems.steps import extract_embeddings
from src.utils import RankedLogger, extras, print_results_table, task_wrapper
from src.utils.config import DATA_DERIVED_KWARGS, data_kwargs_for, register_resolvers

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
    """`ckpt_path`, or for `run_dir=DIR` the checkpoint that run tested: the best one recorded
    by its ModelCheckpoint in `DIR/checkpoints/last.ckpt` when it exists, else last.ckpt."""
    if cfg.get("ckpt_path"):
        return Path(cfg.ckpt_path)
    if not cfg.get("run_dir"):
        raise ValueError("pass ckpt_path=PATH (a .ckpt file) or run_dir=DIR (a src.train run)")
    last = Path(cfg.run_dir, "checkpoints", "last.ckpt")
    if not last.is_file():
        raise FileNotFoundError(f"run_dir={cfg.run_dir}: no checkpoints/last.ckpt in this folder")
    states = checkpoint_meta.load_checkpoint(last).get("callbacks", {})
    for key, state in states.items():
        best = state.get("best_model_path") if key.startswith("ModelCheckpoint") else None
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
        chunks["feat"].append(extract_embeddings(system.net, batch["img"].to(device), flip).cpu())
        for key in ("pid", "camid", "is_query", "index"):
            chunks[key].append(batch[key])
    return {k: torch.cat(v) for k, v in chunks.items()}


def evaluate_features_table(
    data: dict[str, torch.Tensor], cfg: DictConfig
) -> tuple[dict[str, dict[str, float]], torch.Tensor]:
    """Metrics without (and optionally with) re-ranking, plus the query-gallery distances."""
    q, g = data["is_query"], ~data["is_query"]
    qf, gf = data["feat"][q], data["feat"][g]
    distmat = compute_distance_matrix(qf, gf, metric=cfg.metric)
    labels = (data["pid"][q], data["pid"][g], data["camid"][q], data["camid"][g])
    rows: dict[str, dict[str, float]] = {}

    def summarise(dist: Any) -> dict[str, float]:
        cmc, mAP, mINP = evaluate_rank(dist, *labels, ap=cfg.ap)
        # max_rank shrinks to the gallery size on tiny galleries
        ranks = {f"rank{k}": cmc[min(k, len(cmc)) - 1] for k in (1, 5, 10)}
        return {**ranks, "mAP": mAP, "mINP": mINP}

    rows["plain"] = summarise(distmat)
    if cfg.rerank:
        q_q = compute_distance_matrix(qf, qf, metric=cfg.metric)
        g_g = compute_distance_matrix(gf, gf, metric=cfg.metric)
        rr = re_ranking(
            distmat.numpy(),
            q_q.numpy(),
            g_g.numpy(),
            k1=cfg.rerank_k1,
            k2=cfg.rerank_k2,
            lambda_value=cfg.rerank_lambda,
        )
        rows["re-ranked"] = summarise(rr)
    return {k: {m: float(v) for m, v in r.items()} for k, r in rows.items()}, distmat


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
    rows, distmat = evaluate_features_table(data, cfg)
    summary = protocol_summary(cfg, ckpt, meta, data_cfg)
    log.info(f"Evaluated\n{summary}")
    print(summary)
    print_results_table(rows)

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.json", "w") as f:
        protocol = {key: cfg[key] for key in PROTOCOL_KEYS}
        json.dump({"ckpt_path": str(ckpt), "protocol": protocol, **rows}, f, indent=2)
    q, g = data["is_query"], ~data["is_query"]
    positions, matches, _ = topk_gallery(
        distmat, data["pid"][q], data["pid"][g], data["camid"][q], data["camid"][g], k=10
    )
    # Evaluation indices run over query then gallery (ImageDataset.query_gallery).
    records = [*datamodule.eval_data.query, *datamodule.eval_data.gallery]
    plot_ranklist(
        query_paths=[records[i].img_path for i in data["index"][q].tolist()],
        gallery_paths=[records[i].img_path for i in data["index"][g].tolist()],
        topk_indices=positions,
        matches=matches,
        out_path=out_dir / "ranklist.png",
        num_queries=cfg.ranklist_queries,
    )
    log.info(f"Wrote {out_dir / 'metrics.json'} and {out_dir / 'ranklist.png'}")
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="eval.yaml")
def main(cfg: DictConfig) -> None:
    extras(cfg)
    evaluate(cfg)


if __name__ == "__main__":
    main()
