"""Samplers that shard themselves over DDP ranks and never replay an order.

Lightning must not wrap these (``Trainer(use_distributed_sampler=False)``): the DataModule builds
them with the trainer's world size and rank.

Randomness comes only from a private :class:`torch.Generator` seeded with
``(seed, epoch, iteration)``, where `iteration` counts the ``__iter__`` calls within the current
epoch. Every rank therefore computes the same global order, and a loader re-iterated within one
epoch (the target loader cycled by ``CombinedLoader(mode="max_size_cycle")``) gets a fresh order
each time instead of replaying the first one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler


def mix_seed(seed: int, epoch: int, iteration: int) -> int:
    """A 63-bit generator seed from (seed, epoch, iteration), well mixed (numpy SeedSequence)."""
    words = np.random.SeedSequence([seed % 2**63, epoch, iteration]).generate_state(2, np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


class _EpochSeeded:
    """`set_epoch`, the per-epoch iteration counter and a checkpointable state."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)
        self.epoch = 0
        self.iteration = 0  # __iter__ calls so far in this epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's order. Re-setting the current epoch keeps the iteration counter, so a
        repeated call (Lightning calls it for fit and validation) cannot replay an order."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self.iteration = 0

    def _next_generator(self) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(mix_seed(self.seed, self.epoch, self.iteration))
        self.iteration += 1
        return gen

    def state_dict(self) -> dict[str, int]:
        """Epoch and iteration counter (restored on resume)."""
        return {"seed": self.seed, "epoch": self.epoch, "iteration": self.iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.seed, self.epoch, self.iteration = state["seed"], state["epoch"], state["iteration"]


def _check_pk_arguments(num_instances: int, batch_size: int, num_replicas: int, rank: int) -> None:
    """The arguments every P×K sampler shares: K >= 1, batch_size a multiple of K, a valid rank."""
    if num_instances < 1 or batch_size < num_instances or batch_size % num_instances:
        raise ValueError(
            f"batch_size ({batch_size}) must be a positive multiple of num_instances "
            f"({num_instances})"
        )
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} out of range for num_replicas={num_replicas}")


def num_pk_batches(chunks_per_id: torch.Tensor, ids_per_batch: int) -> int:
    """Most batches of `ids_per_batch` distinct ids that chunk counts allow.

    The largest B with ``sum_i min(c_i, B) >= B * ids_per_batch``: an id contributes at most one
    chunk per batch. g(B) = sum_i min(c_i, B) - B*M is concave with g(0) = 0, so {B : g(B) >= 0}
    is an interval [0, B*] and a binary search finds B*.
    """
    lo, hi = 0, int(chunks_per_id.sum()) // ids_per_batch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(chunks_per_id.clamp(max=mid).sum()) >= mid * ids_per_batch:
            lo = mid
        else:
            hi = mid - 1
    return lo


class DistributedPKSampler(_EpochSeeded, Sampler[int]):
    """P×K sampler sharded over ranks: each rank's batches hold P distinct ids × K images.

    Per epoch, every identity's images are shuffled and cut into chunks of K (an identity with
    fewer than K images gives one chunk: all its images, then draws with replacement to fill K).
    A global batch holds P × num_replicas chunks of distinct identities; rank r takes chunks
    r*P .. (r+1)*P - 1, so the ranks of one step see disjoint identities. The number of batches
    B (the same on every rank and in every epoch) is the most that the chunk counts allow with
    distinct identities per global batch (:func:`num_pk_batches`), so nearly every image is used
    once per epoch, as in the usual re-ID samplers, but with an exact length.

    Args:
        pids: identity of every dataset sample (any integers).
        num_instances: K, images per identity in a batch.
        batch_size: per-rank batch size P*K (must be a multiple of K).
        num_replicas: number of ranks (world size).
        rank: this rank.
        seed: base seed, identical on every rank.

    Yields flat dataset indices; each consecutive chunk of `batch_size` is one batch, ordered
    id-major (``batch.view(P, K)``). Use ``DataLoader(batch_size=batch_size, drop_last=True)``.
    """

    def __init__(
        self,
        pids: Sequence[int],
        num_instances: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        _EpochSeeded.__init__(self, seed)
        _check_pk_arguments(num_instances, batch_size, num_replicas, rank)
        self.num_instances = num_instances
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.ids_per_batch = batch_size // num_instances  # P
        pid_tensor = torch.as_tensor(list(pids), dtype=torch.long)
        unique_pids, self._codes = torch.unique(pid_tensor, return_inverse=True)
        self._counts = torch.bincount(self._codes, minlength=len(unique_pids))  # n_i
        self._starts = torch.cumsum(self._counts, 0) - self._counts
        self._chunks = (self._counts.clamp(min=num_instances) // num_instances).long()  # c_i
        global_ids = self.ids_per_batch * num_replicas
        if len(unique_pids) < global_ids:
            raise ValueError(
                f"P×K sampling needs at least P × num_replicas = {self.ids_per_batch} × "
                f"{num_replicas} = {global_ids} identities, the dataset has {len(unique_pids)}"
            )
        self.num_batches = num_pk_batches(self._chunks, global_ids)

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        plan = self.global_plan(self._next_generator())  # (B, P*W, K)
        P = self.ids_per_batch
        mine = plan[:, self.rank * P : (self.rank + 1) * P, :]
        return iter(mine.reshape(-1).tolist())

    def global_plan(self, gen: torch.Generator) -> torch.Tensor:
        """The epoch's batches for all ranks: LongTensor (B, P*num_replicas, K) of dataset indices.

        Row b is global batch b; slots [r*P, (r+1)*P) belong to rank r.
        """
        K, B = self.num_instances, self.num_batches
        M = self.ids_per_batch * self.num_replicas
        codes, counts, starts, chunks = self._codes, self._counts, self._starts, self._chunks
        num_ids = len(counts)
        # Dataset indices grouped by identity, random order inside each identity.
        order = torch.argsort(torch.rand(len(codes), generator=gen))
        by_id = order[torch.argsort(codes[order], stable=True)]
        # Chunks: (owner id, chunk number j); an id keeps at most B chunks (one per batch).
        kept = chunks.clamp(max=B)
        owner = torch.repeat_interleave(torch.arange(num_ids), kept)
        # Drop random chunks until exactly B*M remain (cannot break "at most one per batch").
        excess = len(owner) - B * M
        owner = torch.sort(owner[torch.randperm(len(owner), generator=gen)[excess:]]).values
        remaining = torch.bincount(owner, minlength=num_ids)
        # Fill the batches: ids whose remaining chunks equal the batches left must be taken;
        # the other slots go to ids drawn without replacement, weighted by remaining chunks.
        batch_ids = torch.empty(B, M, dtype=torch.long)
        for b in range(B):
            forced = remaining == B - b
            num_forced = int(forced.sum())
            weights = torch.where(forced, 0, remaining).double()
            drawn = (
                torch.multinomial(weights, M - num_forced, replacement=False, generator=gen)
                if num_forced < M
                else torch.empty(0, dtype=torch.long)
            )
            batch_ids[b] = torch.cat([torch.nonzero(forced).flatten(), drawn])
            remaining[batch_ids[b]] -= 1
        # The t-th use of an id takes its t-th chunk: number the occurrences in batch order.
        flat = batch_ids.flatten()
        sort = torch.argsort(flat, stable=True)
        first = torch.cumsum(torch.bincount(flat, minlength=num_ids), 0)
        first = first - torch.bincount(flat, minlength=num_ids)
        chunk_no = torch.empty_like(flat)
        chunk_no[sort] = torch.arange(len(flat)) - first[flat[sort]]
        # Element k of chunk j of id i: position j*K + k in the id's shuffled images when it
        # exists (ids with >= K images), else a random image of the id (ids with < K images:
        # all their images first, then draws with replacement).
        pos = chunk_no[:, None] * K + torch.arange(K)
        n = counts[flat][:, None]
        random_pos = (torch.rand(pos.shape, generator=gen) * n).long()
        pos = torch.where(pos < n, pos, random_pos)
        indices = by_id[starts[flat][:, None] + pos].view(B, M, K)
        # Shuffle the slots of each batch (rank assignment) and the order of the batches.
        slot_perm = torch.argsort(torch.rand(B, M, generator=gen), dim=1)
        indices = torch.gather(indices, 1, slot_perm[:, :, None].expand(B, M, K))
        return indices[torch.randperm(B, generator=gen)]


class RandomIdentitySampler(DistributedPKSampler):
    """Single-process P×K sampler: :class:`DistributedPKSampler` with one rank.

    Args:
        pids: identity of every dataset sample.
        num_instances: K.
        batch_size: P*K.
        seed: base seed.
    """

    def __init__(
        self, pids: Sequence[int], num_instances: int, batch_size: int, seed: int = 0
    ) -> None:
        super().__init__(pids, num_instances, batch_size, num_replicas=1, rank=0, seed=seed)


class ShardedSampler(_EpochSeeded, Sampler[int]):
    """A DistributedSampler-like sampler that is also safe to cycle within an epoch.

    The (shuffled, if `shuffle`) order of all `size` indices is padded by wrapping around to a
    multiple of `num_replicas` (padding duplicates indices: de-duplicate by the sample's
    ``index``), then rank r takes positions r, r + W, r + 2W, ... Every rank gets the same
    number of samples, ``ceil(size / num_replicas)``, capped at `max_samples` if given.

    Args:
        size: dataset length.
        num_replicas: number of ranks.
        rank: this rank.
        shuffle: random order (seeded by seed, epoch and iteration) or dataset order.
        seed: base seed, identical on every rank.
        max_samples: cap on the samples per rank per ``__iter__`` (used to bound a cycled target
            loader by the length of the source loader).
    """

    def __init__(
        self,
        size: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        max_samples: int | None = None,
    ) -> None:
        _EpochSeeded.__init__(self, seed)
        if size < 1:
            raise ValueError("ShardedSampler needs a non-empty dataset")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} out of range for num_replicas={num_replicas}")
        self.size = size
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.num_samples = math.ceil(size / num_replicas)
        if max_samples is not None:
            self.num_samples = min(self.num_samples, max_samples)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=self._next_generator())
        else:
            self.iteration += 1
            order = torch.arange(self.size)
        total = math.ceil(self.size / self.num_replicas) * self.num_replicas
        order = order.repeat(math.ceil(total / self.size))[:total]
        return iter(order[self.rank :: self.num_replicas][: self.num_samples].tolist())


class PseudoLabelPKSampler(_EpochSeeded, Sampler[int]):
    """P×K sampler over *pseudo*-identities that change every epoch (clustering-based UDA).

    The labels are handed over with :meth:`set_labels` (``-1`` = outlier: never drawn) before the
    epoch's ``__iter__``; each epoch then yields exactly `num_batches` batches per rank, as the
    fixed "iterations per epoch" of the clustering methods: :class:`DistributedPKSampler` passes
    over the inliers' pseudo-identities (P distinct clusters per rank, disjoint over the ranks of
    a step) are concatenated until `num_batches` global batches exist. Every rank computes the
    same global plan (same labels, same seed), so the loader length never changes between epochs
    and Lightning needs no dataloader reload.

    Args:
        num_samples: size of the (target train) dataset the labels describe.
        num_instances: K.
        batch_size: per-rank batch P*K.
        num_batches: batches per rank and epoch (the recipe's iterations per epoch).
        num_replicas, rank: DDP world size and rank.
        seed: base seed, identical on every rank.
    """

    def __init__(
        self,
        num_samples: int,
        num_instances: int,
        batch_size: int,
        num_batches: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        _EpochSeeded.__init__(self, seed)
        _check_pk_arguments(num_instances, batch_size, num_replicas, rank)
        if num_batches < 1:
            raise ValueError(f"num_batches (iterations per epoch) must be >= 1, got {num_batches}")
        self.num_samples = int(num_samples)
        self.num_instances = num_instances
        self.batch_size = batch_size
        self.num_batches = int(num_batches)
        self.num_replicas = num_replicas
        self.rank = rank
        self.ids_per_batch = batch_size // num_instances
        self.labels: torch.Tensor | None = None

    def set_labels(self, labels: Sequence[int] | torch.Tensor) -> None:
        """Pseudo-label of every dataset sample, (num_samples,) ints, -1 for outliers."""
        labels = torch.as_tensor(labels, dtype=torch.long).detach().cpu().flatten()
        if labels.numel() != self.num_samples:
            raise ValueError(
                f"pseudo-labels: got {labels.numel()} labels for a dataset of {self.num_samples}"
            )
        clusters = int(torch.unique(labels[labels >= 0]).numel())
        needed = self.ids_per_batch * self.num_replicas
        if clusters < needed:
            raise ValueError(
                f"pseudo-labels: {clusters} clusters, but P×K batches need at least P × "
                f"world size = {self.ids_per_batch} × {self.num_replicas} = {needed} distinct "
                "clusters per step (raise the clustering eps or lower data.batch_size / raise "
                "data.num_instances)"
            )
        self.labels = labels

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def __iter__(self) -> Iterator[int]:
        if self.labels is None:
            raise RuntimeError(
                "PseudoLabelPKSampler: no pseudo-labels yet; the system must call "
                "datamodule.set_target_pseudo_labels(labels) before the epoch starts"
            )
        inliers = torch.nonzero(self.labels >= 0).flatten()
        pk = DistributedPKSampler(
            self.labels[inliers].tolist(),
            self.num_instances,
            self.batch_size,
            self.num_replicas,
            self.rank,
            self.seed,
        )
        if pk.num_batches == 0:
            raise ValueError("pseudo-labels allow no P×K batch with distinct clusters")
        gen = self._next_generator()
        plans, total = [], 0
        while total < self.num_batches:
            plan = pk.global_plan(gen)  # (B, P*W, K) positions into `inliers`
            plans.append(plan)
            total += len(plan)
        plan = torch.cat(plans)[: self.num_batches]
        P = self.ids_per_batch
        mine = plan[:, self.rank * P : (self.rank + 1) * P, :]
        return iter(inliers[mine.reshape(-1)].tolist())
