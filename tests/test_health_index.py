"""The dashboard and the tool reliability read the window's tool calls from the error index,
not from the events: they must count what the scan of the events counted (``scan_oracle``,
the code before), on a generated history and on one where every kind of damaged row was
added, for windows that hold the damage, cut runs in two or hold nothing."""
from __future__ import annotations

import json
import shutil
import sqlite3
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from selfheal_plugin.analysis import health
from selfheal_plugin.analysis.health import _window, _window_runs, run_facts, scan_window
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.errorindex import MAX_DURATION_MS, MAX_EVENT_BYTES, refresh
from selfheal_plugin.testbed.generator import generate_history

from .conftest import NOW
from .scan_oracle import scan_events
from .test_untrusted_history import STAMP, add_event, failed_call

OK_CALL = {"type": "tool_complete", "name": "mcp__x__ok", "result": "fine", "duration": 40, "is_error": False}
ITERATION = {"type": "iteration", "n": 1}


def _raw_event(db: Path, run_sql: str, data: str, event_type: str = "tool_complete") -> None:
    """A row whose run id is given as SQL (a BLOB, invalid UTF-8): no runs row can match it."""
    c = sqlite3.connect(db)
    c.execute(f"INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) "
              f"VALUES ({run_sql}, 0, ?, ?, ?)", (event_type, data, STAMP))
    c.commit()
    c.close()


def damage(db: Path) -> None:
    """Every kind of row the index refuses or keeps with care, in one history."""
    bad = [
        json.dumps(failed_call(duration=1e30)), json.dumps(failed_call(duration=-1e30)),
        '{"type": "tool_complete", "name": "t", "duration": 1e400, "is_error": true}',
        json.dumps({**OK_CALL, "duration": MAX_DURATION_MS + 1}),
        json.dumps(failed_call(result="bad @@")).encode().replace(b"@@", b"\xff\xfe"),
        json.dumps(failed_call()).encode().replace(b"mcp__x__y", b"mcp__x\xc3__y"),
        json.dumps(failed_call(result="x" * (MAX_EVENT_BYTES + 10))),
        json.dumps({**OK_CALL, "name": 5}), json.dumps({**OK_CALL, "name": ""}), '{"type": "tool_complete"',
        json.dumps({k: v for k, v in OK_CALL.items() if k != "name"}),
    ]
    for data in bad:
        add_event(db, data)
    add_event(db, json.dumps(OK_CALL), timestamp="not a time")  # no instant: malformed in every window
    add_event(db, json.dumps(failed_call()), timestamp="2019-01-01T00:00:00Z")  # years before every window
    run = add_event(db, json.dumps({**OK_CALL, "duration": -5}))  # no duration kept, a call all the same
    add_event(db, json.dumps({**OK_CALL, "is_error": "true"}), run_id=run)
    add_event(db, json.dumps(failed_call(error_type="Timeout")), run_id=run)
    add_event(db, json.dumps(failed_call(error_type=None)), run_id=run)
    add_event(db, json.dumps(OK_CALL), run_id=run, timestamp=(NOW - timedelta(hours=1)).strftime(
        "%Y-%m-%dT%H:%M:%S+02:00"))  # an offset: 3 hours before NOW
    for data in (json.dumps(ITERATION), json.dumps(ITERATION), "{broken", json.dumps({**ITERATION, "duration": 1e30}),
                 json.dumps({**ITERATION, "is_error": True, "note": "@@"}).encode().replace(b"@@", b"\xff")):
        add_event(db, data, run_id=run, event_type="iteration")
    add_event(db, json.dumps(ITERATION), run_id=run, event_type="iteration", timestamp="2019-01-01T00:00:00Z")
    _raw_event(db, "x'07'", json.dumps(OK_CALL))  # a run id that is not text
    _raw_event(db, "CAST(x'72ff' AS TEXT)", json.dumps(OK_CALL))  # a run id of invalid UTF-8
    _raw_event(db, "x'07'", json.dumps(failed_call()))


@pytest.fixture(scope="module")
def histories(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("health-index")
    plain = base / "plain.db"
    generate_history(plain, seed=11, runs=120, end=NOW)
    damaged = base / "damaged.db"
    shutil.copy(plain, damaged)
    damage(damaged)
    return {"plain": plain, "damaged": damaged}


@contextmanager
def indexed(history: Path, tmp_path: Path) -> Iterator[tuple[Path, sqlite3.Connection]]:
    """A copy of ``history`` with its index brought up to date, and a connection to it."""
    db = tmp_path / "conversations.db"
    shutil.copy(history, db)
    conn = connect(db)
    try:
        refresh(conn)
        yield db, conn
    finally:
        conn.close()


def _tools(scan) -> dict:
    return {name: (s.calls, s.errors, s.timeouts, sorted(s.durations), dict(s.error_types))
            for name, s in scan.tools.items()}


WINDOWS = [("-7d", NOW), ("-8d", NOW + timedelta(days=1)), ("-36h", NOW - timedelta(hours=30)),
           ("-1d", NOW - timedelta(days=60))]


@pytest.mark.parametrize("share", [0.0, 1.0])  # iterations by one pass, or by a lookup per run
@pytest.mark.parametrize("which", ["plain", "damaged"])
@pytest.mark.parametrize("since, now", WINDOWS)
def test_the_index_counts_what_the_scan_of_the_events_counted(histories, which, since, now, share, tmp_path,
                                                              monkeypatch):
    monkeypatch.setattr(health, "ITERATION_LOOKUP_SHARE", share)
    with indexed(histories[which], tmp_path) as (_, conn):
        start, end = _window(since, now)
        runs = _window_runs(conn, start, end)
        ours, theirs = run_facts(conn, runs), run_facts(conn, runs)
        new = scan_window(conn, start, end, ours)
        old = scan_events(conn, start, end, theirs)
    assert _tools(new) == _tools(old)
    assert {d: Counter(c) for d, c in new.errors_by_day.items()} == {d: Counter(c) for d, c in old.errors_by_day.items()}
    assert new.skipped_rows == old.skipped_rows
    assert {r: f.tool_calls for r, f in ours.items()} == {r: f.tool_calls for r, f in theirs.items()}
    # iterations are counted where the score reads them: the runs without a run_metrics row
    assert {r: f.iteration_events for r, f in ours.items() if f.metrics is None} == \
        {r: f.iteration_events for r, f in theirs.items() if f.metrics is None}
    if which == "damaged" and since == "-8d":  # the test sees what it means to see
        assert new.skipped_rows >= 13 and any(f.metrics is None and f.iteration_events == 2 for f in ours.values())


def test_a_window_in_the_future_of_the_index_counts_nothing_twice(histories, tmp_path):
    """Calls written after the index was read are neither calls nor malformed rows: both
    counts stop at the index's watermark."""
    with indexed(histories["plain"], tmp_path) as (db, conn):
        start, end = _window("-8d", NOW + timedelta(days=1))
        before = scan_window(conn, start, end)
        add_event(db, json.dumps(OK_CALL))
        add_event(db, '{"broken')
        after = scan_window(conn, start, end)
        refresh(conn)
        again = scan_window(conn, start, end)
    assert (after.skipped_rows, _tools(after)) == (before.skipped_rows, _tools(before))
    assert again.skipped_rows == before.skipped_rows + 1
    assert "mcp__x__ok" not in before.tools and again.tools["mcp__x__ok"].calls == 1


@pytest.mark.parametrize("call", [OK_CALL, failed_call(name="mcp__x__ok")])
def test_a_call_whose_run_id_is_not_text_is_one_bad_row_for_detection_too(histories, tmp_path, call):
    """A failed call with such a run id was refused; a successful one was kept as a call of
    its tool (in the failure rates' denominators). Both are damage, for every reader, and
    counted once (the failed call's closer look does not count it again, nor take it off
    another call's hour)."""
    with indexed(histories["plain"], tmp_path) as (db, conn):
        before = refresh(conn).total_bad_rows
        hours = conn.execute("SELECT sum(calls) FROM selfheal_tool_hours").fetchone()[0]
        _raw_event(db, "x'07'", json.dumps(call))
        _raw_event(db, "CAST(x'72ff' AS TEXT)", json.dumps(call))
        add_event(db, json.dumps({**call, "error_type": "timeout"}))  # a sound call of the same tool and hour
        assert refresh(conn).total_bad_rows == before + 2
        assert conn.execute("SELECT count(*) FROM selfheal_bad_calls").fetchone()[0] == before + 2
        assert conn.execute("SELECT count(*) FROM selfheal_calls WHERE tool_name = 'mcp__x__ok'").fetchone()[0] == 1
        assert conn.execute("SELECT sum(calls) FROM selfheal_tool_hours").fetchone()[0] == hours + 1


def test_rows_of_another_shape_in_the_calls_index_are_left_out(histories, tmp_path):
    """The index lives in a file another program writes: a call row whose fields are of
    another type is not a call for the dashboard, and nothing raises."""
    with indexed(histories["plain"], tmp_path) as (_, conn):
        start, end = _window("-8d", NOW + timedelta(days=1))
        before = _tools(scan_window(conn, start, end))
        (jd,) = conn.execute("SELECT max(jd) FROM selfheal_calls").fetchone()
        (top,) = conn.execute("SELECT max(event_id) FROM selfheal_calls").fetchone()
        conn.executemany("INSERT INTO selfheal_calls VALUES (?,?,?,?,?,?,?,?,?)", [
            (top - 10**6 + i, *row) for i, row in enumerate([
                (b"\x00", "r", jd, 1, 5, None, None, None),  # a tool name that is not text
                ("mcp__x__ok", b"\x07", jd, 1, 5, None, None, None),  # nor its run id
                ("mcp__x__ok", "r", "soon", 1, 5, None, None, None),  # an instant that is not one
                ("mcp__x__ok", "r", jd, 7, 5, None, None, None),  # an outcome that is not one
                ("mcp__x__ok", "r", jd, 0, 5, None, None, None),  # a failure without its type
                ("mcp__x__ok", "r", jd, 1, "slow", None, None, None),  # a duration that is not a number
            ])])
        conn.commit()
        after = _tools(scan_window(conn, start, end))
    assert after == before
