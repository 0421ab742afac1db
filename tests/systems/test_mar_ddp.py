"""MAR step functions on 2 CPU processes (gloo): the memory, T and the CML centres are identical on
both ranks and equal to a single-process run on the same global batches; the gradients are the
single-process ones (times world size, which DDP's averaging divides out)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from src.systems.mar_steps import MARWeights, mar_train_step
from tests.systems._mar_helpers import make_problem

WORLD = 2
STEPS = 3
WEIGHTS = MARWeights(lambda_cml=2e-4, lambda_ral=50.0, beta=0.2)
B_SOURCE, B_TARGET = 6, 10


def _global_batches():
    """Per step: (source_feat, source_pids, target_feat, cams, index, pids) of the global batch.
    Step 1 repeats a target index across the ranks (DistributedSampler padding)."""
    batches = []
    for step in range(STEPS):
        p = make_problem(
            seed=100 + step, batch_source=B_SOURCE, batch_target=B_TARGET, dtype=torch.float64
        )
        index = p.target_index.clone()
        if step == 1:
            index[B_TARGET // 2] = index[0]
        batches.append(
            (p.source_feat, p.source_pids, p.target_feat, p.target_camids, index, p.target_pids)
        )
    return batches


def _run(problem, batches, rank: int | None):
    """Run the steps; rank None = single process on the whole batch. Returns state + grads."""
    grads = []
    for step, (fs, ys, ft, cams, index, pids) in enumerate(batches):
        if rank is None:
            s_rows, t_rows = slice(None), slice(None)
        else:
            s_rows = slice(rank * B_SOURCE // WORLD, (rank + 1) * B_SOURCE // WORLD)
            t_rows = slice(rank * B_TARGET // WORLD, (rank + 1) * B_TARGET // WORLD)
        source = fs[s_rows].clone().requires_grad_(True)
        target = ft[t_rows].clone().requires_grad_(True)
        weight = problem.classifier_weight.clone().requires_grad_(True)
        out = mar_train_step(
            source_feat=source,
            source_pids=ys[s_rows],
            target_feat=target,
            target_camids=cams[t_rows],
            target_index=index[t_rows],
            classifier_weight=weight,
            memory=problem.memory,
            memory_visited=problem.visited,
            joint_loss=problem.joint,
            multilabel_loss=problem.multilabel,
            discriminative_loss=problem.discriminative,
            weights=WEIGHTS,
            target_pids=pids[t_rows],
            mdl_active=step > 0,  # step 0 is the warm-up
        )
        out.loss.backward()
        grads.append(
            {
                "source": source.grad,
                "target": target.grad,
                "agents": weight.grad,
                "loss": out.loss.detach(),
            }
        )
    state = {
        "memory": problem.memory,
        "visited": problem.visited,
        "threshold": problem.discriminative.threshold,
        "center_mean": problem.multilabel.center_mean,
        "center_std": problem.multilabel.center_std,
    }
    return state, grads


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        problem = make_problem(
            seed=0, batch_source=B_SOURCE, batch_target=B_TARGET, dtype=torch.float64
        )
        state, grads = _run(problem, _global_batches(), rank)
        torch.save({"state": state, "grads": grads}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_mar_step_ddp_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    problem = make_problem(
        seed=0, batch_source=B_SOURCE, batch_target=B_TARGET, dtype=torch.float64
    )
    ref_state, ref_grads = _run(problem, _global_batches(), None)
    assert ref_state["visited"].any()  # the memory was written after the warm-up

    for name, value in ref_state.items():
        # identical (bitwise) on every rank ...
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        # ... and the single-process state of the same global batches
        torch.testing.assert_close(ranks[0]["state"][name], value, rtol=1e-10, atol=1e-12)

    for step in range(STEPS):
        ref = ref_grads[step]
        for rank in range(WORLD):
            got = ranks[rank]["grads"][step]
            torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-10, atol=1e-12)
            s_rows = slice(rank * B_SOURCE // WORLD, (rank + 1) * B_SOURCE // WORLD)
            t_rows = slice(rank * B_TARGET // WORLD, (rank + 1) * B_TARGET // WORLD)
            # gather_with_grad sums every rank's (identical) loss gradient: WORLD x the global one
            torch.testing.assert_close(
                got["source"], WORLD * ref["source"][s_rows], rtol=1e-9, atol=1e-12
            )
            torch.testing.assert_close(
                got["target"], WORLD * ref["target"][t_rows], rtol=1e-9, atol=1e-12
            )
            # the agents are not gathered: every rank has the global gradient (DDP averages it)
            torch.testing.assert_close(got["agents"], ref["agents"], rtol=1e-9, atol=1e-12)
