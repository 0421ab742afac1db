"""Compatibility module: the names that lived here before the split, re-exported.

The evaluation is organised the way the field reads it (torchreid ``metrics/rank.py`` +
``metrics/distance.py`` + ``utils/rerank.py``; FastReID ``evaluation/rank.py``, ``rerank.py``,
``query_expansion.py``, ``roc.py``):

* :mod:`src.metrics.distance` -- distance matrices;
* :mod:`src.metrics.rank` -- the Market-1501 ranking protocol (CMC, mAP, mINP), top-k lists;
* :mod:`src.metrics.rerank` -- k-reciprocal Jaccard distance and re-ranking, chunked;
* :mod:`src.metrics.query_expansion` -- alpha-query expansion (AQE);
* :mod:`src.metrics.roc` -- ROC and TPR at fixed FPR.
"""

from __future__ import annotations

from src.metrics._inputs import (  # noqa: F401
    _AP_VARIANTS,
    _METRICS,
    DEFAULT_CHUNK_ELEMENTS,
    APVariant,
    ArrayLike,
    Metric,
    _as_labels,
    _check_choice,
    _check_positive_int,
)
from src.metrics.distance import compute_distance_matrix
from src.metrics.rank import (  # noqa: F401
    SkippedQueriesWarning,
    _topk_features,
    evaluate_features,
    evaluate_rank,
    topk_gallery,
)
from src.metrics.rerank import (
    evaluate_reranked,
    k_reciprocal_jaccard,
    re_ranking,
    re_ranking_features,
)

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "SkippedQueriesWarning",
    "compute_distance_matrix",
    "evaluate_features",
    "evaluate_rank",
    "evaluate_reranked",
    "k_reciprocal_jaccard",
    "re_ranking",
    "re_ranking_features",
    "topk_gallery",
]
