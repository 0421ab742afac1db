"""src.search: the evaluation's ranking for any query, gallery features cached per checkpoint."""

from __future__ import annotations

import os
import shutil

import numpy as np

from src.inference import FeatureExtractor
from src.metrics.functional import compute_distance_matrix, topk_gallery
from src.search import CACHE_DIR, search
from src.systems.mar_init import file_sha256
from tests.inference._helpers import eval_reference
from tests.inference.conftest import compose_cfg


def _search(ckpt, tmp_path, query, gallery, *overrides):
    cfg = compose_cfg(
        [
            f"ckpt_path={ckpt}",
            f"query={query}",
            f"gallery={gallery}",
            "num_workers=0",
            "progress=false",
            f"out={tmp_path / 'search.png'}",
            *overrides,
        ],
        tmp_path / "run",
        "search",
    )
    return search(cfg)


def test_search_returns_the_evaluations_ranking(supervised_ckpt, tiny_data_root, tmp_path):
    """Every query of the split, against the gallery folder (junk files included): the
    evaluation's top-10 (junk and same-camera matches skipped), same order, same distances."""
    gallery = tmp_path / "gallery"
    shutil.copytree(tiny_data_root / "synthetic" / "A" / "bounding_box_test", gallery)
    assert any(p.name.startswith("-1_") for p in gallery.iterdir())  # junk on disk
    ref = eval_reference(supervised_ckpt)
    q = ref.is_query
    queries = tmp_path / "queries"
    queries.mkdir()
    query_paths = [p for p, is_q in zip(ref.paths, q.tolist()) if is_q]
    for p in query_paths:
        shutil.copy(p, queries / os.path.basename(p))
    result = _search(supervised_ckpt, tmp_path, queries, gallery, "protocol_filter=true")
    dist = compute_distance_matrix(ref.feats[q], ref.feats[~q])
    positions, _, distances = topk_gallery(
        dist, ref.pids[q], ref.pids[~q], ref.camids[q], ref.camids[~q], k=10
    )
    gallery_paths = [os.path.basename(p) for p, is_q in zip(ref.paths, q.tolist()) if not is_q]
    row_of = {os.path.basename(p): i for i, p in enumerate(query_paths)}
    assert sorted(result.query_paths) == sorted(row_of)
    for r, name in enumerate(result.query_paths):
        i = row_of[name]
        expected = [gallery_paths[g] if g >= 0 else None for g in positions[i].tolist()]
        got = [result.gallery_paths[g] if g >= 0 else None for g in result.indices[r].tolist()]
        assert got == expected, name
        np.testing.assert_allclose(result.distances[r], distances[i].numpy(), rtol=0, atol=1e-4)
    assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plain_search_ranks_everything_and_caches_the_gallery(
    mar_ckpt, tiny_data_root, tmp_path, monkeypatch
):
    gallery = tmp_path / "gallery"
    shutil.copytree(tiny_data_root / "synthetic" / "B" / "bounding_box_test", gallery)
    queries = sorted((tiny_data_root / "synthetic" / "B" / "query").glob("*.jpg"))[:2]
    (tmp_path / "q").mkdir()
    for f in queries:
        shutil.copy(f, tmp_path / "q" / f.name)
    shutil.copy(queries[0], gallery / "same_image.jpg")  # a query inside the gallery: rank 1
    result = _search(mar_ckpt, tmp_path, tmp_path / "q", gallery, "topk=4")
    assert result.metric == "cosine"
    assert result.gallery_paths[result.indices[0, 0]] == "same_image.jpg"
    assert abs(result.distances[0, 0]) < 1e-5
    # brute force over the extractor's features
    extractor = FeatureExtractor.from_checkpoint(mar_ckpt, device="cpu")
    gf = extractor([gallery / p for p in result.gallery_paths])
    qf = extractor(queries)
    d = compute_distance_matrix(qf, gf, metric="cosine")
    np.testing.assert_allclose(result.distances, np.sort(d.numpy(), 1)[:, :4], atol=1e-5)
    cache = gallery / CACHE_DIR / f"{file_sha256(mar_ckpt)[:16]}_flip0.npz"
    assert cache.is_file()
    # a second search extracts only the queries
    counted = []
    real = FeatureExtractor.embed
    monkeypatch.setattr(
        FeatureExtractor, "embed", lambda self, x: counted.append(len(x)) or real(self, x)
    )
    again = _search(mar_ckpt, tmp_path, tmp_path / "q", gallery, "topk=4")
    assert sum(counted) == 2
    np.testing.assert_array_equal(again.indices, result.indices)
