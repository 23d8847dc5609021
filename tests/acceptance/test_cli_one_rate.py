"""`dashboard`, `test` and `verify` (installed CLI, --json) give one success rate for one
window holding cancelled and running runs (see tests/test_one_rate.py for the service)."""
from __future__ import annotations

import json
from datetime import timedelta

from selfheal_plugin.history.times import format_timestamp, utcnow

from ..conftest import run_agent
from ..test_one_rate import window_runs
from ..lifecycle_data import add_improvement, timeout_change, write_runs


def _json(*args: str) -> dict:
    r = run_agent("self-heal", *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_dashboard_test_and_verify_agree_through_the_cli(binks_home):
    db = binks_home / "conversations.db"
    now = utcnow().replace(minute=0, second=0, microsecond=0)  # the CLI reads the wall clock
    applied_at = now - timedelta(days=7)
    write_runs(db, window_runs(applied_at - timedelta(days=7), applied_at, seed=1, fail_rate=0.2)
               + window_runs(applied_at, now - timedelta(hours=1), seed=2, fail_rate=0.05))
    proposed = add_improvement(db, [timeout_change()])
    applied = add_improvement(db, [timeout_change()], status="applied", applied_at=format_timestamp(applied_at),
                              commit_sha="0" * 40)
    since = format_timestamp(applied_at)
    home = ("--home", str(binks_home))

    board = _json("dashboard", "--since", since, *home)
    tested = _json("test", proposed.id, "--since", since, *home)
    verified = _json("verify", applied.id, *home)

    runs = board["runs"]
    assert (runs["finished"], runs["cancelled"], runs["running"]) == (66, 6, 2)
    assert board["success_rate"] == round(runs["completed"] / 66, 4)
    assert tested["baseline_success_rate"] == board["success_rate"]
    assert verified["metrics"]["after_success_rate"] == board["success_rate"]
    assert verified["metrics"]["runs_after"] == 66
