"""Benchmark of the metric-learning losses against loop versions of the reference code.

``python -m src.bench.losses`` prints a markdown section (``run()`` returns it, for
``make bench`` to collect into docs/benchmarks.md). Every comparison is measured in the same
process on the same device: forward + backward, median of several runs after warm-up, with
torch's thread count left as configured.

* Batch-hard triplet loss (B = 256 = 64 identities × 4, D = 2048): :class:`TripletLoss` against
  the open-reid per-anchor loop (boolean-mask max/min per anchor), and against the distance
  matrix alone (``euclidean_dist(x, x).sum()``), the floor any batch-hard loss pays.
  Goals: ≥ 20× faster than the loop, ≤ 2× the distance matrix alone.
* AlignedReID ``batch_local_dist`` (anti-diagonal dynamic programme) against the reference
  double loop over the m × n grid (vectorised over the batch, as AlignedReID-Re-Production) and
  against a per-pair loop.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from src.losses import TripletLoss
from src.losses.functional import (
    batch_euclidean_dist,
    batch_local_dist,
    euclidean_dist,
    hard_example_mining,
    triplet_ranking_loss,
)

__all__ = ["run"]


@dataclass(frozen=True)
class _Sizes:
    num_ids: int
    num_instances: int
    feat_dim: int
    local_batch: int
    stripes: int
    local_dim: int
    per_pair_batch: int
    repeats: int


FULL = _Sizes(64, 4, 2048, 128, 8, 128, 32, 7)
QUICK = _Sizes(8, 4, 64, 16, 4, 16, 4, 2)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(steps: list[Callable[[], None]], device: torch.device, repeats: int) -> list[float]:
    """Median wall time (ms) of each step, timed round-robin so that load changes on a shared
    machine affect every implementation alike."""
    for step in steps:
        for _ in range(2):  # warm-up (allocator, kernels, lazy init)
            step()
    _sync(device)
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(repeats):
        for step, bucket in zip(steps, times):
            start = time.perf_counter()
            step()
            _sync(device)
            bucket.append(time.perf_counter() - start)
    return [1000.0 * statistics.median(bucket) for bucket in times]


# ------------------------------------------------------------------ reference loop versions


def _loop_triplet(x: Tensor, labels: Tensor, margin: float) -> Tensor:
    """open-reid / torchreid TripletLoss.forward: per-anchor boolean-mask mining."""
    return _loop_mining_ranking(euclidean_dist(x, x), labels, margin)


def _loop_mining_ranking(dist: Tensor, labels: Tensor, margin: float) -> Tensor:
    n = dist.size(0)
    mask = labels.expand(n, n).eq(labels.expand(n, n).t())
    dist_ap, dist_an = [], []
    for i in range(n):
        dist_ap.append(dist[i][mask[i]].max().unsqueeze(0))
        dist_an.append(dist[i][mask[i] == 0].min().unsqueeze(0))
    ap, an = torch.cat(dist_ap), torch.cat(dist_an)
    return torch.nn.functional.margin_ranking_loss(an, ap, torch.ones_like(an), margin=margin)


def _grid_loop_shortest(cost: Tensor) -> Tensor:
    """AlignedReID-Re-Production ``shortest_dist``: double loop over the grid, batch last."""
    m, n = cost.shape[:2]
    d = [[None] * n for _ in range(m)]
    for i in range(m):
        for j in range(n):
            if i == 0 and j == 0:
                d[i][j] = cost[i, j]
            elif i == 0:
                d[i][j] = d[i][j - 1] + cost[i, j]
            elif j == 0:
                d[i][j] = d[i - 1][j] + cost[i, j]
            else:
                d[i][j] = torch.min(d[i - 1][j], d[i][j - 1]) + cost[i, j]
    return d[-1][-1]


def _reference_batch_local_dist(x: Tensor, y: Tensor) -> Tensor:
    dist = batch_euclidean_dist(x, y)
    dist = (torch.exp(dist) - 1.0) / (torch.exp(dist) + 1.0)
    return _grid_loop_shortest(dist.permute(1, 2, 0))


def _per_pair_local_dist(x: Tensor, y: Tensor) -> Tensor:
    return torch.stack(
        [_reference_batch_local_dist(x[i : i + 1], y[i : i + 1])[0] for i in range(x.size(0))]
    )


# ------------------------------------------------------------------ benchmark


def _fwd_bwd(fn: Callable[[Tensor], Tensor], x: Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        fn(x).backward()

    return step


def _fmt_ratio(value: float) -> str:
    return f"{value:.1f}×" if value >= 10 else f"{value:.2f}×"


def run(quick: bool = False, device: str | torch.device | None = None) -> str:
    """Run the loss benchmarks and return a markdown section.

    Args:
        quick: tiny sizes and 2 repeats (smoke test), not meaningful timings.
        device: where to run; default CUDA when available, else CPU.
    """
    sizes = QUICK if quick else FULL
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator().manual_seed(0)
    batch = sizes.num_ids * sizes.num_instances
    labels = torch.arange(sizes.num_ids).repeat_interleave(sizes.num_instances).to(dev)
    x = torch.randn(batch, sizes.feat_dim, generator=g).mul_(0.05).to(dev).requires_grad_(True)
    triplet = TripletLoss(margin=0.3)

    with torch.no_grad():  # the vectorised loss and the loop agree before being timed
        ours, ref = triplet(x, labels), _loop_triplet(x, labels, 0.3)
    torch.testing.assert_close(ours, ref)

    t_vec, t_loop, t_dist = _median_ms(
        [
            _fwd_bwd(lambda f: triplet(f, labels), x),
            _fwd_bwd(lambda f: _loop_triplet(f, labels, 0.3), x),
            _fwd_bwd(lambda f: euclidean_dist(f, f).sum(), x),
        ],
        dev,
        sizes.repeats,
    )
    speedup = t_loop / t_vec
    overhead = t_vec / t_dist

    def vec_mining(dist: Tensor) -> Tensor:
        return triplet_ranking_loss(*hard_example_mining(dist, labels), 0.3)

    dist_mat = euclidean_dist(x, x).detach().requires_grad_(True)
    t_mine_vec, t_mine_loop = _median_ms(
        [
            _fwd_bwd(vec_mining, dist_mat),
            _fwd_bwd(lambda d: _loop_mining_ranking(d, labels, 0.3), dist_mat),
        ],
        dev,
        sizes.repeats,
    )
    mining_speedup = t_mine_loop / t_mine_vec

    n, m, d = sizes.local_batch, sizes.stripes, sizes.local_dim
    lx = torch.randn(n, m, d, generator=g).to(dev).requires_grad_(True)
    ly = torch.randn(n, m, d, generator=g).to(dev)
    with torch.no_grad():
        torch.testing.assert_close(batch_local_dist(lx, ly), _reference_batch_local_dist(lx, ly))
    t_local, t_grid = _median_ms(
        [
            _fwd_bwd(lambda f: batch_local_dist(f, ly).sum(), lx),
            _fwd_bwd(lambda f: _reference_batch_local_dist(f, ly).sum(), lx),
        ],
        dev,
        sizes.repeats,
    )
    k = sizes.per_pair_batch
    px = lx[:k].detach().clone().requires_grad_(True)
    t_local_k, t_pair = _median_ms(
        [
            _fwd_bwd(lambda f: batch_local_dist(f, ly[:k]).sum(), px),
            _fwd_bwd(lambda f: _per_pair_local_dist(f, ly[:k]).sum(), px),
        ],
        dev,
        min(sizes.repeats, 3),
    )

    def ok(met: bool) -> str:
        return "met" if met else "**not met**"

    lines = [
        "## Losses (`src/bench/losses.py`)",
        "",
        f"Device `{dev}`"
        + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
        + f", torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"{platform.processor() or platform.machine()}; forward + backward, median of "
        f"{sizes.repeats} runs (implementations timed round-robin) after 2 warm-up runs"
        + (" (**quick smoke run: sizes too small for meaningful timings**)" if quick else "")
        + ".",
        "",
        f"### Batch-hard triplet loss, B = {batch} ({sizes.num_ids} ids × "
        f"{sizes.num_instances}), D = {sizes.feat_dim}",
        "",
        "| implementation | time (ms) |",
        "|---|---:|",
        f"| `TripletLoss` (mask-based mining) | {t_vec:.2f} |",
        f"| open-reid per-anchor loop | {t_loop:.2f} |",
        f"| distance matrix alone (`euclidean_dist(x, x).sum()`) | {t_dist:.2f} |",
        f"| mining + ranking alone on a given distance matrix, vectorised | {t_mine_vec:.2f} |",
        f"| mining + ranking alone on a given distance matrix, per-anchor loop | "
        f"{t_mine_loop:.2f} |",
        "",
        "| ratio | value | goal |",
        "|---|---:|---|",
        f"| loop / vectorised | {_fmt_ratio(speedup)} | ≥ 20× ({ok(speedup >= 20)}) |",
        f"| vectorised / distance matrix alone | {_fmt_ratio(overhead)} | "
        f"≤ 2× ({ok(overhead <= 2)}) |",
        f"| mining + ranking alone: loop / vectorised | {_fmt_ratio(mining_speedup)} | |",
        f"| attainable bound on loop / vectorised (loop / distance matrix alone) | "
        f"{_fmt_ratio(t_loop / t_dist)} | |",
        "",
        "Both implementations pay the distance matrix (its matmuls dominate at D = 2048); the "
        "loop adds per-anchor boolean indexing (two host syncs per anchor on a GPU). Where "
        "the matmul dominates (CPU), loop / vectorised cannot exceed loop / distance matrix "
        "alone, so the ≥ 20× goal is only reachable where the loop's per-anchor cost dominates.",
        "",
        f"### AlignedReID `batch_local_dist`, m = n = {m} stripes, d = {d}",
        "",
        "| implementation | pairs | time (ms) |",
        "|---|---:|---:|",
        f"| anti-diagonal DP (ours) | {n} | {t_local:.2f} |",
        f"| reference grid double loop (batched) | {n} | {t_grid:.2f} |",
        f"| anti-diagonal DP (ours) | {k} | {t_local_k:.2f} |",
        f"| per-pair loop of the reference | {k} | {t_pair:.2f} |",
        "",
        "| ratio | value |",
        "|---|---:|",
        f"| grid double loop / anti-diagonal DP | {_fmt_ratio(t_grid / t_local)} |",
        f"| per-pair loop / anti-diagonal DP | {_fmt_ratio(t_pair / t_local_k)} |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(run())
