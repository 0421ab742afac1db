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


def _plain(**kwargs) -> object:
    return build_transforms(32, 16, True, flip_p=0, pad=0, random_erasing_p=0, **kwargs)


def test_grayscale_gives_equal_channels_of_the_luma() -> None:
    img = _gradient_image(32, 16)
    grey = _plain(grayscale_p=1.0, mean=(0, 0, 0), std=(1, 1, 1))(img)
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    # ITU-R 601 luma of the RGB input (torchvision's rgb_to_grayscale), up to uint8 rounding
    rgb = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    luma = 0.2989 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    torch.testing.assert_close(grey[0], luma, atol=1 / 255 + 1e-6, rtol=0)
    # off (p=0) or zero strength: the colour steps are not even in the pipeline
    assert torch.equal(_plain(grayscale_p=0.0)(img), build_transforms(32, 16, False)(img))
    no_jitter = _plain(color_jitter=(0, 0, 0, 0), color_jitter_p=1.0)
    assert torch.equal(no_jitter(img), build_transforms(32, 16, False)(img))


def test_color_jitter_changes_colours_but_not_geometry() -> None:
    img = _gradient_image(32, 16)
    test = build_transforms(32, 16, False, mean=(0, 0, 0), std=(1, 1, 1))(img)
    jitter = _plain(
        color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_p=1.0, mean=(0, 0, 0), std=(1, 1, 1)
    )
    torch.manual_seed(0)
    outs = torch.stack([jitter(img) for _ in range(8)])
    assert (outs - test).abs().amax((1, 2, 3)).min() > 0.01  # every draw recolours the image
    assert outs.min() >= 0 and outs.max() <= 1  # stays a valid image before normalising
    # brightness only: a per-image factor in [0.6, 1.4] on every pixel (up to clipping/rounding)
    bright = _plain(color_jitter=(0.4, 0, 0, 0), color_jitter_p=1.0, mean=(0, 0, 0), std=(1, 1, 1))
    for _ in range(5):
        out = bright(img)
        inside = (test > 0.1) & (out < 0.99)
        factor = out[inside] / test[inside]
        assert 0.6 - 0.02 <= factor.median() <= 1.4 + 0.02
        assert (factor - factor.median()).abs().max() < 0.05 + 2 / (255 * 0.1)
    # applied with probability color_jitter_p
    torch.manual_seed(1)
    half = _plain(
        color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_p=0.5, mean=(0, 0, 0), std=(1, 1, 1)
    )
    unchanged = sum(bool(torch.equal(half(img), test)) for _ in range(200))
    assert 70 <= unchanged <= 130


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="3 values"):
        build_transforms(8, 4, True, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="interpolation"):
        build_transforms(8, 4, True, interpolation="lanczos")
    with pytest.raises(ValueError, match="color_jitter needs 4"):
        build_transforms(8, 4, True, color_jitter=(0.4, 0.4, 0.4))
    with pytest.raises(ValueError, match="hue <= 0.5"):
        build_transforms(8, 4, True, color_jitter=(0, 0, 0, 0.7))
    with pytest.raises(ValueError, match="grayscale_p must be a probability"):
        build_transforms(8, 4, True, grayscale_p=1.5)


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
