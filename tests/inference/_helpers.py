"""What the evaluator computes for a checkpoint: the reference of the inference tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F

from src.eval import extract_split_features
from src.metrics.functional import compute_distance_matrix, evaluate_rank
from src.systems import checkpoint_meta


@dataclass
class EvalReference:
    feats: torch.Tensor  # (N, D) evaluator features, L2-normalised when the protocol is cosine
    raw: torch.Tensor  # (N, D) evaluator features as extracted
    paths: list[str]  # image of each row
    pids: torch.Tensor
    camids: torch.Tensor
    is_query: torch.Tensor
    metric: str
    map_score: float


def eval_reference(ckpt: Path, flip: bool = False) -> EvalReference:
    """Features of the checkpoint's evaluation split as src.eval extracts them (its data
    config, its test loader, `extract_split_features`), and the mAP of its protocol."""
    checkpoint = checkpoint_meta.load_checkpoint(ckpt)
    meta = checkpoint_meta.read_metadata(checkpoint, ckpt)
    datamodule = hydra.utils.instantiate(meta["data"], _convert_="all")
    datamodule.setup("test")
    system = checkpoint_meta.load_system(ckpt)
    data = extract_split_features(system, datamodule.test_dataloader(), torch.device("cpu"), flip)
    records = [*datamodule.eval_data.query, *datamodule.eval_data.gallery]
    metric = meta["protocol"]["metric"]
    feats = F.normalize(data["feat"], dim=1) if metric == "cosine" else data["feat"]
    q = data["is_query"]
    dist = compute_distance_matrix(data["feat"][q], data["feat"][~q], metric=metric)
    _, mAP, _ = evaluate_rank(
        dist,
        data["pid"][q],
        data["pid"][~q],
        data["camid"][q],
        data["camid"][~q],
        ap=meta["protocol"]["ap"],
    )
    return EvalReference(
        feats=feats,
        raw=data["feat"],
        paths=[records[i].img_path for i in data["index"].tolist()],
        pids=data["pid"],
        camids=data["camid"],
        is_query=q,
        metric=metric,
        map_score=float(mAP),
    )
