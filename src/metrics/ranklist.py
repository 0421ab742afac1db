"""Rank-list picture: each query followed by its top-k gallery images, framed green / red."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["RankListRows", "plot_ranklist", "select_queries", "write_ranklist"]

_TRUE = (0, 170, 0)
_FALSE = (220, 0, 0)
_QUERY = (40, 40, 40)
_EMPTY = (235, 235, 235)


def _as_2d(x: object, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (num_queries, k) array, got shape {arr.shape}")
    return arr


def _as_ap(x: object) -> np.ndarray:
    """(Q,) float64 per-query AP from numpy or torch (NaN: not scored)."""
    return np.asarray(x.detach().cpu() if hasattr(x, "detach") else x, dtype=float)


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
    query_titles: Sequence[str] | None = None,
    tile_titles: Sequence[Sequence[str]] | None = None,
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
        query_titles: a title per drawn row (default "query").
        tile_titles: per drawn row, a title per gallery tile (default its rank).

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
    for name, titles in (("query_titles", query_titles), ("tile_titles", tile_titles)):
        if titles is not None and len(titles) != len(chosen):
            raise ValueError(
                f"plot_ranklist: {name} has {len(titles)} entries for {len(chosen)} rows"
            )
    fontsize = 7 if query_titles is None and tile_titles is None else 5.5
    border = max(2, min(image_size) // 20)

    fig = Figure(figsize=((topk + 1) * 0.9, len(chosen) * (1.7 if tile_titles is None else 1.85)))
    axes = fig.subplots(len(chosen), topk + 1, squeeze=False)
    for r, qi in enumerate(chosen):
        axes[r, 0].imshow(_tile(query_paths[qi], image_size, border, _QUERY))
        axes[r, 0].set_title(query_titles[r] if query_titles else "query", fontsize=fontsize)
        for j in range(topk):
            g = int(indices[qi, j])
            path = gallery_paths[g] if g >= 0 else None
            color = _TRUE if bool(flags[qi, j]) else _FALSE
            axes[r, j + 1].imshow(_tile(path, image_size, border, color))
            title = tile_titles[r][j] if tile_titles else str(j + 1)
            axes[r, j + 1].set_title(title, fontsize=fontsize)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    return out


def select_queries(
    query_ap: object, num_worst: int, num_random: int, seed: int = 0
) -> list[tuple[int, str]]:
    """The query rows a rank list shows: ``(row, "worst")`` for the `num_worst` lowest-AP
    queries (lowest first; ties: lower row first), then ``(row, "random")`` for `num_random`
    of the others drawn uniformly with `seed` (ascending; the same rows at every epoch for the
    same query set, so that successive pictures compare). Queries with a NaN AP (no true match
    in the gallery, not scored) are never drawn."""
    ap = _as_ap(query_ap)
    if num_worst < 0 or num_random < 0:
        raise ValueError(f"num_worst and num_random must be >= 0, got {num_worst}, {num_random}")
    scored = np.flatnonzero(~np.isnan(ap))
    worst = scored[np.argsort(ap[scored], kind="stable")][:num_worst]
    rest = np.setdiff1d(scored, worst)
    pick = np.random.default_rng(seed).permutation(len(rest))[: min(num_random, len(rest))]
    random_rows = np.sort(rest[pick])
    return [(int(r), "worst") for r in worst] + [(int(r), "random") for r in random_rows]


class RankListRows(Sequence):
    """Per-query data a rank list shows, aligned with the rank-list arrays' rows."""

    def __init__(self, paths: Sequence[str], pids: Sequence[int], camids: Sequence[int]) -> None:
        if not len(paths) == len(pids) == len(camids):
            raise ValueError("RankListRows: paths, pids and camids differ in length")
        self.paths, self.pids, self.camids = list(paths), list(pids), list(camids)

    @classmethod
    def from_records(cls, records: Sequence) -> RankListRows:
        """From records with ``img_path``, ``pid`` and ``camid`` (e.g. ``ReIDRecord``)."""
        return cls([r.img_path for r in records], [r.pid for r in records],
                   [r.camid for r in records])  # fmt: skip

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i):  # type: ignore[override]
        return self.paths[i], int(self.pids[i]), int(self.camids[i])


def write_ranklist(
    out_path: str | os.PathLike,
    queries: RankListRows,
    gallery: RankListRows,
    positions: object,
    matches: object,
    distances: object,
    query_ap: object,
    num_worst: int = 5,
    num_random: int = 5,
    seed: int = 0,
    topk: int = 10,
) -> tuple[Path, Path]:
    """Write the rank lists of the worst and of randomly drawn queries (:func:`select_queries`):
    a PNG (each tile titled with identity, camera and distance; each query with its AP) and,
    next to it with the suffix ``.tsv``, one line per (query, rank) with the same facts.

    Args:
        out_path: the PNG to write (``<stem>.tsv`` goes beside it).
        queries, gallery: paths, pids and camids of the query / gallery rows.
        positions: (Q, k) gallery rows in rank order (-1: none); matches: (Q, k) bool;
            distances: (Q, k); query_ap: (Q,) AP per query (NaN: not scored).

    Returns:
        (PNG path, TSV path).
    """
    indices, flags = _as_2d(positions, "positions"), _as_2d(matches, "matches")
    dists = _as_2d(distances, "distances").astype(float)
    ap = _as_ap(query_ap)
    if not (indices.shape == flags.shape == dists.shape) or indices.shape[0] != len(queries):
        raise ValueError(
            f"write_ranklist: positions {indices.shape}, matches {flags.shape}, distances "
            f"{dists.shape} must agree and have one row per query ({len(queries)})"
        )
    topk = min(topk, indices.shape[1])
    chosen = select_queries(ap, num_worst, num_random, seed)
    if not chosen:
        raise ValueError("write_ranklist: no query with a true match to show")
    out = Path(out_path)
    tsv = out.with_suffix(".tsv")
    tsv.parent.mkdir(parents=True, exist_ok=True)
    query_titles, tile_titles = [], []
    with open(tsv, "w") as f:
        f.write(
            "selection\tquery\tquery_pid\tquery_camid\tquery_AP\trank\tgallery\t"
            "gallery_pid\tgallery_camid\tdistance\tmatch\n"
        )
        for row, selection in chosen:
            q_path, q_pid, q_cam = queries[row]
            query_titles.append(f"{selection} · id {q_pid} c{q_cam}\nAP {ap[row]:.2f}")
            titles = []
            for j in range(topk):
                g = int(indices[row, j])
                if g < 0:
                    titles.append(f"{j + 1}: -")
                    continue
                g_path, g_pid, g_cam = gallery[g]
                titles.append(f"{j + 1}: id {g_pid} c{g_cam}\n{dists[row, j]:.3f}")
                f.write(
                    f"{selection}\t{q_path}\t{q_pid}\t{q_cam}\t{ap[row]:.6f}\t{j + 1}\t{g_path}\t"
                    f"{g_pid}\t{g_cam}\t{dists[row, j]:.6f}\t{int(bool(flags[row, j]))}\n"
                )
            tile_titles.append(titles)
    plot_ranklist(
        query_paths=queries.paths,
        gallery_paths=gallery.paths,
        topk_indices=indices,
        matches=flags,
        out_path=out,
        topk=topk,
        rows=[row for row, _ in chosen],
        query_titles=query_titles,
        tile_titles=tile_titles,
    )
    return out, tsv
