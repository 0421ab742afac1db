"""`python -m src.extract ckpt_path=PATH images=DIR_OR_LIST out=FILE`: features of every image.

A folder is listed recursively (jpg/jpeg/png/bmp/webp), a list file gives one path per line. The
features are the checkpoint's retrieval features (:class:`src.inference.FeatureExtractor`).
``.npz`` output holds ``features`` (N, D) float32, ``paths`` (relative to the folder / list file),
``pids``/``camids`` when every name follows the Market-1501, DukeMTMC-reID or MSMT17 scheme,
``skipped`` (unreadable files), ``ckpt_sha256``, ``flip`` and ``normalized``; ``.npy`` holds the
features and ``<out>.paths.txt`` the paths. Unreadable files are skipped, counted and listed; with
``resume=true`` a re-run skips the images ``out`` already holds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from src.inference import FeatureExtractor, list_images, parse_reid_name
from src.systems.mar_init import file_sha256
from src.utils import RankedLogger

log = RankedLogger(__name__)

OUT_SUFFIXES = (".npz", ".npy")


@dataclass
class Features:
    """Features of a set of images (what an extract output file holds)."""

    paths: list[str]
    features: np.ndarray  # (N, D) float32
    skipped: list[str] = field(default_factory=list)
    ckpt_sha256: str = ""
    flip: bool = False
    normalized: bool = False

    def labels(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(pids, camids) when every file name follows a known re-ID naming scheme."""
        parsed = [parse_reid_name(p) for p in self.paths]
        if not parsed or any(x is None for x in parsed):
            return None
        return (
            np.array([x[0] for x in parsed], dtype=np.int64),  # type: ignore[index]
            np.array([x[1] for x in parsed], dtype=np.int64),  # type: ignore[index]
        )


def image_list(images: str | os.PathLike) -> tuple[Path, list[str]]:
    """(root, paths relative to root) of a folder (recursive) or a list file."""
    source = Path(images)
    if source.is_dir():
        return source, [str(p.relative_to(source)) for p in list_images(source)]
    if source.is_file():
        lines = source.read_text(encoding="utf-8").splitlines()
        paths = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
        if not paths:
            raise ValueError(f"images={source}: the list file names no image")
        return source.parent, paths
    raise FileNotFoundError(f"images={source}: no such folder or list file")


def _paths_file(out: Path) -> Path:
    return out.with_name(out.name + ".paths.txt")


def save_features(out: str | os.PathLike, feats: Features) -> None:
    """Write `feats` to `out` (.npz or .npy + .paths.txt), atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp{out.suffix}")
    if out.suffix == ".npz":
        extra: dict[str, Any] = {}
        labels = feats.labels()
        if labels is not None:
            extra = {"pids": labels[0], "camids": labels[1]}
        np.savez(
            tmp,
            features=feats.features.astype(np.float32),
            paths=np.array(feats.paths, dtype=str),
            skipped=np.array(feats.skipped, dtype=str),
            ckpt_sha256=np.array(feats.ckpt_sha256),
            flip=np.array(feats.flip),
            normalized=np.array(feats.normalized),
            **extra,
        )
    else:
        np.save(tmp, feats.features.astype(np.float32))
        _paths_file(out).write_text("".join(f"{p}\n" for p in feats.paths), encoding="utf-8")
    os.replace(tmp, out)


def load_features(path: str | os.PathLike) -> Features:
    """Read an extract output (.npz, or .npy with its .paths.txt)."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as z:
            return Features(
                paths=[str(p) for p in z["paths"]],
                features=z["features"],
                skipped=[str(p) for p in z["skipped"]],
                ckpt_sha256=str(z["ckpt_sha256"]),
                flip=bool(z["flip"]),
                normalized=bool(z["normalized"]),
            )
    paths_file = _paths_file(path)
    if not paths_file.is_file():
        raise FileNotFoundError(f"{path}: no {paths_file.name} next to it (its image paths)")
    paths = paths_file.read_text(encoding="utf-8").splitlines()
    return Features(paths=paths, features=np.load(path))


def extract_features(
    extractor: FeatureExtractor,
    root: str | os.PathLike,
    paths: Sequence[str],
    out: str | os.PathLike | None = None,
    resume: bool = True,
    ckpt_sha256: str = "",
    save_every: int = 10_000,
    progress: bool = False,
) -> Features:
    """Features of `root/path` for every path, in the order given; written to `out` (every
    `save_every` images and at the end) when given. With `resume` the rows an existing `out`
    holds for the same checkpoint and flip are reused."""
    out = Path(out) if out is not None else None
    done: dict[str, np.ndarray] = {}
    if out is not None and out.suffix not in OUT_SUFFIXES:
        raise ValueError(f"out={out}: expected a .npz or .npy file")
    if out is not None and resume and out.exists():
        previous = load_features(out)
        if out.suffix == ".npz" and (
            previous.ckpt_sha256 != ckpt_sha256 or previous.flip != extractor.flip
        ):
            raise ValueError(
                f"out={out} holds features of another checkpoint or flip setting: delete it, "
                "choose another out=, or pass resume=false"
            )
        done = dict(zip(previous.paths, previous.features))
        log.info(f"resume: {len(done)} images already in {out}")
    todo = [p for p in paths if p not in done]
    skipped: list[str] = []
    new: dict[str, np.ndarray] = {}

    def snapshot() -> Features:
        rows = {**done, **new}
        kept = [p for p in paths if p in rows]
        dim = next(iter(rows.values())).shape[0] if rows else 0
        feats = np.stack([rows[p] for p in kept]) if kept else np.zeros((0, dim), np.float32)
        return Features(
            kept, feats, list(skipped), ckpt_sha256, extractor.flip, extractor.normalize
        )

    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", disable=not progress, desc="extract")
    since_save = 0
    for positions, ok, feats in extractor.iter_files([Path(root, p) for p in todo]):
        kept = positions[ok].tolist()
        for row, i in enumerate(kept):
            new[todo[i]] = feats[row].numpy()
        skipped.extend(todo[i] for i in positions[~ok].tolist())
        bar.update(len(positions))
        since_save += len(positions)
        if out is not None and since_save >= save_every:
            save_features(out, snapshot())
            since_save = 0
    bar.close()
    result = snapshot()
    if out is not None:
        save_features(out, result)
    if skipped:
        log.warning(
            f"skipped {len(skipped)} unreadable image(s): "
            + ", ".join(skipped[:20])
            + (" ..." if len(skipped) > 20 else "")
        )
    return result


def extract(cfg: DictConfig) -> Features:
    """The CLI task: returns what was written to `cfg.out`."""
    extractor = FeatureExtractor.from_checkpoint(
        cfg.ckpt_path,
        device=cfg.device,
        flip=cfg.get("flip"),
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
    )
    root, paths = image_list(cfg.images)
    feats = extract_features(
        extractor,
        root,
        paths,
        out=cfg.out,
        resume=cfg.resume,
        ckpt_sha256=file_sha256(cfg.ckpt_path),
        save_every=cfg.save_every,
        progress=cfg.progress,
    )
    log.info(
        f"{len(feats.paths)} of {len(paths)} images -> {cfg.out} "
        f"(features {tuple(feats.features.shape)}, {len(feats.skipped)} skipped)"
    )
    return feats


@hydra.main(version_base="1.3", config_path="../conf", config_name="extract.yaml")
def main(cfg: DictConfig) -> None:
    torch.set_grad_enabled(False)
    extract(cfg)


if __name__ == "__main__":
    main()
