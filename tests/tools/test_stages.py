"""run_stage: a demo stage as a subprocess with its output in a log file."""

from __future__ import annotations

import sys

import pytest

from src.tools.stages import run_stage


def test_success_writes_the_log_and_returns_the_wall_time(tmp_path):
    log = tmp_path / "deep" / "stage.log"  # missing parent folders are created
    cmd = [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr)"]
    elapsed = run_stage(cmd, log)
    assert elapsed > 0
    assert set(log.read_text().split()) == {"out", "err"}  # stdout and stderr, both


def test_failure_stops_with_the_status_the_log_and_its_last_lines(tmp_path):
    log = tmp_path / "stage.log"
    script = "for i in range(100): print(f'line {i}')\nraise SystemExit(3)"
    with pytest.raises(SystemExit) as info:
        run_stage([sys.executable, "-c", script], log, tail_lines=5)
    message = str(info.value)
    assert "exit 3" in message and str(log) in message
    assert "line 99" in message and "line 95" in message and "line 94" not in message
