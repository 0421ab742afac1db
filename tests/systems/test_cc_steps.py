"""Cluster-contrast step functions against loop references and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from sklearn.cluster import DBSCAN

from src.systems.cc_steps import (
    cc_train_step,
    cluster_centroids,
    cluster_contrast_loss,
    cluster_diagnostics,
    dbscan_labels,
    update_cluster_memory,
)


def loop_memory_update(memory, feat, labels, momentum, mode):
    """The paper's update one cluster at a time (the reference's CM_Hard loop): for each cluster
    of the batch, its hardest (least similar, first on ties) or mean batch feature q, then
    M[k] = normalize(m M[k] + (1 - m) q)."""
    memory = memory.clone()
    old = memory.clone()
    for k in dict.fromkeys(labels.tolist()):  # clusters in order of first appearance
        rows = [i for i, y in enumerate(labels.tolist()) if y == k]
        if mode == "hard":
            sims = [float(feat[i] @ old[k]) for i in rows]
            q = feat[rows[int(np.argmin(sims))]]
        else:
            q = sum(feat[i] for i in rows) / len(rows)
        value = momentum * old[k] + (1 - momentum) * q
        memory[k] = value / value.norm()
    return memory


def _problem(seed=0, num_clusters=6, batch=24, dim=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    memory = F.normalize(torch.randn(num_clusters, dim, generator=g, dtype=dtype), dim=1)
    labels = torch.randint(0, num_clusters - 1, (batch,), generator=g)  # the last one unseen
    feat = F.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=1)
    return memory, feat, labels


@pytest.mark.parametrize("mode", ["hard", "mean"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_memory_update_matches_loop(mode, seed):
    memory, feat, labels = _problem(seed)
    expected = loop_memory_update(memory, feat, labels, 0.1, mode)
    got = memory.clone()
    update_cluster_memory(got, feat, labels, momentum=0.1, mode=mode)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[-1], memory[-1])  # a cluster absent from the batch is untouched


def test_hard_update_ties_take_the_first_sample():
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # cluster 0: samples 1 and 2 are equally (and most) dissimilar (cosine 0); the first is taken
    feat = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0])
    got = memory.clone()
    update_cluster_memory(got, feat, labels, momentum=0.1, mode="hard")
    torch.testing.assert_close(got, loop_memory_update(memory, feat, labels, 0.1, "hard"))
    # hand value: q = sample 1 = (0, 1): normalize(0.1 (1, 0) + 0.9 (0, 1))
    expected = torch.tensor([0.1, 0.9], dtype=torch.float64) / math.hypot(0.1, 0.9)
    torch.testing.assert_close(got[0], expected)


def test_loss_is_infonce_over_the_memory():
    memory, feat, labels = _problem(3)
    tau = 0.05
    loss = cluster_contrast_loss(feat, labels, memory, tau)
    by_hand = 0.0
    for i in range(len(labels)):
        logits = [float(feat[i] @ memory[k]) / tau for k in range(len(memory))]
        top = max(logits)
        log_z = top + math.log(sum(math.exp(v - top) for v in logits))
        by_hand += log_z - logits[int(labels[i])]
    assert float(loss) == pytest.approx(by_hand / len(labels), rel=1e-12)


def test_step_uses_the_pre_step_memory_then_updates_it():
    memory, feat, labels = _problem(4)
    raw = (3.0 * feat).requires_grad_(True)  # not unit-norm: the step normalises
    before = memory.clone()
    out = cc_train_step(raw, labels, memory, temperature=0.05, momentum=0.1, mode="hard")
    expected = cluster_contrast_loss(feat, labels, before, 0.05)
    assert float(out.loss.detach()) == pytest.approx(float(expected))
    out.loss.backward()  # the in-place update did not break the graph
    assert raw.grad is not None and torch.isfinite(raw.grad).all()
    torch.testing.assert_close(memory, loop_memory_update(before, feat, labels, 0.1, "hard"))


def test_centroids_are_normalised_cluster_means():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(12, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 1, -1, 2, 0, 1, 1, -1, 2, 0, 2, 2])
    got = cluster_centroids(feats, labels, 3)
    for k in range(3):
        mean = feats[labels == k].mean(0)
        torch.testing.assert_close(got[k], mean / mean.norm())


def test_diagnostics_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 1, -1, 2, 2, -1, -1])
    ids = torch.tensor([5, 5, 7, 7, 7, 5, 9, 5, 9, 9])
    stats = cluster_diagnostics(labels, ids)
    assert stats["num_clusters"] == 3
    assert stats["outlier_fraction"] == pytest.approx(0.3)
    # majorities: cluster 0 -> 5 (2 of 3), 1 -> 7 (2 of 2), 2 -> 9 or 5 (1 of 2): 5 of 7
    assert stats["purity"] == pytest.approx(5 / 7)
    from sklearn.metrics import normalized_mutual_info_score

    keep = labels >= 0
    assert stats["nmi"] == pytest.approx(
        normalized_mutual_info_score(ids[keep].numpy(), labels[keep].numpy())
    )
    assert cluster_diagnostics(torch.tensor([0, 0, 1, 1]), torch.tensor([3, 3, 4, 4]))["nmi"] == 1


def _sparse_distances(seed, n=60):
    """A symmetric 'Jaccard-like' distance: blobs, most pairs at 1 (not stored), some exact 0
    off-diagonal pairs (duplicates) stored as explicit zeros, the diagonal stored as 0."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((5, 3)) * 3
    x = centres[rng.integers(0, 5, n)] + rng.standard_normal((n, 3)) * 0.7
    x[:4] = 100.0  # four identical images far from the rest: a cluster only through the
    x[5] = x[4]  # explicit zeros (min_samples = 4); and one more duplicate pair
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)) / 4
    d = np.minimum(d, 1.0)
    rows, cols = np.nonzero(d < 1)
    sparse = sp.csr_matrix((d[rows, cols].astype(np.float32), (rows, cols)), shape=(n, n))
    assert sparse.nnz > n and (sparse.data == 0).sum() > n  # explicit zeros are stored
    return sparse, d.astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("eps", [0.25, 0.35])
def test_dbscan_on_sparse_equals_sklearn_on_dense(seed, eps):
    sparse, dense = _sparse_distances(seed)
    expected = DBSCAN(eps=eps, min_samples=4, metric="precomputed").fit_predict(dense)
    got = dbscan_labels(sparse, eps=eps, min_samples=4)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, expected)
    assert len(set(got) - {-1}) >= 2  # a non-trivial clustering
    assert got[0] >= 0 and (got[:4] == got[0]).all()  # the duplicates' cluster


def test_dbscan_rejects_eps_outside_the_jaccard_range():
    sparse, _ = _sparse_distances(0)
    with pytest.raises(ValueError, match="eps"):
        dbscan_labels(sparse, eps=1.0)


def test_dbscan_on_the_shared_jaccard_equals_sklearn_on_its_dense_form():
    """The sparse k-reciprocal Jaccard distance (missing pairs = 1) into DBSCAN gives
    scikit-learn's labels on the dense N x N matrix the reference clusters, duplicates included
    (their Jaccard distance 0 must stay stored as explicit zeros)."""
    from src.metrics.rerank import k_reciprocal_jaccard

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 8)) * 2
    x = centres[rng.integers(0, 6, 90)] + rng.standard_normal((90, 8)) * 0.6
    x[1], x[5] = x[0], x[4]  # duplicate images
    feats = F.normalize(torch.tensor(x, dtype=torch.float32), dim=1)
    sparse = k_reciprocal_jaccard(feats, k1=10, k2=3, metric="cosine")
    dense = np.ones(sparse.shape, dtype=np.float32)
    coo = sparse.tocoo()
    dense[coo.row, coo.col] = coo.data
    assert dense[0, 1] == 0 and sparse[0, 1] == 0 and (0, 1) in set(zip(coo.row, coo.col))
    for eps in (0.5, 0.6, 0.7):
        expected = DBSCAN(eps=eps, min_samples=4, metric="precomputed").fit_predict(dense)
        got = dbscan_labels(sparse, eps=eps, min_samples=4)
        np.testing.assert_array_equal(got, expected)
    assert len(set(got) - {-1}) >= 3
