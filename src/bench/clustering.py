"""Benchmark of one cluster-contrast clustering pass: marlin's sparse version against the dense one.

``python -m src.bench.clustering [--quick]`` prints a markdown section (``run()`` returns it, for
``make bench`` to collect into docs/benchmarks.md).

Cluster contrast (Dai et al. 2021) re-clusters the target training set every epoch: the
k-reciprocal Jaccard distance of the features (k1=30, k2=6), then DBSCAN (eps 0.6, min_samples
4, ``metric="precomputed"``). Two versions, each in a fresh subprocess (time, peak memory above
the features from the kernel's counters, as :mod:`src.bench.evaluation` measures them), at the
sizes of Market-1501 train (12,936 images, 751 identities, 6 cameras) and MSMT17 train (32,621
images, 1,041 identities, 15 cameras), 2048-d unit-norm planted-identity features:

* **marlin**: :func:`src.metrics.rerank.k_reciprocal_jaccard` with the options
  :func:`src.systems.cc_steps.cluster_features` uses (``metric="cosine"``, ``knn="auto"``,
  ``max_distance=eps``), a sparse matrix holding only the pairs within eps (all DBSCAN reads),
  then :func:`src.systems.cc_steps.dbscan_labels`;
* **dense reference**: :func:`reference_jaccard`, the algorithm of cluster-contrast-reid's
  ``compute_jaccard_distance`` (clustercontrast/utils/faiss_rerank.py, CPU path) step by step,
  written here: faiss ``IndexFlatL2`` search of k1 items, k-reciprocal lists, a dense N x N
  float32 V (softmax weights over the expanded set), a dense N x N float32 query expansion, an
  inverted index from V's columns, a per-row loop accumulating the min-sums into a dense N x N
  float32 Jaccard matrix, then scikit-learn's ``DBSCAN(metric="precomputed", n_jobs=-1)`` on
  it, as the reference's training script calls it.

The labels of the two versions are compared (identical, or their adjusted Rand index). The dense
version is skipped, with a line saying why, when its N x N matrices would not fit in the memory
available at the time of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from src.bench.evaluation import _measure_peak, _planted, _quiet, _ratio, _run_worker

__all__ = ["dense_peak_bytes", "reference_jaccard", "run"]

K1, K2, EPS, MIN_SAMPLES = 30, 6, 0.6, 4


@dataclass(frozen=True)
class _Case:
    name: str
    n: int
    ids: int
    cams: int


@dataclass(frozen=True)
class _Sizes:
    cases: tuple[_Case, ...]
    dim: int
    noise: float  # per-image noise of `_planted` (its scale is relative to the dimension)


FULL = _Sizes(
    (_Case("Market-1501 train", 12936, 751, 6), _Case("MSMT17 train", 32621, 1041, 15)), 2048, 3.0
)
# 64-d needs less noise than 2048-d for a comparable regime (a few % to ~15 % outliers)
QUICK = _Sizes((_Case("Market-like", 600, 35, 6), _Case("MSMT-like", 1500, 48, 15)), 64, 1.5)
#: Run the dense version only if this multiple of its estimated peak fits in MemAvailable.
SAFETY = 1.25


def _features(sizes: _Sizes, case: _Case, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """(N, D) unit-norm float32 planted-identity features (the gallery part of `_planted`:
    identity centre + camera bias + log-normal per-image noise) and their identities."""
    _, feats, _, pids, _, _ = _planted(
        0, case.n, case.ids, 0, case.cams, sizes.dim, sizes.noise, seed
    )
    return feats, pids


# ------------------------------------------------------------------ the dense reference
def _reciprocal(ranked: np.ndarray, i: int, k: int) -> np.ndarray:
    """The items among the first k+1 of i's list whose own first k+1 items contain i (the
    reference slices k+1 columns of a k1-wide list: k1 items for k = k1)."""
    ahead = ranked[i, : k + 1]
    return ahead[(ranked[ahead, : k + 1] == i).any(axis=1)]


def reference_jaccard(
    features: torch.Tensor, k1: int = K1, k2: int = K2, times: dict | None = None
) -> np.ndarray:
    """Dense (N, N) float32 k-reciprocal Jaccard distance, cluster-contrast-reid's algorithm.

    The steps and data structures of ``compute_jaccard_distance`` (CPU search, float32, the
    reference's default ``use_float16=False``): features are used as given (the reference gets
    unit-norm ones); stage times in seconds go to `times` when given.
    """
    import faiss

    x = features.detach().float().cpu().contiguous()
    xs = x.numpy()
    n = len(xs)
    stages = times if times is not None else {}

    t = time.perf_counter()
    index = faiss.IndexFlatL2(xs.shape[1])
    index.add(xs)
    _, ranked = index.search(xs, k1)  # (N, k1), each item itself usually first
    del index
    stages["k-NN (faiss flat L2)"] = time.perf_counter() - t

    t = time.perf_counter()
    half = int(np.around(k1 / 2))
    full_sets = [_reciprocal(ranked, i, k1) for i in range(n)]
    half_sets = [_reciprocal(ranked, i, half) for i in range(n)]
    V = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        base = full_sets[i]
        parts = [base]
        for c in base:
            cand = half_sets[c]
            if len(np.intersect1d(cand, base)) > 2 / 3 * len(cand):
                parts.append(cand)
        support = np.unique(np.concatenate(parts))
        dist = 2 - 2 * torch.mm(x[i : i + 1], x[support].t())
        V[i, support] = torch.softmax(-dist, dim=1).view(-1).numpy()
    del full_sets, half_sets
    stages["reciprocal sets + dense V"] = time.perf_counter() - t

    if k2 != 1:
        t = time.perf_counter()
        expanded = np.zeros_like(V)
        for i in range(n):
            expanded[i] = V[ranked[i, :k2]].mean(axis=0)
        V = expanded
        del expanded
        stages["query expansion (dense)"] = time.perf_counter() - t
    del ranked

    t = time.perf_counter()
    columns = [np.flatnonzero(V[:, j]) for j in range(n)]  # rows with a non-zero in column j
    stages["inverted index (column scans)"] = time.perf_counter() - t

    t = time.perf_counter()
    jaccard = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        mins = np.zeros(n, dtype=np.float32)
        for j in np.flatnonzero(V[i]):
            rows = columns[j]
            mins[rows] += np.minimum(V[i, j], V[rows, j])
        jaccard[i] = 1 - mins / (2 - mins)
    del columns, V
    jaccard[jaccard < 0] = 0.0
    stages["min-sum loop (dense Jaccard)"] = time.perf_counter() - t
    return jaccard


def dense_peak_bytes(n: int) -> int:
    """Estimated peak of :func:`reference_jaccard` + DBSCAN: two N x N float32 matrices alive at
    once (V with its query expansion, then V with the Jaccard matrix) plus the N x N bool mask of
    the final clamp; the features, lists and DBSCAN's neighbourhoods are comparatively small."""
    return 2 * 4 * n * n + n * n


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _skip_reason(n: int, available: int) -> str | None:
    need = dense_peak_bytes(n)
    if SAFETY * need <= available:
        return None
    return (
        f"dense reference at N = {n:,} skipped: its three N × N float32 matrices (V, its query "
        f"expansion, the Jaccard matrix) are {4 * n * n / 2**30:.1f} GiB each, an estimated "
        f"peak of {need / 2**30:.1f} GiB (two alive at once + a bool mask), and {SAFETY}× that "
        f"exceeds the {available / 2**30:.1f} GiB available"
    )


# ------------------------------------------------------------------ workers (fresh interpreters)
def _worker(version: str, case_index: int, quick: bool) -> None:
    """Fresh interpreter: one clustering pass; prints one JSON line."""
    from sklearn.cluster import DBSCAN

    from src.metrics import rerank as RR
    from src.systems.cc_steps import dbscan_labels

    sizes = QUICK if quick else FULL
    feats, _ = _features(sizes, sizes.cases[case_index])
    stages: dict[str, float] = {}
    if version == "marlin":
        # time the neighbour search inside k_reciprocal_jaccard (looked up at call time)
        def timed(name, fn):
            def wrapper(*args, **kwargs):
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                stages[name] = stages.get(name, 0.0) + time.perf_counter() - t
                return out

            return wrapper

        RR._knn_symmetric = timed("k-NN (torch chunked top-k)", RR._knn_symmetric)
        RR._faiss_neighbours = timed("k-NN (faiss)", RR._faiss_neighbours)
        RR._k_reciprocal_v = timed("sparse V + query expansion", RR._k_reciprocal_v)
        RR._sparse_jaccard = timed("inverted-index min-sums (sparse Jaccard)", RR._sparse_jaccard)

    def one_pass() -> tuple[np.ndarray, dict]:
        t0 = time.perf_counter()
        if version == "marlin":
            dist = RR.k_reciprocal_jaccard(
                feats, K1, K2, metric="cosine", knn="auto", max_distance=EPS
            )
            extra = {"stored_pairs_per_row": dist.nnz / dist.shape[0]}
        else:
            dist = reference_jaccard(feats, K1, K2, stages)
            extra = {}
        t1 = time.perf_counter()
        if version == "marlin":
            labels = dbscan_labels(dist, EPS, MIN_SAMPLES)
        else:
            cluster = DBSCAN(eps=EPS, min_samples=MIN_SAMPLES, metric="precomputed", n_jobs=-1)
            labels = _quiet(cluster.fit_predict, dist)
        t2 = time.perf_counter()
        return labels, {"jaccard_s": t1 - t0, "dbscan_s": t2 - t1, **extra}

    (labels, split), out = _measure_peak(one_pass)
    out.update(split)
    out["stages"] = stages
    out["features_mib"] = feats.numel() * 4 / 2**20
    out["threads"] = torch.get_num_threads()
    out["labels"] = labels.tolist()
    print(json.dumps(out))


def _labels_check(a: np.ndarray, b: np.ndarray) -> str:
    if np.array_equal(a, b):
        return "yes"
    from sklearn.metrics import adjusted_rand_score

    ari = adjusted_rand_score(a, b)
    moved = int(((a == -1) != (b == -1)).sum())
    return f"no: ARI {ari:.4f} ({moved} items outlier in one version only)"


# ------------------------------------------------------------------ report
def run(quick: bool = False) -> str:
    """Run the clustering benchmark and return a markdown section (quick: tiny sizes)."""
    sizes = QUICK if quick else FULL
    load = [os.getloadavg()[0]]
    rows, notes, stage_lines = [], [], []
    method, threads = "VmHWM", torch.get_num_threads()
    for index, case in enumerate(sizes.cases):
        res: dict[str, dict] = {}
        for version in ("marlin", "dense"):
            if version == "dense":
                reason = _skip_reason(case.n, _mem_available())
                if reason is not None:
                    notes.append(reason + ".")
                    continue
            code = (
                "from src.bench.clustering import _worker; "
                f"_worker({version!r}, {index}, {quick!r})"
            )
            res[version] = _run_worker(code, f"clustering ({version}, N={case.n})")
            load.append(os.getloadavg()[0])
            method, threads = res[version]["method"], res[version]["threads"]
        labels = {v: np.asarray(r["labels"]) for v, r in res.items()}
        for version, r in res.items():
            other = "dense" if version == "marlin" else "marlin"
            check = (
                _labels_check(labels[version], labels[other])
                if other in labels
                else "n/a (dense skipped)"
            )
            lab = labels[version]
            name = (
                "marlin (sparse `k_reciprocal_jaccard` + `dbscan_labels`)"
                if version == "marlin"
                else "dense reference (`compute_jaccard_distance` + `DBSCAN`)"
            )
            rows.append(
                f"| {name} | {case.name}, N = {case.n:,} "
                f"| {r['jaccard_s']:.1f} / {r['dbscan_s']:.1f} / {r['seconds']:.1f} "
                f"| {r['peak_extra_mib']:,.0f} | {int(lab.max()) + 1 if lab.size else 0} "
                f"| {float((lab == -1).mean()):.3f} | {check} |"
            )
            parts = ", ".join(f"{k} {v:.1f} s" for k, v in r["stages"].items())
            if version == "marlin":
                parts += f"; {r['stored_pairs_per_row']:,.0f} stored pairs per row"
            stage_lines.append(f"- {version}, N = {case.n:,}: {parts}.")
            parts_s = {**r["stages"], "DBSCAN": r["dbscan_s"]}
            top = max(parts_s, key=parts_s.__getitem__)
            notes.append(
                f"N = {case.n:,}, {version}: the largest part is {top} "
                f"({100 * parts_s[top] / r['seconds']:.0f} % of the pass)."
            )
        if "dense" in res:
            m, d = res["marlin"], res["dense"]
            notes.append(
                f"N = {case.n:,}, dense: each N × N float32 matrix is "
                f"{4 * case.n**2 / 2**20:,.0f} MiB (estimated peak "
                f"{dense_peak_bytes(case.n) / 2**20:,.0f} MiB: two alive at once + a bool mask)."
            )
            notes.append(
                f"N = {case.n:,}: dense / marlin total time "
                f"{_ratio(d['seconds'], m['seconds'])}, peak memory "
                f"{_ratio(max(d['peak_extra_mib'], 1.0), max(m['peak_extra_mib'], 1.0))} "
                "(above 1: marlin is faster / smaller)."
            )

    features = ", ".join(
        f"{c.name} {c.n:,} images / {c.ids:,} identities / {c.cams} cameras" for c in sizes.cases
    )
    lines = [
        "## Cluster-contrast clustering pass (`src/bench/clustering.py`)",
        "",
        f"One pseudo-labelling pass: k-reciprocal Jaccard distance (k1={K1}, k2={K2}) + DBSCAN "
        f"(eps {EPS}, min_samples {MIN_SAMPLES}) on {sizes.dim}-d unit-norm float32 planted-"
        f"identity features (`_planted`, noise {sizes.noise}; {features}). marlin = sparse "
        '`k_reciprocal_jaccard(metric="cosine", knn="auto", max_distance=eps)` (only the pairs '
        "within eps are kept, block by block; at these sizes `auto` is torch's "
        "exact chunked top-k; faiss from 50,000 items) + `dbscan_labels`; dense reference = "
        "cluster-contrast-reid's `compute_jaccard_distance` algorithm (faiss `IndexFlatL2`, dense "
        "N × N float32 V, query expansion and Jaccard matrices, as the reference's default "
        '`use_float16=False`) + `DBSCAN(metric="precomputed", n_jobs=-1)`. Each run in a fresh '
        f"subprocess; peak memory = kernel peak RSS ({method}, reset just before) minus the RSS "
        f"before, above the features; torch threads {threads}; 1-min load average "
        + ", ".join(f"{x:.1f}" for x in load)
        + " (before / after each run).",
        "",
        "| version | size | time (s): Jaccard / DBSCAN / total "
        "| peak memory above the features (MiB) | clusters | outlier fraction "
        "| labels identical to the other version |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Stages of the Jaccard (seconds):",
        "",
        *stage_lines,
        "",
        *[f"- {note}" for note in notes],
    ]
    if any(not r.endswith("| yes |") for r in rows if "n/a" not in r):
        lines += [
            "",
            "Labels differ where a Jaccard distance lies within float rounding of eps (the "
            "reference sums the min-sums and the query expansion in float32, marlin in float64) "
            "or where two neighbour distances at the k1 boundary are within rounding of each "
            "other (faiss's and torch's distance arithmetic differ), which changes a few "
            "k-reciprocal sets.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    print(run(quick=parser.parse_args().quick))
