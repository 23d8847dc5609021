"""Once an apply or rollback has committed, a busy history database never makes it say
"nothing was changed": it waits longer for the database, and when the database stays busy
it says what is true (the commit, the record left to recovery) with exit code 5.

Processes are ordered with ``SELFHEAL_PAUSE_AT``/``SELFHEAL_PAUSE_DIR`` files and the
database is held by a second connection's transaction for as long as the test needs it,
never for a measured time.
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from selfheal_plugin.history.connection import connect, write_transaction

from .conftest import agent_bin, run_agent
from .lifecycle_data import add_improvement, timeout_change
from .test_trust_lifecycle import (  # noqa: F401 — fixtures
    APPLIED, CONFIG, applied, assert_consistent, commits_of, db, finish, go, home, row, versioned, wait_reached,
)

FAST_BUSY = {"SELFHEAL_BUSY_TIMEOUT_MS": "20"}  # each attempt gives up at once: the lock is held throughout


def spawn(*args: str, pause_at: str, pause_dir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    full = {**os.environ, "SELFHEAL_PAUSE_AT": pause_at, "SELFHEAL_PAUSE_DIR": str(pause_dir), **(env or {})}
    return subprocess.Popen([agent_bin(), *args], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def hold(db_path: Path) -> sqlite3.Connection:
    """Another process's write lock (readers are kept out too), held until rolled back."""
    conn = sqlite3.connect(str(db_path), isolation_level=None, timeout=60)
    conn.execute("BEGIN EXCLUSIVE")
    return conn


def release(conn: sqlite3.Connection) -> None:
    conn.execute("ROLLBACK")
    conn.close()


@pytest.fixture
def pause(tmp_path):
    folder = tmp_path / "pause"
    folder.mkdir()
    return folder


def test_apply_that_committed_says_so_when_the_database_stays_busy(versioned, db, pause):
    imp = add_improvement(db, [timeout_change()])
    proc = spawn("self-heal", "apply", imp.id, "--yes", "--json", "--home", str(versioned), pause_at="after-commit",
                 pause_dir=pause, env=FAST_BUSY)
    wait_reached(pause, "after-commit", proc)
    lock = hold(db)
    try:
        go(pause, "after-commit")
        code, out, err = finish(proc)
    finally:
        release(lock)
    [sha] = commits_of(versioned, imp.id)
    assert code == 5, (out, err)
    assert err.strip() == (f"warning: applied {imp.id} (commit {sha[:12]}), but the history database is busy: the "
                           "record will be completed by the next command (or run agent self-heal improvements)")
    assert out == ""  # no result to parse: the record is not written yet
    assert (versioned / "config.toml").read_text() == APPLIED
    state = row(db, imp.id)
    assert state.status == "proposed" and state.pending_op["op"] == "apply"
    r = run_agent("self-heal", "improvements", "--home", str(versioned))
    assert r.returncode == 0, r.stderr
    assert f"recovered interrupted apply of {imp.id}: finished (commit {sha[:12]} exists)" in r.stderr
    assert row(db, imp.id).commit_sha == sha
    assert_consistent(versioned, db, imp.id)


def test_apply_waits_for_a_busy_database_after_its_commit(versioned, db, pause):
    imp = add_improvement(db, [timeout_change()])
    proc = spawn("self-heal", "apply", imp.id, "--yes", "--home", str(versioned),
                 pause_at="after-commit,busy-after-commit", pause_dir=pause, env=FAST_BUSY)
    wait_reached(pause, "after-commit", proc)
    lock = hold(db)
    go(pause, "after-commit")
    wait_reached(pause, "busy-after-commit", proc)  # its first write after the commit found the database busy
    release(lock)
    go(pause, "busy-after-commit")
    code, out, err = finish(proc)
    assert code == 0, (out, err)
    assert f"Applied {imp.id}" in out and "busy" not in err
    assert row(db, imp.id).status == "applied"
    assert_consistent(versioned, db, imp.id)


def test_rollback_that_committed_says_so_when_the_database_stays_busy(versioned, db, applied, pause):
    proc = spawn("self-heal", "rollback", applied.id, "--yes", "--home", str(versioned),
                 pause_at="rollback-after-commit", pause_dir=pause, env=FAST_BUSY)
    wait_reached(pause, "rollback-after-commit", proc)
    lock = hold(db)
    try:
        go(pause, "rollback-after-commit")
        code, out, err = finish(proc)
    finally:
        release(lock)
    [revert, _] = commits_of(versioned, applied.id)  # newest first: the rollback, then the apply
    assert code == 5, (out, err)
    assert f"rolled back {applied.id} (commit {revert[:12]}), but the history database is busy" in err
    assert "nothing was changed" not in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert (versioned / "config.toml").read_text() == CONFIG
    assert row(db, applied.id).status == "applied"
    r = run_agent("self-heal", "improvements", "--home", str(versioned))
    assert f"recovered interrupted rollback of {applied.id}: finished" in r.stderr
    state = row(db, applied.id)
    assert state.status == "rolled_back" and state.rollback_sha == revert and state.pending_op is None


def test_a_commit_that_finds_the_database_busy_leaves_no_open_transaction(tmp_path):
    path = tmp_path / "h.db"
    connect(path, create=True).close()
    ours = sqlite3.connect(str(path), isolation_level=None, timeout=0)
    reader = sqlite3.connect(str(path), isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM runs").fetchone()  # a reader's SHARED lock: our COMMIT cannot finish
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        with write_transaction(ours):
            ours.execute("INSERT INTO selfheal_state(key, value) VALUES ('k', 'v')")
    assert not ours.in_transaction  # so the caller may simply try again
    reader.execute("ROLLBACK")
    with write_transaction(ours):
        ours.execute("INSERT INTO selfheal_state(key, value) VALUES ('k', 'v')")
    assert ours.execute("SELECT value FROM selfheal_state WHERE key = 'k'").fetchone() == ("v",)
