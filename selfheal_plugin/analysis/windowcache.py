"""The window's failure signatures as detect last grouped them, for a detect with nothing new.

Grouping the window's failed calls by signature and context (``patterns._signatures``)
reads every failure in the window: its cost grows with the failures, not with what
changed. What it gives is a function of

* the set of failed calls in the window (``selfheal_errors`` rows with the window's and the
  filters' conditions), identified by the count, smallest, largest and sum of their event
  ids (one read of the ``ts`` index, no row);
* the ``runs`` they join (a workflow name per run): the table's row count and latest start;
* the code that groups and scores them (a hash of ``patterns.py``).

Those make the key of the one stored grouping (``selfheal_signatures``); a detect whose key
differs groups again and stores its own. The index emptied or rebuilt empties the table.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any

from selfheal_plugin.history.connection import write_transaction

log = logging.getLogger("selfheal.windowcache")


def window_key(conn: sqlite3.Connection, where: str, params: list[Any], code: Path) -> str:
    """The key of the window's failures (``where`` on ``selfheal_errors e``, no join)."""
    count, lo, hi, total = conn.execute(
        "SELECT count(*), min(e.event_id), max(e.event_id), sum(e.event_id) FROM selfheal_errors e WHERE " + where,
        params).fetchone()
    # quote(): the latest start as SQL text whatever its type (a BLOB start is damage the
    # readers skip, but still a value of the key); max() keeps to the started_at index
    runs = conn.execute("SELECT count(*), quote(max(started_at)) FROM runs").fetchone()
    digest = hashlib.sha256(code.read_bytes()).hexdigest()[:16]
    return json.dumps([digest, count, lo, hi, total, *runs], separators=(",", ":"))


def load(conn: sqlite3.Connection, key: str) -> list[dict[str, Any]] | None:
    row = conn.execute("SELECT value FROM selfheal_signatures WHERE key = ?", (key,)).fetchone()
    if row is None:
        return None
    try:
        value = json.loads(row[0])
    except ValueError:
        return None
    return value if isinstance(value, list) else None


def store(conn: sqlite3.Connection, key: str, signatures: list[dict[str, Any]]) -> None:
    """Keep this grouping in place of the one stored; a file we cannot write now keeps none."""
    try:
        with write_transaction(conn):
            conn.execute("DELETE FROM selfheal_signatures")
            conn.execute("INSERT INTO selfheal_signatures VALUES (?, ?)", (key, json.dumps(signatures)))
    except sqlite3.Error as exc:
        log.debug("signatures not stored: %s", exc)
