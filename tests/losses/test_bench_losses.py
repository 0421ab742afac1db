"""Smoke test of the loss benchmark (timings are not asserted, only the report's content)."""

from __future__ import annotations

import re

import torch

from src.bench.losses import run


def test_quick_run_reports_ratio_rows() -> None:
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        report = run(quick=True)
    finally:
        torch.set_num_threads(threads)
    assert report.startswith("## Losses")
    for row in (
        "loop / vectorised",
        "vectorised / distance matrix alone",
        "grid double loop / anti-diagonal DP",
        "per-pair loop / anti-diagonal DP",
    ):
        match = re.search(rf"^\| {re.escape(row)} \| (\d+\.\d+)× \|", report, re.MULTILINE)
        assert match is not None, row
        assert float(match.group(1)) > 0
    assert "≥ 20×" in report and "≤ 2×" in report
