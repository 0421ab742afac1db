"""Rank lists: the PNG (green / red frames), which queries are shown (worst AP, seeded sample),
the TSV beside it, and the per-query AP they rank by."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from src.metrics.ranklist import RankListRows, plot_ranklist, select_queries, write_ranklist


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


# ---------------------------------------------------------------- which queries a rank list shows
def test_select_queries_worst_first_then_a_seeded_sample():
    ap = np.array([0.9, 0.1, np.nan, 0.5, 0.1, 0.7, 0.3, 1.0])
    chosen = select_queries(ap, num_worst=3, num_random=2, seed=0)
    # lowest AP first, ties by row (rows 1 and 4 both 0.1); the unscored row 2 never appears
    assert chosen[:3] == [(1, "worst"), (4, "worst"), (6, "worst")]
    randoms = [row for row, kind in chosen[3:]]
    assert [kind for _, kind in chosen[3:]] == ["random", "random"]
    assert len(set(randoms)) == 2 and set(randoms) <= {0, 3, 5, 7} and randoms == sorted(randoms)
    # the same seed draws the same sample (successive epochs show the same queries) ...
    assert select_queries(ap, 3, 2, seed=0) == chosen
    # ... and every scored query is eventually drawn by some seed, never an unscored one
    drawn = {row for s in range(50) for row, kind in select_queries(ap, 3, 2, seed=s)[3:]}
    assert drawn == {0, 3, 5, 7}
    # more than there are: everything scored, once
    everything = select_queries(ap, 10, 10)
    assert sorted(row for row, _ in everything) == [0, 1, 3, 4, 5, 6, 7]
    with pytest.raises(ValueError, match="num_worst"):
        select_queries(ap, -1, 2)


def test_write_ranklist_png_and_tsv(tmp_path):
    queries, gallery = _images(tmp_path, 4, "q"), _images(tmp_path, 6, "g")
    q_rows = RankListRows(queries, [1, 2, 3, 4], [0, 1, 0, 1])
    g_rows = RankListRows(gallery, [1, 1, 2, 3, 4, 9], [1, 0, 0, 1, 0, 1])
    positions = torch.tensor([[0, 5, 1], [2, 0, -1], [3, 1, 2], [4, 0, 1]])
    matches = torch.tensor(
        [[True, False, True], [True, False, False], [True, False, False], [True, False, False]]
    )
    distances = torch.tensor([[0.1, 0.2, 0.3], [0.2, 0.4, 9.0], [0.05, 0.5, 0.6], [0.3, 0.6, 0.7]])
    ap = torch.tensor([1.0, 0.25, float("nan"), 0.5], dtype=torch.float64)
    png, tsv = write_ranklist(tmp_path / "r" / "test.png", q_rows, g_rows, positions, matches,
                              distances, ap, num_worst=1, num_random=1, seed=0, topk=3)  # fmt: skip
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and tsv == tmp_path / "r" / "test.tsv"
    lines = [line.split("\t") for line in tsv.read_text().splitlines()]
    assert lines[0][:5] == ["selection", "query", "query_pid", "query_camid", "query_AP"]
    body = lines[1:]
    # worst: query 1 (AP 0.25), its two existing gallery items (rank 3 is empty: no line)
    worst = [r for r in body if r[0] == "worst"]
    assert [(r[1], r[2], r[5], r[6], r[7], r[8], r[10]) for r in worst] == [
        (queries[1], "2", "1", gallery[2], "2", "0", "1"),
        (queries[1], "2", "2", gallery[0], "1", "1", "0"),
    ]
    assert [float(r[9]) for r in worst] == pytest.approx([0.2, 0.4])
    # random: one of the other scored queries (0 or 3), never the unscored query 2
    randoms = {r[1] for r in body if r[0] == "random"}
    assert len(randoms) == 1 and randoms <= {queries[0], queries[3]}
    with pytest.raises(ValueError, match="one row per query"):
        write_ranklist(tmp_path / "x.png", q_rows, g_rows, positions[:2], matches[:2],
                       distances[:2], ap[:2])  # fmt: skip


def test_reid_metric_keeps_each_query_ap():
    from src.metrics import ReIDMetric
    from tests.metrics._naive import naive_query_ap

    g = torch.Generator().manual_seed(3)
    n_q, n_g = 10, 30
    pids = torch.cat([torch.arange(n_q) % 6, torch.arange(n_g) % 5])  # query ids 5: no match
    feats = torch.randn(n_q + n_g, 8, generator=g) + 0.5 * torch.nn.functional.one_hot(pids, 8)
    camids = torch.randint(0, 3, (n_q + n_g,), generator=g)
    is_query = torch.arange(n_q + n_g) < n_q
    index = torch.cat([torch.arange(n_q), torch.arange(n_g)])
    metric = ReIDMetric(metric="euclidean")
    metric.update(feats, pids, camids, is_query, index)
    with pytest.warns(UserWarning, match="no true match"):
        results = metric.compute()
    ranks = metric.topk_gallery(k=5)
    dist = torch.cdist(feats[:n_q], feats[n_q:]).pow(2).numpy()
    expected = naive_query_ap(dist, pids[:n_q], pids[n_q:], camids[:n_q], camids[n_q:])
    assert np.isnan(expected[5])  # query 5 has identity 5, absent from the gallery
    np.testing.assert_allclose(ranks.ap.numpy(), expected, rtol=0, atol=1e-9)
    assert np.nanmean(ranks.ap.numpy()) == pytest.approx(results["mAP"], abs=1e-12)
