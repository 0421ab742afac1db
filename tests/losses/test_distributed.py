"""gather_with_grad on 2 CPU processes (gloo): same gathered tensor everywhere, local gradients."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from src.losses import TripletLoss, gather_with_grad

WORLD_SIZE = 2
ROWS = 3


def _local_rows(rank: int) -> torch.Tensor:
    return torch.arange(ROWS * 2, dtype=torch.float64).view(ROWS, 2) + 100.0 * rank


def _weights(rank: int) -> torch.Tensor:
    # The loss weights differ per rank so that the summed and the local gradients differ.
    return (rank + 1.0) * torch.arange(WORLD_SIZE * ROWS * 2, dtype=torch.float64).view(-1, 2)


def _worker(rank: int, store_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        mine = slice(rank * ROWS, (rank + 1) * ROWS)
        expected = torch.cat([_local_rows(r) for r in range(WORLD_SIZE)])
        for reduce_grad in (True, False):
            x = _local_rows(rank).requires_grad_(True)
            gathered = gather_with_grad(x, reduce_grad=reduce_grad)
            assert torch.equal(gathered.detach(), expected), gathered
            (gathered * _weights(rank)).sum().backward()
            if reduce_grad:  # every rank's loss gradient on my rows, summed
                want = sum(_weights(r)[mine] for r in range(WORLD_SIZE))
            else:  # only my loss's gradient on my rows
                want = _weights(rank)[mine]
            assert torch.equal(x.grad, want), (reduce_grad, x.grad, want)

        # A real global-batch loss: every rank computes the same TripletLoss on the gathered
        # features; the summed gradient is world_size x the single-process full-batch gradient
        # (DDP's averaging then gives exactly the full-batch gradient).
        g = torch.Generator().manual_seed(0)
        full = torch.randn(WORLD_SIZE * 4, 5, generator=g, dtype=torch.float64)
        labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
        local = full[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
        TripletLoss(margin=1.0)(gather_with_grad(local), labels).backward()
        reference = full.clone().requires_grad_(True)
        TripletLoss(margin=1.0)(reference, labels).backward()
        want = WORLD_SIZE * reference.grad[rank * 4 : (rank + 1) * 4]
        torch.testing.assert_close(local.grad, want, rtol=1e-12, atol=1e-12)
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_two_gloo_processes(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "store"),), nprocs=WORLD_SIZE, join=True)


def test_returns_input_unchanged_when_not_distributed() -> None:
    assert not dist.is_initialized()
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(x) is x
