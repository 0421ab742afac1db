"""alpha-query expansion (alpha-QE / AQE; Radenovic et al., TPAMI 2018), chunked.

FastReID's ``aqe`` (after PyRetri): every item of query + gallery is replaced by the mean of its
``qe_k`` nearest items (itself included) by cosine similarity, each weighted by its similarity
to the power ``alpha``; repeated ``qe_times`` times. The features averaged are the raw ones of
the previous round (not normalised); similarities use the normalised ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from src.metrics._inputs import ArrayLike, _check_positive_int, chunk_elements
from src.metrics.distance import _feature_pair
from src.metrics.rank import _rank_keys

__all__ = ["aqe"]


def aqe(
    qf: ArrayLike,
    gf: ArrayLike,
    qe_times: int = 1,
    qe_k: int = 10,
    alpha: float = 3.0,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Expanded (query, gallery) features: ``x_i <- mean_{j in top-k(i)} cos(x_i, x_j)^alpha x_j``.

    Equal to FastReID's ``aqe(qf, gf, qe_times, qe_k, alpha)`` (same defaults; its config uses
    qe_k=5) except that ties in the top-k go to the lower index (FastReID: argpartition's
    order) and that the (q+g)^2 similarity matrix is never held: rows are processed in chunks
    (``chunk_size`` rows; None: ~2**23 similarities, more on a GPU), on the features' device.
    Like the reference, a negative similarity with a non-integer alpha gives NaN.

    qf (num_q, D), gf (num_g, D) -> (num_q, D), (num_g, D) tensors, unnormalised.
    """
    q, g = _feature_pair(qf, gf, ("qf", "gf"))
    qe_times = _check_positive_int(qe_times, "qe_times")
    qe_k = _check_positive_int(qe_k, "qe_k")
    x = torch.cat([q, g])
    n, dim = x.shape
    if qe_k > n:
        raise ValueError(f"qe_k={qe_k} must not exceed num_q+num_g={n}")
    budget = chunk_elements(x.device)
    if chunk_size is None:
        rows = max(1, min(n, budget // n, budget // (qe_k * dim)))
    else:
        rows = _check_positive_int(chunk_size, "chunk_size")
    pos_bits = max(1, (n - 1).bit_length())
    cols = torch.arange(n, device=x.device)
    for _ in range(qe_times):
        unit = F.normalize(x, dim=1)
        out = torch.empty_like(x)
        for a in range(0, n, rows):
            sims = unit[a : a + rows] @ unit.t()
            if sims.dtype == torch.float32:  # most similar first, ties by index
                key = _rank_keys(-sims, cols, pos_bits)
                top = torch.topk(key, qe_k, dim=1, largest=False, sorted=True).indices
            else:
                top = torch.sort(-sims, dim=1, stable=True).indices[:, :qe_k]
            weight = sims.gather(1, top).pow_(alpha)
            out[a : a + rows] = torch.bmm(weight.unsqueeze(1), x[top]).squeeze(1) / qe_k
        x = out
    return x[: q.shape[0]], x[q.shape[0] :]
