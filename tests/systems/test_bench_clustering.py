"""The clustering benchmark: its dense reference equals the loop reference and gives marlin's
labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import DBSCAN

from src.bench import clustering
from src.bench.__main__ import BENCHMARKS
from src.systems.cc_steps import cluster_features
from tests.metrics._naive import naive_k_reciprocal_jaccard

pytest.importorskip("faiss")


@pytest.mark.parametrize(("k1", "k2"), [(7, 3), (6, 1), (9, 6)])
def test_dense_reference_matches_the_loop_reference(k1, k2):
    rng = np.random.default_rng(k1 + k2)
    centres = rng.standard_normal((5, 8)) * 2
    x = centres[rng.integers(0, 5, 60)] + rng.standard_normal((60, 8))
    x = torch.nn.functional.normalize(torch.from_numpy(x).float(), dim=1)
    stages: dict[str, float] = {}
    got = clustering.reference_jaccard(x, k1, k2, stages)
    assert got.dtype == np.float32 and got.shape == (60, 60)
    ref = naive_k_reciprocal_jaccard(x.numpy(), k1, k2, metric="cosine")
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert "min-sum loop (dense Jaccard)" in stages and all(t >= 0 for t in stages.values())


def test_quick_size_dense_and_sparse_labels_are_identical():
    sizes = clustering.QUICK
    feats, _ = clustering._features(sizes, sizes.cases[0])  # Market-like, N = 600, 64-d
    ours = cluster_features(feats, eps=clustering.EPS, min_samples=clustering.MIN_SAMPLES).numpy()
    dense = clustering.reference_jaccard(feats, clustering.K1, clustering.K2)
    ref = DBSCAN(eps=clustering.EPS, min_samples=clustering.MIN_SAMPLES, metric="precomputed")
    np.testing.assert_array_equal(ours, ref.fit_predict(dense))
    assert ours.max() + 1 >= 20 and 0.0 < (ours == -1).mean() < 0.5  # a non-trivial clustering


def test_dense_version_is_skipped_when_its_matrices_would_not_fit():
    n = 32621
    assert clustering.dense_peak_bytes(n) == 9 * n * n  # ~8.9 GiB
    assert clustering._skip_reason(n, 24 * 2**30) is None
    reason = clustering._skip_reason(n, 8 * 2**30)
    assert reason is not None and "skipped" in reason and "4.0 GiB each" in reason
    assert "clustering" in BENCHMARKS


@pytest.mark.slow
def test_run_quick_reports_identical_labels():
    text = clustering.run(quick=True)
    assert text.startswith("## Cluster-contrast clustering pass")
    assert text.count("| yes |") == 4 and "no: ARI" not in text
    assert "peak memory above the features (MiB)" in text
