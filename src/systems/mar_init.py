"""MAR initialisation statistics: the MDL threshold T0 over all target pairs, exactly and fast.

The original code computes all N(N-1)/2 L1 distances between soft multilabels with scipy on the
CPU (83M pairs for Market-1501), sorts them in float64 and caches a 0.7 GB file. Here the exact
k-th largest agreement is found with chunked pairwise L1 on the multilabels' device and a
streaming top-k, and a sampled-pairs estimate is offered for very large N.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from src.losses.mar import pairwise_agreement


def num_mined_pairs(num_items: int, mining_ratio: float) -> int:
    """k = floor(C(N, 2) * ratio), the rank of the threshold among all pairs (at least 1)."""
    total = num_items * (num_items - 1) // 2
    return max(1, math.floor(total * mining_ratio))


@torch.no_grad()
def kth_largest_agreement(multilabels: Tensor, k: int, chunk_size: int = 1024) -> Tensor:
    """Exact k-th largest pairwise agreement over all pairs i < j.

    Args:
        multilabels: (N, K) soft multilabels (rows sum to 1), on any device.
        k: rank (1 = the largest agreement); must be in [1, N(N-1)/2].
        chunk_size: rows per block; memory is O(chunk_size * N + k).

    Returns:
        0-d float64 tensor on the input's device.
    """
    n = multilabels.shape[0]
    total = n * (n - 1) // 2
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}] for {n} items, got {k}")
    y = multilabels.double()
    best = y.new_empty(0)
    for start in range(0, n - 1, chunk_size):
        stop = min(start + chunk_size, n - 1)
        # (r, n - start - 1) agreements of rows start..stop-1 with every later row
        block = pairwise_agreement(y[start:stop], y[start + 1 :], chunk_size=stop - start)
        # keep pairs i < j: row r (item start + r) pairs with columns >= r
        r = torch.arange(stop - start, device=y.device).unsqueeze(1)
        c = torch.arange(n - start - 1, device=y.device).unsqueeze(0)
        values = block[c >= r]
        candidates = torch.cat([best, values])
        best = torch.topk(candidates, min(k, candidates.numel()), sorted=False).values
    return best.min()


@torch.no_grad()
def sampled_kth_largest_agreement(
    multilabels: Tensor, mining_ratio: float, num_pairs: int = 2_000_000, seed: int = 0
) -> Tensor:
    """Estimate of the (1 - mining_ratio) quantile of agreements from random pairs i != j.

    With m sampled pairs the estimate is the empirical quantile, whose rank error has standard
    deviation sqrt(p (1 - p) / m) in quantile units (p = mining_ratio): for p = 0.005 and
    m = 2e6 that is 5e-5, i.e. the estimate sits between the true (p ± 1.5e-4) quantiles with
    99.7 % probability (see docs/mar.md).
    """
    n = multilabels.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    i = torch.randint(0, n, (num_pairs,), generator=gen)
    j = torch.randint(0, n - 1, (num_pairs,), generator=gen)
    j = j + (j >= i).long()  # uniform over j != i
    y = multilabels.double()
    i, j = i.to(y.device), j.to(y.device)
    out = torch.empty(num_pairs, dtype=torch.float64, device=y.device)
    step = 65536
    for s in range(0, num_pairs, step):
        a, b = y[i[s : s + step]], y[j[s : s + step]]
        out[s : s + step] = 1.0 - (a - b).abs().sum(1) / 2.0
    k = max(1, math.floor(num_pairs * mining_ratio))
    return torch.topk(out, k, sorted=False).values.min()


# ----------------------------------------------------------------------------------------------
# Everything below: the initialisation pipeline of MARModule (added by the MAR stage-2 work).
# Soft multilabels of the target train set -> (dedup under DDP) -> CML centres + T0 -> cache.
# ----------------------------------------------------------------------------------------------
INIT_CACHE_VERSION = 2  # 2: the key covers every input (seed, augmentation, architecture, ...)
# What a cached initialisation holds (CPU tensors): T0 and the two CML centres.
INIT_STATE_KEYS = ("threshold", "center_mean", "center_std")


def dist_world() -> tuple[int, int]:
    """(world size, rank) of an initialised torch.distributed, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def broadcast_from_rank0(obj: Any, trainer: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank: through the Trainer's strategy when there is one, else
    through an initialised torch.distributed (a module driven by hand), else ``obj`` itself."""
    if trainer is not None:
        return trainer.strategy.broadcast(obj, src=0)
    if dist_world()[0] > 1:
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def file_sha256(path: str | os.PathLike[str], block_size: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (streamed; ~1 s for a 300 MB ResNet-50 checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(block_size), b""):
            digest.update(block)
    return digest.hexdigest()


def init_cache_key(
    checkpoint_sha256: str, dataset_root: str, num_items: int, mining_ratio: float, **extra: Any
) -> str:
    """Cache key of the init statistics: the pretrained weights, the target data and every
    setting that changes T0 or the centres (scale, mode, image size, normalisation, ...)."""
    payload = {
        "version": INIT_CACHE_VERSION,
        "checkpoint_sha256": checkpoint_sha256,
        "dataset_root": os.path.abspath(str(dataset_root)),
        "num_items": int(num_items),
        "mining_ratio": float(mining_ratio),
        **{k: extra[k] for k in sorted(extra)},
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def records_digest(records: Iterable[Any]) -> str:
    """SHA-1 of a split's records (path, pid, camid, index) and each file's size and mtime: a
    changed, added, removed or relabelled image changes it."""
    digest = hashlib.sha1()
    for r in records:
        try:
            st = os.stat(r.img_path)
            stamp = f"{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{r.img_path}|{r.pid}|{r.camid}|{r.index}|{stamp}\n".encode())
    return digest.hexdigest()


def init_cache_path(cache_dir: str | os.PathLike[str], key: str) -> Path:
    """File of one cached initialisation: ``<cache_dir>/mar_init_<key>.pt``."""
    return Path(cache_dir) / f"mar_init_{key}.pt"


def load_init_cache(cache_dir: str | os.PathLike[str] | None, key: str) -> dict[str, Tensor] | None:
    """The cached ``{"threshold", "center_mean", "center_std"}`` (CPU tensors), or None on a miss.

    A corrupt or foreign file counts as a miss (it is recomputed and overwritten).
    """
    if cache_dir is None:
        return None
    path = init_cache_path(cache_dir, key)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a cache must never break training: recompute instead
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        return None
    if not all(isinstance(state.get(k), Tensor) for k in INIT_STATE_KEYS):
        return None
    return {k: state[k] for k in INIT_STATE_KEYS}


def save_init_cache(
    cache_dir: str | os.PathLike[str], key: str, state: dict[str, Tensor], meta: dict[str, Any]
) -> Path:
    """Write the init statistics atomically (temporary file + rename: no torn reads)."""
    path = init_cache_path(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {k: state[k].detach().cpu() for k in INIT_STATE_KEYS}
    payload["key"] = key
    payload["meta"] = json.dumps(meta, sort_keys=True, default=str)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


@torch.no_grad()
def extract_target_similarities(
    embed: Callable[[Tensor], Tensor],
    loader: Iterable[dict[str, Tensor]],
    agents: Tensor,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Cosine similarities of every image of `loader` to the (unit) agents.

    Args:
        embed: images (B, 3, H, W) -> pooled features (B, d) (the pretrained net in eval mode).
        loader: batches with "img", "camid", "index" (the DataModule's target_init_dataloader).
        agents: (K, d) unit-norm agents; its device is where everything is computed.
        autocast: optional context factory for the backbone (the trainer's precision context).

    Returns:
        (similarities (n, K) fp32 on the agents' device, camids (n,), indices (n,)), in loader
        order. ``softmax(scale · similarities)`` are the soft multilabels.
    """
    device = agents.device
    sims, cams, index = [], [], []
    for batch in loader:
        images = batch["img"].to(device, non_blocking=True)
        with autocast() if autocast is not None else nullcontext():
            feats = embed(images)
        feats = torch.nn.functional.normalize(feats.float(), dim=1)
        sims.append(feats.mm(agents.float().t()))
        cams.append(batch["camid"].to(device).long())
        index.append(batch["index"].to(device).long())
    if not sims:
        raise ValueError("the target init loader yielded no batch (empty target train split?)")
    return torch.cat(sims), torch.cat(cams), torch.cat(index)


def _all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenating all_gather (no gradient); identity in a single process."""
    import torch.distributed as dist

    world, _ = dist_world()
    if world == 1:
        return tensor
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor.contiguous())
    return torch.cat(out)


def gather_by_index(index: Tensor, *values: Tensor, num_items: int) -> tuple[Tensor, ...]:
    """Gather per-sample rows from every rank, de-duplicate by dataset index, order by index.

    DistributedSampler-style shards are padded with duplicates; the first occurrence (in rank
    order) of each index is kept. Every rank returns the same tensors.

    Args:
        index: (n,) dataset indices of the local rows.
        *values: tensors with n leading rows (e.g. similarities (n, K), camids (n,)).
        num_items: N, the size of the split: every index 0..N-1 must appear.

    Returns:
        the values, each with exactly N rows, row i = dataset item i.

    Raises:
        ValueError: ranks hold different numbers of rows, or some index is missing / out of range.
    """
    world, _ = dist_world()
    if world > 1:
        sizes = _all_gather_cat(torch.tensor([index.numel()], device=index.device))
        if bool((sizes != sizes[0]).any()):
            raise ValueError(
                f"MAR init: ranks extracted different numbers of target images {sizes.tolist()}; "
                "target_init_dataloader() must give every rank the same number of samples"
            )
        index = _all_gather_cat(index)
        values = tuple(_all_gather_cat(v) for v in values)
    order = torch.argsort(index, stable=True)
    sorted_index = index[order]
    keep = torch.ones_like(sorted_index, dtype=torch.bool)
    keep[1:] = sorted_index[1:] != sorted_index[:-1]
    rows = order[keep]
    unique = sorted_index[keep]
    expected = torch.arange(num_items, device=unique.device)
    if unique.numel() != num_items or not torch.equal(unique, expected):
        raise ValueError(
            f"MAR init: the target init loader covered {unique.numel()} distinct indices, expected "
            f"every index 0..{num_items - 1} of the target train split (num_target_train="
            f"{num_items}) exactly once"
        )
    return tuple(v[rows] for v in values)


@torch.no_grad()
def init_threshold_value(
    multilabels: Tensor,
    mining_ratio: float,
    mode: str = "exact",
    num_pairs: int = 2_000_000,
    seed: int = 0,
    chunk_size: int = 1024,
) -> Tensor:
    """T0: the ⌊C(N,2)·p⌋-th largest agreement over all pairs (DiscriminativeLoss.init_threshold
    semantics), exactly (`mode="exact"`) or estimated from `num_pairs` random pairs ("sampled").

    Returns:
        0-d float64 tensor on the multilabels' device.
    """
    if mode == "exact":
        k = num_mined_pairs(multilabels.shape[0], mining_ratio)
        return kth_largest_agreement(multilabels, k, chunk_size=chunk_size)
    if mode == "sampled":
        return sampled_kth_largest_agreement(multilabels, mining_ratio, num_pairs, seed)
    raise ValueError(f"init_mode must be 'exact' or 'sampled', got {mode!r}")


def sampled_quantile_error(mining_ratio: float, num_pairs: int) -> float:
    """Standard deviation, in quantile units, of the sampled estimate's rank:
    sqrt(p(1 - p)/m) (binomial count of sampled pairs above a fixed value)."""
    p = float(mining_ratio)
    return math.sqrt(p * (1 - p) / num_pairs)
