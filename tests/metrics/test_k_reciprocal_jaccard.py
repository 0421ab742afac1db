"""k_reciprocal_jaccard (sparse, chunked) against a dense loop version of the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import sparse

from src.metrics import k_reciprocal_jaccard
from src.metrics import rerank as RR
from tests.metrics._naive import naive_k_reciprocal_jaccard


def _blobs(seed: int, n: int, dim: int = 4, ids: int = 5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids, dim)) * 2
    return (centres[rng.integers(0, ids, n)] + rng.standard_normal((n, dim))).astype(np.float32)


def _dense(m: sparse.csr_matrix) -> np.ndarray:
    """The implied dense matrix: stored values, 1 elsewhere."""
    coo = m.tocoo()
    out = np.ones(m.shape)
    out[coo.row, coo.col] = coo.data
    return out


def _check(got: sparse.csr_matrix, ref: np.ndarray) -> None:
    n = ref.shape[0]
    assert isinstance(got, sparse.csr_matrix) and got.shape == (n, n)
    assert got.dtype == np.float32 and got.has_sorted_indices
    np.testing.assert_allclose(_dense(got), ref, atol=1e-6)
    assert (got.data < 1.0).all()  # only the pairs below 1 are stored
    coo = got.tocoo()
    stored = np.zeros((n, n), dtype=bool)
    stored[coo.row, coo.col] = True
    assert stored[ref < 1 - 1e-6].all()  # ... and all of them
    assert stored[np.arange(n), np.arange(n)].all()  # explicit zero diagonal
    assert (got.diagonal() == 0).all()


@pytest.mark.parametrize(
    ("k1", "k2", "metric", "chunk"),
    [(6, 3, "euclidean", 7), (5, 1, "cosine", None), (8, 6, "euclidean", 1), (4, 9, "cosine", 3),
     (7, 2, "euclidean", 50), (1, 1, "euclidean", None)],
)  # fmt: skip
def test_matches_dense_loop_reference(k1, k2, metric, chunk):
    x = _blobs(k1 * 10 + k2, 40)
    ref = naive_k_reciprocal_jaccard(x, k1, k2, metric)
    _check(k_reciprocal_jaccard(torch.from_numpy(x), k1, k2, metric, chunk_size=chunk), ref)


def test_several_pair_chunks_and_numpy_input(monkeypatch):
    # a tiny pair budget forces many Jaccard / query-expansion chunks
    monkeypatch.setattr(RR, "_PAIR_BUDGET", 50)
    monkeypatch.setattr(RR, "_SET_BUDGET", 64)
    x = _blobs(3, 60, dim=6)
    _check(k_reciprocal_jaccard(x, 10, 4, chunk_size=9), naive_k_reciprocal_jaccard(x, 10, 4))


def test_ties_go_to_the_lower_index():
    # integer features on a grid: many exactly equal distances, and exact duplicates
    rng = np.random.default_rng(5)
    x = rng.integers(0, 3, (45, 2)).astype(np.float32)
    for k1, k2 in ((6, 3), (9, 1)):
        _check(k_reciprocal_jaccard(x, k1, k2, chunk_size=4), naive_k_reciprocal_jaccard(x, k1, k2))


def test_far_items_are_exactly_one_and_far_clusters_do_not_mix():
    # two clusters far apart: no shared neighbour, so every cross pair is implicitly 1
    rng = np.random.default_rng(2)
    x = rng.standard_normal((30, 3)) * 0.5
    x[:15, 0] -= 3.0  # (small magnitudes: float32 squared distances stay accurate)
    x[15:, 0] += 3.0
    got = k_reciprocal_jaccard(x.astype(np.float32), 5, 3)
    coo = got.tocoo()
    assert ((coo.row < 15) == (coo.col < 15)).all()
    _check(got, naive_k_reciprocal_jaccard(x, 5, 3))


def test_input_validation():
    x = np.zeros((5, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="k1=6 must not exceed"):
        k_reciprocal_jaccard(x, k1=6)
    with pytest.raises(ValueError, match="metric"):
        k_reciprocal_jaccard(x, k1=2, metric="l1")
    with pytest.raises(ValueError, match="knn"):
        k_reciprocal_jaccard(x, k1=2, knn="annoy")
    with pytest.raises(ValueError, match="2-D"):
        k_reciprocal_jaccard(np.zeros(5), k1=2)
    bad = x.copy()
    bad[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        k_reciprocal_jaccard(bad, k1=2, knn="torch")


def test_faiss_knn_matches_torch_knn():
    pytest.importorskip("faiss")
    x = _blobs(9, 50, dim=8)
    a = k_reciprocal_jaccard(x, 7, 3, knn="faiss")
    b = k_reciprocal_jaccard(x, 7, 3, knn="torch")
    np.testing.assert_allclose(_dense(a), _dense(b), atol=1e-5)


def test_auto_knn_uses_faiss_from_the_threshold_on(monkeypatch):
    pytest.importorskip("faiss")
    calls = []
    faiss_neighbours = RR._faiss_neighbours

    def spy(x, k):
        calls.append(len(x))
        return faiss_neighbours(x, k)

    monkeypatch.setattr(RR, "_faiss_neighbours", spy)
    monkeypatch.setattr(RR, "FAISS_MIN_ITEMS", 50)
    x = _blobs(9, 50, dim=8)
    auto = k_reciprocal_jaccard(x, 7, 3)  # N == FAISS_MIN_ITEMS: faiss
    assert calls == [50]
    exact = k_reciprocal_jaccard(x, 7, 3, knn="torch")
    np.testing.assert_allclose(_dense(auto), _dense(exact), atol=1e-5)
    k_reciprocal_jaccard(x[:49], 7, 3)  # below the threshold: torch
    monkeypatch.setattr(RR, "_faiss_available", lambda: False)
    k_reciprocal_jaccard(x, 7, 3)  # faiss missing: torch, no error
    assert calls == [50]


def test_faiss_requested_but_missing(monkeypatch):
    monkeypatch.setattr(RR, "_faiss_available", lambda: False)
    with pytest.raises(ImportError, match="faiss-cpu"):
        k_reciprocal_jaccard(np.zeros((5, 3), dtype=np.float32), k1=2, knn="faiss")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_give_the_cpu_result():
    x = torch.from_numpy(_blobs(4, 200, dim=16))
    cpu = k_reciprocal_jaccard(x, 12, 4)
    gpu = k_reciprocal_jaccard(x.cuda(), 12, 4)
    np.testing.assert_allclose(_dense(gpu), _dense(cpu), atol=1e-5)


def _reference_lists(m: torch.Tensor, width: int, normalise: bool):
    row_max = m.amax(dim=1)
    d = m / torch.where(row_max == 0, 1.0, row_max).unsqueeze(1) if normalise else m
    order = np.lexsort((np.arange(m.shape[1])[None].repeat(m.shape[0], 0), d.numpy()), axis=1)
    order = torch.from_numpy(order[:, :width])
    return order, d.gather(1, order)


@pytest.mark.parametrize("normalise", [False, True])
@pytest.mark.parametrize("side", [1, 7, 60])
def test_block_neighbour_search_orders_by_value_then_index(normalise, side):
    # a symmetric matrix of few distinct values (ties everywhere) and of adjacent floats
    # (1.75 + k ulp), which the division by the row maximum (3) can merge
    rng = np.random.default_rng(side)
    n, width = 60, 6
    levels = np.float32(1.75) + np.arange(4, dtype=np.float32) * np.finfo(np.float32).eps
    m = rng.choice(levels, (n, n), p=[0.03, 0.03, 0.44, 0.5]).astype(np.float32)
    m = np.triu(m) + np.triu(m, 1).T
    m[np.arange(n), (np.arange(n) + 1) % n] = 3.0  # the row maxima
    m = np.maximum(m, m.T)
    m = torch.from_numpy(m)
    nn, row_max = RR._knn_symmetric(lambda a, b, c, e: m[a:b, c:e], n, width, side, normalise,
                                    torch.device("cpu"))  # fmt: skip
    index, values = _reference_lists(m, width, normalise)
    assert torch.equal(row_max, m.amax(dim=1))
    assert torch.equal(nn.index, index)
    assert torch.equal(nn.dist, values)


@pytest.mark.parametrize("max_distance", [0.0, 0.3, 0.6, 0.95])
def test_max_distance_keeps_exactly_the_pairs_within_it(monkeypatch, max_distance):
    """Cut at max_distance (row block by row block): exactly the full matrix's entries <= it,
    the diagonal included, and DBSCAN at eps = max_distance gives the same labels."""
    from src.systems.cc_steps import dbscan_labels

    monkeypatch.setattr(RR, "_PAIR_BUDGET", 200)  # several row blocks
    x = _blobs(6, 80, dim=6)
    full = k_reciprocal_jaccard(x, 10, 4)
    cut = k_reciprocal_jaccard(x, 10, 4, max_distance=max_distance)
    f, c = full.tocoo(), cut.tocoo()
    within = f.data <= max_distance
    assert set(zip(c.row.tolist(), c.col.tolist(), strict=True)) == set(
        zip(f.row[within].tolist(), f.col[within].tolist(), strict=True)
    )
    np.testing.assert_array_equal(cut.toarray()[cut.toarray() > 0], full.toarray()[
        (full.toarray() > 0) & (full.toarray() <= max_distance)])  # fmt: skip
    assert (cut.diagonal() == 0).all() and cut.nnz >= x.shape[0]
    if 0 < max_distance < 1:
        np.testing.assert_array_equal(
            dbscan_labels(cut, max_distance, 4), dbscan_labels(full, max_distance, 4)
        )
    with pytest.raises(ValueError, match="max_distance"):
        k_reciprocal_jaccard(x, 10, 4, max_distance=1.5)
