"""The MAR demo's table: mean ± std over seeds of each row, in percent."""

from __future__ import annotations

from src.tools.mar_demo import ROWS, summarise


def test_summarise_mean_and_std_over_seeds():
    per_seed = {
        0: {row: {"rank1": 0.10, "mAP": 0.05} for row in ROWS},
        1: {row: {"rank1": 0.30, "mAP": 0.15} for row in ROWS},
    }
    table = summarise(per_seed).splitlines()
    assert table[0].startswith("| method | rank-1 (%) | mAP (%) | seeds |")
    assert len(table) == 2 + len(ROWS)
    # mean 20.0, sample std of (10, 30) = 14.1; mAP mean 10.0, std 7.1
    assert table[2] == f"| {ROWS[0]} | 20.0 ± 14.1 | 10.0 ± 7.1 | 2 |"


def test_single_seed_has_zero_std():
    per_seed = {3: {row: {"rank1": 0.5, "mAP": 0.25} for row in ROWS}}
    assert f"| {ROWS[1]} | 50.0 ± 0.0 | 25.0 ± 0.0 | 1 |" in summarise(per_seed)
