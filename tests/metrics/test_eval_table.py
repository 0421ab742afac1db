"""src.eval's result table: plain / re-ranked rows with AQE and ROC, against the functional API."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from src.eval import evaluate_features_table
from src.metrics import compute_distance_matrix, evaluate_rank, re_ranking, topk_gallery
from src.metrics.query_expansion import aqe
from src.metrics.roc import tpr_at_fpr
from tests.metrics._naive import naive_query_ap


def test_table_rows_equal_the_functional_composition():
    g = torch.Generator().manual_seed(0)
    n_q, n_g = 12, 40
    pids = torch.cat([torch.randint(0, 5, (n_q,), generator=g), torch.arange(n_g) % 5])
    centres = torch.randn(5, 6, generator=g)
    data = {
        "feat": centres[pids] + 0.8 * torch.randn(n_q + n_g, 6, generator=g),
        "pid": pids,
        "camid": torch.randint(0, 3, (n_q + n_g,), generator=g),
        "is_query": torch.arange(n_q + n_g) < n_q,
        "index": torch.cat([torch.arange(n_q), torch.arange(n_g)]),
    }
    cfg = OmegaConf.create({"metric": "euclidean", "ap": "standard", "rerank": True,
                            "rerank_k1": 6, "rerank_k2": 3, "rerank_lambda": 0.3, "aqe": True,
                            "aqe_times": 1, "aqe_k": 3, "aqe_alpha": 3.0, "roc": True})  # fmt: skip
    rows, ranklists = evaluate_features_table(data, cfg)
    q, gal = data["is_query"], ~data["is_query"]
    qf, gf = aqe(data["feat"][q], data["feat"][gal], 1, 3, 3.0)
    labels = (data["pid"][q], data["pid"][gal], data["camid"][q], data["camid"][gal])
    plain = compute_distance_matrix(qf, gf)
    reranked = re_ranking(plain, compute_distance_matrix(qf, qf), compute_distance_matrix(gf, gf),
                          6, 3, 0.3)  # fmt: skip
    for name, dist in (("plain", plain), ("re-ranked", reranked)):
        cmc, mAP, mINP = evaluate_rank(dist, *labels, max_rank=40)
        assert rows[name]["rank1"] == pytest.approx(cmc[0], abs=1e-12)
        assert rows[name]["rank5"] == pytest.approx(cmc[4], abs=1e-12)
        assert (rows[name]["mAP"], rows[name]["mINP"]) == pytest.approx((mAP, mINP), abs=1e-9)
        roc = tpr_at_fpr(dist, *labels)
        assert {k: rows[name][k] for k in roc} == pytest.approx(roc, abs=1e-12)
    # each setting's rank lists are its own ranking, with every query's AP (loop reference)
    for name, dist in (("plain", plain), ("re-ranked", reranked)):
        exp_pos, exp_match, exp_dist = topk_gallery(dist, *labels, k=10)
        ranks = ranklists[name]
        assert torch.equal(ranks.gallery_index, exp_pos) and torch.equal(ranks.matches, exp_match)
        torch.testing.assert_close(ranks.distances, exp_dist.float(), rtol=0, atol=1e-6)
        expected_ap = naive_query_ap(np.asarray(dist), *(x.numpy() for x in labels))
        np.testing.assert_allclose(ranks.ap.numpy(), expected_ap, rtol=0, atol=1e-12)
        assert np.nanmean(ranks.ap.numpy()) == pytest.approx(rows[name]["mAP"], abs=1e-12)
    assert np.isfinite([v for r in rows.values() for v in r.values()]).all()
