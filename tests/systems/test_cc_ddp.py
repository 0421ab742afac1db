"""Cluster contrast on 2 CPU processes (gloo).

Step level: the memory is bitwise identical on both ranks and equals a single-process run on the
same global batches; the local losses' gradients, averaged as DDP does, are the single-process
gradient. End to end (trainer=ddp_cpu): rank 0's clustering reaches both ranks (labels and
centroid memory equal to a 1-process run on the same data), and after the last step's gathered
update, which nothing re-broadcasts, the memory is identical on both ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from omegaconf import open_dict

from src.systems.cc_steps import cc_train_step
from src.train import train
from tests.systems._cc_helpers import tiny_cc_overrides, tiny_stage1

WORLD = 2
STEPS = 4
BATCH = 12  # global batch
CLUSTERS, DIM = 5, 6


def _problem():
    g = torch.Generator().manual_seed(0)
    memory = F.normalize(torch.randn(CLUSTERS, DIM, generator=g, dtype=torch.float64), dim=1)
    batches = [
        (torch.randn(BATCH, DIM, generator=g, dtype=torch.float64),
         torch.randint(0, CLUSTERS, (BATCH,), generator=g))
        for _ in range(STEPS)
    ]  # fmt: skip
    return memory, batches


def _run(rank, mode):
    memory, batches = _problem()
    rows = (
        slice(None) if rank is None else slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    )
    grads = []
    for feat, labels in batches:
        x = feat[rows].clone().requires_grad_(True)
        out = cc_train_step(x, labels[rows], memory, temperature=0.05, momentum=0.1, mode=mode)
        out.loss.backward()
        grads.append(x.grad)
    return memory, grads


def _worker(rank, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        result = {mode: _run(rank, mode) for mode in ("hard", "mean")}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_cc_step_ddp_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for mode in ("hard", "mean"):
        ref_memory, ref_grads = _run(None, mode)
        assert not torch.equal(ref_memory, _problem()[0])  # the memory moved
        assert torch.equal(ranks[0][mode][0], ranks[1][mode][0]), mode  # bitwise on both ranks
        torch.testing.assert_close(ranks[0][mode][0], ref_memory, rtol=1e-12, atol=1e-12)
        for step in range(STEPS):
            # DDP averages the ranks' gradients of their local mean losses: 1/W of each
            got = torch.cat([ranks[r][mode][1][step] for r in range(WORLD)]) / WORLD
            torch.testing.assert_close(got, ref_grads[step], rtol=1e-10, atol=1e-12)


def _train(make_cfg, data_root, stage1, out_dir, ddp):
    overrides = [*tiny_cc_overrides(data_root, stage1), "trainer.max_epochs=1", "test=false"]
    if ddp:  # 2 ranks x (P=2 x K=4) = the single process's P=4 x K=4 global batches
        overrides += ["trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=8"]
    cfg = make_cfg(overrides)
    with open_dict(cfg):
        cfg.pop("hydra", None)
        cfg.callbacks.state_recorder = {
            "_target_": "tests.systems._cc_helpers.StateRecorder",
            "out_dir": str(out_dir),
        }
    train(cfg)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(2 if ddp else 1)]


def test_cc_ddp_spawn_two_processes(make_cfg, tiny_data_root, tmp_path):
    stage1 = tiny_stage1(tiny_data_root, tmp_path / "stage1.ckpt")
    (single,) = _train(make_cfg, tiny_data_root, stage1, tmp_path / "single", ddp=False)
    ranks = _train(make_cfg, tiny_data_root, stage1, tmp_path / "ddp", ddp=True)
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["steps"] == 3
    for rank in ranks:
        # rank 0 clustered once; both ranks got its labels and centroids, equal to 1 process
        assert torch.equal(rank["start"]["labels"], single["start"]["labels"])
        torch.testing.assert_close(rank["start"]["memory"], single["start"]["memory"])
    assert torch.equal(ranks[0]["start"]["memory"], ranks[1]["start"]["memory"])
    # after 3 gathered updates, with the memory excluded from DDP's buffer broadcast
    assert not torch.equal(ranks[0]["end_memory"], ranks[0]["start"]["memory"])
    assert torch.equal(ranks[0]["end_memory"], ranks[1]["end_memory"])
