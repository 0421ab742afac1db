"""`python -m src.tools.seed_table`: mean ± sample std over a multirun's jobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from src.tools.seed_table import main, mean_std
from tests.tools.fake_runs import write_hydra_run


def test_mean_std_by_hand():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([5.0]) == (5.0, 0.0)


def test_seed_table_prints_mean_and_std(tmp_path: Path, capsys):
    sweep = tmp_path / "multirun"
    for job, (r1, m) in enumerate([(0.70, 0.50), (0.80, 0.60), (0.90, 0.70)]):
        metrics = {"test/rank1": r1, "test/mAP": m, "test/mINP": m / 2}
        write_hydra_run(sweep / str(job), [f"seed={job}"], metrics)
    assert main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert "(3 jobs): rank1 80.0 ± 10.0 | mAP 60.0 ± 10.0 | mINP 30.0 ± 5.0" in out
    assert "test/mAP: 50.0, 60.0, 70.0" in out


def test_seed_table_on_an_empty_folder(tmp_path: Path):
    with pytest.raises(ValueError, match="no Hydra job directories"):
        main([str(tmp_path)])
