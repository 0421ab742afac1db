"""Re-ID evaluation: Market-1501 protocol, re-ranking, AQE, ROC, DDP metric, rank lists.

Names are imported lazily, so that ``import src.metrics.rank`` does not pay for
torchmetrics (and the torchvision it imports) or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SkippedQueriesWarning": "src.metrics.rank",
    "compute_distance_matrix": "src.metrics.distance",
    "evaluate_features": "src.metrics.rank",
    "evaluate_rank": "src.metrics.rank",
    "evaluate_reranked": "src.metrics.rerank",
    "k_reciprocal_jaccard": "src.metrics.rerank",
    "re_ranking": "src.metrics.rerank",
    "re_ranking_features": "src.metrics.rerank",
    "topk_gallery": "src.metrics.rank",
    "plot_ranklist": "src.metrics.ranklist",
    "RankListRows": "src.metrics.ranklist",
    "select_queries": "src.metrics.ranklist",
    "write_ranklist": "src.metrics.ranklist",
    "aqe": "src.metrics.query_expansion",
    "tpr_at_fpr": "src.metrics.roc",
    "RankList": "src.metrics.reid_metric",
    "ReIDMetric": "src.metrics.reid_metric",
}
__all__ = [
    "RankList",
    "RankListRows",
    "ReIDMetric",
    "SkippedQueriesWarning",
    "aqe",
    "compute_distance_matrix",
    "evaluate_features",
    "evaluate_rank",
    "evaluate_reranked",
    "k_reciprocal_jaccard",
    "plot_ranklist",
    "re_ranking",
    "re_ranking_features",
    "select_queries",
    "topk_gallery",
    "tpr_at_fpr",
    "write_ranklist",
]

if TYPE_CHECKING:
    from src.metrics.distance import compute_distance_matrix
    from src.metrics.query_expansion import aqe
    from src.metrics.rank import (
        SkippedQueriesWarning,
        evaluate_features,
        evaluate_rank,
        topk_gallery,
    )
    from src.metrics.ranklist import RankListRows, plot_ranklist, select_queries, write_ranklist
    from src.metrics.reid_metric import RankList, ReIDMetric
    from src.metrics.rerank import (
        evaluate_reranked,
        k_reciprocal_jaccard,
        re_ranking,
        re_ranking_features,
    )
    from src.metrics.roc import tpr_at_fpr


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'src.metrics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
