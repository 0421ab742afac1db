"""PseudoLabelPKSampler and the DataModule's pseudo-label hook (cluster contrast)."""

from __future__ import annotations

import pytest
import torch

from src.data.samplers import PseudoLabelPKSampler


def _labels(seed=0, n=120, clusters=10):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, clusters, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -1  # outliers
    return labels


def _batches(sampler, batch_size):
    flat = torch.tensor(list(iter(sampler)))
    return flat.view(-1, batch_size)


def test_fixed_number_of_pk_batches_of_inliers():
    labels = _labels()
    s = PseudoLabelPKSampler(len(labels), num_instances=4, batch_size=16, num_batches=25)
    s.set_labels(labels)
    batches = _batches(s, 16)
    assert batches.shape == (25, 16) and len(s) == 25 * 16  # more than one pass over the inliers
    for batch in batches:
        ids = labels[batch].view(4, 4)
        assert (ids >= 0).all()  # never an outlier
        assert (ids == ids[:, :1]).all() and len(torch.unique(ids[:, 0])) == 4  # P x K


def test_ranks_split_the_single_process_global_batches():
    labels = _labels(1)
    single = PseudoLabelPKSampler(len(labels), 4, 16, num_batches=7, num_replicas=1, rank=0)
    ranks = [PseudoLabelPKSampler(len(labels), 4, 8, 7, num_replicas=2, rank=r) for r in (0, 1)]
    for s in (single, *ranks):
        s.set_labels(labels)
    whole = _batches(single, 16)
    parts = [_batches(r, 8) for r in ranks]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=0)
    # the two ranks of a step hold disjoint clusters
    for a, b in zip(*parts):
        assert not set(labels[a].tolist()) & set(labels[b].tolist())


def test_labels_change_between_epochs():
    labels = _labels(2)
    s = PseudoLabelPKSampler(len(labels), 4, 16, num_batches=5)
    s.set_labels(labels)
    s.set_epoch(0)
    first = _batches(s, 16)
    new = labels.clone()
    new[new >= 0] = (new[new >= 0] + 3) % 10
    s.set_labels(new)
    s.set_epoch(1)
    assert (new[_batches(s, 16)] >= 0).all()
    assert not torch.equal(first, _batches(s, 16))


def test_errors_name_the_problem():
    s = PseudoLabelPKSampler(10, 2, 8, num_batches=3)
    with pytest.raises(RuntimeError, match="set_target_pseudo_labels"):
        list(iter(s))
    with pytest.raises(ValueError, match="3 clusters.*4 distinct"):
        s.set_labels(torch.tensor([0, 0, 1, 1, 2, 2, -1, -1, -1, -1]))
    with pytest.raises(ValueError, match="11 labels for a dataset of 10"):
        s.set_labels(torch.zeros(11, dtype=torch.long))


def test_datamodule_hook(tiny_data_root):
    from src.data import ReIDDataModule

    spec = {"name": "synthetic", "domain": "B", "preset": "tiny"}
    dm = ReIDDataModule(
        source={**spec, "root": str(tiny_data_root / "synthetic" / "B")},
        target={**spec, "root": str(tiny_data_root / "synthetic" / "B")},
        height=32, width=16, batch_size=8, num_instances=2, num_workers=0,
        target_sampler="pseudo_labels", iters_per_epoch=3,
    )  # fmt: skip
    dm.setup("fit")
    n = dm.num_target_train
    true_ids = torch.tensor(dm.target_data.train.pids if hasattr(dm.target_data.train, "pids")
                            else [r.pid for r in dm.target_data.train])  # fmt: skip
    labels = torch.unique(true_ids, return_inverse=True)[1]
    labels[::5] = -1
    loader = dm.train_dataloader()
    dm.set_target_pseudo_labels(labels)
    batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        ids = labels[batch["index"]].view(4, 2)
        assert (ids >= 0).all() and (ids == ids[:, :1]).all()
    assert len(labels) == n
    with pytest.raises(ValueError, match="iters_per_epoch"):
        ReIDDataModule(source=spec | {"root": "x"}, target=spec | {"root": "x"},
                       target_sampler="pseudo_labels")  # fmt: skip
