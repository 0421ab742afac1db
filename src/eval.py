"""Evaluation entry point: `python -m src.eval ckpt_path=PATH [experiment=...] [data=...]`.

Loads a checkpoint into the configured system, extracts (optionally flip-averaged) features of
query and gallery, evaluates with the Market-1501 protocol (and k-reciprocal re-ranking when
asked), prints a table and writes `metrics.json` and `ranklist.png` into the run directory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from src.metrics.functional import (
    compute_distance_matrix,
    evaluate_rank,
    re_ranking,
    topk_gallery,
)
from src.metrics.ranklist import plot_ranklist
from src.systems.steps import extract_embeddings
from src.utils import RankedLogger, extras, print_results_table, task_wrapper
from src.utils.checkpoints import check_checkpoint_file
from src.utils.config import (
    DATA_DERIVED_KWARGS,
    data_kwargs_for,
    quote_home_paths,
    register_resolvers,
)

log = RankedLogger(__name__)
register_resolvers()


def load_system_from_checkpoint(cfg: DictConfig, datamodule: Any) -> L.LightningModule:
    """Instantiate `cfg.system` and load `cfg.ckpt_path` into it, with errors naming the file."""
    path = check_checkpoint_file(cfg.ckpt_path, "ckpt_path")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint:
        raise ValueError(f"ckpt_path={path} is not a Lightning checkpoint (no 'state_dict' key)")
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
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("test")
    system = load_system_from_checkpoint(cfg, datamodule)

    use_gpu = torch.cuda.is_available() and cfg.trainer.get("accelerator") in (
        "gpu",
        "cuda",
        "auto",
    )
    device = torch.device("cuda" if use_gpu else "cpu")
    data = extract_split_features(system, datamodule.test_dataloader(), device, cfg.flip)
    rows, distmat = evaluate_features_table(data, cfg)
    print_results_table(rows)

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.json", "w") as f:
        json.dump({"ckpt_path": str(cfg.ckpt_path), **rows}, f, indent=2)
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
    sys.argv = quote_home_paths(sys.argv)
    main()
