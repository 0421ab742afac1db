"""RankListLogger and EmbeddingProjection on a tiny run: the pictures exist, the rank lists drawn are
the single-process ranking of the tested checkpoint, the projected features are its features; PCA
and identity choice on hand-made data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import src.metrics.ranklist as ranklist_module
from src.callbacks import EmbeddingProjection, RankListLogger
from src.callbacks.embedding_projection import pca_2d, pick_identities
from src.metrics.functional import compute_distance_matrix, topk_gallery
from src.metrics.ranklist import select_queries
from src.train import train
from tests.conftest import tiny_overrides
from tests.metrics._naive import naive_query_ap
from tests.scale._helpers import reference_features

PNG = b"\x89PNG\r\n\x1a\n"


def test_pictures_of_a_tiny_run(make_cfg, tiny_data_root, monkeypatch):
    drawn: list[dict] = []
    plot = ranklist_module.plot_ranklist

    def spy(**kwargs):
        drawn.append(kwargs)
        return plot(**kwargs)

    monkeypatch.setattr(ranklist_module, "plot_ranklist", spy)
    cfg = make_cfg(
        [
            *tiny_overrides(tiny_data_root),
            "callbacks.ranklist.enabled=true",  # the default; tiny_overrides turns it off
            "callbacks.embedding_projection.enabled=true",
            "trainer.max_epochs=1",
            "trainer.check_val_every_n_epoch=1",
            "scheduler.warmup_epochs=0",
        ]
    )
    metrics, objects = train(cfg)
    out = Path(cfg.paths.output_dir)
    for png in ("ranklists/val_epoch000.png", "ranklists/test.png", "embedding_test.png"):
        assert (out / png).read_bytes()[:8] == PNG, png
    assert len(drawn) == 2  # one validation, one test

    # the test's rank lists and features are those of the tested checkpoint, in one process
    ckpt = Path(objects["trainer"].checkpoint_callback.best_model_path)
    data, datamodule = reference_features(make_cfg, tiny_data_root, ckpt)
    q = data["is_query"]
    num_q = int(q.sum())
    outputs = objects["system"].eval_outputs["test"]
    assert outputs.results["mAP"] == pytest.approx(metrics["test/mAP"])
    torch.testing.assert_close(outputs.features, data["feat"], rtol=1e-5, atol=1e-6)
    assert torch.equal(outputs.index, data["index"]) and torch.equal(outputs.is_query, q)
    assert torch.equal(outputs.pids, data["pid"]) and torch.equal(outputs.camids, data["camid"])
    distmat = compute_distance_matrix(data["feat"][q], data["feat"][~q], "euclidean")
    positions, matches, _ = topk_gallery(
        distmat, data["pid"][q], data["pid"][~q], data["camid"][q], data["camid"][~q], k=10
    )
    expected_index = torch.where(positions >= 0, positions + num_q, -1)
    assert torch.equal(outputs.ranklist.gallery_index, expected_index)
    assert torch.equal(outputs.ranklist.matches, matches)

    # what was drawn: the 5 queries of lowest AP, then 5 of the others (seeded), each with its
    # top-10 gallery images and titles naming identity, camera and distance
    expected_ap = naive_query_ap(np.asarray(distmat), data["pid"][q], data["pid"][~q],
                                 data["camid"][q], data["camid"][~q])  # fmt: skip
    np.testing.assert_allclose(outputs.ranklist.ap.numpy(), expected_ap, rtol=0, atol=1e-9)
    call = drawn[-1]
    records = [*datamodule.eval_data.query, *datamodule.eval_data.gallery]
    rows = call["rows"]
    assert rows == [row for row, _ in select_queries(expected_ap, 5, 5, seed=0)]
    scored = np.flatnonzero(~np.isnan(expected_ap))
    assert sorted(expected_ap[rows[:5]]) == sorted(np.sort(expected_ap[scored])[:5])
    for r, row in enumerate(rows):
        assert call["query_paths"][row] == records[row].img_path
        assert f"id {records[row].pid} c{records[row].camid}" in call["query_titles"][r]
        shown = [call["gallery_paths"][i] for i in call["topk_indices"][row].tolist() if i >= 0]
        assert shown == [records[num_q + p].img_path for p in positions[row].tolist() if p >= 0]
        assert torch.equal(torch.as_tensor(call["matches"][row]), matches[row])
        first = records[num_q + int(positions[row, 0])]
        assert call["tile_titles"][r][0].startswith(f"1: id {first.pid} c{first.camid}")
    tsv = (out / "ranklists" / "test.tsv").read_text().splitlines()
    assert len(tsv) == 1 + sum((positions[row] >= 0).sum().item() for row in rows)


def test_pca_2d_recovers_a_plane():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 2, generator=g))[0]  # orthonormal (6, 2)
    plane = torch.randn(40, 2, generator=g) * torch.tensor([3.0, 1.0])
    features = plane @ basis.T + torch.randn(6, generator=g)  # an offset plane in 6-D
    coords, explained = pca_2d(features)
    assert explained == pytest.approx(1.0, abs=1e-9)
    # the projection preserves every pairwise distance of the plane
    torch.testing.assert_close(torch.pdist(coords), torch.pdist(plane), atol=1e-4, rtol=1e-4)
    # the first axis carries the larger variance; the result equals numpy's SVD up to sign
    assert coords[:, 0].var() > coords[:, 1].var()
    centred = (features - features.mean(0)).double().numpy()
    _, _, vh = np.linalg.svd(centred, full_matrices=False)
    np.testing.assert_allclose(np.abs(coords.numpy()), np.abs(centred @ vh[:2].T), atol=1e-4)
    assert pca_2d(features)[0].equal(coords)  # deterministic


def test_pick_identities_evenly_spaced_and_skips_distractors():
    pids = torch.tensor([0, 7, 3, 3, 9, 1, 5, 11, 13, 2])
    assert pick_identities(pids, 20).tolist() == [1, 2, 3, 5, 7, 9, 11, 13]
    # positions 0, 3.5 -> 4 (round half to even), 7 of the 8 sorted ids
    assert pick_identities(pids, 3).tolist() == [1, 7, 13]


def test_bad_arguments():
    with pytest.raises(ValueError, match="enabled"):
        RankListLogger(enabled="sometimes")
    with pytest.raises(ValueError, match="stages"):
        RankListLogger(stages=["train"])
    with pytest.raises(ValueError, match="stage"):
        EmbeddingProjection(stage="fit")
    with pytest.raises(ValueError, match="num_identities"):
        EmbeddingProjection(num_identities=0)


def test_pictures_go_to_wandb_and_tensorboard_loggers(tmp_path):
    """`log_png` hands the file to WandbLogger.log_image and the pixels (HWC) to TensorBoard's
    add_image, at the trainer's global step; other loggers get nothing."""
    from types import SimpleNamespace

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
    from PIL import Image

    from src.callbacks._images import has_image_logger, log_png

    calls = []

    class FakeWandb(WandbLogger):
        def __init__(self) -> None:  # no wandb run
            pass

        def log_image(self, key, images, step=None, **kwargs):
            calls.append(("wandb", key, images, step, kwargs))

    class FakeWriter:
        def add_image(self, tag, img, global_step, dataformats):
            calls.append(("tb", tag, img.shape, global_step, dataformats))

    class FakeTensorBoard(TensorBoardLogger):
        def __init__(self) -> None:  # no tensorboard package needed
            pass

        @property
        def experiment(self):
            return FakeWriter()

    path = tmp_path / "picture.png"
    Image.new("RGB", (7, 5), (255, 0, 0)).save(path)
    csv_only = SimpleNamespace(loggers=[CSVLogger(tmp_path)], global_step=3)
    assert not has_image_logger(csv_only)
    trainer = SimpleNamespace(
        loggers=[CSVLogger(tmp_path), FakeWandb(), FakeTensorBoard()], global_step=3
    )
    assert has_image_logger(trainer)
    log_png(trainer, "val/ranklist", path, "epoch 0")
    assert calls == [
        ("wandb", "val/ranklist", [str(path)], 3, {"caption": ["epoch 0"]}),
        ("tb", "val/ranklist", (5, 7, 3), 3, "HWC"),
    ]
