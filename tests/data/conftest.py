"""Fixtures of the data tests: small on-disk datasets written by the tests themselves."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.data.synthetic import make_config


def write_image(
    path: str | os.PathLike[str],
    colour: tuple[int, int, int] = (128, 64, 32),
    size: tuple[int, int] = (8, 4),
) -> None:
    """A solid-colour image of (height, width) = size; the format follows the extension."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.empty((*size, 3), np.uint8)
    pixels[:] = colour
    Image.fromarray(pixels).save(path)


def write_files(root: Path, names: Iterable[str]) -> None:
    """Create an image for every relative path in `names` (non-image names get a text file)."""
    for name in names:
        path = root / name
        if name.lower().endswith((".jpg", ".jpeg", ".png")):
            write_image(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("not an image")


MARKET_FILES = [
    "bounding_box_train/0002_c1s1_000451_03.jpg",
    "bounding_box_train/0002_c2s1_000551_01.jpg",
    "bounding_box_train/0007_c3s1_000151_01.jpg",
    "bounding_box_train/0009_c6s2_000201_02.jpg",
    "bounding_box_train/0009_c1s1_000301_01.jpg",
    "bounding_box_train/Thumbs.db",
    "query/0001_c1s1_001051_00.jpg",
    "query/0003_c2s1_000301_00.jpg",
    "bounding_box_test/0001_c2s1_000076_02.jpg",
    "bounding_box_test/0001_c1s1_000101_02.jpg",
    "bounding_box_test/0003_c4s2_000126_01.jpg",
    "bounding_box_test/0000_c1s1_000151_01.jpg",
    "bounding_box_test/-1_c1s1_000401_03.jpg",
    "bounding_box_test/-1_c3s1_000426_01.jpg",
]


@pytest.fixture
def market_root(tmp_path: Path) -> Path:
    """A 5-image-train Market-1501 folder with junk, a distractor and a non-image file."""
    root = tmp_path / "market"
    write_files(root, MARKET_FILES)
    return root


@pytest.fixture
def make_dataset_files(tmp_path: Path) -> Callable[[str, Iterable[str]], Path]:
    """Factory: write the given relative file names under tmp_path/<name> and return it."""

    def make(name: str, files: Iterable[str]) -> Path:
        root = tmp_path / name
        write_files(root, files)
        return root

    return make


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny synthetic domains A and B (12 + 12 ids, 32×16 images), generated once per session."""
    from src.data.synthetic import ensure_generated

    base = tmp_path_factory.mktemp("synth")
    roots = {}
    for domain in ("A", "B"):
        roots[domain] = base / domain
        ensure_generated(roots[domain], domain, seed=0, config=make_config("tiny"))
    return roots
