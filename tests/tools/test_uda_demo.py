"""The UDA demo: its table, and end to end on the tiny preset (direct transfer + cluster contrast
from the same stage-1 checkpoint, then a second demo reusing that checkpoint)."""

from __future__ import annotations

import json

import pytest

from src.tools import uda_demo
from src.tools.uda_demo import DIRECT, METHODS, summarise


def test_summarise_rows_in_run_order_with_mean_and_std():
    rows = [DIRECT, METHODS["cc"]]
    per_seed = {
        0: {row: {"rank1": 0.10, "mAP": 0.05, "mINP": 0.02} for row in rows},
        1: {row: {"rank1": 0.30, "mAP": 0.15, "mINP": 0.04} for row in rows},
    }
    table = summarise(per_seed).splitlines()
    assert table[0] == "| method | rank-1 (%) | mAP (%) | mINP (%) | seeds |"
    assert len(table) == 4
    # (10, 30): mean 20.0, sample std 14.1; (5, 15): 10.0 ± 7.1; (2, 4): 3.0 ± 1.4
    assert table[3] == f"| {METHODS['cc']} | 20.0 ± 14.1 | 10.0 ± 7.1 | 3.0 ± 1.4 | 2 |"


@pytest.mark.slow
def test_uda_demo_quick_cluster_contrast(tmp_path, capsys):
    out = tmp_path / "demo"
    assert uda_demo.main(["--quick", "--out", str(out), "--methods", "cc"]) == 0
    seed = out / "seed0"
    ckpt1 = seed / "stage1" / "checkpoints" / "last.ckpt"
    assert ckpt1.is_file() and (seed / "cc" / "checkpoints" / "last.ckpt").is_file()
    assert str(ckpt1) in (seed / "cc" / ".hydra" / "config.yaml").read_text()
    results = json.loads((out / "results.json").read_text())["0"]
    cc = json.loads((seed / "cc_eval" / "metrics.json").read_text())["plain"]
    assert results[METHODS["cc"]] == cc and 0.0 <= cc["mAP"] <= 1.0
    assert (out / "results.md").read_text().strip() in capsys.readouterr().out
    # a second demo on the first one's stage-1 checkpoints trains no stage 1
    again = tmp_path / "again"
    args = ["--quick", "--out", str(again), "--methods", "cc", "--stage1-from", str(out)]
    assert uda_demo.main(args) == 0
    assert not (again / "seed0" / "stage1").exists()
    second = json.loads((again / "results.json").read_text())["0"]
    assert second[DIRECT] == results[DIRECT]  # the same checkpoint, evaluated again
    with pytest.raises(FileNotFoundError, match="stage1-from"):
        uda_demo.main(["--quick", "--out", str(again), "--stage1-from", str(tmp_path / "no")])
