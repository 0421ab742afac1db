"""`python -m src.data.check`: counts, unreadable files, exit status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from src.data.check import main
from tests.data.conftest import write_image

REPO = Path(__file__).resolve().parents[2]


def test_check_prints_counts_and_passes(market_root: Path, capsys) -> None:
    assert main([str(market_root), "--format", "market1501"]) == 0
    out = capsys.readouterr().out
    assert "train   |     3 |      4 |        5" in out
    assert "query   |     2 |      2 |        2" in out
    assert "gallery |     2 |      3 |        4" in out
    assert "distractor images (pid 0): 1" in out and "{'gallery': 2}" in out
    assert "decoded 11/11 images" in out and out.rstrip().endswith("OK")


def test_check_reports_unreadable_files(market_root: Path, capsys) -> None:
    bad = market_root / "query" / "0005_c3s1_000301_00.jpg"
    bad.write_bytes(b"\xff\xd8 broken")
    assert main([str(market_root), "--format", "market1501"]) == 1
    out = capsys.readouterr().out
    assert f"{bad}: cannot decode image" in out and "1 unreadable image(s)" in out
    assert "no gallery image of their identity from another camera" in out  # pid 5
    assert main([str(market_root), "--format", "market1501", "--no-decode"]) == 0


def test_check_layout_and_name_errors(market_root: Path, tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "nothing"), "--format", "dukemtmc"]) == 2
    assert "missing folder" in capsys.readouterr().err
    write_image(market_root / "query" / "bad.jpg")
    assert main([str(market_root), "--format", "market1501"]) == 2
    assert f"{market_root / 'query' / 'bad.jpg'}" in capsys.readouterr().err
    assert main([str(market_root), "--format", "market1501", "--option", "nope=1"]) == 2


def test_check_options_and_empty_split(make_dataset_files, capsys) -> None:
    root = make_dataset_files(
        "folder", ["train/0001/a_c1.jpg", "train/0002/b_c2.jpg", "query/0003/c_c1.jpg"]
    )
    (root / "gallery").mkdir()
    assert main([str(root), "--format", "folder", "--option", "combine_all=True"]) == 1
    out = capsys.readouterr().out
    assert "the gallery split is empty" in out and "train   |     3 |" in out


def test_check_fails_on_unevaluable_test_splits(make_dataset_files, capsys) -> None:
    """Exit 1 (not "OK") when no query can be evaluated: no camera tokens, or every query's
    identity only in its own camera."""
    files = ["train/0001/a_c1.jpg", "train/0002/b_c2.jpg"]
    no_cams = make_dataset_files("nocams", files + ["query/7/q.jpg", "gallery/7/g.jpg"])
    assert main([str(no_cams), "--format", "folder"]) == 1
    assert "same camera id" in capsys.readouterr().out
    same_cam = make_dataset_files(
        "samecam", files + ["query/7/q_c1.jpg", "gallery/7/g_c1.jpg", "gallery/8/h_c2.jpg"]
    )
    assert main([str(same_cam), "--format", "folder"]) == 1
    out = capsys.readouterr().out
    assert "none of the 1 queries has a gallery image of its identity" in out
    assert not out.rstrip().endswith("OK")


@pytest.mark.parametrize("fmt, code", [("market1501", 0), ("msmt17", 2)])
def test_check_as_a_module(market_root: Path, fmt: str, code: int) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "src.data.check", str(market_root), "--format", fmt],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == code, result.stderr
