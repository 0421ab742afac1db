"""`make bench` / `python -m src.bench`: run every benchmark and write docs/benchmarks.md.

Each benchmark module exposes `run(quick: bool = False) -> str` returning a markdown section that
compares the project's implementation with a naive/reference one measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import platform
import sys
import time
from pathlib import Path

import torch

BENCHMARKS = (
    "losses",
    "mar_losses",
    "evaluation",
    "clustering",
    "extract",
    "ddp_bytes",
    "image_pipeline",
)


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (
        f"- CPU: {cpu}, {os.cpu_count()} logical cores (torch threads: {torch.get_num_threads()})\n"
        f"- GPU: {gpu}\n"
        f"- Python {platform.python_version()}, torch {torch.__version__}, {platform.platform()}\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    command = "python -m src.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = []
    for name in names:
        start = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        module = importlib.import_module(f"src.bench.{name}")
        sections.append(module.run(quick=args.quick))
        print(f"[bench] {name} done in {time.perf_counter() - start:.0f} s", flush=True)

    text = (
        "# Benchmarks\n\n"
        f"Written by `{command.strip()}` (`make bench`) on "
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}.\n\n"
        f"## Machine\n\n{machine_description()}\n" + "\n\n".join(sections) + "\n"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
