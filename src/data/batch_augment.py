"""The default train augmentation, applied to the whole batch on its device.

The per-sample pipeline (:func:`src.data.transforms.build_transforms`: PIL resize, flip, zero-pad
+ random crop, to float, normalise, random erasing) costs the loader workers ~0.2 ms per image,
and on a small CPU machine the workers share the cores with the training step (the default run's
step was 1.15x its in-memory limit with the image cache). Here the loader only resizes (PIL, or
the image cache) and *draws* each sample's random parameters, in the per-sample pipeline's order
and from the sample's seeded generator (:mod:`src.data.seeding`); the main process then applies
them to the uint8 batch at once (:func:`apply_train_augment`, in
``ReIDDataModule.on_after_batch_transfer``): a few vectorised tensor operations, on the GPU
when there is one, without a host sync.

The result is bit-identical to the per-sample pipeline for the same seeds (integer flip and
crop, then the same float32 operations in the same order; tested), so exact resume and every
recipe are unchanged. Colour jitter, greyscale and noise-filled erasing (``erasing_value:
random``) have no batched form here: with them the DataModule keeps the per-sample pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2 as T

__all__ = ["AugmentedImage", "TrainAugmentParams", "apply_train_augment", "augment_batch"]

#: columns of the per-sample parameter vector
FLIP, TOP, LEFT, ERASE_I, ERASE_J, ERASE_H, ERASE_W = range(7)
NUM_PARAMS = 7


class AugmentedImage(NamedTuple):
    """A resized uint8 (3, H, W) image, its augmentation parameters (7,) int64 and its
    normalisation (6,) float32 (mean then std), to be applied batch-wise."""

    img: Tensor
    params: Tensor
    norm: Tensor


class TrainAugmentParams:
    """PIL image -> :class:`AugmentedImage`: resize as the per-sample pipeline does, then draw
    the flip, crop offsets and erasing box with the same calls in the same order as
    ``build_transforms(..., train=True)`` would (v2 ``RandomHorizontalFlip``, ``PadCrop``, v2
    ``RandomErasing``), so that :func:`apply_train_augment` reproduces its output exactly.

    Args: as :func:`src.data.transforms.build_transforms` (the batchable subset).
    """

    def __init__(
        self,
        height: int,
        width: int,
        mean: Sequence[float],
        std: Sequence[float],
        flip_p: float = 0.5,
        pad: int = 10,
        random_erasing_p: float = 0.5,
        erasing_scale: tuple[float, float] = (0.02, 0.4),
        erasing_ratio: tuple[float, float] = (0.3, 3.33),
        interpolation: str = "bilinear",
    ) -> None:
        from src.data.transforms import _INTERPOLATIONS

        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}")
        self.height, self.width = int(height), int(width)
        self.flip_p, self.pad, self.erasing_p = float(flip_p), int(pad), float(random_erasing_p)
        self.resize = T.Compose(
            [
                T.Resize((height, width), interpolation=_INTERPOLATIONS[interpolation],
                         antialias=True),
                T.ToImage(),
            ]
        )  # fmt: skip
        self.erasing = T.RandomErasing(
            random_erasing_p, scale=erasing_scale, ratio=erasing_ratio, value=0.0
        )
        self._shape = tv_tensors.Image(torch.empty(3, self.height, self.width))
        self.norm = torch.tensor([*map(float, mean), *map(float, std)], dtype=torch.float32)

    #: ImageDataset hands a cached image over as its (height, width, 3) uint8 array
    #: (DecodedImageCache.get_array): already resized, so the PIL round trip is skipped
    takes_resized_array = True

    def __call__(self, img: Any) -> AugmentedImage:
        if isinstance(img, np.ndarray):
            if img.shape != (self.height, self.width, 3) or img.dtype != np.uint8:
                raise ValueError(f"TrainAugmentParams: a cached image must be ({self.height}, "
                                 f"{self.width}, 3) uint8, got {img.dtype} {img.shape}")  # fmt: skip
            out = torch.from_numpy(img.copy()).permute(2, 0, 1)  # as ToImage lays out a PIL image
        else:
            out = self.resize(img).as_subclass(Tensor)
        params = torch.zeros(NUM_PARAMS, dtype=torch.int64)
        # the draws of the per-sample pipeline, one by one (steps with p = 0 are left out there)
        if self.flip_p > 0:
            params[FLIP] = int(torch.rand(1) < self.flip_p)  # v2 RandomHorizontalFlip
        if self.pad > 0:
            params[TOP] = int(torch.randint(0, 2 * self.pad + 1, size=()))  # PadCrop
            params[LEFT] = int(torch.randint(0, 2 * self.pad + 1, size=()))
        else:
            params[TOP] = params[LEFT] = 0
        if self.erasing_p > 0 and not torch.rand(1) >= self.erasing_p:  # v2 RandomErasing
            box = self.erasing.make_params([self._shape])
            if box["v"] is not None:  # no box found in 10 tries: the image is left unchanged
                params[ERASE_I], params[ERASE_J] = box["i"], box["j"]
                params[ERASE_H], params[ERASE_W] = box["h"], box["w"]
        return AugmentedImage(out, params, self.norm)


def apply_train_augment(img: Tensor, params: Tensor, norm: Tensor, pad: int) -> Tensor:
    """Apply the drawn augmentation to a batch, on its device.

    Args:
        img: (B, 3, H, W) uint8 resized images.
        params: (B, 7) int64 from :class:`TrainAugmentParams`.
        norm: (B, 6) float32 normalisation mean and std of each sample.
        pad: the zero padding the crop offsets refer to.

    Returns:
        (B, 3, H, W) float32: flipped, padded and cropped, scaled to [0, 1], normalised, erased
        (boxes set to 0, the normalised mean), equal to the per-sample pipeline's output.
    """
    if img.dtype != torch.uint8 or img.dim() != 4:
        raise ValueError(f"apply_train_augment: expected (B, 3, H, W) uint8, got {img.dtype} "
                         f"{tuple(img.shape)}")  # fmt: skip
    b, _, h, w = img.shape
    flip = params[:, FLIP].bool().view(b, 1, 1, 1)
    x = torch.where(flip, img.flip(-1), img)
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = params[:, TOP, None] + torch.arange(h, device=img.device)  # (B, H)
        cols = params[:, LEFT, None] + torch.arange(w, device=img.device)  # (B, W)
        batch = torch.arange(b, device=img.device).view(b, 1, 1)
        x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
        x = x.permute(0, 3, 1, 2)
    # v2 ToDtype(float32, scale=True) then Normalize: the same float32 operations
    out = x.to(torch.float32).mul_(1.0 / 255)
    out = out.sub_(norm[:, :3].view(b, 3, 1, 1)).div_(norm[:, 3:].view(b, 3, 1, 1))
    i, j = params[:, ERASE_I].view(b, 1, 1), params[:, ERASE_J].view(b, 1, 1)
    eh, ew = params[:, ERASE_H].view(b, 1, 1), params[:, ERASE_W].view(b, 1, 1)
    r = torch.arange(h, device=img.device).view(1, h, 1)
    c = torch.arange(w, device=img.device).view(1, 1, w)
    erased = (r >= i) & (r < i + eh) & (c >= j) & (c < j + ew)  # empty where eh = ew = 0
    return out.masked_fill_(erased.unsqueeze(1), 0.0).contiguous()


def augment_batch(batch: Any, pad: int) -> Any:
    """Replace, in every (nested) batch dict holding ``"aug"``, the uint8 ``"img"`` by its
    augmentation (:func:`apply_train_augment`); other batches pass through unchanged."""
    if isinstance(batch, dict):
        if "aug" in batch:
            out = {k: v for k, v in batch.items() if k not in ("aug", "aug_norm")}
            out["img"] = apply_train_augment(batch["img"], batch["aug"], batch["aug_norm"], pad)
            return out
        return {k: augment_batch(v, pad) for k, v in batch.items()}
    if isinstance(batch, list | tuple) and not hasattr(batch, "_fields"):
        return type(batch)(augment_batch(v, pad) for v in batch)
    return batch
