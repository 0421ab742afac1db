"""Re-ID image transforms (torchvision v2) and per-dataset normalisation statistics."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from src.data.image_dataset import ImageDataset
from src.data.records import ReIDRecord

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_INTERPOLATIONS = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


class PadCrop(torch.nn.Module):
    """Zero-pad by ``pad`` pixels and crop a random (height, width) window, in one PIL crop.

    The same output and the same random draws (``torch.randint`` for the top, then the left
    offset) as ``v2.Pad(pad, fill=0)`` followed by ``v2.RandomCrop((height, width))`` on an
    image of size (height, width): PIL's ``crop`` fills the area outside the image with 0.
    """

    def __init__(self, height: int, width: int, pad: int) -> None:
        super().__init__()
        self.height, self.width, self.pad = height, width, pad

    def forward(self, img: Image.Image) -> Image.Image:
        if img.size != (self.width, self.height):
            raise ValueError(
                f"PadCrop expects a {self.width}x{self.height} image (after the resize), got "
                f"{img.size[0]}x{img.size[1]}"
            )
        p = self.pad
        top = int(torch.randint(0, 2 * p + 1, size=()))
        left = int(torch.randint(0, 2 * p + 1, size=()))
        return img.crop((left - p, top - p, left - p + self.width, top - p + self.height))


def build_transforms(
    height: int,
    width: int,
    train: bool,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    flip_p: float = 0.5,
    pad: int = 10,
    random_erasing_p: float = 0.5,
    erasing_scale: tuple[float, float] = (0.02, 0.4),
    erasing_ratio: tuple[float, float] = (0.3, 3.33),
    erasing_value: str = "mean",
    interpolation: str = "bilinear",
    color_jitter: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    color_jitter_p: float = 0.0,
    grayscale_p: float = 0.0,
) -> T.Compose:
    """PIL image -> FloatTensor (3, height, width), normalised.

    Train: resize, random horizontal flip (`flip_p`), zero-pad by `pad` pixels and random crop back
    to (height, width) (these three on the PIL image: `PadCrop`), colour jitter (probability `color_jitter_p`), random greyscale
    (`grayscale_p`), to float in [0, 1], normalise, random erasing (Zhong et al., AAAI 2020;
    probability `random_erasing_p`, area fraction `erasing_scale`, aspect `erasing_ratio`). Test:
    resize, to float, normalise. Probabilities of 0 (or pad 0) remove the step.

    The resize is PIL's (its antialiased filter, as the reference code's torchvision v1
    ``Resize`` on PIL images); resizing an image that already has the size returns it unchanged,
    so an image from `DecodedImageCache` (stored resized) gives the same output as its file.

    Colour jitter and greyscale are off by default: the re-ID recipes here do not use them
    (clothing colour is the strongest identity cue; on the synthetic benchmark they cost a
    source model 54 mAP on its own domain and 13 on the other, docs/mar.md). They are options
    for studies of photometric invariance.

    Args:
        erasing_value: "mean" fills the erased box with the normalisation mean (0 after
            normalising, as in the usual re-ID baselines); "random" fills it with N(0, 1) noise.
        interpolation: resize filter, "bilinear", "bicubic" or "nearest".
        color_jitter: (brightness, contrast, saturation, hue) strengths of torchvision's
            `ColorJitter` (factors drawn in [1 - s, 1 + s], hue shift in [-h, h], h <= 0.5).
        color_jitter_p: probability of applying the colour jitter to an image.
        grayscale_p: probability of converting an image to greyscale (3 equal channels).
    """
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
    if erasing_value not in ("mean", "random"):
        raise ValueError(f"erasing_value must be 'mean' or 'random', got {erasing_value!r}")
    if len(color_jitter) != 4 or min(color_jitter) < 0 or color_jitter[3] > 0.5:
        raise ValueError(
            "color_jitter needs 4 non-negative values (brightness, contrast, saturation, hue), "
            f"hue <= 0.5, got {list(color_jitter)}"
        )
    for name, p in (("color_jitter_p", color_jitter_p), ("grayscale_p", grayscale_p)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
    # PIL side: resize, flip, pad + crop (cheaper on small images than tensor kernels)
    steps: list[Any] = [
        T.Resize((height, width), interpolation=_INTERPOLATIONS[interpolation], antialias=True)
    ]
    if train:
        if flip_p > 0:
            steps.append(T.RandomHorizontalFlip(flip_p))
        if pad > 0:
            steps.append(PadCrop(height, width, pad))
    steps.append(T.ToImage())
    if train:
        if color_jitter_p > 0 and max(color_jitter) > 0:
            b, c, s, h = (float(v) for v in color_jitter)
            jitter = T.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)
            steps.append(T.RandomApply([jitter], p=color_jitter_p))
        if grayscale_p > 0:
            steps.append(T.RandomGrayscale(grayscale_p))
    steps += [
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(mean=list(map(float, mean)), std=list(map(float, std))),
    ]
    if train and random_erasing_p > 0:
        value: Any = 0.0 if erasing_value == "mean" else "random"
        steps.append(
            T.RandomErasing(random_erasing_p, scale=erasing_scale, ratio=erasing_ratio, value=value)
        )
    return T.Compose(steps)


def compute_mean_std(
    records: Sequence[ReIDRecord],
    height: int,
    width: int,
    batch_size: int = 64,
    num_workers: int = 0,
) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the pixels of `records`, resized to (height, width), in [0, 1].

    Exact over all pixels (float64 sums of x and x²), the statistics that `Normalize` should use.
    """
    if not records:
        raise ValueError("compute_mean_std needs at least one record")
    dataset = ImageDataset(records, build_transforms(height, width, False, (0, 0, 0), (1, 1, 1)))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    total = torch.zeros(3, dtype=torch.float64)
    total_sq = torch.zeros(3, dtype=torch.float64)
    for batch in loader:
        x = batch["img"].double()  # (B, 3, H, W)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    n = len(records) * height * width
    mean = total / n
    std = (total_sq / n - mean.square()).clamp(min=0).sqrt()
    return mean.tolist(), std.tolist()


def cached_mean_std(
    records: Sequence[ReIDRecord],
    height: int,
    width: int,
    cache_dir: str,
    num_workers: int = 0,
) -> tuple[list[float], list[float]]:
    """:func:`compute_mean_std`, cached in ``cache_dir/.marlin_mean_std.json``.

    The key hashes the image paths, sizes and modification times and the resolution, so a changed
    dataset is recomputed. An unwritable `cache_dir` only logs a warning. The file is replaced
    atomically, so concurrent ranks do not corrupt it.
    """
    digest = hashlib.sha1(f"{height}x{width}".encode())
    for r in records:
        st = os.stat(r.img_path)
        digest.update(f"{r.img_path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    key = digest.hexdigest()
    path = os.path.join(cache_dir, ".marlin_mean_std.json")
    cache: dict[str, Any] = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
    if key in cache:
        return cache[key]["mean"], cache[key]["std"]
    mean, std = compute_mean_std(records, height, width, num_workers=num_workers)
    cache[key] = {"mean": mean, "std": std, "images": len(records), "size": [height, width]}
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        log.warning(f"could not cache mean/std in {path}: {e}")
    return mean, std
