"""`make mar-demo`: MAR on the synthetic benchmark, source A -> target B, end to end.

For each seed: stage 1 (source pretraining on A), the direct-transfer evaluation of that model
on B, stage 2 (MAR from the stage-1 checkpoint, unlabelled B), and the supervised-on-B upper
bound (the stage-1 recipe trained on B's labels). Every row is evaluated by `src.eval` with the
same protocol on B's query/gallery (cosine distance, as MAR). Prints the three-row table
(mean ± std over seeds) and writes `results.json` (metrics and stage times per seed) and
`results.md` into the output folder.

    python -m src.tools.mar_demo                    # seed 0 (about 13 minutes on 2 CPU cores)
    python -m src.tools.mar_demo --seeds 0 1 2      # the study in docs/results.md
    python -m src.tools.mar_demo --quick --out /tmp/mar_demo   # tiny data, 1 epoch (tests)
    python -m src.tools.mar_demo trainer.max_epochs=4          # extra overrides for every run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from src.tools.stages import run_stage

ROWS = ("direct transfer (A -> B)", "MAR (A -> B, unlabelled B)", "supervised on B (upper bound)")
EVAL_FLAGS = ["metric=cosine", "ap=standard", "extras.print_config=false"]


def quick_overrides(out: Path, kind: str) -> list[str]:
    """Overrides that shrink a run to the tiny synthetic preset (a smoke test of the pipeline).

    `kind`: "train" (one domain), "train_da" (A -> B), "eval" (one domain) or "eval_da".
    """
    common = [
        f"paths.data_dir={out / 'data'}",
        "+data.source.preset=tiny",
        "data.height=32",
        "data.width=16",
        "data.test_batch_size=64",
        "data.num_workers=0",
    ]
    if kind.endswith("_da"):
        common.append("+data.target.preset=tiny")
    if kind.startswith("eval"):
        return common
    common += [
        "data.batch_size=16",
        "data.num_instances=4",
        "trainer.max_epochs=1",
        f"paths.log_dir={out / 'logs'}",  # the MAR initialisation cache
    ]
    if kind == "train_da":
        # 16 target images: C(16, 2) = 120 pairs, ratio 0.05 mines 6; no warm-up in one epoch
        return [*common, "data.target_batch_size=16", "loss.mining_ratio=0.05",
                "system.warmup_epochs=0", "scheduler.milestones=[1]"]  # fmt: skip
    return [*common, "scheduler.warmup_epochs=0", "scheduler.milestones=[1]"]


class Demo:
    """The runs of one demo: where they go and which extra overrides each kind of run gets."""

    def __init__(self, out: Path, extra: Sequence[str], quick: bool) -> None:
        self.out, self.extra, self.quick = out, list(extra), quick
        self.seconds: dict[str, float] = {}

    def overrides(self, kind: str) -> list[str]:
        return [*(quick_overrides(self.out, kind) if self.quick else []), *self.extra]

    def train(self, name: str, run_dir: Path, kind: str, overrides: Sequence[str]) -> Path:
        cmd = [sys.executable, "-m", "src.train"]
        cmd += [*overrides, f"hydra.run.dir={run_dir}", *self.overrides(kind)]
        self.seconds[name] = run_stage(cmd, run_dir.with_suffix(".log"))
        return run_dir / "checkpoints" / "last.ckpt"

    def evaluate(self, name: str, run_dir: Path, kind: str, overrides: Sequence[str]) -> dict:
        cmd = [sys.executable, "-m", "src.eval", *overrides, f"hydra.run.dir={run_dir}"]
        cmd += [*EVAL_FLAGS, *self.overrides(kind)]
        self.seconds[name] = run_stage(cmd, run_dir.with_suffix(".log"))
        return json.loads((run_dir / "metrics.json").read_text())["plain"]


def one_seed(seed: int, demo: Demo) -> dict[str, dict]:
    """Stage 1, direct transfer, MAR and supervised-on-B for one seed; metrics per row."""
    d = demo.out / f"seed{seed}"
    pretrain = ["experiment=synthetic_source_pretrain", f"seed={seed}"]
    ckpt1 = demo.train("stage1", d / "stage1", "train", pretrain)
    results = {
        ROWS[0]: demo.evaluate(
            "direct_eval",
            d / "direct",
            "eval_da",
            ["experiment=synthetic_source_pretrain", "data=synthetic_a2b", f"ckpt_path={ckpt1}"],
        )
    }
    mar = ["experiment=synthetic_mar", f"seed={seed}", f"system.pretrained_ckpt={ckpt1}"]
    ckpt2 = demo.train("mar", d / "mar", "train_da", mar)
    results[ROWS[1]] = demo.evaluate(
        "mar_eval",
        d / "mar_eval",
        "eval_da",
        ["experiment=synthetic_mar", f"ckpt_path={ckpt2}", f"system.pretrained_ckpt={ckpt1}"],
    )
    ckpt_b = demo.train(
        "supervised_b", d / "supervised_b", "train", [*pretrain, "data=synthetic_b"]
    )
    results[ROWS[2]] = demo.evaluate(
        "supervised_b_eval",
        d / "supervised_b_eval",
        "eval",
        ["experiment=synthetic_source_pretrain", "data=synthetic_b", f"ckpt_path={ckpt_b}"],
    )
    (d / "results.json").write_text(json.dumps({**results, "seconds": demo.seconds}, indent=2))
    return results


def summarise(per_seed: dict[int, dict[str, dict]]) -> str:
    """Markdown table: rank-1 and mAP (percent), mean ± sample std over the seeds, per row."""
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
    parser.add_argument("--quick", action="store_true", help="tiny data, one epoch (a smoke test)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    root = Path(args.out)
    per_seed, seconds = {}, {}
    for seed in args.seeds:
        demo = Demo(root, args.overrides, args.quick)
        per_seed[seed] = one_seed(seed, demo)
        seconds[seed] = demo.seconds
    table = summarise(per_seed)
    (root / "results.json").write_text(
        json.dumps({str(k): {**v, "seconds": seconds[k]} for k, v in per_seed.items()}, indent=2)
    )
    (root / "results.md").write_text(table + "\n")
    print("\nSynthetic A -> B, evaluated on B (cosine distance, standard AP):\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
