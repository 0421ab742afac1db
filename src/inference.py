"""Features of any images from a marlin checkpoint: ``FeatureExtractor`` (docs/inference.md).

    from src.inference import FeatureExtractor
    extractor = FeatureExtractor.from_checkpoint("logs/.../checkpoints/last.ckpt")
    feats = extractor("path/to/folder")            # (N, D) float32, folder listed recursively

The checkpoint's own test transform (size, interpolation, mean/std of its evaluation domain) is
applied, the retrieval feature is the one its evaluation uses (flip-averaged when asked), and the
features are L2-normalised when its protocol ranks by cosine distance.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from src.data.image_io import read_image
from src.data.records import ImageReadError, is_image_file
from src.data.transforms import build_transforms
from src.systems import checkpoint_meta
from src.systems.steps import extract_embeddings

__all__ = [
    "FeatureExtractor",
    "Preprocessing",
    "list_images",
    "parse_reid_name",
    "resolve_device",
]

ImageInput = str | os.PathLike | Image.Image | np.ndarray


@dataclass(frozen=True)
class Preprocessing:
    """The test transform of a checkpoint: resize to (height, width) with `interpolation`, to
    float in [0, 1], normalise with `mean`/`std` (RGB)."""

    height: int
    width: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], path: str | os.PathLike = "") -> Preprocessing:
        spec = meta.get("input")
        if not spec:
            raise ValueError(
                f"{path}: the checkpoint metadata has no input spec (data.mean=auto without a "
                "datamodule?): pass a Preprocessing to FeatureExtractor by hand"
            )
        return cls(
            int(spec["height"]),
            int(spec["width"]),
            tuple(float(m) for m in spec["mean"]),  # type: ignore[arg-type]
            tuple(float(s) for s in spec["std"]),  # type: ignore[arg-type]
            str(spec.get("interpolation", "bilinear")),
        )

    def transform(self) -> Callable[[Image.Image], Tensor]:
        """PIL image -> (3, height, width) float32: the evaluation's test transform."""
        return build_transforms(
            self.height, self.width, False, self.mean, self.std, interpolation=self.interpolation
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "height": self.height,
            "width": self.width,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """ "auto": CUDA when available, else MPS, else CPU; anything else as torch.device."""
    if str(device) != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under `folder`, recursively, sorted (extensions of
    :data:`src.data.records.IMAGE_EXTENSIONS`: jpg, jpeg, png, bmp, webp; hidden files skipped)."""
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder of images")
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and is_image_file(p.name) and not p.name.startswith(".")
    )


_MARKET = re.compile(r"^(-1|\d+)_c(\d+)s\d+_\d+_\d+\.", flags=re.ASCII)
_DUKE = re.compile(r"^(-1|\d+)_c(\d+)_f\d+\.", flags=re.ASCII)
_MSMT = re.compile(r"^(\d+)_\d+_(\d+)_\w+_\d+_\d+\.", flags=re.ASCII)


def parse_reid_name(name: str) -> tuple[int, int] | None:
    """(pid, camid 0-based) from a Market-1501 (``0002_c1s1_000451_03.jpg``), DukeMTMC-reID
    (``0001_c2_f0046182.jpg``) or MSMT17 (``0000_000_01_0303morning_0015_0.jpg``) file name,
    the ids the dataset parsers read; None for any other name."""
    base = os.path.basename(name)
    for pattern in (_MARKET, _DUKE, _MSMT):
        match = pattern.match(base)
        if match and int(match.group(2)) >= 1:
            return int(match.group(1)), int(match.group(2)) - 1
    return None


class _ImageFiles(Dataset):
    """Paths -> {"img", "ok", "i"}; an unreadable file gives ok=False and a zero image."""

    def __init__(self, paths: Sequence[str | os.PathLike], transform: Callable, shape: tuple):
        self.paths = [str(p) for p in paths]
        self.transform = transform
        self.shape = shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            img = self.transform(read_image(self.paths[i]))
            ok = True
        except (ImageReadError, OSError, ValueError):
            img, ok = torch.zeros(self.shape), False
        return {"img": img, "ok": ok, "i": i}


class FeatureExtractor:
    """Retrieval features of images with a checkpoint's network and preprocessing.

    Args:
        net: a network with ``embed(images) -> (N, D)`` (a :class:`src.models.ReIDNet`).
        preprocessing: the test transform.
        normalize: L2-normalise the features (the protocol ranks by cosine distance).
        flip: average each image's features with its horizontal mirror's.
        device: "auto", "cpu", "cuda", ...
        batch_size: images per forward pass.
        num_workers: DataLoader workers for decoding image files.
        metadata: the checkpoint's metadata (kept for callers: protocol, datasets, ...).

    Calling it on a path (a file, or a folder listed recursively), a PIL image, a uint8
    ``(H, W, 3)`` / ``(N, H, W, 3)`` RGB array, or a list of these returns ``(N, D)`` float32
    features on the CPU, in input order. Unreadable files raise an ``ImageReadError`` naming the
    file (:meth:`extract_files` skips and reports them instead).
    """

    def __init__(
        self,
        net: nn.Module,
        preprocessing: Preprocessing,
        normalize: bool = False,
        flip: bool = False,
        device: str | torch.device = "auto",
        batch_size: int = 64,
        num_workers: int = 0,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.net = net.eval().to(self.device)
        self.preprocessing = preprocessing
        self.transform = preprocessing.transform()
        self.normalize = normalize
        self.flip = flip
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.metadata = metadata or {}

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "auto",
        flip: bool | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> FeatureExtractor:
        """The network, preprocessing and protocol of a self-describing checkpoint.

        `flip=None` follows the checkpoint's protocol (``system.flip_test``, false in every
        shipped recipe); True/False force it.
        """
        checkpoint = checkpoint_meta.load_checkpoint(path)
        meta = checkpoint_meta.read_metadata(checkpoint, path)
        system = checkpoint_meta.load_system(path, compile=False)
        protocol = meta["protocol"]
        return cls(
            system.net,
            Preprocessing.from_metadata(meta, path),
            normalize=protocol["metric"] == "cosine",
            flip=bool(protocol["flip"]) if flip is None else bool(flip),
            device=device,
            batch_size=batch_size,
            num_workers=num_workers,
            metadata={**meta, "ckpt_path": str(path)},
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.preprocessing.height, self.preprocessing.width)

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """Preprocessed images (N, 3, H, W) -> features (N, D) float32 on the CPU."""
        feats = extract_embeddings(self.net, images.to(self.device), self.flip)
        if self.normalize:
            feats = F.normalize(feats, dim=1)
        return feats.cpu()

    def _to_pil(self, item: Any) -> Image.Image:
        if isinstance(item, Image.Image):
            return item.convert("RGB")
        if isinstance(item, np.ndarray):
            if item.dtype != np.uint8 or item.ndim != 3 or item.shape[2] != 3:
                raise ValueError(
                    f"arrays must be uint8 RGB (H, W, 3) images, got {item.dtype} {item.shape}"
                )
            return Image.fromarray(item, mode="RGB")
        if isinstance(item, (str, os.PathLike)):
            return read_image(str(item))
        raise TypeError(
            f"cannot extract features of a {type(item).__name__}: pass paths, PIL images or "
            "uint8 (H, W, 3) arrays"
        )

    def _flatten(self, images: Any) -> list[Any]:
        if isinstance(images, (str, os.PathLike)) and Path(images).is_dir():
            files = list_images(images)
            if not files:
                raise FileNotFoundError(f"{images}: no image files in this folder")
            return list(files)
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)
        if isinstance(images, (list, tuple)):
            return [x for item in images for x in self._flatten(item)]
        return [images]

    def __call__(self, images: ImageInput | Sequence[ImageInput]) -> Tensor:
        items = self._flatten(images)
        chunks = [torch.zeros(0)]
        for start in range(0, len(items), self.batch_size):
            batch = torch.stack(
                [self.transform(self._to_pil(x)) for x in items[start : start + self.batch_size]]
            )
            chunks.append(self.embed(batch))
        return torch.cat(chunks[1:]) if len(chunks) > 1 else torch.zeros(0, 0)

    def iter_files(
        self, paths: Sequence[str | os.PathLike]
    ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Batches of ``(positions (B,) into paths, ok (B,) bool, features (B_ok, D))`` for image
        files decoded by a DataLoader; unreadable files come back with ok=False, no feature."""
        dataset = _ImageFiles(paths, self.transform, self.input_shape)
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        for batch in loader:
            ok = batch["ok"].bool()
            feats = self.embed(batch["img"][ok]) if ok.any() else torch.zeros(0, 0)
            yield batch["i"], ok, feats
