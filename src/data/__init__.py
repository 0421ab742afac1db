"""Re-ID data layer: dataset parsers, samplers, transforms, the DataModule, synthetic data.

Names are imported lazily (PEP 562) so that ``python -m src.data.synthetic`` and
``python -m src.data.check`` start without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ReIDRecord": "src.data.records",
    "DatasetLayoutError": "src.data.records",
    "FileNameError": "src.data.records",
    "ImageReadError": "src.data.records",
    "ReIDDataset": "src.data.datasets",
    "Market1501": "src.data.datasets",
    "DukeMTMCReID": "src.data.datasets",
    "MSMT17": "src.data.datasets",
    "ImageFolderReID": "src.data.datasets",
    "DATASETS": "src.data.datasets",
    "build_dataset": "src.data.datasets",
    "register_dataset": "src.data.datasets",
    "SyntheticReID": "src.data.synthetic",
    "SyntheticConfig": "src.data.synthetic",
    "ImageDataset": "src.data.image_dataset",
    "read_image": "src.data.image_io",
    "build_transforms": "src.data.transforms",
    "compute_mean_std": "src.data.transforms",
    "IMAGENET_MEAN": "src.data.transforms",
    "IMAGENET_STD": "src.data.transforms",
    "RandomIdentitySampler": "src.data.samplers",
    "DistributedPKSampler": "src.data.samplers",
    "ShardedSampler": "src.data.samplers",
    "ReIDDataModule": "src.data.datamodule",
}

__all__ = [
    "DATASETS",
    "DatasetLayoutError",
    "DistributedPKSampler",
    "DukeMTMCReID",
    "FileNameError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDataset",
    "ImageFolderReID",
    "ImageReadError",
    "MSMT17",
    "Market1501",
    "RandomIdentitySampler",
    "ReIDDataModule",
    "ReIDDataset",
    "ReIDRecord",
    "ShardedSampler",
    "SyntheticConfig",
    "SyntheticReID",
    "build_dataset",
    "build_transforms",
    "compute_mean_std",
    "read_image",
    "register_dataset",
]

if TYPE_CHECKING:
    from src.data.datamodule import ReIDDataModule
    from src.data.datasets import (
        DATASETS,
        MSMT17,
        DukeMTMCReID,
        ImageFolderReID,
        Market1501,
        ReIDDataset,
        build_dataset,
        register_dataset,
    )
    from src.data.image_dataset import ImageDataset
    from src.data.image_io import read_image
    from src.data.records import DatasetLayoutError, FileNameError, ImageReadError, ReIDRecord
    from src.data.samplers import DistributedPKSampler, RandomIdentitySampler, ShardedSampler
    from src.data.synthetic import SyntheticConfig, SyntheticReID
    from src.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transforms, compute_mean_std


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'src.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
