"""`python -m src.search ckpt_path=PATH query=IMG_OR_DIR gallery=DIR topk=10`: image search.

Ranks the gallery for every query by the checkpoint's distance (its protocol's metric) on its
retrieval features, prints the top-k table and writes a rank-list PNG (query, then the top-k
with their distances; ids and cameras when the file names carry them, frames green/red for
same/other identity). Gallery features are cached next to the gallery, keyed by the checkpoint's
SHA-256 (:func:`src.extract.extract_features` with resume). docs/inference.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from src.extract import Features, extract_features, image_list
from src.inference import FeatureExtractor, parse_reid_name
from src.metrics.functional import compute_distance_matrix, topk_gallery
from src.systems.mar_init import file_sha256
from src.utils import RankedLogger

log = RankedLogger(__name__)

CACHE_DIR = ".marlin_features"


@dataclass
class SearchResult:
    """Top-k gallery images of each query.

    query_paths (Q,), gallery_paths (G,): images (the query's as given, the gallery's relative
    to the gallery folder). indices (Q, k) int64: gallery rows in rank order (-1: none left),
    distances (Q, k) float32.
    """

    query_paths: list[str]
    gallery_paths: list[str]
    indices: np.ndarray
    distances: np.ndarray
    metric: str


def gallery_features(
    extractor: FeatureExtractor,
    gallery: str | os.PathLike,
    ckpt_sha256: str,
    cache: bool = True,
    progress: bool = False,
) -> Features:
    """Features of every image under `gallery`; cached in ``<gallery>/.marlin_features/`` per
    checkpoint and flip (an unwritable gallery folder only disables the cache)."""
    root, paths = image_list(gallery)
    if not paths:
        raise FileNotFoundError(f"gallery={gallery}: no images in this folder")
    out = None
    if cache:
        out = Path(root, CACHE_DIR, f"{ckpt_sha256[:16]}_flip{int(extractor.flip)}.npz")
        try:
            out.parent.mkdir(exist_ok=True)
        except OSError as err:
            log.warning(f"gallery feature cache disabled ({out.parent}: {err})")
            out = None
    feats = extract_features(
        extractor, root, paths, out=out, resume=True, ckpt_sha256=ckpt_sha256, progress=progress
    )
    if out is not None:  # the cache may hold images since removed: keep the current ones
        wanted = set(paths)
        keep = [i for i, p in enumerate(feats.paths) if p in wanted]
        feats = Features(
            [feats.paths[i] for i in keep], feats.features[keep], feats.skipped, ckpt_sha256
        )
    return feats


def _labels(paths: list[str], what: str) -> tuple[torch.Tensor, torch.Tensor]:
    parsed = [parse_reid_name(p) for p in paths]
    missing = [p for p, x in zip(paths, parsed) if x is None]
    if missing:
        raise ValueError(
            f"protocol_filter=true needs {what} names with ids and cameras (Market-1501, "
            f"DukeMTMC-reID or MSMT17 scheme); e.g. {missing[0]!r} has none"
        )
    pids = torch.tensor([x[0] for x in parsed])  # type: ignore[index]
    camids = torch.tensor([x[1] for x in parsed])  # type: ignore[index]
    return pids, camids


def rank_gallery(
    query_feats: torch.Tensor,
    gallery_feats: torch.Tensor,
    metric: str,
    topk: int,
    query_paths: list[str] | None = None,
    gallery_paths: list[str] | None = None,
    protocol_filter: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices (Q, k), distances (Q, k)) of the nearest gallery rows (ties: lower row first).

    `protocol_filter`: the evaluation's ranking (:func:`topk_gallery`): gallery junk (id -1) and
    same-identity same-camera images are skipped; needs names with ids and cameras."""
    dist = compute_distance_matrix(query_feats, gallery_feats, metric=metric)
    k = min(topk, dist.shape[1])
    if not protocol_filter:
        order = torch.sort(dist, dim=1, stable=True).indices[:, :k]
        return order.numpy(), torch.gather(dist, 1, order).numpy()
    q_pids, q_cams = _labels(query_paths or [], "query")
    g_pids, g_cams = _labels(gallery_paths or [], "gallery")
    valid = torch.nonzero(g_pids != -1).squeeze(1)
    positions, _, distances = topk_gallery(
        dist[:, valid], q_pids, g_pids[valid], q_cams, g_cams[valid], k=k
    )
    indices = torch.where(positions >= 0, valid[positions.clamp(min=0)], -1)
    return indices.numpy(), distances.float().numpy()


def _caption(path: str, rank: int | None, distance: float | None) -> str:
    label = parse_reid_name(path)
    head = "query" if rank is None else f"{rank}: {distance:.3f}"
    return head if label is None else f"{head}\nid {label[0]} c{label[1] + 1}"


def draw_results(
    result: SearchResult,
    query_root: Path | None,
    gallery_root: Path,
    out: str | os.PathLike,
    max_queries: int = 16,
    image_size: tuple[int, int] = (128, 64),
) -> Path:
    """Rank-list PNG: a row per query (at most `max_queries`), its top-k with distances, ids and
    cameras; frames green (same id as the query) / red (other id) / grey (ids unknown)."""
    from matplotlib.figure import Figure

    from src.metrics.ranklist import _tile  # the evaluation rank list's tile

    rows = min(max_queries, len(result.query_paths))
    k = result.indices.shape[1]
    fig = Figure(figsize=((k + 1) * 0.95, rows * 1.9))
    axes = fig.subplots(rows, k + 1, squeeze=False)
    border = max(2, min(image_size) // 20)
    for r in range(rows):
        qpath = result.query_paths[r]
        qlabel = parse_reid_name(qpath)
        full = Path(qpath) if query_root is None else query_root / qpath
        axes[r, 0].imshow(_tile(full, image_size, border, (40, 40, 40)))
        axes[r, 0].set_title(_caption(qpath, None, None), fontsize=6)
        for j in range(k):
            g = int(result.indices[r, j])
            if g < 0:
                axes[r, j + 1].imshow(_tile(None, image_size, border, (235, 235, 235)))
                continue
            gpath = result.gallery_paths[g]
            glabel = parse_reid_name(gpath)
            color = (150, 150, 150)
            if qlabel is not None and glabel is not None:
                color = (0, 170, 0) if glabel[0] == qlabel[0] else (220, 0, 0)
            axes[r, j + 1].imshow(_tile(gallery_root / gpath, image_size, border, color))
            axes[r, j + 1].set_title(
                _caption(gpath, j + 1, float(result.distances[r, j])), fontsize=6
            )
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


def print_results(result: SearchResult, max_queries: int = 16) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Search ({result.metric} distance)")
    for name in ("query", "rank", "gallery image", "distance", "id / camera"):
        table.add_column(name)
    for r, qpath in enumerate(result.query_paths[:max_queries]):
        for j, g in enumerate(result.indices[r].tolist()):
            if g < 0:
                continue
            label = parse_reid_name(result.gallery_paths[g])
            table.add_row(
                qpath if j == 0 else "",
                str(j + 1),
                result.gallery_paths[g],
                f"{result.distances[r, j]:.4f}",
                "-" if label is None else f"{label[0]} / c{label[1] + 1}",
            )
    Console().print(table)


def search(cfg: DictConfig) -> SearchResult:
    """The CLI task."""
    extractor = FeatureExtractor.from_checkpoint(
        cfg.ckpt_path,
        device=cfg.device,
        flip=cfg.get("flip"),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
    )
    sha = file_sha256(cfg.ckpt_path)
    gallery = gallery_features(extractor, cfg.gallery, sha, cfg.cache, cfg.progress)
    query_source = Path(cfg.query)
    if query_source.is_dir():
        query_root, query_paths = image_list(query_source)
        query_root = Path(query_root)
    elif query_source.is_file():
        query_root, query_paths = None, [str(query_source)]
    else:
        raise FileNotFoundError(f"query={query_source}: no such image or folder")
    full = [Path(p) if query_root is None else query_root / p for p in query_paths]
    query_feats = extractor(full)
    indices, distances = rank_gallery(
        query_feats,
        torch.from_numpy(gallery.features),
        extractor.metadata["protocol"]["metric"],
        cfg.topk,
        [os.path.basename(p) for p in query_paths],
        [os.path.basename(p) for p in gallery.paths],
        cfg.protocol_filter,
    )
    result = SearchResult(
        query_paths, gallery.paths, indices, distances, extractor.metadata["protocol"]["metric"]
    )
    print_results(result, cfg.max_queries_drawn)
    out = Path(cfg.out) if cfg.out else Path(cfg.paths.output_dir, "search.png")
    draw_results(result, query_root, Path(cfg.gallery), out, cfg.max_queries_drawn)
    log.info(f"rank lists of {len(query_paths)} queries in {out}")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="search.yaml")
def main(cfg: DictConfig) -> None:
    torch.set_grad_enabled(False)
    search(cfg)


if __name__ == "__main__":
    main()
