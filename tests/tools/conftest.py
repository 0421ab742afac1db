"""Fixtures of the tools tests: fake Hydra multiruns (see fake_runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .fake_runs import write_grid_multirun


@pytest.fixture
def grid_multirun(tmp_path: Path) -> Path:
    """A 2 x 2 margin x mining-ratio multirun (jobs 0..3 in Hydra's sweep order)."""
    return write_grid_multirun(tmp_path / "multiruns" / "2024-05-01_12-00-00")
