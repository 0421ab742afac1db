"""`make mar-demo`: MAR on the synthetic benchmark, source A -> target B, end to end.

For each seed: stage 1 (source pretraining on A), the direct-transfer evaluation of that model
on B, stage 2 (MAR from the stage-1 checkpoint, unlabelled B), and the supervised-on-B upper
bound (the stage-1 recipe trained on B's labels). Every row is evaluated by `src.eval` with the
same protocol on B's query/gallery (cosine distance, as MAR). Prints the three-row table
(mean ± std over seeds) and writes `results.json` / `results.md` into the output folder.

    python -m src.tools.mar_demo                    # seed 0
    python -m src.tools.mar_demo --seeds 0 1 2      # the study in docs/results.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROWS = ("direct transfer (A -> B)", "MAR (A -> B, unlabelled B)", "supervised on B (upper bound)")
EVAL_FLAGS = ["metric=cosine", "ap=standard", "extras.print_config=false"]


def run(cmd: list[str], log: Path) -> None:
    """Run one stage as its own process (the CLI a user would type), teeing a log file."""
    print("$", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"stage failed (exit {proc.returncode}), log {log}:\n{tail}")
    print(f"  done in {time.perf_counter() - start:.0f} s", flush=True)


def evaluate(out: Path, experiment: str, data: str, ckpt: Path, extra: Sequence[str]) -> dict:
    cmd = [sys.executable, "-m", "src.eval", f"experiment={experiment}", f"data={data}"]
    cmd += [f"ckpt_path={ckpt}", f"hydra.run.dir={out}", *EVAL_FLAGS, *extra]
    run(cmd, out.with_suffix(".log"))
    return json.loads((out / "metrics.json").read_text())["plain"]


def one_seed(seed: int, root: Path, extra: Sequence[str]) -> dict[str, dict]:
    d = root / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "src.train", f"seed={seed}", "callbacks.rich_progress_bar=null"]
    stage1 = d / "stage1"
    run(
        [*py, "experiment=synthetic_source_pretrain", f"hydra.run.dir={stage1}", *extra],
        d / "stage1.log",
    )
    ckpt1 = stage1 / "checkpoints" / "last.ckpt"
    results = {
        ROWS[0]: evaluate(d / "direct", "synthetic_source_pretrain", "synthetic_a2b", ckpt1, extra)
    }

    stage2 = d / "mar"
    run(
        [
            *py,
            "experiment=synthetic_mar",
            f"system.pretrained_ckpt={ckpt1}",
            f"hydra.run.dir={stage2}",
            *extra,
        ],
        d / "mar.log",
    )
    ckpt2 = stage2 / "checkpoints" / "last.ckpt"
    results[ROWS[1]] = evaluate(
        d / "mar_eval",
        "synthetic_mar",
        "synthetic_a2b",
        ckpt2,
        [f"system.pretrained_ckpt={ckpt1}", *extra],
    )

    sup = d / "supervised_b"
    run(
        [
            *py,
            "experiment=synthetic_source_pretrain",
            "data=synthetic_b",
            f"hydra.run.dir={sup}",
            *extra,
        ],
        d / "supervised_b.log",
    )
    results[ROWS[2]] = evaluate(
        d / "supervised_b_eval",
        "synthetic_source_pretrain",
        "synthetic_b",
        sup / "checkpoints" / "last.ckpt",
        extra,
    )
    (d / "results.json").write_text(json.dumps(results, indent=2))
    return results


def summarise(per_seed: dict[int, dict[str, dict]]) -> str:
    seeds = sorted(per_seed)
    lines = [
        "| method | rank-1 (%) | mAP (%) | seeds |",
        "|---|---|---|---|",
    ]
    for row in ROWS:
        cells = []
        for key in ("rank1", "mAP"):
            values = [100 * per_seed[s][row][key] for s in seeds]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}")
        lines.append(f"| {row} | {cells[0]} | {cells[1]} | {len(seeds)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="logs/mar_demo")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every stage")
    args = parser.parse_args(argv)
    root = Path(args.out)
    per_seed = {}
    for seed in args.seeds:
        per_seed[seed] = one_seed(seed, root, args.overrides)
    table = summarise(per_seed)
    (root / "results.json").write_text(
        json.dumps({str(k): v for k, v in per_seed.items()}, indent=2)
    )
    (root / "results.md").write_text(table + "\n")
    print("\nSynthetic A -> B, evaluated on B (cosine distance, standard AP):\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
