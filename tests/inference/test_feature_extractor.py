"""FeatureExtractor and src.extract: the evaluator's features for any images."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from src.eval import evaluate
from src.extract import extract, extract_features, image_list, load_features
from src.inference import FeatureExtractor, parse_reid_name
from src.metrics.functional import compute_distance_matrix, evaluate_rank
from src.systems.mar_init import file_sha256
from tests.conftest import tiny_overrides
from tests.inference._helpers import eval_reference
from tests.inference.conftest import compose_cfg


def _map(feats_q, feats_g, labels_q, labels_g, metric: str) -> float:
    dist = compute_distance_matrix(feats_q, feats_g, metric=metric)
    _, mAP, _ = evaluate_rank(dist, labels_q[0], labels_g[0], labels_q[1], labels_g[1])
    return float(mAP)


@pytest.mark.parametrize("which", ["supervised", "mar"])
def test_features_equal_the_evaluators(which, supervised_ckpt, mar_ckpt):
    ckpt = supervised_ckpt if which == "supervised" else mar_ckpt
    ref = eval_reference(ckpt)
    extractor = FeatureExtractor.from_checkpoint(ckpt, device="cpu", batch_size=7)
    assert extractor.normalize == (which == "mar")  # cosine protocol -> unit-norm features
    feats = extractor(ref.paths)
    assert feats.dtype == torch.float32 and feats.shape == ref.feats.shape
    assert (feats - ref.feats).abs().max() <= 1e-5
    q = ref.is_query
    mAP = _map(
        feats[q],
        feats[~q],
        (ref.pids[q], ref.camids[q]),
        (ref.pids[~q], ref.camids[~q]),
        ref.metric,
    )
    assert mAP == ref.map_score


def test_flip_follows_the_evaluator(supervised_ckpt):
    ref = eval_reference(supervised_ckpt, flip=True)
    extractor = FeatureExtractor.from_checkpoint(supervised_ckpt, device="cpu", flip=True)
    assert (extractor(ref.paths[:20]) - ref.feats[:20]).abs().max() <= 1e-5


def test_every_input_kind_gives_the_same_rows(supervised_ckpt, tiny_data_root, tmp_path):
    extractor = FeatureExtractor.from_checkpoint(supervised_ckpt, device="cpu", batch_size=2)
    files = sorted((tiny_data_root / "synthetic" / "A" / "query").glob("*.jpg"))[:3]
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, f in enumerate(files):
        shutil.copy(f, folder / ("sub" if i == 2 else "") / f.name)
    by_path = extractor([str(f) for f in files])
    assert by_path.shape == (3, 512)
    pils = [Image.open(f).convert("RGB") for f in files]
    arrays = [np.asarray(p) for p in pils]
    torch.testing.assert_close(extractor(pils), by_path, rtol=0, atol=0)
    torch.testing.assert_close(extractor(arrays), by_path, rtol=0, atol=0)
    # (a batch of one: other conv kernels, float32 rounding only)
    torch.testing.assert_close(extractor(files[0]), by_path[:1], rtol=0, atol=1e-5)
    # a folder is listed recursively, sorted by relative path (sub/ after the top-level files)
    listed = [files[0].name, files[1].name, f"sub/{files[2].name}"]
    assert image_list(folder)[1] == listed
    torch.testing.assert_close(extractor(folder), by_path, rtol=0, atol=0)
    with pytest.raises(ValueError, match="uint8 RGB"):
        extractor(np.zeros((8, 4), dtype=np.uint8))


def test_reid_names_parse_as_the_dataset_parsers():
    assert parse_reid_name("0002_c1s1_000451_03.jpg") == (2, 0)
    assert parse_reid_name("x/-1_c3s1_000451_03.jpg") == (-1, 2)
    assert parse_reid_name("0001_c2_f0046182.jpg") == (1, 1)
    assert parse_reid_name("0000_000_01_0303morning_0015_0.jpg") == (0, 0)
    assert parse_reid_name("alice.jpg") is None
    assert parse_reid_name("0002_c0s1_000451_03.jpg") is None  # cameras start at c1


def test_extract_cli_reproduces_the_evaluation(supervised_ckpt, tiny_data_root, tmp_path):
    """src.extract of the query and gallery folders, fed to evaluate_rank, gives src.eval's mAP
    (junk, pid -1, removed as the dataset parser removes it)."""
    root = tiny_data_root / "synthetic" / "A"
    outs = {}
    for split, folder in (("query", "query"), ("gallery", "bounding_box_test")):
        cfg = compose_cfg(
            [
                f"ckpt_path={supervised_ckpt}",
                f"images={root / folder}",
                f"out={tmp_path / split}.npz",
                "num_workers=0",
                "progress=false",
            ],
            tmp_path / "run",
            config_name="extract",
        )
        extract(cfg)
        outs[split] = np.load(tmp_path / f"{split}.npz")
    q, g = outs["query"], outs["gallery"]
    assert q["features"].dtype == np.float32 and str(q["ckpt_sha256"]) == file_sha256(
        supervised_ckpt
    )
    keep = g["pids"] != -1
    mAP = _map(
        torch.from_numpy(q["features"]),
        torch.from_numpy(g["features"][keep]),
        (torch.from_numpy(q["pids"]), torch.from_numpy(q["camids"])),
        (torch.from_numpy(g["pids"][keep]), torch.from_numpy(g["camids"][keep])),
        "euclidean",
    )
    eval_cfg = compose_cfg(
        [*tiny_overrides(tiny_data_root, train=False), f"ckpt_path={supervised_ckpt}"],
        tmp_path / "eval",
        config_name="eval",
    )
    assert mAP == evaluate(eval_cfg)["plain"]["mAP"]


def test_corrupt_images_are_skipped_and_resume_skips_done_ones(
    supervised_ckpt, tiny_data_root, tmp_path, caplog, monkeypatch
):
    files = sorted((tiny_data_root / "synthetic" / "A" / "query").glob("*.jpg"))[:4]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for f in files[:3]:
        shutil.copy(f, folder / f.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    extractor = FeatureExtractor.from_checkpoint(supervised_ckpt, device="cpu", batch_size=2)
    sha = file_sha256(supervised_ckpt)
    root, paths = image_list(folder)
    out = tmp_path / "feats.npz"
    with caplog.at_level(logging.WARNING):
        first = extract_features(extractor, root, paths, out, ckpt_sha256=sha)
    assert first.skipped == ["broken.jpg"] and "broken.jpg" in caplog.text
    assert first.paths == [f.name for f in files[:3]]
    expected = extractor([folder / p for p in first.paths])
    np.testing.assert_array_equal(first.features, expected.numpy())
    # a re-run with one more image decodes only that image
    shutil.copy(files[3], folder / files[3].name)
    embedded = []
    real_embed = extractor.embed
    monkeypatch.setattr(extractor, "embed", lambda x: embedded.append(len(x)) or real_embed(x))
    root, paths = image_list(folder)
    second = extract_features(extractor, root, paths, out, ckpt_sha256=sha)
    assert sum(embedded) == 1
    fresh = extract_features(extractor, root, paths, None, resume=False, ckpt_sha256=sha)
    assert second.paths == fresh.paths == sorted(f.name for f in files)
    resumed = load_features(out)
    np.testing.assert_array_equal(  # the rows of the first run are kept as they were
        resumed.features[[resumed.paths.index(p) for p in first.paths]], first.features
    )
    np.testing.assert_allclose(resumed.features, fresh.features, rtol=0, atol=1e-5)
    # another checkpoint (or flip) must not mix into the file
    with pytest.raises(ValueError, match="another checkpoint"):
        extract_features(extractor, root, paths, out, ckpt_sha256="0" * 64)


def test_npy_output_keeps_the_paths(supervised_ckpt, tiny_data_root, tmp_path):
    files = sorted((tiny_data_root / "synthetic" / "A" / "query").glob("*.jpg"))[:2]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{f}\n" for f in files))
    extractor = FeatureExtractor.from_checkpoint(supervised_ckpt, device="cpu")
    root, paths = image_list(listing)
    out = tmp_path / "f.npy"
    extract_features(extractor, root, paths, out)
    loaded = load_features(out)
    assert loaded.paths == [str(f) for f in files]
    np.testing.assert_array_equal(np.load(out), extractor(files).numpy())
