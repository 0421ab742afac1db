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
import sys
from collections.abc import Sequence
from pathlib import Path

from src.tools.stages import run_stage

DIRECT = "direct transfer (A -> B)"
METHODS = {
    "mar": "MAR (A -> B, unlabelled B)",
    "cc": "cluster contrast (A -> B, unlabelled B)",
    "supervised": "supervised on B (upper bound)",
}
EVAL_FLAGS = ["metric=cosine", "ap=standard", "extras.print_config=false"]
# the tiny preset's 12 target ids of 4-6 images: P x K = 4 x 4 needs >= 4 clusters
QUICK_CC = ["+data.target.preset=tiny", "data.iters_per_epoch=2", "system.k1=6", "system.k2=2",
            "system.min_samples=2", "system.eps=0.6", "scheduler.milestones=[1]"]  # fmt: skip


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
        """`self.extra`, after the quick overrides of `kind` in a quick demo; "train_cc" is a
        one-domain run ("train") on the tiny target with cluster contrast's own schedule."""
        if not self.quick:
            return list(self.extra)
        if kind != "train_cc":
            return [*quick_overrides(self.out, kind), *self.extra]
        quick = [o for o in quick_overrides(self.out, "train") if not o.startswith("scheduler.")]
        return [*quick, *QUICK_CC, *self.extra]

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


def one_seed(
    seed: int, demo: Demo, methods: Sequence[str], stage1_from: Path | None = None
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


def main(
    argv: Sequence[str] | None = None,
    methods: Sequence[str] = tuple(METHODS),
    out: str = "logs/uda_demo",
    description: str | None = __doc__,
) -> int:
    """The demo's command line; `methods`, `out` and `description` are its defaults (`make
    mar-demo` is this with MAR and supervised-on-B into logs/mar_demo)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(methods))
    parser.add_argument("--out", default=out)
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
        demo = Demo(root, args.overrides, args.quick)
        per_seed[seed] = one_seed(seed, demo, args.methods, args.stage1_from)
        seconds[seed] = demo.seconds
    table = summarise(per_seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(
        json.dumps({str(k): {**v, "seconds": seconds[k]} for k, v in per_seed.items()}, indent=2)
    )
    (root / "results.md").write_text(table + "\n")
    print("\nSynthetic A -> B, evaluated on B (cosine distance, standard AP):\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
