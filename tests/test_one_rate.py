"""One window, one success rate: the dashboard, agent metrics, `test`'s baseline and
`verify`'s before/after rates count the same finished runs (completed, failed or cancelled;
``history.outcome``), and a pattern's error rate is the same in `show`/`detect` and `verify`,
on a history where users cancelled runs (some after a timeout) and runs are still running."""
from __future__ import annotations

import random
from datetime import datetime, timedelta

import pytest

from selfheal_plugin import SelfHeal
from selfheal_plugin.analysis.report import render_html
from selfheal_plugin.history.outcome import FINISHED, finished_sql, success_rate
from selfheal_plugin.history.text import percent
from selfheal_plugin.history.times import format_timestamp

from .conftest import NOW
from .lifecycle_data import K8S, RunSpec, add_improvement, rate_runs, settings_for, timeout_change, write_runs

APPLIED = NOW - timedelta(days=7)
WEEK = timedelta(days=7)
PATTERN = f"timeout:{K8S}"


def window_runs(start: datetime, end: datetime, seed: int, fail_rate: float) -> list[RunSpec]:
    """60 runs (a share failed by a K8S timeout), 6 cancelled runs (2 after a K8S timeout)
    and 2 runs still running, over [start, end)."""
    rng = random.Random(seed)
    runs = rate_runs(start, end, 60, fail_rate, seed=seed)
    for i in range(6):
        calls = [("read_file", True, 40.0, None), (K8S, True, 800.0 + 37 * i, None)]
        if i % 3 == 0:
            calls.append((K8S, False, 60_003.0, "timeout"))  # the user gave up after it
        runs.append(RunSpec(start + (end - start) * (i + 0.25) / 6, "cancelled", calls,
                            offset_hours=rng.choice((0, 2, -5))))
    for i in range(2):
        runs.append(RunSpec(start + (end - start) * (i + 0.75) / 2, "running", [("read_file", True, 40.0, None)]))
    return runs


@pytest.fixture
def home(binks_home):
    db = binks_home / "conversations.db"
    write_runs(db, window_runs(APPLIED - WEEK, APPLIED, seed=1, fail_rate=0.2)
               + window_runs(APPLIED, NOW, seed=2, fail_rate=0.05))
    return binks_home


def service(home, at: datetime) -> SelfHeal:
    return SelfHeal(settings=settings_for(home), clock=lambda: at)


def test_the_definition_is_the_documented_one():
    assert FINISHED == ("completed", "failed", "cancelled")
    assert finished_sql("r.status") == "r.status IN ('completed', 'failed', 'cancelled')"
    assert success_rate(48, 66) == 0.7273 and success_rate(0, 0) is None


@pytest.mark.parametrize("side", ["before", "after"])
def test_dashboard_agents_test_and_verify_give_one_success_rate(home, side):
    start, end = (APPLIED - WEEK, APPLIED) if side == "before" else (APPLIED, NOW)
    since = format_timestamp(start)
    db = home / "conversations.db"
    proposed = add_improvement(db, [timeout_change()])
    applied = add_improvement(db, [timeout_change()], status="applied", applied_at=format_timestamp(APPLIED),
                              commit_sha="0" * 40)
    with service(home, end) as sh:
        board = sh.dashboard(since=since, detailed=True)
        agents = sh.agent_metrics(since=since)["agents"]
        tested = sh.test(proposed.id, since=since)
    with service(home, NOW) as sh:
        verified = sh.verify(applied.id)

    runs = board["runs"]
    assert runs["cancelled"] == 6 and runs["running"] == 2
    assert runs["finished"] == runs["completed"] + runs["failed"] + runs["cancelled"] == 66
    want = success_rate(runs["completed"], 66)
    assert board["success_rate"] == want
    assert [a["success_rate"] for a in agents] == [want]
    assert tested["baseline_success_rate"] == want
    assert verified["metrics"][f"{side}_success_rate"] == want
    assert verified["metrics"][f"runs_{side}"] == 66


def test_a_patterns_error_rate_is_the_same_in_show_and_verify(home):
    """The calls of cancelled runs count in verify as they do in detection (26/142 against
    26/141 before)."""
    applied = add_improvement(home / "conversations.db", [timeout_change()], status="applied",
                              applied_at=format_timestamp(APPLIED), commit_sha="0" * 40)
    with service(home, NOW) as sh:
        shown = sh.show(PATTERN, since=format_timestamp(APPLIED))
        verified = sh.verify(applied.id)
    # 60 runs with one K8S call, 3 with a second that timed out (63); 6 cancelled, 2 after a timeout (8)
    pattern = verified["metrics"]["pattern"]
    assert (pattern["after_errors"], pattern["after_calls"]) == (5, 71)
    assert shown["occurrences"] == 5 and shown["failure_rate"] == verified["after_error_rate"] == round(5 / 71, 4)


def test_the_reports_success_card_adds_up_and_reads_as_the_terminal(home):
    with service(home, NOW) as sh:
        board = sh.dashboard(since=format_timestamp(APPLIED), detailed=True)
    runs = board["runs"]
    html = render_html(board)
    assert (f"{runs['completed']} completed of 66 finished; {runs['failed']} failed, 6 cancelled, 2 running"
            in html)
    assert f'<span id="success-rate">{percent(board["success_rate"])}</span>' in html
    assert percent(board["success_rate"]) == "86%"  # 57 of 66: the terminal's figure, not 86.4%
