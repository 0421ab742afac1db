"""Loaded by pytest before any test module: importing `src` first caps oneDNN's CPU ISA before
torch loads (src/__init__.py), as `python -m src.train` does."""

import src  # noqa: F401
