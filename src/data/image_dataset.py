"""The torch Dataset that turns records into sample dicts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from src.data.image_io import read_image
from src.data.records import ReIDRecord


class ImageDataset(Dataset):
    """Records -> sample dicts ``{"img", "pid", "camid", "index"}`` (+ ``"is_query"``).

    Args:
        records: the split (its `index` fields are returned unchanged).
        transform: PIL image -> FloatTensor (3, H, W); None returns the PIL image.
        is_query: if not None, every sample also carries ``"is_query"``: this value, or the i-th
            value when a sequence (one flag per record, e.g. for a query + gallery set).

    Default collate gives ``img`` (B, 3, H, W) float, ``pid``/``camid``/``index`` (B,) int64 and
    ``is_query`` (B,) bool.
    """

    def __init__(
        self,
        records: Sequence[ReIDRecord],
        transform: Callable[[Image.Image], Any] | None = None,
        is_query: bool | Sequence[bool] | None = None,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        if isinstance(is_query, Sequence) and len(is_query) != len(self.records):
            raise ValueError(f"is_query has {len(is_query)} flags for {len(self.records)} records")
        self.is_query = is_query

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record = self.records[i]
        img: Any = read_image(record.img_path)
        if self.transform is not None:
            img = self.transform(img)
        sample = {"img": img, "pid": record.pid, "camid": record.camid, "index": record.index}
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
    ) -> ImageDataset:
        """One evaluation set: query then gallery, ``is_query`` per sample.

        `index` is re-numbered over the concatenation (query i -> i, gallery j -> len(query) + j)
        so that it is unique in the set: metrics de-duplicate DistributedSampler padding by it.
        """
        records = [
            ReIDRecord(r.img_path, r.pid, r.camid, i) for i, r in enumerate([*query, *gallery])
        ]
        return cls(records, transform, is_query=[True] * len(query) + [False] * len(gallery))

    @property
    def pids(self) -> list[int]:
        """pid of every sample, in order (what the P×K samplers group by)."""
        return [r.pid for r in self.records]
