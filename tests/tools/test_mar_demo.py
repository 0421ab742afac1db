"""The MAR demo: its table (mean ± std over seeds of each row, in percent) and, end to end on the
tiny synthetic preset, the four runs and three evaluations of `make mar-demo`."""

from __future__ import annotations

import json

import pytest

from src.tools import mar_demo, uda_demo
from src.tools.mar_demo import ROWS


def test_summarise_mean_and_std_over_seeds():
    per_seed = {
        0: {row: {"rank1": 0.10, "mAP": 0.05, "mINP": 0.01} for row in ROWS},
        1: {row: {"rank1": 0.30, "mAP": 0.15, "mINP": 0.03} for row in ROWS},
    }
    table = uda_demo.summarise(per_seed).splitlines()
    assert len(table) == 2 + len(ROWS)
    # mean 20.0, sample std of (10, 30) = 14.1; mAP mean 10.0, std 7.1; mINP 2.0 ± 1.4
    assert table[2] == f"| {ROWS[0]} | 20.0 ± 14.1 | 10.0 ± 7.1 | 2.0 ± 1.4 | 2 |"


def test_mar_demo_is_the_uda_demo_with_mar_and_supervised(monkeypatch, tmp_path):
    """`make mar-demo` runs the UDA demo's MAR and supervised-on-B rows into logs/mar_demo."""
    calls = []

    def one_seed(seed, demo, methods, stage1_from=None):
        calls.append((seed, demo.out, list(methods), demo.extra))
        return {row: {"rank1": 0.5, "mAP": 0.25, "mINP": 0.1} for row in ROWS}

    monkeypatch.setattr(uda_demo, "one_seed", one_seed)
    monkeypatch.chdir(tmp_path)
    assert mar_demo.main(["trainer.max_epochs=4", "--seeds", "0", "1"]) == 0
    out = uda_demo.Path("logs/mar_demo")
    assert calls == [(s, out, ["mar", "supervised"], ["trainer.max_epochs=4"]) for s in (0, 1)]
    assert f"| {ROWS[1]} | 50.0 ± 0.0 | 25.0 ± 0.0 | 10.0 ± 0.0 | 2 |" in (
        (tmp_path / out / "results.md").read_text()
    )


@pytest.mark.slow
def test_mar_demo_quick_end_to_end(tmp_path, capsys):
    """`python -m src.tools.mar_demo --quick`: stage 1 on A, its evaluation on B, MAR from its
    checkpoint, supervised on B; the table and the files the docs are written from."""
    out = tmp_path / "demo"
    assert mar_demo.main(["--quick", "--out", str(out), "--seeds", "0"]) == 0
    seed = out / "seed0"
    for run in ("stage1", "mar", "supervised_b"):
        assert (seed / run / "checkpoints" / "last.ckpt").is_file(), run
    # stage 2 started from stage 1 and evaluated on the target B (tiny: 12 test identities)
    mar_config = (seed / "mar" / ".hydra" / "config.yaml").read_text()
    assert str(seed / "stage1" / "checkpoints" / "last.ckpt") in mar_config
    results = json.loads((out / "results.json").read_text())["0"]
    for row in ROWS:
        assert 0.0 <= results[row]["mAP"] <= 1.0 and 0.0 <= results[row]["rank1"] <= 1.0, row
    # each row is the metrics.json of its own evaluation run
    direct = json.loads((seed / "direct" / "metrics.json").read_text())["plain"]
    assert results[ROWS[0]] == direct
    assert set(results["seconds"]) == {
        "stage1", "direct_eval", "mar", "mar_eval", "supervised_b", "supervised_b_eval"
    }  # fmt: skip
    table = (out / "results.md").read_text()
    assert table.startswith("| method |") and all(row in table for row in ROWS)
    assert table.strip() in capsys.readouterr().out
