"""MAR initialisation maths (src/systems/mar_init.py): the exact T0 equals a brute-force sort of all
pairs, the sampled estimate stays within its documented error, de-duplication by index, cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import pdist

from src.losses.mar import DiscriminativeLoss
from src.systems import mar_init


def _multilabels(n: int, k: int, seed: int, sharpness: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(sharpness * torch.randn(n, k, generator=g, dtype=torch.float64), dim=1)


def _all_agreements(ml: torch.Tensor) -> np.ndarray:
    return 1 - pdist(ml.numpy(), "minkowski", p=1) / 2


@pytest.mark.parametrize(
    "n,k,ratio,chunk",
    [(60, 9, 0.005, 7), (61, 4, 0.05, 1024), (200, 12, 0.005, 33), (3, 5, 0.5, 1)],
)
def test_exact_threshold_equals_brute_force_sort(n, k, ratio, chunk):
    ml = _multilabels(n, k, seed=n)
    agreements = np.sort(_all_agreements(ml))[::-1]
    rank = mar_init.num_mined_pairs(n, ratio)
    assert rank == max(1, math.floor(n * (n - 1) // 2 * ratio))
    got = mar_init.init_threshold_value(ml, ratio, mode="exact", chunk_size=chunk)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(agreements[rank - 1], abs=1e-12)
    # the same value as the loss's own init_threshold on all condensed agreements
    loss = DiscriminativeLoss(mining_ratio=ratio)
    loss.init_threshold(_all_agreements(ml))
    assert float(loss.threshold) == pytest.approx(float(got), abs=1e-6)


def test_exact_threshold_float32_input_and_rank_one():
    ml = _multilabels(40, 6, seed=1).float()
    top = np.sort(_all_agreements(ml.double()))[::-1]
    got = mar_init.kth_largest_agreement(ml, 1, chunk_size=5)
    assert float(got) == pytest.approx(top[0], abs=1e-6)
    with pytest.raises(ValueError, match="k must be in"):
        mar_init.kth_largest_agreement(ml, 40 * 39 // 2 + 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_threshold_within_documented_error(seed):
    """The estimate's rank among all pairs is within 4 documented standard deviations
    sqrt(p(1-p)/m) of the target quantile p (a 1-in-15,000 false alarm per seed)."""
    n, ratio, m = 400, 0.02, 40_000
    ml = _multilabels(n, 8, seed=10 + seed)
    agreements = _all_agreements(ml)
    estimate = float(
        mar_init.init_threshold_value(ml, ratio, mode="sampled", num_pairs=m, seed=seed)
    )
    quantile = float((agreements >= estimate).mean())  # fraction of pairs at or above it
    sigma = mar_init.sampled_quantile_error(ratio, m)
    assert sigma == pytest.approx(math.sqrt(ratio * (1 - ratio) / m))
    assert abs(quantile - ratio) <= 4 * sigma + 1 / len(agreements), (quantile, ratio, sigma)
    exact = float(mar_init.init_threshold_value(ml, ratio, mode="exact"))
    assert abs(estimate - exact) < 0.05


def test_unknown_mode():
    with pytest.raises(ValueError, match="init_mode"):
        mar_init.init_threshold_value(_multilabels(5, 3, 0), 0.1, mode="approx")


def test_gather_by_index_dedups_and_orders():
    index = torch.tensor([3, 0, 2, 3, 1, 0])  # padded shard: 3 and 0 repeated
    values = torch.arange(6.0)[:, None].repeat(1, 2)
    cams = torch.tensor([30, 0, 20, 31, 10, 1])
    out_values, out_cams = mar_init.gather_by_index(index, values, cams, num_items=4)
    # first occurrence of each index, in index order
    assert out_values[:, 0].tolist() == [1.0, 4.0, 2.0, 0.0]
    assert out_cams.tolist() == [0, 10, 20, 30]


def test_gather_by_index_missing_item_is_an_error():
    with pytest.raises(ValueError, match="num_target_train=5"):
        mar_init.gather_by_index(torch.tensor([0, 1, 2, 3]), torch.zeros(4), num_items=5)


def test_extract_target_similarities():
    agents = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    feats = torch.randn(5, 3)
    loader = [
        {"img": feats[:3], "camid": torch.tensor([0, 1, 0]), "index": torch.tensor([4, 2, 0])},
        {"img": feats[3:], "camid": torch.tensor([1, 1]), "index": torch.tensor([1, 3])},
    ]
    sims, cams, index = mar_init.extract_target_similarities(lambda x: 2 * x, loader, agents)
    want = torch.nn.functional.normalize(feats, dim=1) @ agents.t()
    torch.testing.assert_close(sims, want)
    assert cams.tolist() == [0, 1, 0, 1, 1] and index.tolist() == [4, 2, 0, 1, 3]


def test_cache_roundtrip_and_key(tmp_path):
    ckpt = tmp_path / "a.ckpt"
    ckpt.write_bytes(b"weights-1")
    sha = mar_init.file_sha256(ckpt)
    key = mar_init.init_cache_key(sha, "data/B", 100, 0.005, scale=30.0)
    assert key == mar_init.init_cache_key(sha, "data/B", 100, 0.005, scale=30.0)
    for other in (
        mar_init.init_cache_key(sha, "data/C", 100, 0.005, scale=30.0),
        mar_init.init_cache_key(sha, "data/B", 101, 0.005, scale=30.0),
        mar_init.init_cache_key(sha, "data/B", 100, 0.01, scale=30.0),
        mar_init.init_cache_key(sha, "data/B", 100, 0.005, scale=20.0),
    ):
        assert other != key
    ckpt.write_bytes(b"weights-2")
    assert mar_init.file_sha256(ckpt) != sha

    assert mar_init.load_init_cache(tmp_path / "cache", key) is None
    assert mar_init.load_init_cache(None, key) is None
    state = {
        "threshold": torch.tensor(0.25, dtype=torch.float64),
        "center_mean": torch.randn(7),
        "center_std": torch.rand(7),
    }
    path = mar_init.save_init_cache(tmp_path / "cache", key, state, {"note": "test"})
    assert path == mar_init.init_cache_path(tmp_path / "cache", key) and path.is_file()
    loaded = mar_init.load_init_cache(tmp_path / "cache", key)
    for name, value in state.items():
        assert torch.equal(loaded[name], value)
    # a corrupt file is a miss, not a crash
    path.write_bytes(b"not a checkpoint")
    assert mar_init.load_init_cache(tmp_path / "cache", key) is None
