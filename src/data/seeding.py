"""Per-sample augmentation seeds: random augmentation that a resumed run replays exactly.

Random flips, crops and erasing draw from torch's global generator. In a worker process that
generator is seeded when the worker starts (persistent workers keep it across epochs); with
``num_workers=0`` it is the training process's own generator, shared with everything else. Either
way its state at a given step depends on the whole history of the process, which a checkpoint
cannot capture (worker processes are gone after ``kill -9``).

Here every sample carries its own seed instead: :class:`SeededSampler` wraps an epoch-seeded
sampler (:mod:`src.data.samplers`) and yields ``(index, seed)`` pairs, the seeds drawn from
``(sampler seed, epoch, iteration)`` like the order itself; :class:`SeededDataset` runs the
wrapped dataset's ``__getitem__`` under a forked torch generator seeded with that seed. The
augmentation of a sample is then a function of (seed, epoch, iteration, position) alone: the same
with 0 or N workers, on every rank, and after a resume. The training process's global generator
is left untouched (it is saved and restored separately, see :mod:`src.systems.base`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from src.data.samplers import mix_seed

# Offsets the augmentation seeds away from the sampler's own order generator.
_AUGMENT_STREAM = 0x5EED_A06


class SeededSampler(Sampler[tuple[int, int]]):
    """Wraps a sampler with ``seed``/``epoch``/``iteration`` (the samplers of
    :mod:`src.data.samplers`): yields ``(index, augmentation seed)`` pairs.

    It also resumes mid-epoch: :meth:`load_state_dict` accepts ``skip``, the number of samples of
    the next ``__iter__`` that were already consumed; they are drawn (same order, same seeds) and
    dropped. ``set_epoch``, ``state_dict`` and ``len`` go to the wrapped sampler.
    """

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self._skip = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(iter(self.sampler))  # advances the wrapped sampler's iteration counter
        epoch, iteration = self.sampler.epoch, self.sampler.iteration - 1
        gen = torch.Generator().manual_seed(
            mix_seed(self.sampler.seed ^ _AUGMENT_STREAM, epoch, iteration)
        )
        seeds = torch.randint(0, 2**62, (len(indices),), generator=gen).tolist()
        skip, self._skip = self._skip, 0
        return iter(list(zip(indices, seeds))[skip:])

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def iteration(self) -> int:
        return self.sampler.iteration

    def state_dict(self) -> dict[str, int]:
        """The wrapped sampler's state (epoch, iteration counter)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state; its optional ``skip`` drops that many samples of the next pass."""
        state = dict(state)
        self._skip = int(state.pop("skip", 0))
        self.sampler.load_state_dict(state)


class SeededDataset(Dataset):
    """Runs ``dataset[index]`` with torch's CPU generator seeded from the sample's own seed.

    Indexed by the ``(index, seed)`` pairs of :class:`SeededSampler` (a plain integer index is
    served unseeded, from the current global state). The caller's generator state is restored
    afterwards (``torch.random.fork_rng``), so a loader without workers consumes none of the
    training process's randomness.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        if isinstance(item, int):
            return self.dataset[item]
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also seed (or queue, with a stack
            # trace each time: half of a cached sample's cost) the CUDA/XPU/MTIA generators,
            # which the transforms never use and fork_rng(devices=[]) does not restore
            torch.default_generator.manual_seed(seed)
            return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        # attributes of the wrapped dataset (records, pids, transform) stay reachable
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def loader_generator(seed: int, stream: int, rank: int) -> torch.Generator:
    """A private generator for a DataLoader (it draws its workers' base seed from it) so that
    iterating a loader never draws from the training process's global generator.

    Args:
        seed: the DataModule's seed.
        stream: a number per loader (train source, target, evaluation, ...).
        rank: the process rank.
    """
    return torch.Generator().manual_seed(mix_seed(seed ^ _AUGMENT_STREAM, stream, rank))
