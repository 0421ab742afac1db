"""Run one stage of a demo as its own process: the CLI a user would type, output to a log file."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def run_stage(cmd: Sequence[str], log: Path, tail_lines: int = 40) -> float:
    """Run `cmd` with stdout and stderr written to `log`; returns the wall time in seconds.

    Prints the command and where to follow it. A non-zero exit raises ``SystemExit`` with the
    exit status, the log's path and its last `tail_lines` lines, so a demo stops at the stage that
    failed and shows why.
    """
    print("$", " ".join(map(str, cmd)), flush=True)
    print(f"  (progress: tail -f {log})", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(list(cmd), stdout=f, stderr=subprocess.STDOUT, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-tail_lines:])
        raise SystemExit(f"stage failed (exit {proc.returncode}), log {log}:\n{tail}")
    print(f"  done in {elapsed:.0f} s (log: {log})", flush=True)
    return elapsed
