"""The synthetic benchmark: determinism, Market-1501 layout, A/B differences, caching, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.data import Market1501, SyntheticReID, build_dataset
from src.data.synthetic import (
    DOMAINS,
    MANIFEST,
    Camera,
    ensure_generated,
    generate,
    main,
    make_config,
    render_image,
    sample_camera,
    sample_identity,
)

REPO = Path(__file__).resolve().parents[2]


def _digest(root: Path) -> dict[str, str]:
    """sha1 of every image file, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*.jpg"))
    }


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path, tiny_synth) -> None:
    again = tmp_path / "again"
    generate(again, "A", seed=0, config=make_config("tiny"))
    reference = _digest(tiny_synth["A"])
    assert _digest(again) == reference and len(reference) > 100
    other = tmp_path / "other"
    generate(other, "A", seed=1, config=make_config("tiny"))
    assert set(_digest(other).values()).isdisjoint(reference.values())


def test_worker_processes_give_identical_bytes(tmp_path: Path, tiny_synth) -> None:
    generate(tmp_path / "w2", "B", seed=0, config=make_config("tiny"), workers=2)
    assert _digest(tmp_path / "w2") == _digest(tiny_synth["B"])


def _names(root: Path, folder: str) -> list[str]:
    return sorted(os.listdir(root / folder))


@pytest.mark.parametrize("domain", ["A", "B"])
def test_layout_parses_as_market1501(tiny_synth, domain: str) -> None:
    root = tiny_synth[domain]
    config = make_config("tiny")
    data = Market1501(root)
    assert data.num_train_pids == config.num_train_ids
    assert len({r.pid for r in data.query}) == config.num_test_ids
    assert len(data.train) + len(data.query) + len(data.gallery) + config.num_junk == len(
        _digest(root)
    )
    # junk (-1, dropped by the parser) and distractors (0000, kept) in the gallery folder
    gallery_files = _names(root, "bounding_box_test")
    assert sum(f.startswith("-1_") for f in gallery_files) == config.num_junk
    assert data.skipped["gallery"]["junk"] == config.num_junk
    assert data.stats()["gallery"]["distractors"] == config.num_distractors
    # train and test identities are disjoint (original ids from the file names)
    train_ids = {int(f[:4]) for f in _names(root, "bounding_box_train")}
    test_ids = {int(f[:4]) for f in _names(root, "query")}
    assert not train_ids & test_ids and 0 not in train_ids | test_ids
    # 4..6 images per identity, at least 2 cameras each; camids 0-based within num_cameras
    per_id: dict[tuple[str, int], list[int]] = defaultdict(list)
    for split, records in (("train", data.train), ("test", data.query + data.gallery)):
        for r in records:
            if r.pid != 0:
                per_id[split, r.pid].append(r.camid)
    assert all(config.min_images <= len(c) <= config.max_images for c in per_id.values())
    assert all(len(set(c)) >= 2 for c in per_id.values())
    assert {r.camid for r in data.train} <= set(range(config.num_cameras))
    # every query has a gallery image of its identity from another camera
    gallery_cams = defaultdict(set)
    for r in data.gallery:
        gallery_cams[r.pid].add(r.camid)
    assert all(gallery_cams[q.pid] - {q.camid} for q in data.query)
    with Image.open(data.train[0].img_path) as img:
        assert img.size == (config.width, config.height) and img.mode == "RGB"


def _images(root: Path) -> np.ndarray:
    files = sorted((root / "bounding_box_train").iterdir())
    return np.stack([np.asarray(Image.open(f), np.float32) / 255 for f in files])


def test_domains_differ_in_identities_and_style(tiny_synth) -> None:
    a, b = Market1501(tiny_synth["A"]), Market1501(tiny_synth["B"])
    assert set(_digest(tiny_synth["A"]).values()).isdisjoint(_digest(tiny_synth["B"]).values())
    img_a, img_b = _images(tiny_synth["A"]), _images(tiny_synth["B"])
    assert img_b.mean() < img_a.mean() - 0.15  # B's cameras are darker
    # B's cameras have strong, camera-specific colour casts: per-camera mean chromaticity
    # (channel share of brightness) varies across cameras much more than in A

    def camera_spread(data: Market1501, imgs: np.ndarray) -> float:
        cams = np.array([r.camid for r in data.train])
        chroma = imgs.mean((1, 2)) / imgs.mean((1, 2, 3))[:, None]
        means = np.stack([chroma[cams == c].mean(0) for c in np.unique(cams)])
        return float(means.std(0).mean())

    assert camera_spread(b, img_b) > 2 * camera_spread(a, img_a)


def _neutral_camera(view: int) -> Camera:
    cam = sample_camera(np.random.default_rng(0), DOMAINS["A"])
    return dataclasses.replace(
        cam,
        view_probs=np.eye(4)[view],
        gain=1.0,
        cast=np.ones(3, np.float32),
        gamma=1.0,
        haze=0.0,
        noise=0.0,
        blur=0.0,
        occlusion_prob=0.0,
        clutter=(0, 0),
        wall=np.full(3, 0.5, np.float32),
        floor=np.full(3, 0.5, np.float32),
        illumination_gradient=0.0,
    )


def test_viewpoint_decides_what_is_visible() -> None:
    grey = np.full(3, 0.5, np.float32)
    ident = dataclasses.replace(
        sample_identity(np.random.default_rng(0), DOMAINS["A"]),
        upper=grey, upper2=grey, lower=grey, lower2=grey, shoes=grey, hat=None, bag=None,
        backpack=np.array([1.0, 0.0, 0.0], np.float32),
        emblem="square", emblem_colour=np.array([0.0, 0.0, 1.0], np.float32),
    )  # fmt: skip

    def pixels(view: int, colour: int) -> int:
        img = render_image(ident, _neutral_camera(view), np.random.default_rng(1), 128, 64)
        img = img.astype(int)
        others = [c for c in range(3) if c != colour]
        return int(((img[..., colour] - img[..., others].max(-1)) > 60).sum())

    front, back = 0, 1
    assert pixels(back, 0) > 3 * pixels(front, 0) > 0  # backpack from behind, straps from front
    assert pixels(front, 2) > 20 and pixels(back, 2) == 0  # chest emblem only from the front


def test_synthetic_dataset_is_cached(tmp_path: Path) -> None:
    root = tmp_path / "A"
    data = SyntheticReID(root, domain="A", seed=0, preset="tiny")
    stamp = (root / MANIFEST).stat().st_mtime_ns
    again = build_dataset("synthetic", root, domain="A", seed=0, preset="tiny")
    assert (root / MANIFEST).stat().st_mtime_ns == stamp
    assert [r.img_path for r in again.train] == [r.img_path for r in data.train]
    assert not ensure_generated(root, "A", 0, make_config("tiny"))
    with pytest.raises(FileExistsError, match=f"{root}.*seed: found 0, asked 1"):
        SyntheticReID(root, domain="A", seed=1, preset="tiny")
    with pytest.raises(FileExistsError, match="domain"):
        SyntheticReID(root, domain="B", seed=0, preset="tiny")
    other = tmp_path / "user_data"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        SyntheticReID(other, preset="tiny")
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_bad_options() -> None:
    with pytest.raises(TypeError, match="num_ids"):
        make_config("tiny", num_ids=3)
    with pytest.raises(KeyError, match="huge"):
        make_config("huge")
    with pytest.raises(ValueError, match="num_cameras"):
        make_config(num_cameras=1)


def test_concurrent_processes_generate_once(tmp_path: Path) -> None:
    out = tmp_path / "concurrent"
    cmd = [sys.executable, "-m", "src.data.synthetic", "--out", str(out), "--domain", "B",
           "--preset", "tiny", "--workers", "1"]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    outputs = [stdout for stdout, _ in results]
    assert sum(o.startswith("generated") for o in outputs) == 1
    assert sum(o.startswith("already present") for o in outputs) == 1
    assert "train   |    12 |" in outputs[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".concurrent.lock", "concurrent"]


def test_cli_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--preset", "tiny", "--num-train-ids", "8", "--seed", "3"]) == 0
    assert "train   |     8 |" in capsys.readouterr().out
    assert main(["--out", str(out), "--preset", "tiny", "--seed", "4"]) == 2  # another dataset
    assert "delete it" in capsys.readouterr().err
    assert main(["--out", str(out), "--preset", "tiny", "--seed", "4", "--force"]) == 0


@pytest.mark.slow
def test_default_size_domain(tmp_path: Path) -> None:
    manifest = generate(tmp_path / "A", "A", seed=0, workers=2)
    data = Market1501(tmp_path / "A")
    assert data.num_train_pids == 250 and 2000 < len(data.train) < 3500
    assert len({r.pid for r in data.query}) == 250 and data.num_cams == 6
    assert manifest["num_images"] == len(_digest(tmp_path / "A"))
    with Image.open(data.gallery[0].img_path) as img:
        assert img.size == (64, 128)
