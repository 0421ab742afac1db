"""src.extract throughput on the CPU: PyTorch eager vs TorchScript vs ONNX Runtime.

Images/s of the embedding network (:class:`src.export.EmbeddingModel`, what src.extract and the
exported files run) on preprocessed batches of 1 and 64, for the re-ID standard ResNet-50 at
256x128 and the default ResNet-18 at 64x32 (random weights: speed does not depend on them), and
of the whole src.extract pipeline (decode + resize + normalise in the DataLoader + eager model)
on synthetic JPEGs. Eager PyTorch is the reference. A few batches only: a shared machine.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from src.export import EmbeddingModel, export_onnx, export_torchscript
from src.models import ReIDNet

FULL = {"configs": [("resnet50", 256, 128), ("resnet18", 64, 32)], "batches": (1, 64)}
QUICK = {"configs": [("resnet18", 32, 16)], "batches": (1, 4)}


def _time(fn: Callable[[], object], batch: int, budget_s: float, min_runs: int) -> float:
    """Images/s: median seconds per call over at least `min_runs` calls (after one warm-up)."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return batch / float(np.median(times))


def _model_rows(quick: bool, tmp: Path, threads: int) -> list[str]:
    sizes = QUICK if quick else FULL
    rows = []
    for name, height, width in sizes["configs"]:
        torch.manual_seed(0)
        net = ReIDNet(name, pretrained=False, last_stride=1, neck="bnneck", num_classes=0)
        model = EmbeddingModel(net, normalize=False).eval()
        example = torch.randn(2, 3, height, width)
        onnx_run = export_onnx(model, example, tmp / f"{name}.onnx", 18, True, threads)
        ts_run = export_torchscript(model, example, tmp / f"{name}.pt")
        for batch in sizes["batches"]:
            x = torch.randn(batch, 3, height, width)
            xn = x.numpy()
            with torch.no_grad():
                runners = {
                    "eager": partial(model, x),
                    "torchscript": partial(ts_run, xn),
                    "onnxruntime": partial(onnx_run, xn),
                }
                budget = 0.5 if quick else 4.0
                runs = 1 if quick else 3
                speed = {k: _time(f, batch, budget, runs) for k, f in runners.items()}
            rows.append(
                f"| {name} | {height}×{width} | {batch} | {speed['eager']:.1f} | "
                f"{speed['torchscript']:.1f} ({speed['torchscript'] / speed['eager']:.2f}×) | "
                f"{speed['onnxruntime']:.1f} ({speed['onnxruntime'] / speed['eager']:.2f}×) |"
            )
            print(rows[-1], flush=True)
    return rows


def _pipeline_row(quick: bool, tmp: Path) -> str:
    """src.extract end to end (extract_features over JPEG files, eager model)."""
    from src.data.synthetic import SyntheticReID
    from src.extract import extract_features, image_list
    from src.inference import FeatureExtractor, Preprocessing

    data = SyntheticReID(tmp / "synthetic", domain="A", seed=0, preset="tiny")
    folder = Path(data.root, "bounding_box_test")
    root, paths = image_list(folder)
    height, width = (32, 16) if quick else (64, 32)
    torch.manual_seed(0)
    net = ReIDNet("resnet18", pretrained=False, neck="bnneck", num_classes=0)
    prep = Preprocessing(height, width, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    extractor = FeatureExtractor(net, prep, device="cpu", batch_size=64, num_workers=0)
    seconds = []
    for _ in range(1 if quick else 3):
        t0 = time.perf_counter()
        extract_features(extractor, root, paths, out=None)
        seconds.append(time.perf_counter() - t0)
    rate = len(paths) / float(np.median(seconds))
    return (
        f"src.extract end to end (`extract_features`: JPEG decode + resize + normalise, "
        f"DataLoader num_workers=0, eager ResNet-18 at {height}×{width}, batch 64) over "
        f"{len(paths)} synthetic images: **{rate:.0f} images/s**."
    )


def run(quick: bool = False) -> str:
    """Run the extraction benchmarks and return a markdown section (quick: tiny sizes)."""
    load_before = os.getloadavg()[0]
    # One intra-op thread for every runtime: on an oversubscribed machine (other jobs on the
    # cores) two spinning OpenMP threads make a ResNet-18 call 50x slower, which would measure
    # the machine's load, not the runtime.
    threads = 1 if load_before >= (os.cpu_count() or 1) else torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rows = _model_rows(quick, Path(tmp), threads)
            pipeline = _pipeline_row(quick, Path(tmp))
    finally:
        torch.set_num_threads(previous)
    load = f"1-min load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    import onnxruntime

    lines = [
        "## Feature extraction (`src/bench/extract.py`)",
        "",
        "Images/s of the embedding network on preprocessed float32 batches (median of at least "
        f"3 calls after a warm-up, a few seconds per cell), CPU, {threads} intra-op thread(s) "
        f"for PyTorch and ONNX Runtime {onnxruntime.__version__} (CPUExecutionProvider; 1 when "
        "the load average at the start exceeds the core count), TorchScript = "
        "`torch.jit.trace`. Eager PyTorch "
        f"is the reference; the ratio is against it. Machine {load} ({os.cpu_count()} cores), "
        "shared with other jobs: treat differences under ~20 % as noise.",
        "",
        "| backbone | input | batch | eager | TorchScript | ONNX Runtime |",
        "|---|---|---:|---:|---:|---:|",
        *rows,
        "",
        pipeline,
    ]
    return "\n".join(lines)
