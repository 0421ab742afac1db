"""Per-sample augmentation seeds (src/data/seeding.py): a sample's augmentation is a function of
its seed alone (not of the process's generator, the worker count or the history), different
samples get different draws, and a loader with 0 or 2 workers yields identical batches."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from src.data.samplers import ShardedSampler
from src.data.seeding import SeededDataset, SeededSampler


class RandomItems(Dataset):
    """item i -> (i, a draw from torch's global generator): stands for a random augmentation."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), torch.rand(()).item()])


def test_a_samples_draw_depends_on_its_seed_only():
    data = SeededDataset(RandomItems())
    torch.manual_seed(1)
    a = data[(3, 123)]
    torch.manual_seed(2)
    state = torch.get_rng_state()
    b = data[(3, 123)]
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    assert not torch.equal(data[(3, 124)], a)  # another seed, another draw


def test_seeds_differ_per_sample_and_per_pass_and_skip_drops_the_consumed():
    sampler = SeededSampler(ShardedSampler(32, shuffle=True, seed=5))
    first = list(sampler)
    assert len({s for _, s in first}) == 32  # every sample its own seed
    second = list(sampler)  # the next pass of the same epoch: new order, new seeds
    assert {s for _, s in first}.isdisjoint({s for _, s in second})
    replay = SeededSampler(ShardedSampler(32, shuffle=True, seed=5))
    replay.load_state_dict({"seed": 5, "epoch": 0, "iteration": 1, "skip": 10})
    assert list(replay) == second[10:]
    assert list(replay)[:3] != second[10:13]  # skip applies to one pass only


def test_zero_and_two_workers_give_identical_batches():
    def batches(workers: int) -> list[torch.Tensor]:
        sampler = SeededSampler(ShardedSampler(32, shuffle=True, seed=0))
        loader = DataLoader(SeededDataset(RandomItems()), batch_size=8, sampler=sampler,
                            num_workers=workers)  # fmt: skip
        torch.manual_seed(workers)  # the main process's generator must not matter
        return [b for _ in range(2) for b in loader]

    zero, two = batches(0), batches(2)
    assert all(torch.equal(a, b) for a, b in zip(zero, two)) and len(zero) == len(two) == 8
    draws = torch.cat(zero)[:, 1]
    assert draws.unique().numel() == draws.numel()  # no two samples share a draw
