"""Shared fixtures for the model tests (small CPU inputs, an isolated torch hub cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture
def images() -> torch.Tensor:
    """2 images, 64 high x 32 wide (a re-ID aspect ratio, small enough for CPU tests)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 64, 32, generator=generator)


@pytest.fixture
def hub_dir(tmp_path: Path):
    """Point torch.hub at an empty temporary cache for the test, then restore it."""
    previous = torch.hub.get_dir()
    directory = tmp_path / "hub"
    torch.hub.set_dir(str(directory))
    try:
        yield directory
    finally:
        torch.hub.set_dir(previous)
