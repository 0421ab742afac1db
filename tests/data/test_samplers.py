"""P×K samplers and the sharded sampler: structure, DDP disjointness, seeding, no replay."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from torch.utils.data import DataLoader

from src.data.samplers import (
    DistributedPKSampler,
    RandomIdentitySampler,
    ShardedSampler,
    mix_seed,
    num_pk_batches,
)


def _pids(counts: list[int]) -> list[int]:
    """Dataset pids with counts[i] images of identity 100 + i, interleaved (not grouped)."""
    pids = [100 + i for i, n in enumerate(counts) for _ in range(n)]
    perm = torch.randperm(len(pids), generator=torch.Generator().manual_seed(0))
    return [pids[i] for i in perm.tolist()]


COUNTS = [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 20, 4, 4, 6, 30, 2]


def _batches(sampler, batch_size: int) -> list[list[int]]:
    flat = list(sampler)
    assert len(flat) == len(sampler) and len(flat) % batch_size == 0
    return [flat[i : i + batch_size] for i in range(0, len(flat), batch_size)]


def test_num_pk_batches_matches_brute_force() -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        chunks = torch.randint(
            1, 9, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen
        )
        m = int(torch.randint(1, 6, (1,), generator=gen))
        brute = max(
            b for b in range(0, int(chunks.sum()) + 1) if int(chunks.clamp(max=b).sum()) >= b * m
        )
        assert num_pk_batches(chunks, m) == brute


def test_pk_batches_hold_p_identities_times_k() -> None:
    pids = _pids(COUNTS)
    P, K = 4, 4
    sampler = RandomIdentitySampler(pids, num_instances=K, batch_size=P * K, seed=3)
    batches = _batches(sampler, P * K)
    assert len(batches) == sampler.num_batches > 0
    for batch in batches:
        ids = [pids[i] for i in batch]
        groups = [ids[j * K : (j + 1) * K] for j in range(P)]  # id-major: view(P, K)
        assert all(len(set(g)) == 1 for g in groups)
        assert len({g[0] for g in groups}) == P


def test_small_identities_are_drawn_with_replacement() -> None:
    pids = _pids(COUNTS)
    K = 4
    sampler = RandomIdentitySampler(pids, num_instances=K, batch_size=2 * K, seed=0)
    seen_small = False
    for batch in _batches(sampler, 2 * K):
        for j in range(2):
            chunk = batch[j * K : (j + 1) * K]
            n = Counter(pids)[pids[chunk[0]]]
            if n < K:  # all its images, then repeats
                seen_small = True
                assert len(set(chunk)) == n
            else:  # distinct images
                assert len(set(chunk)) == K
    assert seen_small


def test_pk_epoch_uses_images_once_when_counts_allow() -> None:
    # 8 ids × 8 images, K = 4: 16 chunks, 2 ids per batch -> 8 batches covering every image once
    pids = _pids([8] * 8)
    sampler = RandomIdentitySampler(pids, num_instances=4, batch_size=8, seed=0)
    assert len(sampler) == 64
    assert sorted(sampler) == list(range(64))


def test_pk_length_is_exact_and_independent_of_the_draw() -> None:
    pids = _pids(COUNTS)
    sampler = RandomIdentitySampler(pids, num_instances=4, batch_size=16, seed=0)
    lengths = set()
    for epoch in range(5):
        sampler.set_epoch(epoch)
        lengths.add(len(list(sampler)))
    assert lengths == {len(sampler)}


def test_pk_two_ranks_disjoint_identities_equal_length() -> None:
    pids = _pids(COUNTS)
    P, K = 3, 4
    ranks = [DistributedPKSampler(pids, K, P * K, num_replicas=2, rank=r, seed=7) for r in (0, 1)]
    for epoch in (0, 1):
        for s in ranks:
            s.set_epoch(epoch)
        per_rank = [_batches(s, P * K) for s in ranks]
        assert len(per_rank[0]) == len(per_rank[1]) == ranks[0].num_batches
        for b0, b1 in zip(*per_rank):
            ids0, ids1 = [pids[i] for i in b0], [pids[i] for i in b1]
            for ids in (ids0, ids1):  # exactly P×K on each rank
                groups = [ids[j * K : (j + 1) * K] for j in range(P)]
                assert all(len(set(g)) == 1 for g in groups) and len({g[0] for g in groups}) == P
            assert not set(ids0) & set(ids1)


def test_pk_ranks_split_one_global_plan() -> None:
    pids = _pids(COUNTS)
    ranks = [DistributedPKSampler(pids, 2, 4, num_replicas=2, rank=r, seed=5) for r in (0, 1)]
    plan = ranks[0].global_plan(torch.Generator().manual_seed(mix_seed(5, 0, 0)))  # (B, 4, 2)
    assert list(ranks[0]) == plan[:, 0:2].reshape(-1).tolist()
    assert list(ranks[1]) == plan[:, 2:4].reshape(-1).tolist()
    # the global plan only depends on P × world size: one rank with P = 4 draws the same
    single = DistributedPKSampler(pids, 2, 8, num_replicas=1, rank=0, seed=5)
    assert torch.equal(
        single.global_plan(torch.Generator().manual_seed(1)),
        ranks[1].global_plan(torch.Generator().manual_seed(1)),
    )


def test_pk_epoch_reshuffles_and_is_reproducible() -> None:
    pids = _pids(COUNTS)
    a = RandomIdentitySampler(pids, 4, 16, seed=11)
    b = RandomIdentitySampler(pids, 4, 16, seed=11)
    first = list(a)
    assert first == list(b)  # deterministic for a seed
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)  # back to epoch 0: its first order again
    assert list(a) == first
    assert list(RandomIdentitySampler(pids, 4, 16, seed=12)) != first


def test_pk_never_repeats_within_an_epoch() -> None:
    # A loader cycled within an epoch calls __iter__ again: each pass gets a fresh order.
    pids = _pids(COUNTS)
    sampler = RandomIdentitySampler(pids, 4, 16, seed=0)
    sampler.set_epoch(3)
    passes = [list(sampler) for _ in range(4)]
    assert all(p != q for p, q in itertools.combinations(passes, 2))
    sampler.set_epoch(3)  # re-setting the same epoch (Lightning does) must not replay
    assert list(sampler) not in passes


def test_samplers_do_not_touch_the_global_rng() -> None:
    pids = _pids(COUNTS)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    order = list(RandomIdentitySampler(pids, 4, 16, seed=0))
    list(ShardedSampler(50, shuffle=True))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # the global seed has no influence
    assert list(RandomIdentitySampler(pids, 4, 16, seed=0)) == order


def test_pk_sampler_in_a_dataloader() -> None:
    pids = _pids(COUNTS)
    sampler = RandomIdentitySampler(pids, 4, 16, seed=0)
    loader = DataLoader(torch.tensor(pids), batch_size=16, sampler=sampler, drop_last=True)
    batches = list(loader)
    assert len(batches) == len(loader) == sampler.num_batches
    for batch in batches:
        assert (batch.view(4, 4) == batch.view(4, 4)[:, :1]).all()
        assert batch.view(4, 4)[:, 0].unique().numel() == 4


def test_pk_state_dict_round_trip() -> None:
    pids = _pids(COUNTS)
    a = RandomIdentitySampler(pids, 4, 16, seed=0)
    a.set_epoch(2)
    list(a)
    b = RandomIdentitySampler(pids, 4, 16, seed=0)
    b.load_state_dict(a.state_dict())
    assert list(a) == list(b)


def test_pk_bad_arguments() -> None:
    pids = _pids(COUNTS)
    with pytest.raises(ValueError, match="multiple of num_instances"):
        RandomIdentitySampler(pids, 4, 18)
    with pytest.raises(ValueError, match="at least P × num_replicas = 4 × 5 = 20 identities"):
        DistributedPKSampler(pids, 4, 16, num_replicas=5, rank=0)
    with pytest.raises(ValueError, match="rank 2 out of range"):
        DistributedPKSampler(pids, 4, 16, num_replicas=2, rank=2)


# ---------------------------------------------------------------------------- ShardedSampler
def test_sharded_sampler_partitions_with_padding() -> None:
    size, world = 11, 3
    shards = [list(ShardedSampler(size, world, r, shuffle=True, seed=4)) for r in range(world)]
    assert [len(s) for s in shards] == [4, 4, 4]
    flat = [i for s in shards for i in s]
    assert set(flat) == set(range(size))  # every sample on some rank
    assert len(flat) - len(set(flat)) == 1  # one padding duplicate (12 slots, 11 samples)
    ordered = [list(ShardedSampler(size, world, r, shuffle=False)) for r in range(world)]
    assert ordered == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 0]]


def test_sharded_sampler_cycles_without_replay_and_caps() -> None:
    sampler = ShardedSampler(40, seed=0, max_samples=25)
    passes = [list(sampler) for _ in range(3)]
    assert all(len(p) == 25 == len(sampler) for p in passes)
    assert all(len(set(p)) == 25 for p in passes)
    assert all(p != q for p, q in itertools.combinations(passes, 2))
    sampler.set_epoch(1)
    other = ShardedSampler(40, seed=0, max_samples=25)
    other.set_epoch(1)
    assert list(sampler) == list(other)
