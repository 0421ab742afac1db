"""Mean ± std of a multirun's final test metrics over its jobs (e.g. seeds).

Usage::

    python -m src.train -m seed=0,1,2                        # the default run, three seeds
    python -m src.tools.seed_table logs/train/multiruns/<date_time>

Prints one row: rank-1, mAP and mINP (percent) as mean ± sample standard deviation over the jobs,
the number of jobs and the per-job values; ``--metrics`` picks others (names as logged,
``test/mAP``).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from src.tools.run_reader import load_multirun

DEFAULT_METRICS = ("test/rank1", "test/mAP", "test/mINP")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def seed_table(
    multirun_dir: Path, metrics: Sequence[str] = DEFAULT_METRICS
) -> dict[str, list[float]]:
    """{metric: [value of each job]} of the jobs of `multirun_dir`, in job order."""
    runs = load_multirun(multirun_dir)  # raises, naming the folder, when it holds no job
    return {m: [run.metric(m) for run in runs] for m in metrics}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.tools.seed_table", description=__doc__)
    parser.add_argument("multirun_dir", type=Path)
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    args = parser.parse_args(argv)
    table = seed_table(args.multirun_dir, args.metrics)
    jobs = len(next(iter(table.values())))
    cells = []
    for name, values in table.items():
        mean, std = mean_std([100 * v for v in values])
        cells.append(f"{name.split('/')[-1]} {mean:.1f} ± {std:.1f}")
    print(f"{args.multirun_dir} ({jobs} jobs): " + " | ".join(cells))
    for name, values in table.items():
        print(f"  {name}: " + ", ".join(f"{100 * v:.1f}" for v in values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
