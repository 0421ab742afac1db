"""Smoke test of the image-pipeline benchmark at tiny size (timings are not asserted: only that
every feed is measured and the goal line names the default run's feed)."""

from __future__ import annotations

import re

import pytest


@pytest.mark.slow
def test_quick_run_measures_every_feed():
    from src.bench.image_pipeline import run

    text = run(quick=True)
    for feed in (
        "in memory",
        "loader, per-sample augmentation",
        "loader + image cache, per-sample augmentation",
        "loader, batch-wise augmentation",
        "loader + image cache, batch-wise augmentation",
    ):
        assert re.search(rf"\| {re.escape(feed)} \| [0-9.]+ \| [0-9.]+x \|", text), feed
    assert "for the default run: loader + image cache, batch-wise augmentation" in text
