"""Cluster contrast (Dai et al. 2021) step logic as plain functions, testable without a Trainer.

Per epoch (`cluster_target`): k-reciprocal Jaccard distance of the target features (the shared
sparse `src.metrics.rerank.k_reciprocal_jaccard`), DBSCAN on it (`dbscan_labels`), outliers
(-1) dropped, cluster memory initialised with the unit-norm centroids (`cluster_centroids`).

Per step (`cc_train_step`):

1. unit-normalise this rank's features (fp32, autocast off);
2. InfoNCE over the cluster memory, ``CE(f·Mᵀ / τ, y)`` (`cluster_contrast_loss`); the memory is
   a constant for the gradient, and each sample's loss only involves its own row, so the local
   mean loss under DDP's gradient averaging is the global-batch loss;
3. gather the detached features and pseudo-labels of every rank (`all_gather_nograd`) and update
   the memory from that global batch (`update_cluster_memory`): the identical update on every
   rank, so the memory stays equal on all ranks without a broadcast.

Nothing here reads a value back to the host during a step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from src.systems.mar_steps import _fp32, all_gather_nograd

__all__ = [
    "MEMORY_UPDATES",
    "CCStepOutput",
    "cc_train_step",
    "cluster_centroids",
    "cluster_contrast_loss",
    "cluster_diagnostics",
    "cluster_features",
    "dbscan_labels",
    "update_cluster_memory",
]

#: Memory-update variants: "hard" (the paper's hardest sample per cluster) and "mean".
MEMORY_UPDATES = ("hard", "mean")


# ----------------------------------------------------------------------------------------------
# Clustering (once per epoch, on one rank)
# ----------------------------------------------------------------------------------------------
def dbscan_labels(distance: Any, eps: float, min_samples: int = 4) -> np.ndarray:
    """DBSCAN (scikit-learn, ``metric="precomputed"``) on a sparse or dense distance matrix.

    Sparse input (the k-reciprocal Jaccard distance, only pairs < 1 stored): scikit-learn treats
    every *stored* entry as a candidate neighbour (explicit zeros included, the diagonal is
    added) and missing entries as non-neighbours, which is exact here because a missing pair has
    distance 1 > eps. Memory O(nnz) instead of the N×N matrix the reference builds.

    Args:
        distance: (N, N) scipy sparse matrix or dense array of distances in [0, 1].
        eps: neighbourhood radius (0.6 Market, 0.7 MSMT17 in the reference); must be < 1.
        min_samples: core-point neighbourhood size, the point itself included (4).

    Returns:
        (N,) int64 labels 0..C-1 in scikit-learn's order, -1 for outliers.
    """
    import scipy.sparse as sp
    from sklearn.cluster import DBSCAN

    if not 0.0 < eps < 1.0:
        raise ValueError(
            f"system.eps={eps}: DBSCAN eps on the Jaccard distance must be in (0, 1) (pairs "
            "without a shared k-reciprocal neighbour are at distance 1 and never neighbours)"
        )
    if distance.shape[0] != distance.shape[1]:
        raise ValueError(f"dbscan_labels: expected a square distance matrix, got {distance.shape}")
    if sp.issparse(distance):
        distance = sp.csr_matrix(distance)
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(distance)
    return labels.astype(np.int64)


@torch.no_grad()
def cluster_centroids(features: Tensor, labels: Tensor, num_clusters: int) -> Tensor:
    """Unit-normalised mean feature of each cluster (the memory's initial entries).

    Args:
        features: (N, D) features (normalised or not: each cluster's mean is normalised).
        labels: (N,) pseudo-labels in [0, C) or -1 (outliers, ignored).
        num_clusters: C.

    Returns:
        (C, D) float, row c = normalize(mean of the features labelled c).
    """
    keep = labels >= 0
    feats, lab = features[keep], labels[keep].long()
    sums = feats.new_zeros(num_clusters, features.shape[1]).index_add_(0, lab, feats)
    counts = torch.bincount(lab, minlength=num_clusters).clamp(min=1).to(feats.dtype)
    return F.normalize(sums / counts[:, None], dim=1)


def cluster_diagnostics(labels: Tensor, true_ids: Tensor | None = None) -> dict[str, float]:
    """Per-epoch clustering statistics.

    Args:
        labels: (N,) pseudo-labels, -1 = outlier.
        true_ids: (N,) ground-truth identities (diagnostics only, never a training signal).

    Returns:
        ``num_clusters``, ``outlier_fraction`` and, with `true_ids`, over the clustered samples:
        ``purity`` (fraction of clustered samples whose cluster's majority identity is theirs)
        and ``nmi`` (normalised mutual information with the true ids, scikit-learn's
        arithmetic normalisation).
    """
    labels = labels.detach().cpu().long()
    keep = labels >= 0
    out = {
        "num_clusters": float(torch.unique(labels[keep]).numel()),
        "outlier_fraction": float((~keep).float().mean()) if labels.numel() else 0.0,
    }
    if true_ids is not None and bool(keep.any()):
        from sklearn.metrics import normalized_mutual_info_score

        lab = labels[keep]
        ids = torch.unique(true_ids.detach().cpu().long()[keep], return_inverse=True)[1]
        num_ids = int(ids.max()) + 1
        joint = torch.bincount(lab * num_ids + ids, minlength=(int(lab.max()) + 1) * num_ids)
        out["purity"] = float(joint.view(-1, num_ids).max(dim=1).values.sum()) / lab.numel()
        out["nmi"] = float(normalized_mutual_info_score(ids.numpy(), lab.numpy()))
    return out


# ----------------------------------------------------------------------------------------------
# Memory and loss (every step)
# ----------------------------------------------------------------------------------------------
def cluster_contrast_loss(
    feat: Tensor, labels: Tensor, memory: Tensor, temperature: float
) -> Tensor:
    """InfoNCE over the cluster memory: ``mean_i -log softmax(f_i·Mᵀ/τ)[y_i]``.

    Args:
        feat: (B, D) unit-norm features (with gradient).
        labels: (B,) pseudo-labels in [0, C).
        memory: (C, D) unit-norm cluster entries (a constant for the gradient).
        temperature: τ (0.05).
    """
    logits = feat.mm(memory.detach().to(feat.dtype).t()) / temperature
    return F.cross_entropy(logits, labels.long())


@torch.no_grad()
def update_cluster_memory(
    memory: Tensor, feat: Tensor, labels: Tensor, momentum: float = 0.1, mode: str = "hard"
) -> None:
    """In-place momentum update of the memory entries of the clusters in a batch, vectorised.

    For each cluster k in the batch, with q the batch's representative of k:
    ``M[k] <- normalize(m·M[k] + (1 − m)·q)`` (m = `momentum`, the weight of the *old* entry,
    0.1 in the paper and the reference, so the new sample dominates). q is

    * ``"hard"`` (the paper): the hardest instance, the one least similar to M[k]
      (``argmin_i f_i·M[k]``, ties to the first in batch order);
    * ``"mean"``: the mean of the cluster's batch features.

    Every cluster is updated once per step from the pre-step memory (updates of distinct rows
    are independent), so the result does not depend on the batch order (up to ties / float
    summation order). No host sync: all shapes are the batch's.

    Args:
        memory: (C, D) float buffer, unit rows.
        feat: (B, D) unit-norm features (detached here).
        labels: (B,) pseudo-labels in [0, C).
        momentum: m.
        mode: one of `MEMORY_UPDATES`.
    """
    if mode not in MEMORY_UPDATES:
        raise ValueError(f"memory update mode must be one of {MEMORY_UPDATES}, got {mode!r}")
    labels = labels.long()
    feat = feat.detach().to(memory.dtype)
    old = memory.index_select(0, labels)  # (B, D)
    num_clusters = memory.shape[0]
    if mode == "hard":
        sim = (feat * old).sum(dim=1)  # (B,)
        worst = sim.new_full((num_clusters,), float("inf")).scatter_reduce(
            0, labels, sim, reduce="amin"
        )
        positions = torch.arange(len(labels), device=labels.device)
        candidate = torch.where(sim == worst[labels], positions, len(labels))
        first = torch.full((num_clusters,), len(labels), device=labels.device, dtype=torch.long)
        first = first.scatter_reduce(0, labels, candidate, reduce="amin")
        rep = feat.index_select(0, first[labels])
    else:
        sums = feat.new_zeros(num_clusters, feat.shape[1]).index_add_(0, labels, feat)
        counts = torch.bincount(labels, minlength=num_clusters).to(feat.dtype)
        rep = sums.index_select(0, labels) / counts.index_select(0, labels)[:, None]
    new = F.normalize(momentum * old + (1.0 - momentum) * rep, dim=1)
    # Repeated labels write identical rows, so index_copy_ is deterministic here.
    memory.index_copy_(0, labels, new)


@dataclass
class CCStepOutput:
    """Result of `cc_train_step`: the loss (with gradient) and detached diagnostics
    (``loss``; ``acc``: fraction of samples whose nearest memory entry is their cluster)."""

    loss: Tensor
    terms: dict[str, Tensor]


def cc_train_step(
    feat: Tensor,
    labels: Tensor,
    memory: Tensor,
    temperature: float = 0.05,
    momentum: float = 0.1,
    mode: str = "hard",
) -> CCStepOutput:
    """One cluster-contrast step on raw features; updates the memory in place.

    Args:
        feat: (B, D) this rank's features (the BNNeck output in training mode; not normalised).
        labels: (B,) this rank's pseudo-labels in [0, C).
        memory: (C, D) the cluster memory buffer (identical on every rank).
        temperature, momentum, mode: τ, m and the update variant.

    Returns:
        `CCStepOutput`. Under DDP the memory update uses every rank's (features, labels), in
        rank order, so it equals a single-process step on the concatenated global batch.
    """
    dtype = torch.float64 if feat.dtype == torch.float64 else torch.float32
    with _fp32(feat.device):
        f = F.normalize(feat.to(dtype), dim=1)
        labels = labels.long()
        # The loss reads the pre-step memory; autograd keeps it for the backward pass, so it
        # must not be the buffer that is updated in place below (a (C, D) copy per step).
        snapshot = memory.detach().to(dtype).clone()
        loss = cluster_contrast_loss(f, labels, snapshot, temperature)
        with torch.no_grad():
            acc = (f.detach().mm(snapshot.t()).argmax(dim=1) == labels).float().mean()
        f_all = all_gather_nograd(f.detach().contiguous())
        y_all = all_gather_nograd(labels.contiguous())
        update_cluster_memory(memory, f_all, y_all, momentum=momentum, mode=mode)
    terms: Mapping[str, Tensor] = {"loss": loss.detach(), "acc": acc}
    return CCStepOutput(loss=loss, terms=dict(terms))


def cluster_features(
    features: Tensor,
    eps: float,
    min_samples: int = 4,
    k1: int = 30,
    k2: int = 6,
    metric: str = "cosine",
    knn: str = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """Pseudo-labels of `features` (N, D): sparse k-reciprocal Jaccard distance (the evaluation
    package's `k_reciprocal_jaccard`, shared with re-ranking), then DBSCAN (`dbscan_labels`).

    Returns:
        (N,) int64 CPU labels 0..C-1, -1 for outliers.
    """
    from src.metrics.rerank import k_reciprocal_jaccard

    # Only the pairs within eps matter to DBSCAN: storing just those keeps the Jaccard matrix
    # O(pairs within eps) instead of O(pairs sharing a neighbour), with identical labels.
    kwargs: dict[str, Any] = {"k1": k1, "k2": k2, "metric": metric, "knn": knn,
                              "max_distance": eps}  # fmt: skip
    if chunk_size is not None:
        kwargs["chunk_size"] = chunk_size
    distance = k_reciprocal_jaccard(features, **kwargs)
    return torch.from_numpy(dbscan_labels(distance, eps, min_samples))
