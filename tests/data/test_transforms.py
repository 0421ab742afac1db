"""Transforms: shapes, exact test-time values, augmentation effects, mean/std statistics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from src.data.records import ReIDRecord
from src.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_transforms,
    cached_mean_std,
    compute_mean_std,
)
from tests.data.conftest import write_image


def _gradient_image(h: int = 40, w: int = 20) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) % 256], -1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.mark.parametrize("train", [True, False])
def test_output_shape_and_dtype(train: bool) -> None:
    out = build_transforms(32, 16, train=train)(_gradient_image(50, 23))
    assert out.shape == (3, 32, 16) and out.dtype == torch.float32


def test_test_transform_is_resize_then_normalise() -> None:
    img = _gradient_image(32, 16)  # already at the target size: resize is the identity
    out = build_transforms(32, 16, train=False)(img)
    expected = (
        torch.from_numpy(np.array(img)).permute(2, 0, 1) / 255.0
        - torch.tensor(IMAGENET_MEAN)[:, None, None]
    ) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(out, expected)
    assert torch.equal(out, build_transforms(32, 16, train=False)(img))  # deterministic


def test_train_without_augmentation_equals_test() -> None:
    img = _gradient_image(64, 31)
    train = build_transforms(32, 16, True, flip_p=0, pad=0, random_erasing_p=0)
    torch.testing.assert_close(train(img), build_transforms(32, 16, False)(img))


def test_flip_pad_crop_and_erasing() -> None:
    img = _gradient_image(32, 16)
    test = build_transforms(32, 16, False)(img)
    flipped = build_transforms(32, 16, True, flip_p=1.0, pad=0, random_erasing_p=0)(img)
    torch.testing.assert_close(flipped, test.flip(-1))
    # pad + random crop: a translated copy, zero padding (= -mean/std after normalising) at borders
    torch.manual_seed(0)
    zero = (-torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD))[:, None]
    cropped = [
        build_transforms(32, 16, True, flip_p=0, pad=4, random_erasing_p=0)(img) for _ in range(20)
    ]
    assert any(not torch.equal(c, test) for c in cropped)
    for c in cropped:  # some shift (dy, dx) in [-4, 4]² maps the test image onto the crop
        assert any(
            torch.equal(
                c[:, max(dy, 0) : 32 + min(dy, 0), max(dx, 0) : 16 + min(dx, 0)],
                test[:, max(-dy, 0) : 32 + min(-dy, 0), max(-dx, 0) : 16 + min(-dx, 0)],
            )
            for dy in range(-4, 5)
            for dx in range(-4, 5)
        )
    assert any(torch.isclose(c, zero[..., None]).all(0).any() for c in cropped)
    erased = build_transforms(32, 16, True, flip_p=0, pad=0, random_erasing_p=1.0)(img)
    changed = (erased != test).any(0)
    assert changed.any() and (erased[:, changed] == 0).all()  # erased with the mean (0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="3 values"):
        build_transforms(8, 4, True, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="interpolation"):
        build_transforms(8, 4, True, interpolation="lanczos")


def test_compute_mean_std_hand_computed(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", (255, 0, 51), size=(8, 4))
    write_image(tmp_path / "b.png", (0, 0, 153), size=(8, 4))
    records = [ReIDRecord(str(tmp_path / n), 0, 0, i) for i, n in enumerate(["a.png", "b.png"])]
    mean, std = compute_mean_std(records, 8, 4, batch_size=1)
    np.testing.assert_allclose(mean, [0.5, 0.0, 0.4], atol=1e-6)
    np.testing.assert_allclose(std, [0.5, 0.0, 0.2], atol=1e-6)


def test_mean_std_matches_naive_loop_and_is_cached(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    records = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 8, 3), dtype=np.uint8)).save(path)
        records.append(ReIDRecord(str(path), 0, 0, i))
    pixels = np.concatenate(
        [np.asarray(Image.open(r.img_path)).reshape(-1, 3) / 255.0 for r in records]
    )
    mean, std = cached_mean_std(records, 16, 8, cache_dir=str(tmp_path))
    np.testing.assert_allclose(mean, pixels.mean(0), atol=1e-6)
    np.testing.assert_allclose(std, pixels.std(0), atol=1e-6)
    cache_file = tmp_path / ".marlin_mean_std.json"
    cache = json.loads(cache_file.read_text())
    assert len(cache) == 1
    # served from the cache: poison the stored value and read it back
    key = next(iter(cache))
    cache[key]["mean"] = [9.0, 9.0, 9.0]
    cache_file.write_text(json.dumps(cache))
    assert cached_mean_std(records, 16, 8, cache_dir=str(tmp_path))[0] == [9.0, 9.0, 9.0]
    # a changed dataset (or resolution) is a new key
    assert cached_mean_std(records[:4], 16, 8, cache_dir=str(tmp_path))[0] != [9.0, 9.0, 9.0]
    assert len(json.loads(cache_file.read_text())) == 2
