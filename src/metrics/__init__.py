"""Re-ID evaluation: Market-1501 protocol (CMC, mAP, mINP), re-ranking, DDP metric, rank lists.

Names are imported lazily, so that ``import src.metrics.functional`` does not pay for
torchmetrics (and the torchvision it imports) or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SkippedQueriesWarning": "src.metrics.functional",
    "compute_distance_matrix": "src.metrics.functional",
    "evaluate_features": "src.metrics.functional",
    "evaluate_rank": "src.metrics.functional",
    "re_ranking": "src.metrics.functional",
    "topk_gallery": "src.metrics.functional",
    "plot_ranklist": "src.metrics.ranklist",
    "RankList": "src.metrics.reid_metric",
    "ReIDMetric": "src.metrics.reid_metric",
}
__all__ = [
    "RankList",
    "ReIDMetric",
    "SkippedQueriesWarning",
    "compute_distance_matrix",
    "evaluate_features",
    "evaluate_rank",
    "plot_ranklist",
    "re_ranking",
    "topk_gallery",
]

if TYPE_CHECKING:
    from src.metrics.functional import (
        SkippedQueriesWarning,
        compute_distance_matrix,
        evaluate_features,
        evaluate_rank,
        re_ranking,
        topk_gallery,
    )
    from src.metrics.ranklist import plot_ranklist
    from src.metrics.reid_metric import RankList, ReIDMetric


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'src.metrics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
