"""The torch Dataset that turns records into sample dicts, and its optional decoded-image cache."""

from __future__ import annotations

import logging
import mmap
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from src.data.batch_augment import AugmentedImage
from src.data.image_io import read_image
from src.data.records import ReIDRecord

log = logging.getLogger(__name__)

_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


class DecodedImageCache:
    """Decoded images resized to (height, width), uint8 RGB, shared by the DataLoader workers.

    One slot of ``height * width * 3`` bytes per record in an anonymous shared memory map
    (``mmap(-1, n)``: MAP_SHARED, not /dev/shm, pages only take memory once written), plus a
    filled flag per slot. The first read of an image (by any worker) decodes the file, resizes
    it with PIL's filter (what the transforms' first step does) and stores it; every later read,
    in any worker and epoch, is a copy from memory. Workers started by fork (Linux's default)
    share the map; a pickled cache (spawn/forkserver workers) starts empty in each process and is
    private to it (still correct, each process decodes once). Size: ``N * height * width * 3``
    bytes, e.g. 12,936 Market-1501 train images at 256x128: 1.18 GiB; at 64x32: 76 MiB.
    """

    def __init__(self, num_items: int, height: int, width: int, interpolation: str = "bilinear"):
        if interpolation not in _FILTERS:
            raise ValueError(f"interpolation must be one of {sorted(_FILTERS)}")
        self.num_items, self.height, self.width = int(num_items), int(height), int(width)
        self.interpolation = interpolation
        self._allocate()

    @property
    def nbytes(self) -> int:
        """Bytes of the image slots when full."""
        return self.num_items * self.height * self.width * 3

    def _allocate(self) -> None:
        self._map = mmap.mmap(-1, max(1, self.nbytes + self.num_items))
        buffer = np.frombuffer(self._map, dtype=np.uint8)
        self._images = buffer[: self.nbytes].reshape(self.num_items, self.height, self.width, 3)
        self._filled = buffer[self.nbytes : self.nbytes + self.num_items]

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("num_items", "height", "width", "interpolation")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._allocate()
        log.debug("DecodedImageCache unpickled: a new, empty cache private to this process")

    def __len__(self) -> int:
        """Number of images stored so far."""
        return int(self._filled.sum())

    def get(self, i: int, path: str) -> Image.Image:
        """Image ``i`` (file ``path``) resized to (height, width), from memory when stored."""
        return Image.fromarray(self.get_array(i, path))

    def get_array(self, i: int, path: str) -> np.ndarray:
        """:meth:`get` as the (height, width, 3) uint8 array itself (a read-only view of the
        shared slot), without the round trip through PIL."""
        if not self._filled[i]:
            img = read_image(path).resize((self.width, self.height), _FILTERS[self.interpolation])
            self._images[i] = np.asarray(img)
            self._filled[i] = 1  # after the pixels: a reader never sees a half-written slot
        view = self._images[i].view()
        view.flags.writeable = False
        return view


class ImageDataset(Dataset):
    """Records -> sample dicts ``{"img", "pid", "camid", "index"}`` (+ ``"is_query"``).

    Args:
        records: the split (its `index` fields are returned unchanged).
        transform: PIL image -> FloatTensor (3, H, W); None returns the PIL image.
        is_query: if not None, every sample also carries ``"is_query"``: this value, or the i-th
            value when a sequence (one flag per record, e.g. for a query + gallery set).
        cache: a `DecodedImageCache` with one slot per record (its size must be the one the
            transform resizes to): images are decoded once and then read from memory, with
            the same transform outputs.

    Default collate gives ``img`` (B, 3, H, W) float, ``pid``/``camid``/``index`` (B,) int64 and
    ``is_query`` (B,) bool.
    """

    def __init__(
        self,
        records: Sequence[ReIDRecord],
        transform: Callable[[Image.Image], Any] | None = None,
        is_query: bool | Sequence[bool] | None = None,
        cache: DecodedImageCache | None = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        if cache is not None and cache.num_items != len(self.records):
            raise ValueError(f"cache has {cache.num_items} slots for {len(self.records)} records")
        self.cache = cache
        if isinstance(is_query, Sequence) and len(is_query) != len(self.records):
            raise ValueError(f"is_query has {len(is_query)} flags for {len(self.records)} records")
        self.is_query = is_query

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        img: Any
        if self.cache is None:
            img = read_image(record.img_path)
        elif getattr(self.transform, "takes_resized_array", False):
            img = self.cache.get_array(i, record.img_path)  # TrainAugmentParams: no PIL needed
        else:
            img = self.cache.get(i, record.img_path)
        if self.transform is not None:
            img = self.transform(img)
        sample = {"pid": record.pid, "camid": record.camid, "index": record.index}
        if isinstance(img, AugmentedImage):  # batch-wise augmentation (src.data.batch_augment)
            sample["img"], sample["aug"], sample["aug_norm"] = img
        else:
            sample["img"] = img
        if isinstance(self.is_query, Sequence):
            sample["is_query"] = bool(self.is_query[i])
        elif self.is_query is not None:
            sample["is_query"] = self.is_query
        return sample

    @classmethod
    def query_gallery(
        cls,
        query: Sequence[ReIDRecord],
        gallery: Sequence[ReIDRecord],
        transform: Callable[[Image.Image], Any] | None = None,
        cache: DecodedImageCache | None = None,
    ) -> ImageDataset:
        """One evaluation set: query then gallery, ``is_query`` per sample.

        `index` is re-numbered over the concatenation (query i -> i, gallery j -> len(query) + j)
        so that it is unique in the set: metrics de-duplicate DistributedSampler padding by it.
        """
        records = [
            ReIDRecord(r.img_path, r.pid, r.camid, i) for i, r in enumerate([*query, *gallery])
        ]
        flags = [True] * len(query) + [False] * len(gallery)
        return cls(records, transform, is_query=flags, cache=cache)

    @property
    def pids(self) -> list[int]:
        """pid of every sample, in order (what the P×K samplers group by)."""
        return [r.pid for r in self.records]
