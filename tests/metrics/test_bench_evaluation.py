"""The evaluation benchmark runs end to end at tiny sizes and finds identical numbers."""

from __future__ import annotations

import numpy as np
import pytest

from src.bench import evaluation
from tests.metrics._naive import naive_evaluate as loop_evaluate


def test_bench_naive_reference_matches_test_reference():
    rng = np.random.default_rng(0)
    d = rng.integers(0, 5, (30, 90)).astype(np.float32)
    labels = (rng.integers(0, 9, 30), rng.integers(0, 9, 90), rng.integers(0, 3, 30),
              rng.integers(0, 3, 90))  # fmt: skip
    cmc, mAP, mINP = evaluation.naive_evaluate(d, *labels, max_rank=20)
    ref = loop_evaluate(d, *labels, max_rank=20)
    np.testing.assert_allclose(cmc, ref[0], atol=1e-12)
    assert abs(mAP - ref[1]) < 1e-12 and abs(mINP - ref[2]) < 1e-12


def test_run_quick_returns_markdown_with_identical_numbers():
    text = evaluation.run(quick=True, rerank=False)
    assert text.startswith("## Evaluation (Market-1501 protocol)")
    assert "**DIFFERENT**" not in text
    assert text.count("identical") >= 3  # two Market cases and the MSMT17 slice
    assert "peak memory above the features" in text and "Memory method:" in text


@pytest.mark.slow
def test_rerank_section_quick_finds_identical_numbers():
    text = evaluation.rerank_section(quick=True)
    assert text.startswith("## Re-ranking")
    assert "Same numbers: identical" in text and "**DIFFERENT**" not in text
    assert text.count("peak memory above the features") == 2  # Market table and MSMT17 table
