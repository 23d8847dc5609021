import json
import sqlite3
import threading

import pytest

from selfheal_plugin.errors import HistoryError
from selfheal_plugin.testbed.generator import add_runtime_improvements, generate_history
from selfheal_plugin.history.connection import (IMPROVEMENT_COLUMNS, classify_error, connect, normalize_error_type,
                                     table_columns, write_transaction)
from selfheal_plugin.history.improvements import ImprovementStore

from .conftest import NOW


@pytest.mark.parametrize("raw, expected", [
    ("timeout", "timeout"), ("Timeout", "timeout"), ("TIMEOUT", "timeout"),
    ("connection_refused", "connection_refused"), ("ConnectionRefused", "connection_refused"),
    ("server_crashed", "server_crashed"), ("ServerCrashed", "server_crashed"),
    ("tool_error", "tool_error"), ("ToolError", "tool_error"),
    ("transport_error", "transport_error"), ("TransportError", "transport_error"),
    ("permission_denied", "permission_denied"), ("PermissionDenied", "permission_denied"),
    (None, "Unknown"), ("", "Unknown"), ("Unknown", "Unknown"), ("unknown", "Unknown"), (42, "Unknown"),
    ("RateLimited", "rate_limited"), ("rate_limited", "rate_limited"),
])
def test_normalize_error_type(raw, expected):
    assert normalize_error_type(raw) == expected


@pytest.mark.parametrize("message, label", [
    ("Tool x timed out after 60s", "timeout"), ("deadline has elapsed", "timeout"),
    ("Connection refused (os error 111)", "connection_refused"),
    ("No such file or directory (os error 2)", "connection_refused"),
    ("Broken pipe", "server_crashed"), ("MCP server process exited", "server_crashed"),
    ("failed to parse response", "transport_error"), ("Path not found: /x", "tool_error"),
])
def test_classify_error_runtime_labels(message, label):
    assert classify_error(message) == label


def test_missing_file(tmp_path):
    with pytest.raises(HistoryError, match="no run history"):
        connect(tmp_path / "nope.db")
    assert not (tmp_path / "nope.db").exists()


def test_not_sqlite(tmp_path):
    p = tmp_path / "x.db"
    p.write_text("this is not a database, just some text" * 100)
    before = p.read_bytes()
    with pytest.raises(HistoryError, match="not a run-history database"):
        connect(p)
    assert p.read_bytes() == before


def test_no_run_tables(tmp_path):
    p = tmp_path / "other.db"
    c = sqlite3.connect(p)
    c.execute("CREATE TABLE notes (x)")
    c.commit()
    c.close()
    with pytest.raises(HistoryError, match="no runs or run_events table"):
        connect(p)
    tables = {r[0] for r in sqlite3.connect(p).execute("SELECT name FROM sqlite_master")}
    assert tables == {"notes"}


def test_create_new_file_has_runtime_schema(tmp_path):
    conn = connect(tmp_path / "new.db", create=True)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "run_events", "run_metrics", "improvements", "conversations", "messages",
            "schema_version"} <= tables
    assert conn.execute("SELECT version FROM schema_version").fetchone()[0] == 2
    assert table_columns(conn, "runs") == ["id", "workflow_name", "task", "status", "model", "started_at",
                                          "completed_at", "duration_ms", "context", "error", "metadata"]


def test_legacy_improvements_migrated_in_place(tmp_path):
    """A file in the runtime's older schema keeps every improvements row, readable."""
    path = tmp_path / "legacy.db"
    c = sqlite3.connect(path)
    c.executescript("""
        CREATE TABLE runs (id TEXT PRIMARY KEY, workflow_name TEXT NOT NULL, task TEXT NOT NULL,
          status TEXT NOT NULL, model TEXT NOT NULL, started_at TEXT NOT NULL, completed_at TEXT,
          duration_ms INTEGER, context TEXT, error TEXT, metadata TEXT);
        CREATE TABLE run_events (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, step_index INTEGER NOT NULL,
          event_type TEXT NOT NULL, event_data TEXT NOT NULL, timestamp TEXT NOT NULL);
        CREATE TABLE improvements (id TEXT PRIMARY KEY, category TEXT NOT NULL, description TEXT NOT NULL,
          related_runs TEXT, changes_made TEXT, impact TEXT, created_at TEXT NOT NULL, applied_at TEXT,
          verified_at TEXT, status TEXT NOT NULL DEFAULT 'proposed');
    """)
    c.commit()
    c.close()
    ids = add_runtime_improvements(path, rows=4)
    before = sqlite3.connect(path).execute("SELECT * FROM improvements ORDER BY id").fetchall()
    conn = connect(path)
    assert set(IMPROVEMENT_COLUMNS) <= set(table_columns(conn, "improvements"))
    after = conn.execute("SELECT id, category, description, related_runs, changes_made, impact, created_at, "
                         "applied_at, verified_at, status FROM improvements ORDER BY id").fetchall()
    assert [tuple(r) for r in after] == before
    listed = {i.id: i for i in ImprovementStore(conn).list(limit=None)}
    assert set(ids) <= set(listed)
    assert listed["legacy-2"].impact == {"score": 2} and listed["legacy-2"].category == "tool"
    conn.close()
    connect(path).close()  # a second open migrates nothing more and loses nothing
    assert len(sqlite3.connect(path).execute("SELECT * FROM improvements").fetchall()) == 4


def test_busy_database_waits_then_reports(tmp_path, monkeypatch):
    """A write lock held by 'the runtime' longer than our busy timeout is a clear error;
    one released in time is simply waited for."""
    path = tmp_path / "h.db"
    generate_history(path, seed=1, runs=30, end=NOW)
    connect(path).close()
    monkeypatch.setenv("SELFHEAL_BUSY_TIMEOUT_MS", "300")
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        c2 = sqlite3.connect(path, timeout=0.3, isolation_level=None)
        c2.execute("SELECT count(*) FROM runs").fetchone()
    released = threading.Timer(0.1, lambda: holder.execute("COMMIT"))
    monkeypatch.setenv("SELFHEAL_BUSY_TIMEOUT_MS", "5000")
    released.start()
    conn = connect(path)
    with write_transaction(conn):
        conn.execute("INSERT INTO selfheal_state VALUES ('k', 'v')")
    released.join()
    assert conn.execute("SELECT value FROM selfheal_state WHERE key='k'").fetchone()[0] == "v"


def test_generator_is_deterministic(tmp_path):
    a = generate_history(tmp_path / "a.db", seed=3, runs=50, end=NOW)
    b = generate_history(tmp_path / "b.db", seed=3, runs=50, end=NOW)
    assert a == b
    dump = lambda p: list(sqlite3.connect(p).execute("SELECT run_id, event_type, event_data, timestamp FROM run_events ORDER BY id"))
    assert dump(tmp_path / "a.db") == dump(tmp_path / "b.db")
    truth = json.loads((tmp_path / "a.db.truth.json").read_text())
    assert truth["patterns"] == a["patterns"]


def test_generator_writes_the_runtime_format(sample_history):
    path, truth = sample_history
    c = sqlite3.connect(path)
    types = {r[0] for r in c.execute("SELECT DISTINCT event_type FROM run_events")}
    assert types == {"processing_start", "tool_start", "tool_complete", "token", "thinking", "iteration",
                     "response_complete", "error", "step_started", "step_completed"}
    stamps = [r[0] for r in c.execute("SELECT timestamp FROM run_events")]
    assert any(s.endswith("Z") for s in stamps) and any(s.endswith("+02:00") for s in stamps)
    assert any(len(s.split(".")[-1].split("+")[0].rstrip("Z")) == 9 for s in stamps if "." in s)
    completes = [json.loads(d) for (d,) in c.execute("SELECT event_data FROM run_events WHERE event_type='tool_complete'")
                 if d.startswith("{") and d.endswith("}")]
    raw_types = {e.get("error_type", "<absent>") for e in completes if e.get("is_error")}
    assert {"<absent>", "timeout", "Timeout", "ToolError", "tool_error", None} <= raw_types
    assert all("error_type" not in e for e in completes if e.get("is_error") is False)
    assert {r[0] for r in c.execute("SELECT status FROM runs")} >= {"running", "completed", "failed"}
    assert truth["bad_rows"] > 0


def test_generated_file_has_only_runtime_tables(tmp_path):
    path = tmp_path / "fresh.db"
    generate_history(path, seed=4, runs=20, end=NOW)
    names = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert not any(n.startswith("selfheal_") for n in names)


def test_improvements_list_newest_first_to_the_microsecond(tmp_path):
    """Proposals a detect stores together are microseconds apart: julianday() alone ties them
    (its resolution is ~40 µs) and the id decided; the newest still comes first."""
    from selfheal_plugin.history.improvements import Improvement

    store = ImprovementStore(connect(tmp_path / "h.db", create=True))
    ids = ["imp-20261128-ffffffff", "imp-20261128-00000000", "imp-20261128-88888888"]  # oldest first
    for k, imp_id in enumerate(ids):
        store.insert(Improvement(id=imp_id, status="proposed", description="d",
                                 proposed_at=f"2026-11-28T11:00:00.00000{k}Z"))
    assert [i.id for i in store.list()] == ids[::-1]
