"""An incremental index of failed tool calls, kept in our own tables of the history file.

Reading a history of millions of events means parsing JSON for every ``tool_complete``.
We do that once: each command first ingests only the ``run_events`` rows past a persisted
watermark (``run_events.id`` is monotonic), in id-range chunks so no read holds the file
for long, and stores

* one row per failed call in ``selfheal_errors`` (normalised type, message template,
  argument keys of the matching ``tool_start``, instant as epoch seconds), and
* per tool and hour, call/error/timeout counts in ``selfheal_tool_hours``.

A warm command then reads only the window it needs from small, indexed tables.
Malformed rows (invalid JSON, a failed call with no tool name, an unparsable timestamp)
are counted in ``selfheal_state`` and skipped.
"""
from __future__ import annotations

import json
import logging
import re
import sqlite3
from dataclasses import dataclass
from typing import Callable

from .history import get_state, normalize_error_type, set_state, write_transaction
from .times import to_epoch

log = logging.getLogger("selfheal.errorindex")

CHUNK_IDS = 200_000
INDEX_VERSION = "1"

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


_ERRORS_SQL = """
SELECT e.id, e.run_id, e.step_index, e.timestamp, e.event_data,
  (SELECT s.event_data FROM run_events s
    WHERE s.run_id = e.run_id AND s.event_type = 'tool_start' AND s.id < e.id
      AND json_valid(s.event_data)
      AND json_extract(s.event_data, '$.name') = json_extract(e.event_data, '$.name')
    ORDER BY s.id DESC LIMIT 1) AS start_data
FROM run_events e
WHERE e.id > ? AND e.id <= ?
  AND e.event_type = 'tool_complete'
  AND CASE WHEN json_valid(e.event_data) THEN json_extract(e.event_data, '$.is_error') END = 1
"""

_BAD_JSON_SQL = "SELECT id FROM run_events WHERE id > ? AND id <= ? AND NOT json_valid(event_data)"

_HOURS_SQL = """
SELECT json_extract(event_data, '$.name') AS tool,
       CAST((julianday(timestamp) - 2440587.5) * 24 AS INTEGER) AS hour,
       count(*),
       sum(json_extract(event_data, '$.is_error') = 1),
       sum(json_extract(event_data, '$.is_error') = 1 AND lower(replace(coalesce(json_extract(event_data, '$.error_type'), ''), '_', '')) = 'timeout'),
       sum(coalesce(CAST(json_extract(event_data, '$.duration') AS INTEGER), 0))
FROM run_events
WHERE id > ? AND id <= ? AND event_type = 'tool_complete'
  AND CASE WHEN json_valid(event_data) THEN json_type(event_data, '$.name') = 'text' END
  AND julianday(timestamp) IS NOT NULL
GROUP BY tool, hour
"""


def refresh(conn: sqlite3.Connection, progress: Callable[[int, int], None] | None = None) -> RefreshResult:
    """Ingest every ``run_events`` row past the watermark. Safe to call from several
    processes: each chunk's rows and the new watermark commit in one transaction, and a
    chunk already ingested by someone else is skipped."""
    if get_state(conn, "errors_index_version") != INDEX_VERSION:
        with write_transaction(conn):
            conn.execute("DELETE FROM selfheal_errors")
            conn.execute("DELETE FROM selfheal_tool_hours")
            for key in ("errors_watermark", "bad_rows", "bad_row_ids"):
                conn.execute("DELETE FROM selfheal_state WHERE key = ?", (key,))
            set_state(conn, "errors_index_version", INDEX_VERSION)
    top = conn.execute("SELECT coalesce(max(id), 0) FROM run_events").fetchone()[0]
    mark = int(get_state(conn, "errors_watermark", "0"))
    if top < mark:  # the table was emptied or replaced: start again
        with write_transaction(conn):
            conn.execute("DELETE FROM selfheal_errors")
            conn.execute("DELETE FROM selfheal_tool_hours")
            set_state(conn, "errors_watermark", "0")
            set_state(conn, "bad_rows", "0")
        mark = 0
    start, scanned, new_errors, new_bad = mark, 0, 0, 0
    while mark < top:
        hi = min(mark + CHUNK_IDS, top)
        errors, bad = _read_errors(conn, mark, hi)
        bad_json = [r[0] for r in conn.execute(_BAD_JSON_SQL, (mark, hi))]
        hours = conn.execute(_HOURS_SQL, (mark, hi)).fetchall()
        with write_transaction(conn):
            current = int(get_state(conn, "errors_watermark", "0"))
            if current >= hi:  # another process ingested this chunk meanwhile
                mark = current
                continue
            conn.executemany(
                "INSERT OR IGNORE INTO selfheal_errors VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", errors)
            conn.executemany(
                "INSERT INTO selfheal_tool_hours VALUES (?,?,?,?,?,?) ON CONFLICT(tool_name, hour) DO UPDATE SET "
                "calls = calls + excluded.calls, errors = errors + excluded.errors, "
                "timeouts = timeouts + excluded.timeouts, duration_ms_sum = duration_ms_sum + excluded.duration_ms_sum",
                [tuple(r) for r in hours])
            n_bad = len(bad) + len(bad_json)
            if n_bad:
                total = int(get_state(conn, "bad_rows", "0")) + n_bad
                set_state(conn, "bad_rows", str(total))
                sample = sorted(bad + bad_json)[:5]
                log.debug("malformed run_events rows skipped: %s", sample)
            set_state(conn, "errors_watermark", str(hi))
        new_errors += len(errors)
        new_bad += n_bad
        scanned += hi - mark
        mark = hi
        if progress:
            progress(mark - start, top - start)
    return RefreshResult(scanned, new_errors, new_bad, int(get_state(conn, "bad_rows", "0")))


def _read_errors(conn: sqlite3.Connection, lo: int, hi: int) -> tuple[list[tuple], list[int]]:
    rows: list[tuple] = []
    bad: list[int] = []
    for event_id, run_id, step, timestamp, data, start_data in conn.execute(_ERRORS_SQL, (lo, hi)):
        try:
            event = json.loads(data)
            name = event.get("name")
            if not isinstance(name, str) or not name:
                raise ValueError("no tool name")
            ts = to_epoch(timestamp)
            raw_type = event.get("error_type")
            message = event.get("result")
            message = message if isinstance(message, str) else json.dumps(message)
            duration = event.get("duration")
            duration = int(duration) if isinstance(duration, (int, float)) and not isinstance(duration, bool) else None
        except (ValueError, TypeError, AttributeError):
            bad.append(event_id)
            continue
        keys: list[str] = []
        if start_data:
            try:
                args = json.loads(start_data).get("arguments")
                if isinstance(args, dict):
                    keys = sorted(str(k) for k in args)
            except (ValueError, AttributeError):
                pass
        rows.append((event_id, run_id, step if isinstance(step, int) else None, ts, timestamp, name,
                     normalize_error_type(raw_type), raw_type if isinstance(raw_type, str) else None,
                     message, message_template(message), duration, json.dumps(keys)))
    return rows, bad
