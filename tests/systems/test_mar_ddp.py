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


# ----------------------------------------------------------------------------------------------
# The MAR state is not broadcast by DDP, and drift between ranks is detected
# ----------------------------------------------------------------------------------------------
def _ddp_worker(rank: int, store: str, out_dir: str) -> None:
    from functools import partial

    from torch.nn.parallel import DistributedDataParallel

    from src.losses.mar import MultilabelLoss
    from src.systems import MARModule
    from tests.systems._mar_helpers import mar_net

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        module = MARModule(
            net=mar_net(),
            optimizer=partial(torch.optim.SGD, lr=0.1),
            multilabel_loss=partial(MultilabelLoss, batch_size=32),
            num_classes=5,
            num_target_train=12,
            num_target_cameras=3,
        )
        result: dict = {
            "ignored": list(module._ddp_params_and_buffers_to_ignore),
            "names": list(module.replicated_state),
        }
        result["drift_before"] = module._state_drift().tolist()
        ddp = DistributedDataParallel(module)  # broadcast_buffers=True, as Lightning's default
        bn = module.net.backbone.bn1.running_mean
        with torch.no_grad():
            module.memory[3, 1] += rank + 1  # each rank "computes" a different memory row
            bn.fill_(rank + 1.0)  # a network buffer: DDP re-sends rank 0's before the forward
        ddp.train()
        ddp(torch.ones(2, 3, 32, 16))  # the same images on both ranks
        result["memory_value"] = float(module.memory[3, 1])
        result["bn_running_mean"] = bn.clone()
        result["drift_after"] = module._state_drift().tolist()
        try:
            module._check_state()
            result["error"] = None
        except RuntimeError as err:
            result["error"] = str(err)
        torch.save(result, Path(out_dir) / f"ddp_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_mar_state_is_not_broadcast_and_drift_fails_loudly(tmp_path):
    """Under DDP (broadcast_buffers=True) the network's BN buffers are re-sent from rank 0
    before a forward, the MAR state is not (its memory write survives on each rank); the
    checksum all-reduce then flags exactly the drifted buffer on every rank and the periodic
    check raises on every rank (no rank left waiting in a collective)."""
    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"ddp_rank{r}.pt", weights_only=True) for r in range(WORLD)]
    expected_ignored = {
        "memory",
        "memory_visited",
        "mar_initialised",
        "_nonfinite",
        "multilabel_loss.center_mean",
        "multilabel_loss.center_std",
        "multilabel_loss.is_initialized",
        "discriminative_loss.threshold",
        "discriminative_loss.is_initialized",
    }
    for rank, result in enumerate(ranks):
        assert set(result["ignored"]) == expected_ignored
        assert not any(result["drift_before"])
        assert result["memory_value"] == rank + 1  # not overwritten by rank 0's
        drifted = [n for n, bad in zip(result["names"], result["drift_after"]) if bad]
        assert drifted == ["memory"]
        assert result["error"] is not None and "['memory']" in result["error"]
    # the BN buffer was broadcast: both ranks ran the forward from rank 0's value
    torch.testing.assert_close(ranks[0]["bn_running_mean"], ranks[1]["bn_running_mean"])
