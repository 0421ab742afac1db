"""MAR stage-2 step logic as plain functions, testable without a Trainer (mar.md §2-§3, §7).

One training step (`mar_train_step`):

1. unit-normalise the source features f, the target features g and the agents A (fp32, autocast
   off: MAR's sums over K = 4101 agents and its logs of soft multilabels need fp32);
2. gather f and g over the ranks with gradients (`gather_with_grad`), plus the labels, cameras
   and dataset indices: every rank then holds the *global* batch and computes the same loss;
3. L_AL = CE(scale·f·Aᵀ, y); L_RJ (`JointLoss`); L_CML on log soft multilabels (`MultilabelLoss`,
   which moves its centres before the loss);
4. after the warm-up: write the detached soft multilabels into the memory (first visit copies,
   later visits 0.9·old + 0.1·new), *then* read the updated rows for L_MDL (`DiscriminativeLoss`,
   which moves T after its split), exactly the order of the original `trainers.py`;
5. L = L_MDL + λ1·L_CML + λ2·(L_AL + β·L_RJ).

Nothing here reads a value back to the host: no `.item()`, no `bool(tensor)`, no data-dependent
shapes. Under DDP every rank applies the identical (index, value) memory update computed from the
identical gathered batch, so memory, T and the CML centres stay equal on all ranks (DDP does not
broadcast them; `replica_drift` is the periodic check of that claim); each rank's
loss is the global loss, and `gather_with_grad` (summed backward) followed by DDP's gradient
averaging gives exactly the single-process gradient of the global batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from src.losses.distributed import gather_with_grad
from src.losses.mar import (
    DiscriminativeLoss,
    JointLoss,
    MultilabelLoss,
    log_soft_multilabel,
    soft_multilabel,
)

__all__ = [
    "MARStepOutput",
    "MARWeights",
    "TargetBatch",
    "all_gather_nograd",
    "describe_nonfinite",
    "first_occurrence",
    "gather_source_batch",
    "gather_target_batch",
    "mar_objective",
    "mar_train_step",
    "nonfinite_flags",
    "replica_drift",
    "state_checksums",
    "update_memory",
]

#: Names of the state checked for finiteness, in the order of `nonfinite_flags`.
STATE_NAMES = ("memory", "threshold", "centres")


@dataclass(frozen=True)
class MARWeights:
    """Loss weights of L = L_MDL + λ1·L_CML + λ2·(L_AL + β·L_RJ) (paper defaults)."""

    lambda_cml: float = 2e-4
    lambda_ral: float = 50.0
    beta: float = 0.2


@dataclass
class TargetBatch:
    """The target half of a step after gathering: g (B, d) with gradient, camids/index/pids (B,)."""

    feat: Tensor
    camids: Tensor
    index: Tensor
    pids: Tensor | None = None


@dataclass
class MARStepOutput:
    """Result of `mar_train_step`.

    Attributes:
        loss: the scalar objective (with gradient).
        terms: detached loss terms ``loss_al``, ``loss_rj``, ``loss_cml``, ``loss_mdl``, ``loss``.
        stats: detached float diagnostics (``threshold``, ``active_agents`` always; after the
            warm-up also ``num_pos``, ``num_neg``, ``batch_quantile`` and, with target pids,
            ``tp_rate``).
        nonfinite: (3,) bool: non-finite values in the written memory rows / T / the centres
            (`STATE_NAMES` order).
    """

    loss: Tensor
    terms: dict[str, Tensor]
    stats: dict[str, Tensor] = field(default_factory=dict)
    nonfinite: Tensor | None = None


# ----------------------------------------------------------------------------------------------
# Distributed helpers (identities in a single process)
# ----------------------------------------------------------------------------------------------
def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_gather_nograd(tensor: Tensor) -> Tensor:
    """Concatenating all_gather without gradient, ordered by rank; ``tensor`` itself when not
    distributed. Every rank must pass the same shape (full batches: ``drop_last``)."""
    world = _world_size()
    if world == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def gather_source_batch(feat: Tensor, pids: Tensor) -> tuple[Tensor, Tensor]:
    """Global source batch: features (with gradient) and identities of every rank."""
    return gather_with_grad(feat), all_gather_nograd(pids)


def gather_target_batch(
    feat: Tensor, camids: Tensor, index: Tensor, pids: Tensor | None = None
) -> TargetBatch:
    """Global target batch: features (with gradient), cameras, dataset indices and (diagnostics
    only) identities of every rank, so that CML and MDL see the whole batch (mar.md §6-§7)."""
    return TargetBatch(
        feat=gather_with_grad(feat),
        camids=all_gather_nograd(camids),
        index=all_gather_nograd(index),
        pids=None if pids is None else all_gather_nograd(pids),
    )


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@torch.no_grad()
def state_checksums(tensors: Sequence[Tensor]) -> Tensor:
    """(n,) int64 on the tensors' device: per tensor, the sum of its elements' bit patterns
    (int64 accumulator, wrapping). A change of any single element, even by one ulp, changes
    it; no host read."""
    sums = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        if flat.dtype == torch.bool:
            flat = flat.to(torch.uint8)
        sums.append(flat.view(_BITS[flat.element_size()]).sum(dtype=torch.int64))
    return torch.stack(sums)


@torch.no_grad()
def replica_drift(tensors: Sequence[Tensor]) -> Tensor:
    """(n,) bool, identical on every rank: whether the ranks' copies of each tensor differ.

    The MAR state (memory, T, CML centres) is updated identically on every rank by
    construction and is not broadcast by DDP; this is the cheap guard of that claim: one
    all-reduce (MAX) of 2n int64 checksums (`state_checksums`), no host read. All False in a
    single process.
    """
    sums = state_checksums(tensors)
    if _world_size() == 1:
        return torch.zeros_like(sums, dtype=torch.bool)
    both = torch.cat([sums, -sums])  # max of -x is -min(x): one all-reduce gives max and min
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    n = sums.numel()
    return both[:n] != -both[n:]


# ----------------------------------------------------------------------------------------------
# Soft-multilabel memory
# ----------------------------------------------------------------------------------------------
def first_occurrence(index: Tensor) -> Tensor:
    """(B,) position of the first occurrence of ``index[i]`` in ``index`` (B x B compare; no sync).

    DistributedSampler padding repeats dataset indices inside a global batch; rows that repeat an
    index are replaced by their first occurrence so that the memory update is deterministic.
    """
    same = index[:, None] == index[None, :]
    return same.to(torch.uint8).argmax(dim=1)  # argmax returns the first maximal position


@torch.no_grad()
def update_memory(
    memory: Tensor,
    visited: Tensor,
    index: Tensor,
    multilabels: Tensor,
    momentum: float = 0.1,
) -> None:
    """In-place memory update of the original (mar.md §2, `trainers.py`), vectorised.

    A row never written before takes the new soft multilabel (first visit copies); a visited row
    becomes ``(1 − momentum)·old + momentum·new`` (0.9/0.1). Repeated indices in the batch use
    the values of their first occurrence (identical writes, so ``index_copy_`` is deterministic).

    Args:
        memory: (N, K) float buffer.
        visited: (N,) bool buffer, True where a row has been written.
        index: (B,) dataset indices in [0, N).
        multilabels: (B, K) soft multilabels (detached here).
        momentum: weight of the new value (0.1 in the paper).
    """
    index = index.long()
    values = multilabels.detach().to(memory.dtype)
    values = values.index_select(0, first_occurrence(index))
    old = memory.index_select(0, index)
    seen = visited.index_select(0, index)
    new = torch.where(seen[:, None], (1 - momentum) * old + momentum * values, values)
    memory.index_copy_(0, index, new)
    visited.index_fill_(0, index, True)


# ----------------------------------------------------------------------------------------------
# Objective and diagnostics
# ----------------------------------------------------------------------------------------------
def mar_objective(terms: Mapping[str, Tensor], weights: MARWeights) -> Tensor:
    """L = L_MDL + λ1·L_CML + λ2·(L_AL + β·L_RJ) from ``loss_mdl/cml/al/rj``."""
    return (
        terms["loss_mdl"]
        + weights.lambda_cml * terms["loss_cml"]
        + weights.lambda_ral * (terms["loss_al"] + weights.beta * terms["loss_rj"])
    )


@torch.no_grad()
def nonfinite_flags(
    memory_rows: Tensor | None, threshold: Tensor, center_mean: Tensor, center_std: Tensor
) -> Tensor:
    """(3,) bool on the device: any non-finite value in the memory rows just written (None: not
    written this step), in T, in the CML centres. Fused so one host read checks everything."""
    mem_bad = (
        ~torch.isfinite(memory_rows).all()
        if memory_rows is not None
        else torch.zeros((), dtype=torch.bool, device=threshold.device)
    )
    centres_bad = ~(torch.isfinite(center_mean).all() & torch.isfinite(center_std).all())
    return torch.stack([mem_bad, ~torch.isfinite(threshold).all(), centres_bad])


@contextlib.contextmanager
def _fp32(device: torch.device) -> Iterator[None]:
    """Autocast off on `device`: everything after the backbone computes in fp32."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    else:
        yield


def mar_train_step(
    source_feat: Tensor,
    source_pids: Tensor,
    target_feat: Tensor,
    target_camids: Tensor,
    target_index: Tensor,
    classifier_weight: Tensor,
    memory: Tensor,
    memory_visited: Tensor,
    joint_loss: JointLoss,
    multilabel_loss: MultilabelLoss,
    discriminative_loss: DiscriminativeLoss,
    weights: MARWeights,
    target_pids: Tensor | None = None,
    scale: float = 30.0,
    memory_momentum: float = 0.1,
    mdl_active: bool = True,
) -> MARStepOutput:
    """One MAR step on raw pooled features; updates the memory, T and the CML centres in place.

    Args:
        source_feat: (B_s, d) pooled source features of this rank (not normalised).
        source_pids: (B_s,) source identities in [0, K).
        target_feat: (B_t, d) pooled target features of this rank.
        target_camids: (B_t,) target cameras; target_index: (B_t,) dataset indices (memory rows).
        classifier_weight: (K, d) the bias-free classifier weight: its unit rows are the agents.
        memory, memory_visited: (N, K) float / (N,) bool buffers (see `update_memory`).
        joint_loss, multilabel_loss, discriminative_loss: the RJ / CML / MDL modules.
        weights: λ1, λ2, β.
        target_pids: (B_t,) target identities, diagnostics only (MDL's TP rate), never a loss.
        scale: cosine scale of AL and of the soft multilabels (30).
        memory_momentum: weight of the new soft multilabel in the memory EMA (0.1).
        mdl_active: False during the warm-up (epoch 0): no MDL, no memory write.

    Returns:
        `MARStepOutput`.
    """
    device = source_feat.device
    # fp32 (float64 inputs stay float64: the exactness tests)
    dtype = torch.float64 if source_feat.dtype == torch.float64 else torch.float32
    with _fp32(device):
        f = F.normalize(source_feat.to(dtype), dim=1)
        g = F.normalize(target_feat.to(dtype), dim=1)
        agents = F.normalize(classifier_weight.to(dtype), dim=1)

        f_all, y_all = gather_source_batch(f, source_pids.long())
        tgt = gather_target_batch(g, target_camids.long(), target_index.long(), target_pids)

        # AL: the only term that updates the agents (apart from weight decay).
        sim_source = f_all.mm(agents.t())
        loss_al = F.cross_entropy(scale * sim_source, y_all)
        # RJ: detaches agents and similarities itself.
        sim_target = tgt.feat.detach().mm(agents.detach().t())
        loss_rj = joint_loss(f_all, agents, y_all, sim_source, tgt.feat, sim_target)
        # CML on the current soft multilabels (the memory is only read by MDL).
        loss_cml = multilabel_loss(log_soft_multilabel(tgt.feat, agents, scale), tgt.camids)

        stats: dict[str, Tensor] = {}
        memory_rows = None
        if mdl_active:
            multilabels = soft_multilabel(tgt.feat.detach(), agents, scale)
            update_memory(memory, memory_visited, tgt.index, multilabels, memory_momentum)
            memory_rows = memory.index_select(0, tgt.index)  # after this step's update
            loss_mdl = discriminative_loss(tgt.feat, memory_rows, tgt.pids)
            mdl_stats = discriminative_loss.last_stats
            stats["num_pos"] = mdl_stats["num_positives"].float()
            stats["num_neg"] = mdl_stats["num_negatives"].float()
            stats["batch_quantile"] = mdl_stats["batch_quantile"].float()
            if "tp_rate" in mdl_stats:
                stats["tp_rate"] = mdl_stats["tp_rate"].float()
        else:
            loss_mdl = tgt.feat.new_zeros(())

        terms = {"loss_al": loss_al, "loss_rj": loss_rj, "loss_cml": loss_cml, "loss_mdl": loss_mdl}
        loss = mar_objective(terms, weights)

    with torch.no_grad():
        rj = joint_loss.last_stats
        b_s, b_t = f_all.shape[0], tgt.feat.shape[0]
        stats["active_agents"] = (
            rj["hard_agents_source"].float() * b_s + rj["hard_agents_target"].float() * b_t
        ) / (b_s + b_t)
        stats["active_agents_source"] = rj["hard_agents_source"].float()
        stats["active_agents_target"] = rj["hard_agents_target"].float()
        stats["threshold"] = discriminative_loss.threshold.detach().float().clone()
        stats["cml_views"] = multilabel_loss.last_stats["num_views_used"].float()
        detached = {k: v.detach() for k, v in terms.items()}
        detached["loss"] = loss.detach()
        flags = nonfinite_flags(
            memory_rows,
            discriminative_loss.threshold,
            multilabel_loss.center_mean,
            multilabel_loss.center_std,
        )
    return MARStepOutput(loss=loss, terms=detached, stats=stats, nonfinite=flags)


def describe_nonfinite(flags: list[bool]) -> str:
    """Human-readable names of the flagged state (`STATE_NAMES` order)."""
    names = {
        "memory": "the soft-multilabel memory",
        "threshold": "the MDL threshold T",
        "centres": "the CML centres",
    }
    return ", ".join(names[n] for n, bad in zip(STATE_NAMES, flags) if bad)
