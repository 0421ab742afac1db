"""The notebooks are committed without outputs and run top to bottom without error.

Each notebook runs in a fresh IPython kernel started with the interpreter running the tests (the
project's venv), from the repository root so that `import src` works, with no logs of the
developer's own runs visible (MARLIN_LOG_DIR points to a temporary folder).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from PIL import Image

from tests.tools.fake_runs import GRID_MAP_BEST, write_grid_multirun, write_hydra_run

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 120
KERNEL_NAME = "marlin-test"


def test_the_notebooks_are_there() -> None:
    assert [p.name for p in NOTEBOOKS] == ["01_losses.ipynb", "02_results.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_outputs_are_stripped(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{path.name} cell {index} has outputs: clear them"
        assert cell.execution_count is None, f"{path.name} cell {index} has an execution count"
        assert "execution" not in cell.metadata, f"{path.name} cell {index} has run timings"


def _kernel_manager(kernel_dir: Path) -> KernelManager:
    """A kernel spec running this interpreter (never a `python3` spec found elsewhere on the
    machine, which may point to another Python without the project installed)."""
    spec_dir = kernel_dir / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "marlin venv",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)], ensure_native_kernel=False)
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def _execute(path: Path, tmp_path: Path, extra_env: dict[str, str]) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARLIN_")}
    pythonpath = [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    env.update(
        PYTHONPATH=os.pathsep.join(pythonpath),
        MARLIN_LOG_DIR=str(tmp_path / "logs"),
        OMP_NUM_THREADS="1",
        **extra_env,
    )
    client = NotebookClient(
        nb,
        km=_kernel_manager(tmp_path / "kernels"),
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(ROOT)}},  # the kernel's working directory
    )
    client.execute(env=env)  # raises CellExecutionError naming the cell on any error
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in nb.cells
        for output in cell.get("outputs", [])
    )


def test_losses_notebook_runs(tmp_path: Path) -> None:
    nb = _execute(ROOT / "notebooks" / "01_losses.ipynb", tmp_path, {})
    text = _text(nb)
    assert "hard margin (0.3)" in text and "aligned local distance" in text
    assert _images(nb) == 4


def test_results_notebook_on_a_fresh_checkout(tmp_path: Path) -> None:
    # Nothing in the log dir: the notebook falls back to its made-up run and sweep.
    nb = _execute(ROOT / "notebooks" / "02_results.ipynb", tmp_path, {})
    text = _text(nb)
    assert "made-up demo run" in text and "made-up demo sweep" in text
    assert "no ranklist.png" in text
    assert _images(nb) == 2  # training curves, sweep plot


def test_results_notebook_on_user_runs(tmp_path: Path) -> None:
    # MARLIN_RUN_DIR names a run with a rank list; the newest sweep under the log dir is found.
    run_dir = write_hydra_run(
        tmp_path / "elsewhere" / "run",
        ["experiment=synthetic_triplet"],
        {"val/mAP_best": 0.4321, "test/rank1": 0.75},
    )
    Image.fromarray(np.full((60, 80, 3), 200, dtype=np.uint8)).save(run_dir / "ranklist.png")
    old_sweep = write_grid_multirun(tmp_path / "logs" / "train" / "multiruns" / "old")
    sweep = write_grid_multirun(tmp_path / "logs" / "train" / "multiruns" / "2024-05-01_12-00-00")
    os.utime(old_sweep, (1_000, 1_000))

    nb = _execute(
        ROOT / "notebooks" / "02_results.ipynb", tmp_path, {"MARLIN_RUN_DIR": str(run_dir)}
    )
    text = _text(nb)
    assert "made-up" not in text
    assert f"run:       {run_dir}" in text
    assert "val/mAP_best             0.4321" in text
    assert f"sweep: {sweep}" in text
    # The sweep table lists the fixture's jobs, best first.
    best_first = [f"{v:.4f}" for v in sorted(GRID_MAP_BEST.values(), reverse=True)]
    positions = [text.index(v) for v in best_first]
    assert positions == sorted(positions)
    assert _images(nb) == 3  # training curves, rank list, sweep plot
