"""`make sweep-demo`: a margin x mining-ratio sweep of MAR on the synthetic data, then its summary.

MAR is the mode that has both knobs: the RJ margin (``loss.margin``) and the MDL mining ratio
(``loss.mining_ratio``). The demo trains one stage-1 model (source pretraining on A) and runs a
Hydra multirun of stage 2 (MAR, A -> unlabelled B) over the 2 x 2 grid from that one checkpoint,
so the four jobs differ only in the two swept values. Everything is shrunk to run on 2 CPU cores
(64 x 32 images, a few epochs: about 7 minutes; ``--quick``: the tiny synthetic preset,
one epoch, one to two minutes). Each job writes its own directory ``<out>/sweep/<n>/``; then
``python -m src.tools.summarize_sweep <out>/sweep --metric test/mAP`` prints the table and writes
``sweep_summary.csv`` and ``sweep_summary.png`` (test/mAP against the margin, one line per mining
ratio) into the sweep directory, so the sweep is readable without W&B.

    python -m src.tools.sweep_demo                          # logs/sweep_demo/<time>/
    python -m src.tools.sweep_demo --quick --out /tmp/demo  # the tiny version (tests)
    python -m src.tools.sweep_demo \\
        --stage1-ckpt logs/mar_demo/seed0/stage1/checkpoints/last.ckpt  # reuse a stage-1 model
    python -m src.tools.sweep_demo --margins 0.5 1.0 1.5 --mining-ratios 0.005 0.01 0.02

The numbers of so short runs differ by little more than noise: the demo shows the machinery (one
command, one directory per job, one summary); real studies sweep full-length runs (docs/sweeps.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from src.tools import summarize_sweep
from src.tools.stages import run_stage

METRIC = "test/mAP"  # MAR evaluates once, after the last epoch, on the target B
X_KEY = "loss.margin"
LINE_KEY = "loss.mining_ratio"


@dataclass
class DemoPlan:
    """The two commands of the demo (Hydra overrides after ``python -m src.train``).

    Attributes:
        out: the demo's folder.
        stage1: overrides of the stage-1 run (None when a checkpoint is given).
        stage1_ckpt: the checkpoint stage 2 starts from.
        stage2: overrides of the stage-2 multirun (without ``-m``).
        sweep_dir: the multirun directory (one numbered job folder per grid point).
    """

    out: Path
    stage1: list[str] | None
    stage1_ckpt: Path
    stage2: list[str]
    sweep_dir: Path


def _csv(values: Sequence[float]) -> str:
    return ",".join(repr(float(v)) for v in values)


def build_plan(args: argparse.Namespace) -> DemoPlan:
    """The overrides of both stages for the parsed command line (nothing is run)."""
    out = (
        Path(args.out)
        if args.out
        else Path("logs/sweep_demo") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    )
    height, width = args.image_size
    common = [f"data.height={height}", f"data.width={width}", "extras.print_config=false"]
    if args.quick:
        # the tiny synthetic preset (12 + 12 identities, 32 x 16), generated into the demo folder
        common += [
            f"paths.data_dir={out / 'data'}",
            "+data.source.preset=tiny",
            "data.batch_size=16",
            "data.num_instances=4",
            "data.test_batch_size=64",
            "data.num_workers=0",
        ]
    common.append(f"paths.log_dir={out / 'logs'}")  # the MAR initialisation cache

    stage1 = None
    stage1_ckpt = (
        Path(args.stage1_ckpt) if args.stage1_ckpt else out / "stage1" / "checkpoints" / "last.ckpt"
    )
    if not args.stage1_ckpt:
        epochs = args.stage1_epochs
        stage1 = [
            "experiment=synthetic_source_pretrain",
            *common,
            f"trainer.max_epochs={epochs}",
            # the recipe's step decay, scaled to the shorter run
            f"scheduler.milestones=[{max(1, (2 * epochs) // 3)}]",
            "scheduler.warmup_epochs=1" if epochs > 1 else "scheduler.warmup_epochs=0",
            # stage 2 is the result: no evaluation of the stage-1 model, nothing to optimise
            "test=false",
            "optimized_metric=null",
            f"hydra.run.dir={out / 'stage1'}",
        ]

    epochs = args.epochs
    stage2 = [
        "experiment=synthetic_mar",
        *common,
        f"system.pretrained_ckpt={stage1_ckpt}",
        f"trainer.max_epochs={epochs}",
        f"scheduler.milestones=[{max(1, epochs - 1)}]",
        # the paper's one warm-up epoch (no MDL, no memory writes) when there is room for it
        f"system.warmup_epochs={1 if epochs > 1 else 0}",
        f"{X_KEY}={_csv(args.margins)}",
        f"{LINE_KEY}={_csv(args.mining_ratios)}",
        f"hydra.sweep.dir={out / 'sweep'}",
    ]
    if args.quick:
        stage2 += ["+data.target.preset=tiny", "data.target_batch_size=16"]
    return DemoPlan(out, stage1, stage1_ckpt, stage2, out / "sweep")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m src.tools.sweep_demo",
        description="MAR margin x mining-ratio multirun on the synthetic data, then a summary "
        "table and sweep_summary.png.",
    )
    parser.add_argument("--quick", action="store_true", help="tiny data, one epoch (1-2 min)")
    parser.add_argument("--out", default=None, help="demo folder (default logs/sweep_demo/<time>)")
    parser.add_argument("--stage1-ckpt", default=None, help="skip stage 1: start from this ckpt")
    parser.add_argument(
        "--margins", type=float, nargs="+", default=[0.5, 1.0], help="RJ margins (loss.margin)"
    )
    parser.add_argument(
        "--mining-ratios",
        type=float,
        nargs="+",
        default=None,
        help="MDL mining ratios (loss.mining_ratio); default 0.005 0.02 (--quick: 0.05 0.1, "
        "as 16 target images per batch give only C(16, 2) = 120 pairs)",
    )
    parser.add_argument("--epochs", type=int, default=None, help="stage-2 epochs (default 3)")
    parser.add_argument("--stage1-epochs", type=int, default=None, help="default 6 (--quick 1)")
    parser.add_argument(
        "--image-size",
        type=int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="input size (default 64 32; --quick 32 16)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = parser.parse_args(argv)
    quick = args.quick
    if args.mining_ratios is None:
        args.mining_ratios = [0.05, 0.1] if quick else [0.005, 0.02]
    if args.epochs is None:
        args.epochs = 1 if quick else 3
    if args.stage1_epochs is None:
        args.stage1_epochs = 1 if quick else 6
    if args.image_size is None:
        args.image_size = [32, 16] if quick else [64, 32]
    for name in ("epochs", "stage1_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.stage1_ckpt and not Path(args.stage1_ckpt).is_file():
        parser.error(f"--stage1-ckpt {args.stage1_ckpt} does not exist")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo; returns summarize_sweep's exit status."""
    args = _parse_args(argv)
    plan = build_plan(args)
    train = [sys.executable, "-m", "src.train"]
    if args.dry_run:
        if plan.stage1 is not None:
            print("$", " ".join([*train, *plan.stage1]))
        print("$", " ".join([*train, "-m", *plan.stage2]))
        print("$", " ".join(_summary_argv(plan)))
        return 0
    plan.out.mkdir(parents=True, exist_ok=True)
    if plan.stage1 is not None:
        run_stage([*train, *plan.stage1], plan.out / "stage1.log")
    run_stage([*train, "-m", *plan.stage2], plan.out / "sweep.log")
    print("$", " ".join(_summary_argv(plan)), flush=True)
    return summarize_sweep.main(_summary_argv(plan)[3:])


def _summary_argv(plan: DemoPlan) -> list[str]:
    return [
        sys.executable,
        "-m",
        "src.tools.summarize_sweep",
        str(plan.sweep_dir),
        "--metric",
        METRIC,
        "--x",
        X_KEY,
        "--line",
        LINE_KEY,
    ]


if __name__ == "__main__":
    sys.exit(main())
