"""Absurd flag values through the installed `agent`: exit 2, one line, nothing read or written."""
from __future__ import annotations

import pytest

from ..conftest import run_agent

HUGE = "99999999999999999999999"


@pytest.mark.parametrize("args, message", [
    (["self-heal", "improvements", "--limit", HUGE], f"--limit must be between 1 and 1000000, got {HUGE}"),
    (["self-heal", "improvements", "--limit", "0"], "--limit must be between 1 and 1000000, got 0"),
    (["self-heal", "verify", "imp-x", "--window-days", "1e308"], "--window-days must be between 1 and 3650, got 1e308"),
    (["self-heal", "verify", "imp-x", "--window-days", "nan"], "--window-days must be between 1 and 3650, got nan"),
    (["self-heal", "verify", "imp-x", "--window-days", "5000"], "--window-days must be between 1 and 3650, got 5000"),
    (["self-heal", "verify", "imp-x", "--window-days", "-inf"], "--window-days must be between 1 and 3650, got -inf"),
    (["self-heal-daemon", "--once", "--interval", "999999d"], "invalid interval '999999d': it must be at most 30 days"),
    (["self-heal", "detect", "--min-occurrences", HUGE], "--min-occurrences must be between 1 and 1000000"),
    (["self-heal", "detect", "--min-occurrences", "three"],
     "--min-occurrences must be an integer between 1 and 1000000, got three"),
    (["self-heal", "detect", "--confidence", "nan"], "--confidence must be between 0 and 1, got nan"),
    (["self-heal", "dashboard", "--since", "-7x"], "invalid time window '-7x'"),
    (["self-heal", "test", "imp-x", "--fraction", "0"], "--fraction must be between 0 and 1 (exclusive), got 0"),
])
def test_absurd_flags_are_one_line_usage_errors(history_copy, binks_home, args, message):
    db, _ = history_copy
    before = db.read_bytes()
    res = run_agent(*args, "--home", str(binks_home))
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""
    assert db.read_bytes() == before


def test_demo_runs_has_a_ceiling(tmp_path):
    res = run_agent("self-heal", "demo", "--runs", "100000000", "--dir", str(tmp_path / "demo"))
    assert res.returncode == 2 and res.stderr.strip() == "Error: --runs must be between 40 and 10000, got 100000000"
    assert not (tmp_path / "demo").exists()


def test_in_range_flags_still_work(history_copy, binks_home):
    res = run_agent("self-heal", "improvements", "--limit", "1000000", "--json", "--home", str(binks_home))
    assert res.returncode == 0, res.stderr


def test_help_shows_the_schema_defaults_and_ranges():
    res = run_agent("self-heal", "detect", "--help")
    text = " ".join(res.stdout.split())
    assert "(1-1000000; default: [self_heal] min_occurrences, else 3)" in text
    assert "(0-1; default: [self_heal] confidence_threshold, else 0.75)" in text
    verify = " ".join(run_agent("self-heal", "verify", "--help").stdout.split())
    assert "(1-3650; default: [self_heal] measurement_window_days, else 7 days)" in verify
