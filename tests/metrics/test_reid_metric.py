"""ReIDMetric: equality with the functional evaluation, de-duplication, DDP (gloo, 2 ranks)."""

from __future__ import annotations

import os
import tempfile
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from src.metrics import RankList, ReIDMetric
from src.metrics.functional import (
    compute_distance_matrix,
    evaluate_rank,
    re_ranking,
    topk_gallery,
)

NUM_Q, NUM_G, DIM = 14, 50, 8


def _dataset(seed: int = 0) -> dict[str, torch.Tensor]:
    """Query + gallery samples in loader order; query and gallery `index` both start at 0."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(7, DIM, generator=g)
    pids = torch.cat([torch.randint(0, 7, (NUM_Q,), generator=g), torch.arange(NUM_G) % 7])
    feats = centres[pids] + 0.9 * torch.randn(NUM_Q + NUM_G, DIM, generator=g)
    feats = feats.round(decimals=1)  # ties in distance, to check the canonical order
    return {
        "feat": feats,
        "pid": pids,
        "camid": torch.randint(0, 3, (NUM_Q + NUM_G,), generator=g),
        "is_query": torch.arange(NUM_Q + NUM_G) < NUM_Q,
        "index": torch.cat([torch.arange(NUM_Q), torch.arange(NUM_G)]),
    }


def _expected(data, metric="euclidean", ap="standard", rerank=False, normalize=False):
    q, g = data["is_query"], ~data["is_query"]
    feats = torch.nn.functional.normalize(data["feat"]) if normalize else data["feat"]
    qf, gf = feats[q], feats[g]
    dist_qg = compute_distance_matrix(qf, gf, metric)
    if rerank:
        dist_qg = re_ranking(
            dist_qg,
            compute_distance_matrix(qf, qf, metric),
            compute_distance_matrix(gf, gf, metric),
        )
    labels = (data["pid"][q], data["pid"][g], data["camid"][q], data["camid"][g])
    cmc, mAP, mINP = evaluate_rank(dist_qg, *labels, max_rank=50, ap=ap)
    return {"rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "mAP": mAP, "mINP": mINP}, cmc


def _feed(metric: ReIDMetric, data: dict, order: torch.Tensor, batch: int) -> None:
    for start in range(0, len(order), batch):
        i = order[start : start + batch]
        metric.update(data["feat"][i], data["pid"][i], data["camid"][i], data["is_query"][i],
                      data["index"][i])  # fmt: skip


def _assert_same(got: dict, expected: dict) -> None:
    assert set(got) == {"rank1", "rank5", "rank10", "mAP", "mINP"}
    for key, value in expected.items():
        assert isinstance(got[key], float)
        assert got[key] == pytest.approx(float(value), abs=1e-12), key


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"metric": "cosine"},
        {"ap": "market_trapezoid", "normalize": True},
        {"rerank": True, "k1": 6, "k2": 3},
        {"compute_on_cpu": True, "chunk_size": 3},
    ],
)
def test_equals_functional_evaluation_with_duplicates(options):
    data = _dataset()
    n = NUM_Q + NUM_G
    # Shuffled loader order plus DistributedSampler-style padding (repeated samples).
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    order = torch.cat([order, order[:9]])
    metric = ReIDMetric(max_rank=20, **options)
    _feed(metric, data, order, batch=11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = metric.compute()
        expected, cmc = _expected(
            data,
            metric=options.get("metric", "euclidean"),
            ap=options.get("ap", "standard"),
            rerank=options.get("rerank", False),
            normalize=options.get("normalize", False),
        )
    if options.get("rerank"):  # the metric used k1=6, k2=3
        q, g = data["is_query"], ~data["is_query"]
        qf, gf = data["feat"][q], data["feat"][g]
        rr = re_ranking(
            compute_distance_matrix(qf, gf),
            compute_distance_matrix(qf, qf),
            compute_distance_matrix(gf, gf),
            k1=6,
            k2=3,
        )
        labels = (data["pid"][q], data["pid"][g], data["camid"][q], data["camid"][g])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cmc, mAP, mINP = evaluate_rank(rr, *labels)
        expected = {"rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "mAP": mAP, "mINP": mINP}
    _assert_same(got, expected)
    np.testing.assert_array_equal(metric.last_cmc, cmc[:20])


def test_topk_gallery_uses_dataset_indices():
    data = _dataset()
    metric = ReIDMetric()
    order = torch.randperm(NUM_Q + NUM_G, generator=torch.Generator().manual_seed(2))
    _feed(metric, data, order, batch=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric.compute()
    ranks = metric.topk_gallery(k=5)
    assert isinstance(ranks, RankList)
    q, g = data["is_query"], ~data["is_query"]
    positions, matches, dists = topk_gallery(
        compute_distance_matrix(data["feat"][q], data["feat"][g]),
        data["pid"][q],
        data["pid"][g],
        data["camid"][q],
        data["camid"][g],
        k=5,
    )
    assert torch.equal(ranks.query_index, data["index"][q])
    assert torch.equal(ranks.gallery_index, data["index"][g][positions])
    assert torch.equal(ranks.matches, matches)
    torch.testing.assert_close(ranks.distances, dists)
    metric.reset()
    with pytest.raises(RuntimeError, match="compute"):
        metric.topk_gallery()


def test_errors():
    metric = ReIDMetric()
    with pytest.raises(ValueError, match="before any update"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics' own "compute before update" warning
        metric.compute()
    with pytest.raises(ValueError, match="pids"):
        metric.update(
            torch.zeros(3, 4), torch.zeros(2), torch.zeros(3), torch.ones(3), torch.arange(3)
        )
    metric.update(torch.zeros(2, 4), torch.tensor([1, 1]), torch.tensor([0, 1]),
                  torch.tensor([True, True]), torch.arange(2))  # fmt: skip
    with pytest.raises(ValueError, match="0 gallery items"):
        metric.compute()
    metric.reset()
    # the same gallery record (index 0) sent twice with different labels
    metric.update(torch.zeros(3, 4), torch.tensor([1, 1, 2]), torch.tensor([0, 1, 1]),
                  torch.tensor([True, False, False]), torch.tensor([0, 0, 0]))  # fmt: skip
    with pytest.raises(ValueError, match="index 0 was updated twice"):
        metric.compute()
    with pytest.raises(ValueError, match="metric"):
        ReIDMetric(metric="l1")


# ---------------------------------------------------------------------------------------------
# Two ranks over gloo: uneven shards, DistributedSampler-style padding, equal to one process.
# ---------------------------------------------------------------------------------------------
def _shards(n: int) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    # rank 0 gets 33 samples, rank 1 the other 31 plus 5 repeats of rank 0's (padding)
    return [order[:33], torch.cat([order[33:], order[:5]])]


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)  # fmt: skip
    try:
        data = _dataset()
        metric = ReIDMetric(ap="market_trapezoid")
        _feed(metric, data, _shards(NUM_Q + NUM_G)[rank], batch=8 if rank == 0 else 5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = metric.compute()
        torch.save(
            {"result": result, "cmc": metric.last_cmc, "topk": metric.topk_gallery(4)},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_ddp_two_ranks_equal_single_process():
    data = _dataset()
    single = ReIDMetric(ap="market_trapezoid")
    _feed(single, data, torch.arange(NUM_Q + NUM_G), batch=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = single.compute()
    expected_topk = single.topk_gallery(4)
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        # fork: the workers inherit the imported modules (spawn re-imports torchmetrics and
        # torchvision, ~6 s per worker); they use one intra-op thread, set before any op.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        mp.start_processes(
            _ddp_worker, args=(2, init_file, tmp), nprocs=2, join=True, start_method=method
        )
        for rank in range(2):
            saved = torch.load(os.path.join(tmp, f"rank{rank}.pt"), weights_only=False)
            assert saved["result"] == expected  # bit-identical on every rank
            np.testing.assert_array_equal(saved["cmc"], single.last_cmc)
            for a, b in zip(saved["topk"], expected_topk):
                assert torch.equal(a, b)


def test_aqe_and_roc_equal_the_functional_composition():
    from src.metrics.query_expansion import aqe
    from src.metrics.roc import tpr_at_fpr

    data = _dataset(3)
    metric = ReIDMetric(metric="cosine", aqe=True, qe_k=4, alpha=3.0, roc=True, chunk_size=5)
    _feed(
        metric, data, torch.randperm(NUM_Q + NUM_G, generator=torch.Generator().manual_seed(1)), 9
    )
    got = metric.compute()
    q, g = data["is_query"], ~data["is_query"]
    qf, gf = aqe(data["feat"][q], data["feat"][g], 1, 4, 3.0)
    dist = compute_distance_matrix(qf, gf, "cosine")
    labels = (data["pid"][q], data["pid"][g], data["camid"][q], data["camid"][g])
    cmc, mAP, mINP = evaluate_rank(dist, *labels)
    assert got["rank1"] == pytest.approx(cmc[0], abs=1e-12)
    assert (got["mAP"], got["mINP"]) == pytest.approx((mAP, mINP), abs=1e-12)
    roc = tpr_at_fpr(dist, *labels)
    assert set(roc) == {"TPR@FPR=1e-04", "TPR@FPR=1e-03", "TPR@FPR=1e-02"}
    for key, value in roc.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    # rank lists follow the expanded features
    ranks = metric.topk_gallery(3)
    expected = topk_gallery(dist, *labels, k=3)[0]
    assert torch.equal(torch.where(ranks.gallery_index >= 0, ranks.gallery_index, -1), expected)
