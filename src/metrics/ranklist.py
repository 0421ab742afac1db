"""Rank-list picture: each query followed by its top-k gallery images, framed green / red."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["plot_ranklist"]

_TRUE = (0, 170, 0)
_FALSE = (220, 0, 0)
_QUERY = (40, 40, 40)
_EMPTY = (235, 235, 235)


def _as_2d(x: object, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (num_queries, k) array, got shape {arr.shape}")
    return arr


def _tile(path: str | os.PathLike | None, size: tuple[int, int], border: int, color) -> np.ndarray:
    """An RGB tile of `size` (height, width) with a coloured frame; grey when path is None."""
    height, width = size
    inner = (width - 2 * border, height - 2 * border)
    if path is None:
        img = Image.new("RGB", inner, _EMPTY)
    else:
        try:
            with Image.open(path) as src:
                img = src.convert("RGB").resize(inner, Image.BILINEAR)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"rank list: image {path} does not exist") from err
        except OSError as err:
            raise OSError(f"rank list: cannot read image {path}: {err}") from err
    return np.asarray(ImageOps.expand(img, border=border, fill=color))


def plot_ranklist(
    query_paths: Sequence[str | os.PathLike],
    gallery_paths: Sequence[str | os.PathLike],
    topk_indices: object,
    matches: object,
    out_path: str | os.PathLike,
    num_queries: int = 8,
    topk: int = 10,
    rows: Sequence[int] | None = None,
    image_size: tuple[int, int] = (128, 64),
) -> Path:
    """Write a PNG: one row per query, the query image then its top-k gallery images.

    Args:
        query_paths: image path of each query; row i of ``topk_indices`` belongs to query i.
        gallery_paths: image path of each gallery item, indexed by ``topk_indices``.
        topk_indices: (num_q, >=topk) gallery indices in rank order (numpy or torch; -1 = none),
            e.g. from :func:`~src.metrics.functional.topk_gallery`.
        matches: (num_q, >=topk) bool, True where the gallery item is a true match (green
            frame), False otherwise (red frame).
        out_path: PNG file to write (parent folders are created).
        num_queries: how many queries to draw (the first ones, unless ``rows`` is given).
        topk: how many gallery images per query.
        rows: which query rows to draw (overrides num_queries).
        image_size: (height, width) of each tile in pixels, frame included.

    Returns:
        The path written.
    """
    # A bare Figure renders with Agg without touching pyplot's global backend or figure list.
    from matplotlib.figure import Figure

    indices, flags = _as_2d(topk_indices, "topk_indices"), _as_2d(matches, "matches")
    if indices.shape != flags.shape:
        raise ValueError(f"topk_indices {indices.shape} and matches {flags.shape} differ in shape")
    if indices.shape[0] != len(query_paths):
        raise ValueError(
            f"topk_indices has {indices.shape[0]} rows but there are {len(query_paths)} queries"
        )
    topk = min(topk, indices.shape[1])
    chosen = list(rows) if rows is not None else list(range(min(num_queries, len(query_paths))))
    if not chosen or topk < 1:
        raise ValueError("plot_ranklist: nothing to draw (no query row or topk < 1)")
    border = max(2, min(image_size) // 20)

    fig = Figure(figsize=((topk + 1) * 0.9, len(chosen) * 1.7))
    axes = fig.subplots(len(chosen), topk + 1, squeeze=False)
    for r, qi in enumerate(chosen):
        axes[r, 0].imshow(_tile(query_paths[qi], image_size, border, _QUERY))
        axes[r, 0].set_title("query", fontsize=7)
        for j in range(topk):
            g = int(indices[qi, j])
            path = gallery_paths[g] if g >= 0 else None
            color = _TRUE if bool(flags[qi, j]) else _FALSE
            axes[r, j + 1].imshow(_tile(path, image_size, border, color))
            axes[r, j + 1].set_title(str(j + 1), fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out
