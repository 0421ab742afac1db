"""Benchmark: the three MAR losses per training step, vectorised vs the original code's loops.

The loop versions below follow the algorithm of the original code (KovenYu/MAR ``src/utils.py``):
RJ loops over the 368 samples with K-wide masks and ``torch.any``; CML loops over the cameras
with ``torch.unique`` and ``torch.stack``; MDL moves the features and multilabels to the CPU,
computes Euclidean and L1 distances with scipy ``pdist``, sorts with numpy and loops over the
mined pairs. Both sides run forward + backward on the same inputs in the same process; the
losses are also compared to check that both compute the same thing.

Run: ``python -m src.bench.mar_losses [--quick] [--device cpu|cuda]`` (``make bench`` runs it
through ``python -m src.bench``).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.distance import pdist

from src.losses.mar import (
    DiscriminativeLoss,
    JointLoss,
    MultilabelLoss,
    condensed_pairwise_agreement,
    log_soft_multilabel,
    soft_multilabel,
)

FULL = {"batch": 184, "agents": 4101, "dim": 2048, "views": 6, "ratio": 0.005, "repeats": 5}
QUICK = {"batch": 24, "agents": 96, "dim": 32, "views": 4, "ratio": 0.05, "repeats": 2}
SCALE = 30.0


# ----------------------------------------------------------------------------------------------
# Loop versions (the original code's algorithm)
# ----------------------------------------------------------------------------------------------
def loop_joint_loss(features, agents, labels, similarity, features_target, similarity_target):
    margin, sim_margin = 1.0, 0.5
    terms = []
    agent_ids = torch.arange(len(agents), device=features.device)
    zero = torch.zeros(1, device=features.device)
    for f, label, sim in zip(features, labels, similarity):
        terms.append((f - agents[label]).pow(2).sum())
        hard = (agent_ids != label) & (sim > sim_margin)
        if torch.any(hard):  # host sync per sample
            sq_dist = (f - agents[hard]).pow(2).sum(dim=1)
            terms.append(torch.max(zero, margin - sq_dist).mean())
    for f, sim in zip(features_target, similarity_target):
        hard = sim > sim_margin
        if torch.any(hard):
            sq_dist = (f - agents[hard]).pow(2).sum(dim=1)
            terms.append(torch.max(zero, margin - sq_dist).mean())
    return torch.stack(terms).mean()


class LoopMultilabelLoss:
    def __init__(self, batch_size: int, center_mean: torch.Tensor, center_std: torch.Tensor):
        self.moment = batch_size / 10000
        self.center_mean = center_mean.clone()
        self.center_std = center_std.clone()

    def __call__(self, log_multilabels, views):
        detached = log_multilabels.detach()
        means, stds = [], []
        for v in torch.unique(views):
            rows = detached[views == v]
            if len(rows) == 1:
                continue
            means.append(rows.mean(dim=0))
            stds.append(rows.std(dim=0))
        self.center_mean = (
            self.center_mean * (1 - self.moment) + torch.stack(means).mean(0) * self.moment
        )
        self.center_std = (
            self.center_std * (1 - self.moment) + torch.stack(stds).mean(0) * self.moment
        )
        terms = []
        for v in torch.unique(views):
            rows = log_multilabels[views == v]
            if len(rows) == 1:
                continue
            terms.append((rows.mean(dim=0) - self.center_mean).pow(2).sum())
            terms.append((rows.std(dim=0) - self.center_std).pow(2).sum())
        return torch.stack(terms).mean()


class LoopDiscriminativeLoss:
    def __init__(self, mining_ratio: float, threshold: torch.Tensor):
        self.mining_ratio = mining_ratio
        self.threshold = threshold.clone()
        self.n_pos_pairs = torch.zeros(1, device=threshold.device)
        self.rate_tp = torch.zeros(1, device=threshold.device)

    @staticmethod
    def _pairs(n: int, condensed_idx: np.ndarray):
        if len(condensed_idx) == 0:
            return None
        first, second = np.triu_indices(n, k=1)
        return first[condensed_idx], second[condensed_idx]

    def __call__(self, features, multilabels, labels):
        f_np = features.detach().cpu().numpy()
        ml_np = multilabels.cpu().numpy()
        p_dist = pdist(f_np)
        p_agree = 1 - pdist(ml_np, "minkowski", p=1) / 2
        n_similar = int(len(p_dist) * self.mining_ratio)
        similar_idx = np.argsort(p_dist)[:n_similar]
        is_positive = p_agree[similar_idx] > self.threshold.item()
        P = self._pairs(len(f_np), similar_idx[is_positive])
        N = self._pairs(len(f_np), similar_idx[~is_positive])
        t = torch.tensor([np.sort(p_agree)[-n_similar]], device=features.device)
        self.threshold = self.threshold * 0.9 + t.float() * 0.1
        if P is not None:  # diagnostics: one comparison (host sync) per positive pair
            count = sum(int(labels[i] == labels[j]) for i, j in zip(*P))
            self.n_pos_pairs = 0.9 * self.n_pos_pairs + 0.1 * len(P[0])
            self.rate_tp = 0.9 * self.rate_tp + 0.1 * count / len(P[0])
        if P is None:
            pos, num = torch.ones(1, device=features.device), 0
        else:
            sq = [(features[i] - features[j]).pow(2).sum() for i, j in zip(*P)]
            pos = torch.exp(-torch.stack(sq)).mean()
            num = -torch.log(pos)
        if N is None:
            neg = torch.full((1,), 0.5, device=features.device)
        else:
            sq = [(features[i] - features[j]).pow(2).sum() for i, j in zip(*N)]
            neg = torch.exp(-torch.stack(sq)).mean()
        return num + torch.log(pos + neg)


# ----------------------------------------------------------------------------------------------
# Inputs and timing
# ----------------------------------------------------------------------------------------------
def make_inputs(cfg: dict, device: torch.device, seed: int = 0) -> dict:
    """Unit features/agents with realistic structure: agents in clusters (so rows have a few hard
    agents with cosine > 0.5), source features near their own agent, target features near a
    random agent, P x K identities and random cameras in the target batch."""
    gen = torch.Generator().manual_seed(seed)
    batch, num_agents, dim = cfg["batch"], cfg["agents"], cfg["dim"]
    centres = F.normalize(torch.randn(num_agents // 8 + 1, dim, generator=gen), dim=1)
    cluster = torch.randint(0, centres.shape[0], (num_agents,), generator=gen)
    noise = torch.randn(num_agents, dim, generator=gen) / math.sqrt(dim)
    agents = F.normalize(centres[cluster] + 0.7 * noise, dim=1)  # cosine ~0.67 within a cluster
    labels = torch.randint(0, num_agents, (batch,), generator=gen)
    source = F.normalize(agents[labels] + 0.8 * torch.randn(batch, dim, generator=gen) / 45, dim=1)
    ids_target = torch.arange(batch) // 4
    near = torch.randint(0, num_agents, (batch // 4 + 1,), generator=gen)[ids_target]
    target = F.normalize(
        agents[near] + 1.2 * torch.randn(batch, dim, generator=gen) / math.sqrt(dim), dim=1
    )
    views = torch.randint(0, cfg["views"], (batch,), generator=gen)
    out = {
        "agents": agents,
        "labels": labels,
        "source": source,
        "target": target,
        "views": views,
        "target_labels": ids_target,
    }
    out = {k: v.to(device) for k, v in out.items()}
    out["memory"] = soft_multilabel(out["target"], out["agents"], SCALE)  # memory rows
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step: Callable[[], torch.Tensor], device: torch.device, repeats: int) -> float:
    """Median wall time (ms) of ``step()`` forward + backward, after one warm-up call."""
    step().backward()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        step().backward()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def run(quick: bool = False, device: str | None = None) -> str:
    """Time the MAR losses and return a markdown section with the speed-ups.

    Each loss is timed on its own (forward + backward from leaf inputs: features for RJ and MDL,
    log soft multilabels for CML), so the shared network / soft-multilabel cost is excluded.
    """
    cfg = QUICK if quick else FULL
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = make_inputs(cfg, dev)
    agents = data["agents"]
    f, g = _leaf(data["source"]), _leaf(data["target"])
    sim_s, sim_t = (f @ agents.t()).detach(), (g @ agents.t()).detach()
    log_ml = _leaf(log_soft_multilabel(data["target"], agents, SCALE))

    # Shared initial state. Centres from another batch (as from the training set); T0 between
    # the n-th and (n+1)-th largest agreement of this batch (its (1 - p) quantile, where T
    # settles in training), so that the mined pairs split into both P and N with no tie at T.
    init = make_inputs(cfg, dev, seed=1)
    cml = MultilabelLoss(batch_size=2 * cfg["batch"], num_views=cfg["views"]).to(dev)
    cml.init_centers(log_soft_multilabel(init["target"], agents, SCALE), init["views"])
    cml_loop = LoopMultilabelLoss(2 * cfg["batch"], cml.center_mean, cml.center_std)
    mdl = DiscriminativeLoss(cfg["ratio"]).to(dev)
    num_mined = mdl.num_mined_pairs(cfg["batch"])
    ranked = condensed_pairwise_agreement(data["memory"]).sort(descending=True).values
    mdl.init_threshold(((ranked[num_mined - 1] + ranked[num_mined]) / 2).reshape(1))
    mdl_loop = LoopDiscriminativeLoss(cfg["ratio"], mdl.threshold.reshape(1))
    rj = JointLoss(1.0)

    steps = {
        "RJ (JointLoss)": (
            lambda: rj(f, agents, data["labels"], sim_s, g, sim_t),
            lambda: loop_joint_loss(f, agents, data["labels"], sim_s, g, sim_t),
        ),
        "CML (MultilabelLoss)": (
            lambda: cml(log_ml, data["views"]),
            lambda: cml_loop(log_ml, data["views"]),
        ),
        "MDL (DiscriminativeLoss)": (
            lambda: mdl(g, data["memory"], data["target_labels"]),
            lambda: mdl_loop(g, data["memory"], data["target_labels"]),
        ),
    }

    rows, total_fast, total_loop = [], 0.0, 0.0
    for name, (fast, loop) in steps.items():
        # First calls on identical state: both versions must give the same loss.
        diff = abs(float(fast().detach()) - float(loop().detach().reshape(())))
        t_fast = time_step(fast, dev, cfg["repeats"])
        t_loop = time_step(loop, dev, cfg["repeats"])
        total_fast += t_fast
        total_loop += t_loop
        rows.append(
            f"| {name} | {t_loop:.2f} | {t_fast:.2f} | {t_loop / t_fast:.2f}x | {diff:.1e} |"
        )
    rows.append(
        f"| all three | {total_loop:.2f} | {total_fast:.2f} | {total_loop / total_fast:.2f}x | |"
    )
    # Floor for RJ: the similarity matmuls f·Aᵀ, g·Aᵀ alone (forward + backward to f, g).
    t_matmul = time_step(
        lambda: (f @ agents.t()).sum() + (g @ agents.t()).sum(), dev, cfg["repeats"]
    )
    rows.append(f"| reference: f·Aᵀ and g·Aᵀ matmuls alone | | {t_matmul:.2f} | | |")
    stats = mdl.last_stats
    size = (
        f"B = {cfg['batch']} source + {cfg['batch']} target, K = {cfg['agents']} agents, "
        f"D = {cfg['dim']}, {cfg['views']} cameras, mining ratio {cfg['ratio']}"
    )
    return "\n".join(
        [
            "## MAR losses (RJ, CML, MDL): vectorised vs original-style loops",
            "",
            f"{size}{' (quick)' if quick else ''}; device `{dev}`, torch threads "
            f"{torch.get_num_threads()}. Forward + backward per step, median of "
            f"{cfg['repeats']} runs after a warm-up, each loss from leaf inputs. Loop versions follow the original code "
            "(per-sample RJ loop with `torch.any`, per-camera CML loop, MDL with CPU scipy "
            "`pdist`, numpy sorts and per-pair loops). Goal: >= 10x on the full step.",
            "",
            "| loss | loop (ms) | vectorised (ms) | speed-up | abs. loss diff (1st call) |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"MDL mined {num_mined} pairs ({int(stats['num_positives'])} positive in the last "
            f"step); RJ mean hard agents per row: source "
            f"{float(rj.last_stats['hard_agents_source']):.1f}, target "
            f"{float(rj.last_stats['hard_agents_target']):.1f}.",
            "",
            "RJ on the CPU gathers only the hard (row, agent) pairs (~10 per row, no device to "
            "sync with); on accelerators it evaluates ‖x − a‖² densely against all K agents (one "
            "B x d x K matmul), which is sync-free and where the loop's 368 host syncs and "
            "thousands of tiny kernels dominate instead. CML and MDL do the same arithmetic as the "
            "loops (MDL's cost is the 184 x 184 x K L1 agreement), so on a CPU they gain only the "
            "Python/scipy overhead: the >= 10x goal is a GPU goal, not measurable on this machine.",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(run(quick=args.quick, device=args.device))


if __name__ == "__main__":
    main()
