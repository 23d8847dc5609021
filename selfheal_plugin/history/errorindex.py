"""An incremental index of failed tool calls, kept in our own tables of the history file.

Reading a history of millions of events means parsing JSON for every ``tool_complete``.
We do that once: each command first ingests only the ``run_events`` rows past a persisted
watermark (``run_events.id`` is monotonic), in id-range chunks so no read holds the file
for long, and stores

* one row per failed call in ``selfheal_errors`` (normalised type, message template,
  argument keys of the matching ``tool_start``, instant as epoch seconds), and
* one row per call in ``selfheal_calls`` (tool, run, instant, outcome, duration, a hash of
  the arguments of its ``tool_start``, and the arguments themselves for a failed call): what
  the evidence of a pattern, the strategies' :class:`~selfheal_plugin.plugins.strategy.HistoryWindow`,
  the duration model and the dashboard read, so that none of them parses the history's JSON
  again, and
* per tool and hour, the number of calls in ``selfheal_tool_hours``, and
* per tool, the number of failed calls and the latest one's id in ``selfheal_tool_errors``
  (what a stored evidence of a pattern depends on, see analysis/evidencecache.py), and
* per failed call, what came after it (``selfheal_followups``): the outcome of the next
  call of its tool in its run, and of the next call of its tool with the same arguments
  (and whether that one was in the same run). A question stays open (NULL) until a call
  answers it; the calls of each chunk answer the open ones of their runs and arguments, so
  the evidence's determinism reads the answers instead of looking through the calls.

A call is paired with the latest ``tool_start`` of its run and tool before it, at most
:data:`START_LOOKBACK_IDS` ids before it and not paired with an earlier call: a rule of the
two rows alone, so the index is the same whether the history was ingested at once or in
pieces (each piece's scan starts that many ids early, for the starts alone).

A warm command then reads only the window it needs from small, indexed tables.
Malformed ``tool_complete`` rows are counted once in ``selfheal_state`` and skipped:
invalid JSON, no tool name, an unparsable timestamp, invalid UTF-8 in what we read, a run
id that is not text, a ``duration`` that is not a finite number within
:data:`MAX_DURATION_MS`, or an ``event_data`` over :data:`MAX_EVENT_BYTES` (see
:func:`wellformed_sql`, which the other readers of ``run_events`` share); each with its
instant in ``selfheal_bad_calls``, which the dashboard counts per window. Stored messages
are cut to :data:`MAX_MESSAGE_CHARS`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sqlite3
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from selfheal_plugin.history.connection import (SELFHEAL_SCHEMA, get_int_state, get_state, last_event_id,
                                                 normalize_error_type, scan_id_range, set_state, write_transaction)
from selfheal_plugin.history.text import Undecodable, bounded
from selfheal_plugin.history.times import to_epoch

log = logging.getLogger("selfheal.errorindex")

CHUNK_IDS = 200_000
INDEX_VERSION = "13"
# What the index and what is computed from it keep: dropped when the version changes,
# emptied when the history is replaced.
INDEX_TABLES = ("selfheal_errors", "selfheal_tool_hours", "selfheal_calls", "selfheal_bad_calls", "selfheal_tool_errors",
                "selfheal_evidence", "selfheal_signatures", "selfheal_error_kinds", "selfheal_followups")

# Bounds past which a row is not a tool call but damage (counted and skipped everywhere).
MAX_EVENT_BYTES = 8 << 20  # 8 MiB of event JSON: past what a tool call returns (a file read of a few MB is fine)
MAX_DURATION_MS = 30 * 86_400_000  # a tool call of more than 30 days
MAX_MESSAGE_CHARS = 4000  # what we keep of a failure's message (templates keep 500)
MAX_ARGUMENT_CHARS = 65_536  # a failed call's arguments kept for the evidence (longer: only their hash)
START_LOOKBACK_IDS = 10_000  # how far before its tool_complete a call's tool_start may be


def wellformed_sql(col: str) -> str:
    """SQL that is 1 when the JSON text in ``col`` is a row we can read: at most
    :data:`MAX_EVENT_BYTES`, valid JSON, and a numeric ``duration`` (when there is one)
    within ±:data:`MAX_DURATION_MS` (``1e30`` or ``1e400`` is damage, not a duration).
    The size test comes first, so an oversized row is never parsed."""
    duration = f"json_extract({col}, '$.duration')"
    return (f"(CASE WHEN length(CAST({col} AS BLOB)) > {MAX_EVENT_BYTES} THEN 0 "
            f"WHEN NOT json_valid({col}) THEN 0 "
            f"WHEN json_type({col}, '$.duration') IN ('integer', 'real') "
            f"THEN {duration} >= -{MAX_DURATION_MS} AND {duration} <= {MAX_DURATION_MS} ELSE 1 END)")


def sane_duration(value: object) -> bool:
    """A JSON ``duration`` we accept: absent/non-numeric, or finite within the bound
    (the same rule as :func:`wellformed_sql`, for rows parsed in Python)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return True
    return math.isfinite(value) and -MAX_DURATION_MS <= value <= MAX_DURATION_MS

# Masks applied to error messages, in order, so that the same failure with other paths,
# numbers or ids becomes one template.
_MASKS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"), "<id>"),
    (re.compile(r"https?://\S+"), "<url>"),
    (re.compile(r"(?:~|\.{1,2})?(?:/[\w.@+-]+)+/?"), "<path>"),
    (re.compile(r"\b[0-9a-fA-F]{12,}\b"), "<hex>"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    (re.compile(r"\d+(?:\.\d+)?"), "<n>"),
)
_TOKEN = re.compile(r"<\w+>|[A-Za-z_]+")


def message_template(message: str) -> str:
    """``"open /tmp/a.txt failed after 3 tries"`` → ``"open <path> failed after <n> tries"``."""
    text = (message or "").strip()
    for pattern, repl in _MASKS:
        text = pattern.sub(repl, text)
    return " ".join(text.split())[:500]


def template_tokens(template: str) -> set[str]:
    return {t.lower() for t in _TOKEN.findall(template)}


@dataclass
class RefreshResult:
    scanned_rows: int
    new_errors: int
    new_bad_rows: int
    total_bad_rows: int


_HOUR = "CAST((julianday({t}) - 2440587.5) * 24 AS INTEGER)"

# The failed calls among ``ids`` (those _read_calls found failed). `instr(..., 'true')` is a
# cheap, exact prefilter (a failed call's JSON holds the literal `true`). Each comes with the
# tool and hour the hour counts filed it under, so that a row found malformed here can be
# moved from those counts to the malformed ones.
_ERRORS_SQL = f"""
SELECT e.id, e.run_id, e.step_index, e.timestamp, e.event_data,
  json_extract(e.event_data, '$.name') AS tool, {_HOUR.format(t='e.timestamp')} AS hour,
  json_type(e.event_data, '$.name'), json_extract(e.event_data, '$.error_type'),
  json_type(e.event_data, '$.result'), json_extract(e.event_data, '$.result'),
  json_extract(e.event_data, '$.duration')
FROM run_events e
WHERE e.id IN (SELECT value FROM json_each(?))
  AND e.event_type = 'tool_complete'
  AND instr(e.event_data, 'true') > 0
  AND CASE WHEN {wellformed_sql('e.event_data')} THEN json_extract(e.event_data, '$.is_error') = 1 END
  AND julianday(e.timestamp) IS NOT NULL
ORDER BY e.id
"""

# Tool calls in an id range, with the tool_starts they are paired with. The fields of a row
# are read only when its JSON is (the size test first, so an oversized row is never parsed);
# the rest of wellformed_sql's rule (a sane duration) and the hour are applied in Python, from
# the same values (one JSON parse and one julianday() a row fewer).
_CALLS_SQL = f"""
SELECT id, run_id, event_type,
  CASE WHEN good THEN json_extract(event_data, '$.name') END,
  julianday(timestamp),
  CASE WHEN good AND event_type = 'tool_start' THEN json_extract(event_data, '$.arguments') END,
  CASE WHEN good AND event_type = 'tool_complete' THEN json_extract(event_data, '$.is_error') END,
  CASE WHEN good THEN json_extract(event_data, '$.duration') END,
  CASE WHEN good AND event_type = 'tool_complete' AND json_extract(event_data, '$.is_error') = 1
       THEN json_extract(event_data, '$.error_type') END
FROM (SELECT id, run_id, event_type, event_data, timestamp,
             CASE WHEN length(CAST(event_data AS BLOB)) > {MAX_EVENT_BYTES} THEN 0 ELSE json_valid(event_data) END AS good
      FROM run_events WHERE id > ? AND id <= ? AND event_type IN ('tool_start', 'tool_complete'))
ORDER BY id
"""


def args_key(arguments: str) -> str:
    """The hash ``selfheal_calls.args_key`` of a call's arguments (their JSON text)."""
    return hashlib.blake2b(arguments.encode("utf-8", "replace"), digest_size=16).hexdigest()


def _read_calls(conn: sqlite3.Connection, lo: int, hi: int
                ) -> tuple[dict[tuple[str, int], int], list[tuple[int, float | None]], list[tuple], dict[int, str | None]]:
    """The calls in ids (lo, hi]: per (tool, hour) counts, the malformed ``tool_complete``
    rows (``selfheal_bad_calls`` rows: id, instant), ``selfheal_calls`` rows, and the failed
    ones (``is_error`` 1, malformed or not: id → the arguments of the start paired with it,
    for :func:`_read_errors`). The scan starts :data:`START_LOOKBACK_IDS` early, for the
    starts (and the calls that took them) alone."""
    counted: Counter = Counter()
    failed: dict[int, str | None] = {}
    bad: list[tuple[int, float | None]] = []
    rows: list[tuple] = []
    started: dict[tuple[Any, str], tuple[int, str | None]] = {}
    for (eid, run_id, etype, tool, jd, args, is_error, duration, raw_type) in scan_id_range(
            conn, _CALLS_SQL, max(0, lo - START_LOOKBACK_IDS), hi):
        if not sane_duration(duration) or not isinstance(run_id, str) or isinstance(run_id, Undecodable):
            tool = None  # damage (as wellformed_sql; a run id that is not text, as a failed call's)
        named = isinstance(tool, str) and bool(tool)
        if etype == "tool_start":
            if named:
                started[(run_id, tool)] = (eid, args if isinstance(args, str) else None)
            continue
        start = started.pop((run_id, tool), None) if named else None
        if eid <= lo:
            continue
        text = start[1] if start is not None and eid - start[0] <= START_LOOKBACK_IDS else None
        if is_error == 1:
            failed[eid] = text
        hour = None if jd is None else int((jd - 2440587.5) * 24)  # as _HOUR
        if not _countable(tool, hour):
            bad.append((eid, jd))
            continue
        counted[(tool, hour)] += 1
        ok = is_error != 1
        rows.append((eid, tool, run_id, jd, int(ok),
                     duration if isinstance(duration, (int, float)) and duration >= 0 else None,
                     None if ok else normalize_error_type(raw_type if isinstance(raw_type, str) else None),
                     None if text is None else args_key(text),
                     text if not ok and text is not None and len(text) <= MAX_ARGUMENT_CHARS else None))
    return counted, bad, rows, failed


def refresh(conn: sqlite3.Connection, progress: Callable[[int, int], None] | None = None) -> RefreshResult:
    """Ingest every ``run_events`` row past the watermark. Safe to call from several
    processes: each chunk's rows and the new watermark commit in one transaction, and a
    chunk already ingested by someone else is skipped."""
    if get_state(conn, "errors_index_version") != INDEX_VERSION:
        with write_transaction(conn):  # an index written by another version: rebuild it
            for table in INDEX_TABLES:
                conn.execute(f"DROP TABLE IF EXISTS {table}")
            for stmt in SELFHEAL_SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            for key in ("errors_watermark", "bad_rows", "bad_row_ids"):
                conn.execute("DELETE FROM selfheal_state WHERE key = ?", (key,))
            set_state(conn, "errors_index_version", INDEX_VERSION)
    top = last_event_id(conn)

    def restart() -> bool:
        """The table was emptied or replaced, or our marks are missing, unreadable or negative
        (another program wrote them; ingesting again over the index would count calls twice):
        the index starts again from scratch."""
        mark, bad = get_int_state(conn, "errors_watermark"), get_int_state(conn, "bad_rows")
        return mark is None or bad is None or mark < 0 or bad < 0 or top < mark

    if restart():
        with write_transaction(conn):
            if restart():  # still, under the write lock (another process may have started it)
                for table in INDEX_TABLES:
                    conn.execute(f"DELETE FROM {table}")
                set_state(conn, "errors_watermark", "0")
                set_state(conn, "bad_rows", "0")
    mark = get_int_state(conn, "errors_watermark") or 0
    start, scanned, new_errors, new_bad = mark, 0, 0, 0
    if mark >= top:
        return RefreshResult(0, 0, 0, get_int_state(conn, "bad_rows") or 0)
    while mark < top:
        hi = min(mark + CHUNK_IDS, top)
        # one scan after the other: a worker thread for one of them gained nothing measurable
        # (both do Python work, under one GIL)
        counted, bad, calls, failed = _read_calls(conn, mark, hi)
        errors, unreadable = _read_errors(conn, failed)
        dropped = {event_id: (tool, hour) for event_id, tool, hour in unreadable}
        if dropped:  # the calls above that a closer look finds malformed (the others are counted already)
            for c in calls:
                if c[0] in dropped:
                    counted[dropped[c[0]]] -= 1
                    bad.append((c[0], c[3]))
            calls = [c for c in calls if c[0] not in dropped]
        n_bad = len(bad)
        hours = [(tool, hour, n) for (tool, hour), n in counted.items() if n > 0]
        followups = _followups(conn, calls, errors)
        with write_transaction(conn):
            current = get_int_state(conn, "errors_watermark")
            if current is not None and current != mark:  # another process ingested rows meanwhile: go on from there
                mark = current
                continue
            conn.executemany(
                "INSERT OR IGNORE INTO selfheal_errors VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", errors)
            conn.executemany("INSERT OR IGNORE INTO selfheal_calls VALUES (?,?,?,?,?,?,?,?,?)", calls)
            conn.executemany("INSERT OR IGNORE INTO selfheal_bad_calls VALUES (?,?)", bad)
            conn.executemany("INSERT OR REPLACE INTO selfheal_followups VALUES (?,?,?,?,?,?,?)", followups)
            conn.executemany(
                "INSERT INTO selfheal_tool_hours VALUES (?,?,?) ON CONFLICT(tool_name, hour) DO UPDATE SET "
                "calls = calls + excluded.calls", hours)
            conn.execute(
                "INSERT INTO selfheal_tool_errors SELECT tool_name, count(*), max(event_id) FROM selfheal_errors "
                "WHERE event_id > ? AND event_id <= ? GROUP BY tool_name ON CONFLICT(tool_name) DO UPDATE SET "
                "errors = errors + excluded.errors, max_event_id = max(max_event_id, excluded.max_event_id)",
                (mark, hi))
            if n_bad:
                set_state(conn, "bad_rows", str((get_int_state(conn, "bad_rows") or 0) + n_bad))
                log.info("skipped %d malformed tool_complete row(s) in run_events ids %d..%d", n_bad, mark + 1, hi)
            set_state(conn, "errors_watermark", str(hi))
        new_errors += len(errors)
        new_bad += n_bad
        scanned += hi - mark
        mark = hi
        if progress:
            progress(mark - start, top - start)
    return RefreshResult(scanned, new_errors, new_bad, get_int_state(conn, "bad_rows") or 0)


def indexed_up_to(conn: sqlite3.Connection) -> int:
    """The last ``run_events`` id the index has read: every call up to it is in ``selfheal_calls``."""
    return get_int_state(conn, "errors_watermark") or 0


def followup_ok(tool_name: object, run_id: object, args_key: object, follow: object, repeat: object,
                repeat_run: object) -> bool:
    """Whether a kept follow-up row holds what ingest writes (our table lives in a file
    another program writes: ingest answers no row of another shape, and the evidence reads
    such a row's answers from the calls instead)."""
    return isinstance(tool_name, str) and isinstance(run_id, str) and (args_key is None or isinstance(args_key, str)) \
        and all(v is None or (type(v) is int and v in (0, 1)) for v in (follow, repeat, repeat_run))


def _open_followups(conn: sqlite3.Connection, runs: list[str], keys: list[str]) -> list[list[Any]]:
    """The kept follow-ups still waiting for a call of one of ``runs`` or with one of
    ``keys`` (rows of another shape are left alone: the evidence reads those from the calls)."""
    rows = conn.execute(
        "SELECT event_id, tool_name, run_id, args_key, follow, repeat, repeat_run FROM selfheal_followups "
        "WHERE follow IS NULL AND run_id IN (SELECT value FROM json_each(?)) UNION "
        "SELECT event_id, tool_name, run_id, args_key, follow, repeat, repeat_run FROM selfheal_followups "
        "WHERE repeat IS NULL AND args_key IN (SELECT value FROM json_each(?))", (json.dumps(runs), json.dumps(keys)))
    return [list(r) for r in rows if followup_ok(*r[1:])]


def _followups(conn: sqlite3.Connection, calls: list[tuple], errors: list[tuple]) -> list[list[Any]]:
    """The ``selfheal_followups`` rows to write for a chunk: one per new failed call
    (``errors``), and the kept ones still open that the chunk's ``calls`` answer. The calls
    are walked in id order: each answers the open questions of its run and tool, and of its
    tool and arguments, waiting before it; a failed call then waits itself."""
    key_of = {c[0]: c[7] for c in calls if not c[4]}
    fresh = {e[0]: [e[0], e[5], e[1], key_of.get(e[0]), None, None, None] for e in errors}
    # run -> tool -> the follow-ups waiting for that tool's next call in the run; args key -> tool -> ...
    by_run: dict[str, dict[str, list[list[Any]]]] = {}
    by_key: dict[str, dict[str, list[list[Any]]]] = {}
    changed: dict[int, list[Any]] = {}

    def wait(f: list[Any]) -> None:
        if f[4] is None:
            by_run.setdefault(f[2], {}).setdefault(f[1], []).append(f)
        if f[5] is None and f[3] is not None:
            by_key.setdefault(f[3], {}).setdefault(f[1], []).append(f)

    runs = sorted({c[2] for c in calls})  # text: _read_calls refuses any other run id
    keys = sorted({c[7] for c in calls if c[7] is not None})
    for f in _open_followups(conn, runs, keys) if calls else ():
        wait(f)
    # the failed calls the calls index does not hold wait from their place too (no call of theirs answers)
    alone = sorted(eid for eid in fresh if eid not in key_of)
    at = 0
    for eid, tool, run, _, ok, _, _, key, _ in calls:  # in id order
        while at < len(alone) and alone[at] < eid:
            wait(fresh[alone[at]])
            at += 1
        waiting = by_run.get(run)
        if waiting is not None:
            for f in waiting.pop(tool, ()):
                f[4] = ok
                changed[f[0]] = f
        waiting = by_key.get(key) if key is not None else None
        if waiting is not None:
            for f in waiting.pop(tool, ()):
                f[5], f[6] = ok, int(f[2] == run)
                changed[f[0]] = f
        f = fresh.get(eid)
        if f is not None:
            wait(f)
    for eid in alone[at:]:
        wait(fresh[eid])
    changed.update(fresh)
    return list(changed.values())


def _countable(tool: object, hour: object) -> bool:
    return isinstance(tool, str) and not isinstance(tool, Undecodable) and bool(tool) and isinstance(hour, int)


def _read_errors(conn: sqlite3.Connection, failed: dict[int, str | None]
                 ) -> tuple[list[tuple], list[tuple[int, str, int]]]:
    """The failed calls of ``failed`` (event id → the arguments of its start, as
    :func:`_read_calls` paired them) as ``selfheal_errors`` rows (their argument keys from
    those arguments), and the (event id, tool, hour) of the ones found
    malformed here although the hour counts took them for calls (invalid UTF-8 in the
    message, say). Rows the hour counts find malformed themselves are left to them."""
    rows: list[tuple] = []
    unreadable: list[tuple[int, str, int]] = []
    # The fields are taken apart by SQLite, as the other readers do (a result nested deeper
    # than Python's json parser goes is still a message); the event's whole text is read
    # only to refuse invalid UTF-8 in a failed call, the text we keep.
    if not failed:
        return rows, unreadable
    for (event_id, run_id, step, timestamp, data, tool, hour, name_type, raw_type, result_type, result,
         duration) in conn.execute(_ERRORS_SQL, (json.dumps(sorted(failed)),)):
        try:
            if isinstance(data, Undecodable) or isinstance(run_id, Undecodable) or not isinstance(run_id, str):
                raise ValueError("invalid UTF-8 or no run id")
            if name_type != "text" or not tool:
                raise ValueError("no tool name")
            ts = to_epoch(timestamp)
            if result_type == "text":
                message = result
            elif result_type in ("array", "object"):
                try:
                    message = json.dumps(json.loads(result))  # spelled as Python writes it
                except RecursionError:
                    message = result
            elif result_type in ("integer", "real"):
                message = json.dumps(result)
            else:  # true, false, null or absent
                message = result_type or "null"
            if not sane_duration(duration):
                raise ValueError("duration out of range")
            duration = int(duration) if isinstance(duration, (int, float)) and not isinstance(duration, bool) else None
        except (ValueError, TypeError, AttributeError, OverflowError, RecursionError):
            if _countable(tool, hour):
                unreadable.append((event_id, tool, hour))
            continue
        name = tool
        raw_type = raw_type if isinstance(raw_type, str) else None
        keys: list[str] = []
        arguments = failed[event_id]
        if arguments and not isinstance(arguments, Undecodable):
            try:
                args = json.loads(arguments)
                if isinstance(args, dict):
                    keys = sorted(str(k) for k in args)
            except (ValueError, RecursionError):
                pass
        message = bounded(message, MAX_MESSAGE_CHARS)
        rows.append((event_id, run_id, step if isinstance(step, int) else None, ts, timestamp, name,
                     normalize_error_type(raw_type), raw_type,
                     message, message_template(message), duration, "\x1f".join(keys)))
    return rows, unreadable
