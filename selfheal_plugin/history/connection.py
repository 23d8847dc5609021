"""Access to the runtime's run-history database (spec/run-history-format.md).

We open the runtime's own file while it keeps writing to it, so every connection sets a
busy timeout and every write we make is one short transaction. We never change the
runtime's tables except by adding what the design allows: columns of ``improvements``,
our own ``selfheal_*`` tables and indexes on them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from selfheal_plugin.errors import HistoryError
from selfheal_plugin.history.text import decode_text, is_decode_error

log = logging.getLogger("selfheal.history")

def _busy_timeout_ms() -> int:
    """How long we wait for a runtime's write lock (``SELFHEAL_BUSY_TIMEOUT_MS``, default 10 s)."""
    try:
        return max(0, int(os.environ.get("SELFHEAL_BUSY_TIMEOUT_MS", "10000")))
    except ValueError:
        return 10_000
RUNTIME_SCHEMA_VERSION = 2

RUNTIME_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS conversations (
    id TEXT PRIMARY KEY,
    title TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    workflow_name TEXT NOT NULL,
    task TEXT NOT NULL,
    status TEXT NOT NULL,
    model TEXT NOT NULL,
    started_at TEXT NOT NULL,
    completed_at TEXT,
    duration_ms INTEGER,
    context TEXT,
    error TEXT,
    metadata TEXT
);
CREATE INDEX IF NOT EXISTS idx_runs_started_at ON runs(started_at DESC);
CREATE INDEX IF NOT EXISTS idx_runs_workflow ON runs(workflow_name, started_at DESC);
CREATE INDEX IF NOT EXISTS idx_runs_status ON runs(status, started_at DESC);
CREATE TABLE IF NOT EXISTS run_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    step_index INTEGER NOT NULL,
    event_type TEXT NOT NULL,
    event_data TEXT NOT NULL,
    timestamp TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS idx_run_events_run ON run_events(run_id, step_index, timestamp);
CREATE TABLE IF NOT EXISTS run_metrics (
    run_id TEXT PRIMARY KEY REFERENCES runs(id) ON DELETE CASCADE,
    total_tool_calls INTEGER NOT NULL DEFAULT 0,
    successful_tool_calls INTEGER NOT NULL DEFAULT 0,
    failed_tool_calls INTEGER NOT NULL DEFAULT 0,
    total_iterations INTEGER NOT NULL DEFAULT 0,
    total_tokens_in INTEGER,
    total_tokens_out INTEGER,
    files_read INTEGER NOT NULL DEFAULT 0,
    files_modified INTEGER NOT NULL DEFAULT 0,
    tools_used TEXT,
    step_durations TEXT
);
"""

# The runtime's own, older shape of `improvements`.
RUNTIME_IMPROVEMENTS_TABLE = """CREATE TABLE IF NOT EXISTS improvements (
    id TEXT PRIMARY KEY,
    category TEXT NOT NULL,
    description TEXT NOT NULL,
    related_runs TEXT,
    changes_made TEXT,
    impact TEXT,
    created_at TEXT NOT NULL,
    applied_at TEXT,
    verified_at TEXT,
    status TEXT NOT NULL DEFAULT 'proposed'
)
"""

# Columns the design document's `improvements` has that the runtime's older shape lacks,
# then ours. Added in place with ALTER TABLE so existing rows stay as they are.
IMPROVEMENT_COLUMNS: dict[str, str] = {
    "pattern_id": "TEXT",
    "expected_impact": "TEXT",
    "proposed_at": "TEXT",
    "actual_impact": "TEXT",
    "updated_at": "TEXT",
    "error_type": "TEXT",
    "tool_name": "TEXT",
    "strategy": "TEXT",
    "risk_level": "TEXT",
    "confidence": "REAL",
    "changes_required": "TEXT",  # JSON array of strings
    "changes": "TEXT",  # JSON array of change objects
    "test_result": "TEXT",  # JSON
    "commit_sha": "TEXT",
    "verification_scheduled": "TEXT",
    "metrics": "TEXT",  # JSON of the last verification
    "pending_op": "TEXT",  # JSON intent of an apply/rollback in progress
    "rollback_sha": "TEXT",
    "rolled_back_at": "TEXT",
    "evidence": "TEXT",  # JSON: the strategy's data behind a proposal (expected_reduction, fits, counts)
    "apply_record": "TEXT",  # JSON: file, repo, previous values, tables created (for rollback)
    "experiment": "TEXT",  # JSON: a canary/shadow test (section, fraction, started_at, commits)
}

SELFHEAL_SCHEMA = """
CREATE TABLE IF NOT EXISTS selfheal_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS selfheal_errors (
    event_id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL,
    step_index INTEGER,
    ts REAL NOT NULL,
    timestamp TEXT NOT NULL,
    tool_name TEXT NOT NULL,
    error_type TEXT NOT NULL,
    raw_error_type TEXT,
    message TEXT NOT NULL,
    template TEXT NOT NULL,
    duration_ms INTEGER,
    arg_keys TEXT NOT NULL  -- argument names of the call, joined by U+001F
);
CREATE INDEX IF NOT EXISTS idx_selfheal_errors_ts ON selfheal_errors(ts);
CREATE INDEX IF NOT EXISTS idx_selfheal_errors_sig ON selfheal_errors(error_type, tool_name, ts);
CREATE TABLE IF NOT EXISTS selfheal_tool_hours (
    tool_name TEXT NOT NULL,
    hour INTEGER NOT NULL,
    calls INTEGER NOT NULL,
    PRIMARY KEY (tool_name, hour)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS selfheal_calls (  -- every well-formed tool call (history.errorindex)
    event_id INTEGER PRIMARY KEY,  -- its tool_complete
    tool_name TEXT NOT NULL,
    run_id TEXT NOT NULL,
    jd REAL NOT NULL,  -- julianday() of its timestamp
    ok INTEGER NOT NULL,
    duration,  -- the JSON duration when a number >= 0, as written (integer or real)
    error_type TEXT,  -- normalised, failed calls only
    args_key TEXT,  -- a hash of its tool_start's arguments (JSON text), NULL when none was found
    arguments TEXT  -- failed calls only: that JSON text, when at most MAX_ARGUMENT_CHARS
);
CREATE INDEX IF NOT EXISTS idx_selfheal_calls_tool ON selfheal_calls(tool_name, event_id, ok, duration);
CREATE TABLE IF NOT EXISTS selfheal_rules (  -- fix rules (history.rules)
    id TEXT PRIMARY KEY,
    failure_kind TEXT NOT NULL,
    error_type TEXT,
    description TEXT NOT NULL,
    template TEXT NOT NULL,     -- JSON array of change templates
    evidence TEXT NOT NULL,     -- JSON object: origin -> measured effect
    enabled INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS selfheal_tool_errors (
    tool_name TEXT PRIMARY KEY,
    errors INTEGER NOT NULL,  -- rows of selfheal_errors with this tool
    max_event_id INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS selfheal_evidence (
    pattern_id TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,  -- JSON: what the evidence was computed from (analysis/evidencecache.py)
    evidence TEXT NOT NULL,  -- JSON: the pattern's evidence
    paths TEXT NOT NULL  -- JSON: every path the messages name, with exists_now when computed
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS selfheal_error_kinds (
    event_id INTEGER PRIMARY KEY,  -- a row of selfheal_errors
    label TEXT,  -- the runtime's label the kind was read with
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    codes TEXT NOT NULL,  -- JSON: the codes in the message
    named TEXT NOT NULL  -- JSON: the argument of the call (or path) the message names, null when none
);
CREATE TABLE IF NOT EXISTS selfheal_followups (  -- what came after each failed call (history.errorindex)
    event_id INTEGER PRIMARY KEY,  -- a row of selfheal_errors
    tool_name TEXT NOT NULL,
    run_id TEXT NOT NULL,
    args_key TEXT,  -- the key of its call's arguments, as selfheal_calls.args_key
    follow INTEGER,  -- the outcome of the next call of its tool in its run (1 ok, 0 failed), NULL while none
    repeat INTEGER,  -- the outcome of the next call of its tool with the same arguments, NULL while none
    repeat_run INTEGER  -- 1 when that call was in the same run
);
CREATE INDEX IF NOT EXISTS idx_selfheal_followups_run ON selfheal_followups(run_id) WHERE follow IS NULL;
CREATE INDEX IF NOT EXISTS idx_selfheal_followups_args ON selfheal_followups(args_key) WHERE repeat IS NULL;
CREATE TABLE IF NOT EXISTS selfheal_bad_calls (  -- the tool_complete rows the index refused (history.errorindex)
    event_id INTEGER PRIMARY KEY,
    jd REAL  -- julianday() of its timestamp, NULL when it has none
);
CREATE TABLE IF NOT EXISTS selfheal_signatures (
    key TEXT PRIMARY KEY,  -- JSON: what the window's failures were (analysis/windowcache.py)
    value TEXT NOT NULL  -- JSON: the signatures detect grouped them into
);
"""

SELFHEAL_TABLES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SELFHEAL_SCHEMA))

REQUIRED_TABLES = ("runs", "run_events")

# The columns a file must have to be the runtime's history (spec/run-history-format.md).
# A file whose tables lack them is another program's database: we refuse it and write
# nothing to it (no selfheal tables, no migration).
REQUIRED_COLUMNS: dict[str, frozenset[str]] = {
    "runs": frozenset({"id", "workflow_name", "task", "status", "model", "started_at", "completed_at",
                       "duration_ms", "context", "error", "metadata"}),
    "run_events": frozenset({"id", "run_id", "step_index", "event_type", "event_data", "timestamp"}),
    # only when present: the runtime's own older shape, which we migrate in place
    "improvements": frozenset({"id", "category", "description", "created_at", "status"}),
}
SQLITE_HEADER = b"SQLite format 3\x00"
# `PRAGMA quick_check` reads every page (~3 ms per MB here, and it cannot be stopped
# half-way: the b-tree walk is one VM step). It runs on every open of a file up to this
# size (~0.1 s); a larger file is not checked up front, and damage in it is reported as
# one line when a read reaches it (is_corrupt_error).
QUICK_CHECK_MAX_BYTES = 32 << 20

# ---------------------------------------------------------------- error types

CANONICAL_ERROR_TYPES = (
    "timeout", "connection_refused", "server_crashed", "transport_error", "tool_error",
    "permission_denied", "Unknown",
)
_SPELLINGS = {t.replace("_", "").lower(): t for t in CANONICAL_ERROR_TYPES}


def normalize_error_type(value: Any) -> str:
    """One name per error type, whatever spelling wrote it.

    ``timeout``/``Timeout`` → ``timeout``, ``ConnectionRefused`` → ``connection_refused``;
    absent, null, empty and ``Unknown`` → ``Unknown``. Types we do not know are kept,
    in snake_case, so that ``RateLimited`` and ``rate_limited`` still meet.

    A normalised type never holds ``:`` (written as ``_``, like ``-`` and spaces): pattern
    ids are ``error_type:tool_name`` and tool names may hold ``:``, so the first ``:`` of
    an id always ends its type (see ``analysis.patterns.split_pattern_id``).
    """
    if value is None or not isinstance(value, str) or not value.strip():
        return "Unknown"
    text = value.strip().replace(":", "_")
    key = text.replace("_", "").replace("-", "").replace(" ", "").lower()
    if key in _SPELLINGS:
        return _SPELLINGS[key]
    out = []
    for i, ch in enumerate(text.replace("-", "_").replace(" ", "_")):
        if ch.isupper() and i and (text[i - 1].islower() or text[i - 1].isdigit()):
            out.append("_")
        out.append(ch.lower())
    return "".join(out)


_RUNTIME_LABELS = (
    ("timeout", ("timed out", "deadline has elapsed")),
    ("connection_refused", ("connection refused", "no such file or directory", "failed to connect")),
    ("server_crashed", ("broken pipe", "connection reset", "aborted", "process exited")),
    ("transport_error", ("failed to parse", "serialization", "protocol")),
)


def server_of(tool: str) -> str | None:
    """``mcp__kubernetes__pods_list`` → ``kubernetes`` (the runtime's MCP tool naming);
    None for a built-in tool."""
    if isinstance(tool, str) and tool.startswith("mcp__"):
        server, sep, rest = tool[5:].partition("__")
        if sep and server and rest:
            return server
    return None


# How ToolPolicy's own refusals begin: a call it stopped before it reached the tool (a failed
# preflight check, an open circuit breaker). Still failed calls of the tool in the history,
# with the runtime's label; verification counts them apart (the fix working, not the fault).
PREFLIGHT_REFUSAL = "Preflight check "
BREAKER_REFUSAL = "Circuit breaker open for "
REFUSAL_PREFIXES = (PREFLIGHT_REFUSAL, BREAKER_REFUSAL)


def classify_error(message: str) -> str:
    """The runtime's own label for a failed call's message (first match wins)."""
    low = (message or "").lower()
    for label, needles in _RUNTIME_LABELS:
        if any(n in low for n in needles):
            return label
    return "tool_error"


# ---------------------------------------------------------------- connections


def _configure(conn: sqlite3.Connection) -> sqlite3.Connection:
    conn.row_factory = sqlite3.Row
    # invalid UTF-8 written by the runtime reads as an Undecodable string, never an error
    conn.text_factory = decode_text
    conn.execute(f"PRAGMA busy_timeout = {_busy_timeout_ms()}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def connect(db_path: Path | str, *, create: bool = False) -> sqlite3.Connection:
    """Open the runtime's database, ready for our reads and short writes.

    ``create=True`` makes a new file with the runtime's schema when none exists (or the
    file is empty). Otherwise a missing file raises :class:`HistoryError`. A file that is
    not SQLite, whose tables are not the runtime's (another program's database), or that
    is damaged (``PRAGMA quick_check``, on files up to :data:`QUICK_CHECK_MAX_BYTES`) is refused
    with one line, before anything is written to it.
    """
    path = Path(db_path)
    if not path.exists():
        if not create:
            raise HistoryError(f"no run history at {path} (use --home, --db or BINKS_HOME)")
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # isolation_level=None: we open transactions ourselves and keep them short.
        conn = _configure(sqlite3.connect(str(path), timeout=_busy_timeout_ms() / 1000, isolation_level=None,
                                          check_same_thread=False))
    except sqlite3.DatabaseError as exc:
        raise _open_error(path, exc) from exc
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()]
        # columns of the tables we judge only (another program's table names are not SQL)
        tables = {n: [r[0] for r in conn.execute("SELECT name FROM pragma_table_info(?)", (n,))]
                  if n in REQUIRED_COLUMNS else [] for n in names}
        if create and not tables:
            create_runtime_schema(conn)
            ensure_selfheal_schema(conn)
            return conn
        problem = schema_problem(tables)
        if problem:
            raise HistoryError(f"{path} {problem}: not an agent run history; nothing was written to it")
        damage = quick_check(conn)
        if damage:
            raise HistoryError(f"{path} is damaged ({damage}); nothing was written to it "
                               "(restore a backup or run sqlite3's .recover)")
        ensure_selfheal_schema(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise _open_error(path, exc) from exc
    except BaseException:
        conn.close()
        raise
    return conn


def file_identity(path: Path | str) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of the file at ``path``, None when there is none. A connection
    opened on a file that the runtime has since replaced (deleted and recreated, or renamed
    over) keeps reading the old one: long-lived readers compare this to reopen."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _not_sqlite(path: Path) -> bool:
    """Whether the file at ``path`` does not start with SQLite's header. Only asked after
    SQLite refused the file: closing any descriptor of a file drops every POSIX lock this
    process holds on it, so reading a healthy database beside our open connections would
    let another process take it for unused and delete the WAL index under them."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_HEADER))
    except OSError:
        return False
    return bool(head) and head != SQLITE_HEADER


def _open_error(path: Path, exc: sqlite3.DatabaseError) -> HistoryError:
    if is_busy_error(exc):
        return HistoryError(BUSY_MESSAGE)
    if is_readonly_error(exc):  # e.g. our tables are not there yet and cannot be added
        return HistoryError(readonly_message(path))
    if getattr(exc, "sqlite_errorname", "").startswith("SQLITE_CANTOPEN"):
        what = "it is a directory" if path.is_dir() else "check that this user can read and write it and its folder"
        return HistoryError(f"cannot open {path}: {what}")
    if is_corrupt_error(exc):
        if _not_sqlite(path):
            return HistoryError(f"{path} is not a run-history database: not an SQLite file")
        return HistoryError(f"{path} is damaged ({one_line(exc)}); nothing was written to it")
    return HistoryError(f"{path} is not a run-history database: {one_line(exc)}")


def schema_problem(tables: dict[str, list[str]]) -> str | None:
    """Why tables (name → columns) are not the runtime's history, or None when they are."""
    missing = [t for t in REQUIRED_TABLES if t not in tables]
    if missing:
        return f"has no {' or '.join(missing)} table"
    for table, needed in REQUIRED_COLUMNS.items():
        if table in tables:
            lacking = sorted(needed - set(tables[table]))
            if lacking:
                return f"has a {table} table without the runtime's column(s) {', '.join(lacking)}"
    return None


def quick_check(conn: sqlite3.Connection, attempts: int = 3) -> str | None:
    """The first problem ``PRAGMA quick_check`` finds, or None (also for a main file over
    :data:`QUICK_CHECK_MAX_BYTES`, which is not checked).

    A problem must show in each of ``attempts`` checks, a moment apart: while the runtime
    switches the file to WAL or checkpoints, a check can fail to read a page of a healthy
    file ("unable to get the page. error code=522"), and a healthy file is never refused.
    """
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    try:
        if path and os.path.getsize(path) > QUICK_CHECK_MAX_BYTES:
            return None
    except OSError:
        pass
    problem = None
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(0.05 * attempt)
        rows = conn.execute("PRAGMA quick_check(1)").fetchall()
        result = " ".join(str(r[0]) for r in rows).replace("*** in database main ***", "").strip()
        if result == "ok":
            return None
        problem = one_line(result)
        log.debug("quick_check of %s: %s", path, problem)
    return problem


def one_line(value: object, limit: int = 200) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def is_corrupt_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the file is damaged or not a database (SQLITE_CORRUPT/NOTADB)."""
    return isinstance(exc, sqlite3.DatabaseError) and any(
        w in str(exc).lower() for w in ("malformed", "file is not a database", "corrupt"))


def wellformed_run_sql(alias: str = "") -> str:
    """SQL that is 1 for a ``runs`` row we can read: its id, workflow_name and status are
    text and its started_at is text SQLite reads as an instant. SQLite stores what it is
    given whatever the declared type (a BLOB id or start is possible); any other row is
    damage, skipped by every reader of ``runs`` and counted (:func:`malformed_runs`)."""
    p = f"{alias}." if alias else ""
    return (f"(typeof({p}id) = 'text' AND typeof({p}workflow_name) = 'text' AND typeof({p}status) = 'text' "
            f"AND typeof({p}started_at) = 'text' AND julianday({p}started_at) IS NOT NULL)")


def malformed_runs(conn: sqlite3.Connection) -> int:
    """How many ``runs`` rows :func:`wellformed_run_sql` refuses (``skipped_runs``)."""
    return int(conn.execute(f"SELECT count(*) FROM runs WHERE NOT {wellformed_run_sql()}").fetchone()[0])


def last_event_id(conn: sqlite3.Connection) -> int:
    """The largest ``run_events`` id (0 for none): where a scan of the events ends."""
    return int(conn.execute("SELECT coalesce(max(id), 0) FROM run_events").fetchone()[0])


def scan_id_range(conn: sqlite3.Connection, sql: str, lo: int, hi: int, *params: Any) -> Iterator[Any]:
    """Rows of ``sql`` for the id range (lo, hi] of a table, fast and never failing on
    invalid UTF-8.

    ``sql`` takes ``lo`` and ``hi`` as its first two parameters and returns the id as its
    first column, ascending. Text is decoded by sqlite3's C decoder (our lenient text
    factory costs ~15 % of a full scan); at the first row with invalid UTF-8 the scan
    goes on after the last good id with :func:`~selfheal_plugin.history.text.decode_text`,
    so that row's text arrives as an ``Undecodable`` string. Do not use ``conn`` for
    anything else while iterating.
    """
    last = lo
    factory = conn.text_factory
    conn.text_factory = str
    try:
        for row in conn.execute(sql, (lo, hi, *params)):
            last = row[0]
            yield row
        return
    except sqlite3.OperationalError as exc:
        if not is_decode_error(exc):
            raise
    finally:
        conn.text_factory = factory
    conn.text_factory = decode_text
    try:
        rest = conn.execute(sql, (last, hi, *params)).fetchall()
    finally:
        conn.text_factory = factory
    yield from rest


def read_all(conn: sqlite3.Connection, sql: str, params: Any = ()) -> list[tuple]:
    """Every row of ``sql`` as a plain tuple, text decoded by sqlite3's C decoder (our
    lenient text factory is a Python call per text value); a row with invalid UTF-8 makes the
    read start again with :func:`~selfheal_plugin.history.text.decode_text`, so that its
    text arrives as an ``Undecodable`` string."""
    factory, rows = conn.text_factory, conn.row_factory
    conn.row_factory = None
    try:
        conn.text_factory = str
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if not is_decode_error(exc):
                raise
        conn.text_factory = decode_text
        return conn.execute(sql, params).fetchall()
    finally:
        conn.text_factory, conn.row_factory = factory, rows


BUSY_MESSAGE = ("the run-history database is busy (another process holds its write lock); "
                "nothing was changed, try again")


def is_readonly_error(exc: BaseException) -> bool:
    """Whether ``exc`` says this process cannot write the history: the file is read-only for
    it, or its folder is (no journal, no ``-wal``/``-shm`` can be made): SQLITE_READONLY*."""
    return isinstance(exc, sqlite3.OperationalError) and (
        str(getattr(exc, "sqlite_errorname", "")).startswith("SQLITE_READONLY")
        or "readonly database" in str(exc).lower())


def readonly_message(path: Path | str) -> str:
    """The one line for a history this user cannot write, where a command must write it."""
    return (f"the history is read-only ({path}): this user cannot write the file or its folder, and this "
            "command must write to it (its error index, an improvement's record); nothing was changed")


def check_writable(conn: sqlite3.Connection) -> None:
    """Raise :class:`HistoryError` (:func:`readonly_message`) unless this connection can write
    the history: a row of our own state is written and rolled back (a real page write, so a
    folder that refuses the journal fails here too). Asked before a command changes anything
    outside the database (a repository, a commit) that a refused database write would strand."""
    try:
        with write_transaction(conn):
            conn.execute("INSERT OR REPLACE INTO selfheal_state(key, value) VALUES ('write-check', '')")
            raise _Probe
    except _Probe:
        return
    except sqlite3.OperationalError as exc:
        if is_readonly_error(exc) or str(getattr(exc, "sqlite_errorname", "")).startswith("SQLITE_CANTOPEN"):
            path = conn.execute("PRAGMA database_list").fetchone()[2]
            raise HistoryError(readonly_message(path)) from None
        raise


class _Probe(Exception):
    """Ends :func:`check_writable`'s transaction with a rollback."""


def is_busy_error(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and any(
        w in str(exc).lower() for w in ("database is locked", "database is busy", "database table is locked"))


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``: take the write lock up front (waiting up to the
    busy timeout), so the transaction cannot fail half-way on lock upgrade."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    try:
        conn.execute("COMMIT")
    except BaseException:
        # a COMMIT that could not get its lock (SQLITE_BUSY) leaves the transaction open:
        # end it, so the caller may try again and nothing half-done stays pending
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def create_runtime_schema(conn: sqlite3.Connection) -> None:
    """The runtime's schema version 2, exactly as it creates it."""
    with write_transaction(conn):
        for stmt in RUNTIME_SCHEMA.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        conn.execute(RUNTIME_IMPROVEMENTS_TABLE)
        conn.execute("INSERT OR IGNORE INTO schema_version(version) VALUES (?)", (RUNTIME_SCHEMA_VERSION,))


def table_columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def ensure_selfheal_schema(conn: sqlite3.Connection) -> None:
    """Create our tables and migrate ``improvements`` in place (idempotent, one transaction)."""
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    cols = table_columns(conn, "improvements") if "improvements" in have else []
    need_cols = [c for c in IMPROVEMENT_COLUMNS if c not in cols]
    if have >= SELFHEAL_TABLES and "improvements" in have and not need_cols:
        return
    with write_transaction(conn):
        if "improvements" not in have:
            conn.execute(RUNTIME_IMPROVEMENTS_TABLE)
            need_cols = [c for c in IMPROVEMENT_COLUMNS if c not in table_columns(conn, "improvements")]
        for col in need_cols:
            conn.execute(f"ALTER TABLE improvements ADD COLUMN {col} {IMPROVEMENT_COLUMNS[col]}")
        for stmt in SELFHEAL_SCHEMA.split(";"):
            if stmt.strip():
                conn.execute(stmt)


def get_state(conn: sqlite3.Connection, key: str, default: str | None = None) -> str | None:
    row = conn.execute("SELECT value FROM selfheal_state WHERE key = ?", (key,)).fetchone()
    return row[0] if row else default


_warned_state: set[tuple[str, str]] = set()


def get_int_state(conn: sqlite3.Connection, key: str) -> int | None:
    """The integer kept under ``key`` (a watermark, a count), None when there is none.

    ``selfheal_state`` lives in a file other programs write: a value that is not an
    integer's text (``garbage``, a BLOB, ``1e30``) is treated as absent, so the caller
    starts that mark again from scratch as it does for a missing one (and writes it
    anew), with one warning line, once per key and value in a process."""
    value = get_state(conn, key)
    if value is None:
        return None
    if isinstance(value, str) and re.fullmatch(r"[+-]?[0-9]{1,30}", value.strip()):
        return int(value)
    if (key, repr(value)) not in _warned_state:
        _warned_state.add((key, repr(value)))
        log.warning("selfheal_state %s holds %s, not an integer: treated as absent (started again)", key,
                    one_line(repr(value), 60))
    return None


def set_state(conn: sqlite3.Connection, key: str, value: Any) -> None:
    """Upsert one state value; call inside a write transaction."""
    conn.execute(
        "INSERT INTO selfheal_state(key, value) VALUES (?, ?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        (key, value if isinstance(value, str) else json.dumps(value)),
    )


def rows_by_id(conn: sqlite3.Connection, table: str, column: str, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Rows of ``table`` whose ``column`` is one of ``ids``, keyed by it (queried in chunks
    of 500 to stay under SQLite's variable limit)."""
    out: dict[str, dict[str, Any]] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i:i + 500]
        for row in conn.execute(f"SELECT * FROM {table} WHERE {column} IN ({','.join('?' * len(chunk))})", chunk):
            out[row[column]] = dict(row)
    return out


def load_json(text: Any, default: Any = None) -> Any:
    """Parse a JSON column, returning ``default`` for NULL or malformed text."""
    if text is None or text == "":
        return default
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return default
