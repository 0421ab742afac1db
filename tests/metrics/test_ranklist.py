"""plot_ranklist writes a valid PNG with green (true) and red (false) frames."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from src.metrics.ranklist import plot_ranklist


def _images(folder, count, prefix):
    paths = []
    for i in range(count):
        path = folder / f"{prefix}{i}.jpg"
        Image.new("RGB", (32, 64), (40 + 10 * i, 90, 200)).save(path)
        paths.append(str(path))
    return paths


def _frame_pixels(png, rgb, tol=30):
    arr = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(arr - np.array(rgb)).sum(axis=2) < tol).sum())


def test_writes_png_with_true_and_false_frames(tmp_path):
    queries, gallery = _images(tmp_path, 3, "q"), _images(tmp_path, 12, "g")
    indices = torch.tensor([list(range(10)), list(range(2, 12)), list(range(10))])
    matches = indices % 3 == 0
    out = plot_ranklist(queries, gallery, indices, matches, tmp_path / "sub" / "ranklist.png",
                        num_queries=2, topk=10)  # fmt: skip
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        img.verify()
    assert _frame_pixels(out, (0, 170, 0)) > 100  # green frames
    assert _frame_pixels(out, (220, 0, 0)) > 100  # red frames


def test_only_false_matches_and_padding(tmp_path):
    queries, gallery = _images(tmp_path, 1, "q"), _images(tmp_path, 2, "g")
    out = plot_ranklist(queries, gallery, np.array([[1, 0, -1]]), np.zeros((1, 3), bool),
                        tmp_path / "r.png", topk=3)  # fmt: skip
    assert _frame_pixels(out, (0, 170, 0)) == 0
    assert _frame_pixels(out, (220, 0, 0)) > 100


def test_missing_image_is_named(tmp_path):
    queries = _images(tmp_path, 1, "q")
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        plot_ranklist(queries, [str(tmp_path / "nope.jpg")], [[0]], [[True]], tmp_path / "x.png")
    with pytest.raises(ValueError, match="rows"):
        plot_ranklist(queries * 2, queries, [[0]], [[True]], tmp_path / "x.png")
