"""RunRecorder writes the runtime's exact format, and selfheal's own detection reads it."""
from __future__ import annotations

import json
import re
import sqlite3
import threading
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from selfheal_plugin.history.clock import SimulatedClock, runtime_timestamp
from selfheal_plugin.history.connection import connect
from selfheal_plugin.analysis.patterns import detect_failure_patterns
from selfheal_plugin.runtime.recorder import RunRecorder, current_run
from selfheal_plugin.history.times import parse_timestamp

T0 = datetime(2026, 11, 10, 9, 0, 0, 250000, tzinfo=timezone.utc)
STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}\+00:00$")
RUN_COLUMNS = ["id", "workflow_name", "task", "status", "model", "started_at", "completed_at", "duration_ms",
               "context", "error", "metadata"]


@pytest.fixture
def db(tmp_path):
    return tmp_path / "conversations.db"


def rows(db, sql, *params):
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def test_runtime_timestamp_shape():
    assert runtime_timestamp(T0) == "2026-11-10T09:00:00.250000000+00:00"
    other = T0.astimezone(timezone(timedelta(hours=2)))
    assert runtime_timestamp(other) == "2026-11-10T09:00:00.250000000+00:00"
    with pytest.raises(ValueError):
        runtime_timestamp(datetime(2026, 1, 1))


def test_simulated_clock_moves_only_forward():
    clock = SimulatedClock(T0)
    assert clock() == T0
    clock.advance(1.5)
    assert clock() == T0 + timedelta(seconds=1.5)
    clock.set(T0)  # earlier: ignored
    assert clock() == T0 + timedelta(seconds=1.5)
    with pytest.raises(ValueError):
        clock.advance(-1)


def test_a_recorded_run_matches_the_spec(db):
    clock = SimulatedClock(T0)
    rec = RunRecorder(db, clock=clock, model="qwen3:14b")
    with rec.run("planner", "list the logs", metadata={"arm": "control"}, context={"cwd": "/w"}) as run:
        assert current_run() is run
        with run.step(0):
            run.iteration()
            run.thinking("Calling list_dir")
            run.tool_start("list_dir", {"path": "/logs"})
            clock.advance(0.012)
            run.tool_complete("list_dir", "a.log b.log", 12, False)
            run.token("done ")
        clock.advance(1)
        with run.step():
            run.iteration()
            run.record_tool_call("mcp__k8s__pods_list", {"namespace": "x"},
                                 "Tool mcp__k8s__pods_list timed out after 60s", 60003, True)
        run.add_tokens(900, 120)
        run.response_complete("partial")
        clock.advance(0.5)
    rec.close()
    assert current_run() is None

    conn = sqlite3.connect(db)
    assert [r[1] for r in conn.execute("PRAGMA table_info(runs)")] == RUN_COLUMNS
    conn.close()
    (r,) = rows(db, "SELECT * FROM runs")
    assert uuid.UUID(r["id"]).version == 4
    assert (r["workflow_name"], r["task"], r["status"], r["model"]) == ("planner", "list the logs", "completed",
                                                                        "qwen3:14b")
    assert STAMP.match(r["started_at"]) and STAMP.match(r["completed_at"])
    assert parse_timestamp(r["started_at"]) == T0
    assert r["duration_ms"] == int((clock() - T0).total_seconds() * 1000) == 1512
    assert json.loads(r["metadata"]) == {"arm": "control"} and json.loads(r["context"]) == {"cwd": "/w"}
    assert r["error"] is None

    events = rows(db, "SELECT * FROM run_events ORDER BY id")
    types = [e["event_type"] for e in events]
    assert types == ["processing_start", "step_started", "iteration", "thinking", "tool_start", "tool_complete",
                     "token", "step_completed", "step_started", "iteration", "tool_start", "tool_complete",
                     "step_completed", "response_complete"]
    for e in events:
        data = json.loads(e["event_data"])
        assert data["type"] == e["event_type"] and STAMP.match(e["timestamp"])
    data = [json.loads(e["event_data"]) for e in events]
    ok, timeout = [d for d in data if d["type"] == "tool_complete"]
    assert ok == {"type": "tool_complete", "name": "list_dir", "result": "a.log b.log", "duration": 12,
                  "is_error": False}  # error_type absent on success
    assert timeout["error_type"] == "timeout" and timeout["duration"] == 60003 and timeout["is_error"] is True
    starts = [d for d in data if d["type"] == "tool_start"]
    assert starts[0] == {"type": "tool_start", "name": "list_dir", "arguments": {"path": "/logs"}}
    steps = [d for d in data if d["type"] == "step_completed"]
    assert steps[0] == {"type": "step_completed", "step_index": 0, "success": True, "duration_ms": 12}
    assert steps[1]["step_index"] == 1 and steps[1]["success"] is False
    assert [e["step_index"] for e in events if e["event_type"] == "tool_complete"] == [0, 1]
    assert data[-1] == {"type": "response_complete", "content": "partial", "iterations": 2,
                        "total_duration": 1012}

    (m,) = rows(db, "SELECT * FROM run_metrics")
    assert (m["total_tool_calls"], m["successful_tool_calls"], m["failed_tool_calls"], m["total_iterations"]) \
        == (2, 1, 1, 2)
    assert (m["total_tokens_in"], m["total_tokens_out"]) == (900, 120)
    assert json.loads(m["tools_used"]) == {"list_dir": 1, "mcp__k8s__pods_list": 1}
    assert json.loads(m["step_durations"]) == [12, 0]


@pytest.mark.parametrize("message,label", [
    ("Tool x timed out after 30s", "timeout"),
    ("deadline has elapsed", "timeout"),
    ("Failed to connect to MCP server github: connection refused", "connection_refused"),
    ("MCP server flaky process exited unexpectedly", "server_crashed"),
    ("failed to parse response", "transport_error"),
    ("Path not found: /x", "tool_error"),
])
def test_failed_calls_get_the_runtime_labels(db, message, label):
    rec = RunRecorder(db, clock=SimulatedClock(T0))
    with rec.run("w", "t") as run:
        assert run.record_tool_call("tool", {}, message, 5, True) == label
        run.record_tool_call("tool", {}, "unclassified", 5, True, error_type=None)
    data = [json.loads(r["event_data"]) for r in rows(db, "SELECT event_data FROM run_events "
                                                         "WHERE event_type = 'tool_complete' ORDER BY id")]
    assert data[0]["error_type"] == label
    assert "error_type" not in data[1]  # an unclassifying runtime leaves it absent


def test_failures_and_cancellation_finish_the_run(db):
    rec = RunRecorder(db, clock=SimulatedClock(T0))
    with pytest.raises(RuntimeError, match="boom"):
        with rec.run("w", "raises"):
            raise RuntimeError("boom")
    with rec.run("w", "fails") as run:
        run.fail("step 1 failed")
    with pytest.raises(KeyboardInterrupt):
        with rec.run("w", "cancelled"):
            raise KeyboardInterrupt
    got = {r["task"]: (r["status"], r["error"]) for r in rows(db, "SELECT task, status, error FROM runs")}
    assert got == {"raises": ("failed", "boom"), "fails": ("failed", "step 1 failed"),
                   "cancelled": ("cancelled", "cancelled")}
    errors = [json.loads(r["event_data"])["message"] for r in rows(db, "SELECT event_data FROM run_events "
                                                                      "WHERE event_type = 'error' ORDER BY id")]
    assert errors == ["boom", "step 1 failed"]
    run = rec.start_run("w", "twice")
    run.finish()
    with pytest.raises(RuntimeError, match="already completed"):
        run.finish()
    with pytest.raises(ValueError, match="status must be"):
        rec.start_run("w", "bad").finish("running")


def test_running_run_is_visible_at_once_and_metadata_updates(db):
    rec = RunRecorder(db, clock=SimulatedClock(T0))
    run = rec.start_run("w", "t")
    assert rows(db, "SELECT status, completed_at, duration_ms FROM runs") == [
        {"status": "running", "completed_at": None, "duration_ms": None}]
    run.update_metadata(arm="canary")
    assert json.loads(rows(db, "SELECT metadata FROM runs")[0]["metadata"]) == {"arm": "canary"}


def test_writes_wait_for_a_reader_holding_the_file(db):
    """A reader in the middle of a transaction delays the recorder's write; it does not fail."""
    rec = RunRecorder(db, clock=SimulatedClock(T0))
    reader = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    reader.execute("BEGIN IMMEDIATE")  # hold the write lock like a busy runtime would
    threading.Timer(0.3, lambda: reader.execute("COMMIT")).start()
    with rec.run("w", "t") as run:  # start_run's insert waits on the busy timeout
        run.record_tool_call("tool", {"path": "/x"}, "ok", 1)
    reader.close()
    assert rows(db, "SELECT status FROM runs") == [{"status": "completed"}]


def test_detection_reads_a_recorded_history(db):
    """Patterns from recorded runs are found with runtime labels and argument keys."""
    clock = SimulatedClock(T0)
    rec = RunRecorder(db, clock=clock, max_buffer=5)
    for i in range(30):
        clock.set(T0 + timedelta(hours=i))
        with rec.run("k8s-ops" if i % 2 else "planner", f"task {i}") as run:
            with run.step(0):
                run.record_tool_call("read_file", {"path": f"/p/{i}"}, "ok", 30)
            with run.step(1):
                if i % 3 == 0:
                    run.record_tool_call("mcp__kubernetes__pods_list", {"namespace": "prod"},
                                         f"Tool mcp__kubernetes__pods_list timed out after {60 + i % 2}s", 60003, True)
                    run.fail("timeout")
                elif i % 5 == 0:
                    run.record_tool_call("list_dir", {"path": f"/missing/{i}"}, f"Path not found: /missing/{i}", 3,
                                         True)
                else:
                    run.record_tool_call("mcp__kubernetes__pods_list", {"namespace": "prod"}, "3 pods", 20000)
    rec.close()
    conn = connect(db)
    found = detect_failure_patterns(conn, since="-30d", min_occurrences=2, confidence_threshold=0.0,
                                    now=T0 + timedelta(days=2))
    conn.close()
    by_id = {p.id: p for p in found.patterns}
    assert set(by_id) == {"timeout:mcp__kubernetes__pods_list", "tool_error:list_dir"}
    assert by_id["timeout:mcp__kubernetes__pods_list"].occurrences == 10
    assert by_id["tool_error:list_dir"].occurrences == 4
    detail = by_id["timeout:mcp__kubernetes__pods_list"].occurrences_detail
    assert {tuple(d["arg_keys"]) for d in detail} == {("namespace",)}
    assert {d["raw_error_type"] for d in detail} == {"timeout"}
    assert found.scanned.new_bad_rows == 0
