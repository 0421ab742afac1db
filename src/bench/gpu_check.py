"""`make gpu-check`: the checks that need a CUDA GPU, in one prepared run (<= 8 minutes on one GPU).

1. the `gpu`-marked tests (`pytest -m gpu tests`): fp16 AMP for both systems, the no-host-sync
   step under ``torch.cuda.set_sync_debug_mode("error")``, CUDA DDP when 2 GPUs are present;
2. one epoch of `market_bot`-shaped training (ResNet-50, 256x128, P x K = 16 x 4, BNNeck, triplet +
   label-smoothed CE, Adam) on the synthetic domain A, at fp32, 16-mixed and bf16-mixed, with
   images per second (timed from the 4th step to the end of the epoch, the GPU synchronised);
3. one MAR stage-2 step at the paper's shapes (184 + 184 images of 384x128 in two forward
   passes, K = 4,101 agents, memory 12,936 x 4,101, ResNet-50 last stride 2): time per step and
   a zero-sync check (the step under ``torch.cuda.set_sync_debug_mode("error")``).

Results are appended to docs/benchmarks.md (``--out``). Without CUDA it prints why and exits 0
(nothing is written). ``--cpu-dry-run`` runs pieces 2 and 3 at tiny sizes on the CPU (what the
test suite does to keep this script working on machines without a GPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

SKIP_MESSAGE = (
    "make gpu-check: skipped, no CUDA device (torch.cuda.is_available() is False). Run it on a "
    "machine with a GPU; nothing was checked or written."
)
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
WARMUP_STEPS = 3


class Throughput(Callback):
    """Images per second of the training steps after the first `WARMUP_STEPS` (written as JSON
    to ``out``). Synchronises the GPU at its two time points only (outside the steps)."""

    def __init__(self, out: str, warmup: int = WARMUP_STEPS) -> None:
        self.out = out
        self.warmup = warmup
        self.images = 0
        self.steps = 0
        self._start: float | None = None

    @staticmethod
    def _sync(pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == self.warmup:
            self._sync(pl_module)
            self._start = time.perf_counter()
        if batch_idx >= self.warmup:
            self.images += int(batch["img"].shape[0])
            self.steps += 1

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._sync(pl_module)
        seconds = time.perf_counter() - self._start if self._start is not None else float("nan")
        result = {
            "images": self.images * trainer.world_size,
            "steps": self.steps,
            "seconds": seconds,
            "img_per_s": self.images * trainer.world_size / seconds if self.steps else None,
        }
        if trainer.global_rank == 0:
            Path(self.out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# 1. gpu tests
# ----------------------------------------------------------------------------------------------
def run_gpu_tests(timeout: float = 240) -> str:
    """`pytest -m gpu tests`: its summary line."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests", "-q", "-p", "no:cacheprovider"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1] if lines else proc.stderr[-300:]
    return f"{summary} (exit code {proc.returncode})"


# ----------------------------------------------------------------------------------------------
# 2. market_bot-shaped epoch
# ----------------------------------------------------------------------------------------------
def bot_overrides(precision: str, out_dir: Path, data_dir: Path, dry_run: bool) -> list[str]:
    """`python -m src.train` overrides of one market_bot-shaped epoch on synthetic data."""
    overrides = [
        "experiment=market_bot",
        "data=synthetic_a",
        f"paths.data_dir={data_dir}",
        f"paths.output_dir={out_dir}",
        f"hydra.run.dir={out_dir}",
        f"trainer.precision={precision}",
        "trainer.max_epochs=1",
        "trainer.limit_val_batches=0",
        "test=false",
        "optimized_metric=null",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "callbacks.model_checkpoint=null",  # no validation to monitor, nothing to keep
        "extras.print_config=false",
        "model.backbone.pretrained=false",
        "scheduler.warmup_epochs=0",
        "+callbacks.throughput._target_=src.bench.gpu_check.Throughput",
        f"+callbacks.throughput.out={out_dir / 'throughput.json'}",
    ]
    if dry_run:
        overrides += [
            "trainer=cpu",
            "model=resnet18",
            "+data.source.preset=tiny",
            "data.height=32",
            "data.width=16",
            "data.batch_size=16",
            "data.num_workers=0",
            "+callbacks.throughput.warmup=1",  # the tiny epoch has 2 steps
        ]
    else:
        overrides += [
            "trainer=gpu",
            "data.height=256",
            "data.width=128",
            "data.batch_size=64",
            "data.num_instances=4",
            f"data.num_workers={min(8, os.cpu_count() or 1)}",
        ]
    return overrides


def run_bot_epochs(work: Path, dry_run: bool, timeout: float = 150) -> dict[str, dict[str, Any]]:
    """One epoch per precision in a fresh process each; {precision: throughput or error}."""
    results: dict[str, dict[str, Any]] = {}
    data_dir = work / "data"
    for precision in PRECISIONS:
        out_dir = work / f"bot_{precision}"
        cmd = [
            sys.executable,
            "-m",
            "src.train",
            *bot_overrides(precision, out_dir, data_dir, dry_run),
        ]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            results[precision] = {"error": f"timed out after {timeout:.0f} s"}
            continue
        wall = time.perf_counter() - start
        file = out_dir / "throughput.json"
        if proc.returncode != 0 or not file.is_file():
            tail = (proc.stderr or proc.stdout)[-400:].replace("\n", " ")
            results[precision] = {"error": f"exit code {proc.returncode}: {tail}"}
            continue
        results[precision] = {**json.loads(file.read_text()), "wall": wall}
    return results


# ----------------------------------------------------------------------------------------------
# 3. MAR step at the paper's shapes
# ----------------------------------------------------------------------------------------------
PAPER = {"batch": 184, "agents": 4101, "memory": 12936, "height": 384, "width": 128, "cams": 6}
TINY = {"batch": 8, "agents": 50, "memory": 100, "height": 32, "width": 16, "cams": 3}


def mar_step_check(dry_run: bool, steps: int = 5) -> dict[str, Any]:
    """Median time of a full MAR step (two forwards, losses, backward, SGD step) and whether it
    runs under ``set_sync_debug_mode("error")`` (CUDA only)."""
    from src.models import ReIDNet
    from src.systems import MARModule

    shapes = TINY if dry_run else PAPER
    device = torch.device("cpu" if dry_run else "cuda")
    net = partial(
        ReIDNet,
        backbone={"name": "resnet18" if dry_run else "resnet50", "last_stride": 2},
        neck="none",
        classifier_bias=False,
        embed="global",
    )
    net = partial(net, backbone={**net.keywords["backbone"], "last_relu": False})
    module = MARModule(
        net=net,
        optimizer=partial(torch.optim.SGD, lr=2e-4, momentum=0.9),
        num_classes=shapes["agents"],
        num_target_train=shapes["memory"],
        num_target_cameras=shapes["cams"],
        cml_batch_size=2 * shapes["batch"],
        warmup_epochs=0,
    ).to(device)
    k = shapes["agents"]
    module.load_init_state(
        {
            "threshold": torch.tensor(0.5),
            "center_mean": torch.full((k,), -8.0),
            "center_std": torch.ones(k),
        }
    )
    optimizer = torch.optim.SGD(module.parameters(), lr=2e-4, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    b, h, w = shapes["batch"], shapes["height"], shapes["width"]
    batch = {
        "source": {
            "img": torch.randn(b, 3, h, w, generator=g).to(device),
            "pid": torch.randint(k, (b,), generator=g).to(device),
        },
        "target": {
            "img": torch.randn(b, 3, h, w, generator=g).to(device),
            "camid": (torch.arange(b) % shapes["cams"]).to(device),
            "index": torch.randperm(shapes["memory"], generator=g)[:b].to(device),
        },
    }
    module.log = lambda *a, **k: None  # type: ignore[method-assign] # no Trainer to log to
    module.log_dict = lambda *a, **k: None  # type: ignore[method-assign]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    module.train()
    for _ in range(2):  # warm-up (cuDNN autotuning, allocator)
        step()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    result: dict[str, Any] = {
        "shapes": shapes,
        "median_s": statistics.median(times),
        "memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else None,
    }
    if device.type == "cuda":
        previous = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
            result["syncs"] = "none (ran under set_sync_debug_mode('error'))"
        except RuntimeError as err:
            result["syncs"] = f"FOUND: {str(err).splitlines()[0][:200]}"
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    else:
        result["syncs"] = "not checked (CPU dry run; tests/scale/test_no_host_sync.py on CPU)"
    return result


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def report(tests: str, bot: dict[str, dict[str, Any]], mar: dict[str, Any], device: str) -> str:
    lines = [
        f"## GPU check (`make gpu-check`), {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}",
        "",
        f"Device: {device}; torch {torch.__version__}. Command: `make gpu-check` "
        "(`python -m src.bench.gpu_check`).",
        "",
        f"- `pytest -m gpu tests`: {tests}",
        "",
        "One epoch of market_bot-shaped training (ResNet-50, P x K = 16 x 4, synthetic domain A; "
        f"img/s from step {WARMUP_STEPS + 1} to the end of the epoch):",
        "",
        "| precision | img/s | timed steps | process wall (s) |",
        "|---|---:|---:|---:|",
    ]
    for precision, r in bot.items():
        if "error" in r:
            lines.append(f"| {precision} | error: {r['error'][:200]} | | |")
        else:
            ips = "n/a" if r["img_per_s"] is None else f"{r['img_per_s']:.0f}"
            lines.append(f"| {precision} | {ips} | {r['steps']} | {r['wall']:.0f} |")
    s = mar["shapes"]
    memory = "" if mar["memory_gib"] is None else f", peak memory {mar['memory_gib']:.1f} GiB"
    lines += [
        "",
        f"MAR step ({s['batch']} + {s['batch']} images of {s['height']}x{s['width']}, K = "
        f"{s['agents']:,}, memory {s['memory']:,} x {s['agents']:,}; two forwards, losses, "
        f"backward, SGD step, fp32): {1000 * mar['median_s']:.0f} ms per step (median of 5)"
        f"{memory}. Host syncs: {mar['syncs']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="docs/benchmarks.md", help="file the results go to")
    parser.add_argument(
        "--cpu-dry-run", action="store_true", help="tiny sizes on the CPU (tests this script)"
    )
    args = parser.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(SKIP_MESSAGE)
        return 0
    start = time.perf_counter()
    device = "CPU dry run" if args.cpu_dry_run else torch.cuda.get_device_name(0)
    tests = "not run (CPU dry run)" if args.cpu_dry_run else run_gpu_tests()
    print(f"[gpu-check] gpu tests: {tests}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        bot = run_bot_epochs(Path(tmp), args.cpu_dry_run)
    print(f"[gpu-check] market_bot epochs: {bot}", flush=True)
    mar = mar_step_check(args.cpu_dry_run)
    print(f"[gpu-check] MAR step: {mar}", flush=True)
    text = report(tests, bot, mar, device)
    out = Path(args.out)
    previous = out.read_text() if out.is_file() else "# Benchmarks\n"
    out.write_text(previous.rstrip("\n") + "\n\n" + text)
    print(text)
    print(f"[gpu-check] appended to {out} in {time.perf_counter() - start:.0f} s")
    failed = any("error" in r for r in bot.values()) or mar["syncs"].startswith("FOUND")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
