"""`make uda-demo`: MAR and cluster contrast side by side on the synthetic A -> B benchmark.

For each seed: stage 1 (source pretraining on A) and its direct-transfer evaluation on B, then,
from that same checkpoint, every chosen method: MAR (`experiment=synthetic_mar`), cluster
contrast (`experiment=synthetic_cc`), and the supervised-on-B upper bound. Every row is
evaluated by `src.eval` with the same protocol on B's query/gallery (cosine distance, standard
AP). Prints the table (mean ± std over seeds) and writes `results.json` / `results.md`.

    python -m src.tools.uda_demo                               # seed 0, every method
    python -m src.tools.uda_demo --seeds 0 1 2 --methods cc    # direct transfer + cluster contrast
    python -m src.tools.uda_demo --quick --out /tmp/uda_demo   # tiny data, 1 epoch (tests)
    python -m src.tools.uda_demo --seeds 0 1 2 --methods cc --stage1-from logs/mar_demo
        # reuse the stage-1 checkpoints of an earlier `make mar-demo` (seed<N>/stage1/...)
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from src.tools.mar_demo import Demo, quick_overrides

DIRECT = "direct transfer (A -> B)"
METHODS = {
    "mar": "MAR (A -> B, unlabelled B)",
    "cc": "cluster contrast (A -> B, unlabelled B)",
    "supervised": "supervised on B (upper bound)",
}
# the tiny preset's 12 target ids of 4-6 images: P x K = 4 x 4 needs >= 4 clusters
QUICK_CC = ["+data.target.preset=tiny", "data.iters_per_epoch=2", "system.k1=6", "system.k2=2",
            "system.min_samples=2", "system.eps=0.6", "scheduler.milestones=[1]"]  # fmt: skip


class UDADemo(Demo):
    """`Demo` with a "train_cc" kind: the one-domain quick overrides plus the tiny target."""

    def overrides(self, kind: str) -> list[str]:
        if kind != "train_cc":
            return super().overrides(kind)
        quick = [o for o in quick_overrides(self.out, "train") if not o.startswith("scheduler.")]
        return [*(quick + QUICK_CC if self.quick else []), *self.extra]


def one_seed(
    seed: int, demo: UDADemo, methods: Sequence[str], stage1_from: Path | None = None
) -> dict[str, dict]:
    """Stage 1 (or its checkpoint from an earlier demo in `stage1_from`), direct transfer and
    each method for one seed; metrics per row."""
    d = demo.out / f"seed{seed}"
    pretrain = ["experiment=synthetic_source_pretrain", f"seed={seed}"]
    if stage1_from is None:
        ckpt1 = demo.train("stage1", d / "stage1", "train", pretrain)
    else:
        ckpt1 = stage1_from / f"seed{seed}" / "stage1" / "checkpoints" / "last.ckpt"
        if not ckpt1.is_file():
            raise FileNotFoundError(f"--stage1-from: {ckpt1} does not exist")
    results = {
        DIRECT: demo.evaluate(
            "direct_eval",
            d / "direct",
            "eval_da",
            ["experiment=synthetic_source_pretrain", "data=synthetic_a2b", f"ckpt_path={ckpt1}"],
        )
    }
    for method in methods:
        if method == "supervised":
            ckpt = demo.train("supervised_b", d / "supervised_b", "train",
                              [*pretrain, "data=synthetic_b"])  # fmt: skip
            results[METHODS[method]] = demo.evaluate(
                "supervised_b_eval",
                d / "supervised_b_eval",
                "eval",
                ["experiment=synthetic_source_pretrain", "data=synthetic_b", f"ckpt_path={ckpt}"],
            )
            continue
        experiment = {"mar": "synthetic_mar", "cc": "synthetic_cc"}[method]
        common = [f"experiment={experiment}", f"system.pretrained_ckpt={ckpt1}"]
        kind = "train_cc" if method == "cc" else "train_da"
        ckpt = demo.train(method, d / method, kind, [*common, f"seed={seed}"])
        results[METHODS[method]] = demo.evaluate(
            f"{method}_eval", d / f"{method}_eval", "eval_da", [*common, f"ckpt_path={ckpt}"]
        )
    (d / "results.json").write_text(json.dumps({**results, "seconds": demo.seconds}, indent=2))
    return results


def summarise(per_seed: dict[int, dict[str, dict]]) -> str:
    """Markdown table: rank-1, mAP, mINP (percent), mean ± sample std over the seeds, per row."""
    seeds = sorted(per_seed)
    lines = ["| method | rank-1 (%) | mAP (%) | mINP (%) | seeds |", "|---|---|---|---|---|"]
    for row in per_seed[seeds[0]]:
        cells = []
        for key in ("rank1", "mAP", "mINP"):
            values = [100 * per_seed[s][row][key] for s in seeds]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}")
        lines.append(f"| {row} | {' | '.join(cells)} | {len(seeds)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--out", default="logs/uda_demo")
    parser.add_argument("--quick", action="store_true", help="tiny data, one epoch (a smoke test)")
    parser.add_argument(
        "--stage1-from",
        type=Path,
        default=None,
        help="folder of an earlier demo whose seed<N>/stage1 checkpoints to reuse",
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args(argv)
    root = Path(args.out)
    per_seed, seconds = {}, {}
    for seed in args.seeds:
        demo = UDADemo(root, args.overrides, args.quick)
        per_seed[seed] = one_seed(seed, demo, args.methods, args.stage1_from)
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
