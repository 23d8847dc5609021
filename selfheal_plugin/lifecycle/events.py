"""What is new in the run history, reported exactly once: ``history_changed`` for new rows
and ``run_failed`` for each newly failed run, across processes and restarts.

Two persisted marks say what is new:

* ``selfheal_state['watch_events_watermark']``: the highest ``run_events.id`` already
  reported by ``history_changed`` (ids are autoincrement and writers are serialised, so
  every id at or below the current maximum is committed);
* ``selfheal_state['watch_runs_floor']``: a ``runs`` rowid below which no run is still
  ``running``; a run only becomes ``failed`` from ``running`` (an ``UPDATE`` of
  ``runs.status``, maybe without any new event), so failed runs are looked for at or above
  the floor only, through the runtime's ``runs(status, started_at)`` index.

Exactly once: a failed run is *claimed* by ``INSERT OR IGNORE`` into
``selfheal_hooked_runs(run_id PRIMARY KEY, ...)`` inside a short write transaction, and
only the process whose insert took effect fires ``run_failed``. The watermark advances in
the same transaction, so two watchers (or a watcher and a runtime calling
:func:`notify_run_finished`) never report the same rows or hook the same run twice, and a
restarted watcher starts where the last one stopped: failures written while no watcher ran
are hooked at start. ``fired_at`` is set after the hooks returned; a claim whose process
died before that (same host, pid gone) is fired again by the next watcher that starts.

When to look is the shell's business: :mod:`selfheal_plugin.daemon.watcher` asks after file
events or by polling.
"""
from __future__ import annotations

import logging
import os
import socket
import sqlite3
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from selfheal_plugin.history.connection import (connect, get_int_state, last_event_id, rows_by_id, set_state,
                                                wellformed_run_sql, write_transaction)
from selfheal_plugin.history.settings import Settings
from selfheal_plugin.history.times import format_timestamp, utcnow
from selfheal_plugin.plugins import manager as plugins

log = logging.getLogger("selfheal.watcher")

WATERMARK_KEY = "watch_events_watermark"
FLOOR_KEY = "watch_runs_floor"

HOOKED_SCHEMA = """
CREATE TABLE IF NOT EXISTS selfheal_hooked_runs (
    run_id TEXT PRIMARY KEY,
    hooked_at TEXT NOT NULL,
    claimed_by TEXT,
    fired_at TEXT
)
"""



def process_tag() -> str:
    """``host:pid``: who claimed a run (a dead claimer's runs are fired again)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def ensure_watch_schema(conn: sqlite3.Connection) -> None:
    """Create ``selfheal_hooked_runs`` when it is missing (idempotent)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='selfheal_hooked_runs'").fetchone():
        return
    with write_transaction(conn):
        conn.execute(HOOKED_SCHEMA)


@dataclass
class CheckResult:
    """What one look at the history found (and this process fired)."""

    new_event_count: int = 0
    new_runs: list[str] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)  # runs this process claimed and hooked
    watermark: int = 0
    initialized: bool = False  # the first watcher on this history set the marks

    @property
    def changed(self) -> bool:
        return bool(self.new_event_count or self.failed_runs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fire(hook: str, **kwargs: Any) -> None:
    plugins.fire(hook, **kwargs)


# ------------------------------------------------------------------ claiming


def _claim(conn: sqlite3.Connection, run_id: str, now: str, tag: str) -> bool:
    cur = conn.execute("INSERT OR IGNORE INTO selfheal_hooked_runs(run_id, hooked_at, claimed_by) VALUES (?, ?, ?)",
                       (run_id, now, tag))
    return cur.rowcount == 1


_unmarked: set[str] = set()  # fired, but fired_at not written yet (the database was locked)
_unmarked_lock = threading.Lock()


def _mark_fired(conn: sqlite3.Connection, run_ids: list[str]) -> None:
    """Record that the hooks of these runs returned. A locked database does not undo the
    firing: the ids are kept and written with the next batch (a restart must not see them
    as unfired claims of a dead process and fire them again)."""
    with _unmarked_lock:
        pending = sorted(_unmarked.union(run_ids))
        if not pending:
            return
        now = format_timestamp(utcnow())
        try:
            with write_transaction(conn):
                conn.executemany("UPDATE selfheal_hooked_runs SET fired_at = ? WHERE run_id = ?",
                                 [(now, r) for r in pending])
        except sqlite3.OperationalError as exc:
            _unmarked.update(pending)
            log.warning("could not record %d fired run(s) yet (%s); will retry", len(pending), exc)
            return
        _unmarked.clear()


def _fire_failed(conn: sqlite3.Connection, settings: Settings, run_ids: list[str]) -> None:
    rows = rows_by_id(conn, "runs", "id", run_ids)
    fired = []
    for run_id in run_ids:
        run = rows.get(run_id)
        if run is None:  # deleted since it was claimed
            fired.append(run_id)
            continue
        log.info("run %s (%s) failed: firing run_failed", run_id, run.get("workflow_name"))
        _fire("run_failed", run=run, settings=settings)
        fired.append(run_id)
    _mark_fired(conn, fired)


def notify_run_finished(db: str | os.PathLike | sqlite3.Connection, run_id: str, settings: Settings) -> bool:
    """Fire ``run_failed`` for ``run_id`` now, from the process that ran it.

    For a Python runtime that knows when a run ended and does not want to wait for a
    watcher: call it after the run's final status is committed. When the run is ``failed``
    and no one hooked it yet, it is claimed in ``selfheal_hooked_runs`` (the same claim a
    watcher makes) and ``run_failed`` fires in this process; returns True. A run that did
    not fail, or that a watcher or an earlier call already hooked, returns False. So a
    runtime calling this and a watcher running at the same time still hook each run once.

    :param db: the history's path, or an open connection (from :func:`history.connect`).
    """
    conn = db if isinstance(db, sqlite3.Connection) else connect(Path(db))
    try:
        ensure_watch_schema(conn)
        row = conn.execute(f"SELECT status FROM runs WHERE id = ? AND {wellformed_run_sql()}", (run_id,)).fetchone()
        if row is None or row[0] != "failed":
            return False
        with write_transaction(conn):
            claimed = _claim(conn, run_id, format_timestamp(utcnow()), process_tag())
        if claimed:
            _fire_failed(conn, settings, [run_id])
        return claimed
    finally:
        if not isinstance(db, sqlite3.Connection):
            conn.close()


def recover_unfired(conn: sqlite3.Connection, settings: Settings) -> list[str]:
    """Fire ``run_failed`` for runs claimed by a process on this host that died before its
    hooks returned (``fired_at`` NULL, pid gone). Each is re-claimed atomically first, so
    two watchers starting at once fire it once."""
    host = socket.gethostname()
    tag = process_tag()
    mine: list[str] = []
    rows = conn.execute("SELECT run_id, claimed_by FROM selfheal_hooked_runs WHERE fired_at IS NULL").fetchall()
    for run_id, claimer in rows:
        c_host, _, c_pid = (claimer or "").rpartition(":")
        if c_host != host or not c_pid.isdigit() or int(c_pid) == os.getpid() or _alive(int(c_pid)):
            continue
        with write_transaction(conn):
            cur = conn.execute("UPDATE selfheal_hooked_runs SET claimed_by = ? WHERE run_id = ? AND claimed_by = ? "
                               "AND fired_at IS NULL", (tag, run_id, claimer))
        if cur.rowcount == 1:
            mine.append(run_id)
    if mine:
        log.warning("firing run_failed for %d run(s) whose watcher stopped before its hooks returned", len(mine))
        _fire_failed(conn, settings, mine)
    return mine


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------ one look at the history

_FAILED_SQL = f"""
SELECT id FROM runs
WHERE status = 'failed' AND rowid >= ? AND {wellformed_run_sql()}
  AND NOT EXISTS (SELECT 1 FROM selfheal_hooked_runs h WHERE h.run_id = runs.id)
ORDER BY rowid
"""


def _floor(conn: sqlite3.Connection, lower: int) -> int:
    """The lowest rowid at or above ``lower`` of a run still ``running``, else max rowid + 1."""
    row = conn.execute("SELECT min(rowid) FROM runs WHERE status = 'running' AND rowid >= ?", (lower,)).fetchone()
    if row[0] is not None:
        return int(row[0])
    return int(conn.execute("SELECT coalesce(max(rowid), 0) FROM runs").fetchone()[0]) + 1


def check_history(conn: sqlite3.Connection, settings: Settings, *, fire: bool = True) -> CheckResult:
    """Read what is new past the persisted marks, claim it, and fire the hooks.

    ``history_changed`` fires once for the claimed range of new events (plus newly failed
    runs), then ``run_failed`` once per run this call claimed. The first call on a history
    without marks only sets them (the past is periodic detection's business) and returns
    ``initialized=True``. Safe to call from several processes at once.
    """
    top = last_event_id(conn)
    # a mark missing or unreadable (connection.get_int_state): set again, as on the first call
    mark, floor = get_int_state(conn, WATERMARK_KEY), get_int_state(conn, FLOOR_KEY)
    if mark is not None and floor is not None:
        if (top == mark and _floor(conn, floor) == floor
                and not conn.execute(_FAILED_SQL, (floor,)).fetchone()):
            return CheckResult(watermark=mark)  # nothing new: no write lock taken
    result = CheckResult()
    now = format_timestamp(utcnow())
    tag = process_tag()
    with write_transaction(conn):
        top = last_event_id(conn)
        max_rowid = int(conn.execute("SELECT coalesce(max(rowid), 0) FROM runs").fetchone()[0])
        mark, floor = get_int_state(conn, WATERMARK_KEY), get_int_state(conn, FLOOR_KEY)
        if mark is None or floor is None:
            # The first watcher on this history: what failed before it is history, left to
            # periodic detection; runs failed above the floor are marked as seen, not fired.
            floor = _floor(conn, 0)
            conn.execute("INSERT OR IGNORE INTO selfheal_hooked_runs(run_id, hooked_at, claimed_by, fired_at) "
                         f"SELECT id, ?, 'baseline', ? FROM runs WHERE status = 'failed' AND rowid >= ? "
                         f"AND {wellformed_run_sql()}",
                         (now, now, floor))
            set_state(conn, WATERMARK_KEY, str(top))
            set_state(conn, FLOOR_KEY, str(floor))
            return CheckResult(watermark=top, initialized=True)
        stored_floor = floor
        if top < mark:  # run_events was emptied or replaced: read it again from the start
            log.warning("run_events shrank below the watermark (%d < %d): rereading from the start", top, mark)
            mark = 0
        if max_rowid + 1 < floor:  # runs was emptied or replaced
            floor = 0
        for (run_id,) in conn.execute(_FAILED_SQL, (floor,)).fetchall():
            if _claim(conn, run_id, now, tag):
                result.failed_runs.append(run_id)
        new_floor = _floor(conn, floor)
        if top != mark:
            set_state(conn, WATERMARK_KEY, str(top))
        if new_floor != floor or stored_floor != floor:
            set_state(conn, FLOOR_KEY, str(new_floor))
    result.watermark = top
    if top > mark:  # rows in (mark, top] are ours to report; they are committed and immutable
        counts = conn.execute("SELECT run_id, count(*) FROM run_events WHERE id > ? AND id <= ? GROUP BY run_id "
                              "ORDER BY min(id)", (mark, top)).fetchall()
        result.new_runs = [r[0] for r in counts]
        result.new_event_count = sum(r[1] for r in counts)
    for run_id in result.failed_runs:
        if run_id not in result.new_runs:
            result.new_runs.append(run_id)
    if result.changed:
        log.info("history changed: %d new event(s) in %d run(s), %d newly failed run(s)",
                 result.new_event_count, len(result.new_runs), len(result.failed_runs))
    if fire and result.changed:
        _fire("history_changed", new_runs=list(result.new_runs), new_event_count=result.new_event_count,
              settings=settings)
    if result.failed_runs:
        if fire:
            _fire_failed(conn, settings, result.failed_runs)
        else:
            _mark_fired(conn, result.failed_runs)
    return result


# ------------------------------------------------------------------ the watcher


def retry_marking(conn: sqlite3.Connection) -> None:
    """Write ``fired_at`` for runs whose hooks fired while the database was locked."""
    if _unmarked:
        _mark_fired(conn, [])
