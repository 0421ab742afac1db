"""`make gpu-check` (src/bench/gpu_check.py): skips cleanly without CUDA, and its pieces run (CPU
dry run at tiny sizes) so that the script works when a GPU machine runs it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from src.bench import gpu_check


def test_skips_cleanly_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n")
    assert gpu_check.main(["--out", str(out)]) == 0
    assert "skipped, no CUDA device" in capsys.readouterr().out
    assert out.read_text() == "# Benchmarks\n"  # nothing written


def test_makefile_target_runs_the_script():
    text = (Path(__file__).resolve().parents[2] / "Makefile").read_text()
    assert re.search(r"^gpu-check: install\n\t\$\(PY\) -m src\.bench\.gpu_check", text, re.M)


@pytest.mark.slow
def test_cpu_dry_run_appends_every_result(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nearlier results\n")
    assert gpu_check.main(["--cpu-dry-run", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nearlier results\n\n## GPU check")
    for precision in gpu_check.PRECISIONS:
        row = re.search(rf"^\| {re.escape(precision)} \| ([0-9.]+) \| (\d+) \|", text, re.M)
        assert row and float(row.group(1)) > 0 and int(row.group(2)) >= 1, precision
    assert re.search(r"MAR step \(8 \+ 8 images .*: \d+ ms per step", text)
