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
import rich
import torch
from omegaconf import DictConfig

from src.metrics.ranklist import plot_ranklist
from src.metrics.reid_metric import evaluate_split
from src.systems.steps import extract_embeddings
from src.utils import RankedLogger, extras, print_results_table, task_wrapper
from src.utils.checkpoints import check_checkpoint_file
from src.utils.config import (
    DATA_DERIVED_KWARGS,
    data_kwargs_for,
    quote_home_paths,
    register_resolvers,
)
from src.utils.rich_utils import format_results_table

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
        # features stay on the device: the evaluation runs there (chunked)
        chunks["feat"].append(extract_embeddings(system.net, batch["img"].to(device), flip))
        for key in ("pid", "camid", "is_query", "index"):
            chunks[key].append(batch[key].to(device))
    return {k: torch.cat(v) for k, v in chunks.items()}


def evaluate_features_table(
    data: dict[str, torch.Tensor], cfg: DictConfig
) -> tuple[dict[str, dict[str, float]], torch.Tensor]:
    """Metrics without (and optionally with) re-ranking, plus top-10 gallery positions.

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
    rows, positions = {}, None
    settings = {"plain": None}
    if cfg.rerank:
        settings["re-ranked"] = (cfg.rerank_k1, cfg.rerank_k2, cfg.rerank_lambda)
    for name, rerank in settings.items():
        rows[name], topk = evaluate_split(data["feat"][q], data["feat"][g], labels, rerank=rerank,
                                          topk=10 if name == "plain" else None, **options)  # fmt: skip
        positions = topk if topk is not None else positions
    return rows, positions


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
    rows, (positions, matches) = evaluate_features_table(data, cfg)
    print_results_table(rows)
    if cfg.get("roc", False):
        rich.print(format_results_table(rows, keys=[k for k in rows["plain"] if "TPR@" in k]))

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "metrics.json", "w") as f:
        json.dump({"ckpt_path": str(cfg.ckpt_path), **rows}, f, indent=2)
    q, g = data["is_query"], ~data["is_query"]
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
