"""Stored evidence of patterns, so that a detect with nothing new does not read it again.

A pattern's evidence (:func:`selfheal_plugin.analysis.evidence.gather`) is a function of

* its occurrences in the window: the most recent ``MAX_OCCURRENCES`` of them, identified by
  the count, smallest, largest and sum of the event ids of all of them (rows of
  ``selfheal_errors`` never change; the index is emptied when it is rebuilt, and so is this
  table);
* the calls of its tool from the first of those occurrences of any pattern of the tool
  (``first``) to the end of the history: the tool's calls in ``selfheal_tool_hours`` and the
  malformed rows counted so far (a new call, well-formed or not, changes one of them);
* the failed calls of the other tools of its MCP server (``selfheal_tool_errors``);
* the code that computes it (a hash of ``evidence.py``), and
* whether the paths the messages name exist now: checked again on every read, and a
  change reads the evidence again.

Those make the row's ``fingerprint``; a stored evidence is used only when its fingerprint
is the one computed now, so a cached detect gives what a fresh one does (tests/test_perf.py).

When a pattern's evidence is read again (a new failure, a new call), the kind and codes of
each occurrence's message and the argument it names, already read, come from
``selfheal_error_kinds`` (a function of the message, the runtime's label and the call's
arguments, by event id; emptied when the evidence code changes), so only the new
occurrences' messages go through the rules and their arguments are parsed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from pathlib import Path
from typing import Any, Callable

from selfheal_plugin.analysis import evidence as _evidence
from selfheal_plugin.history.connection import get_state, read_all, server_of, set_state, write_transaction

log = logging.getLogger("selfheal.evidencecache")

_CODE_KEY: str | None = None


def code_key() -> str:
    """A hash of the evidence code: a change to its rules makes every stored evidence stale."""
    global _CODE_KEY
    if _CODE_KEY is None:
        _CODE_KEY = hashlib.sha256(Path(_evidence.__file__).read_bytes()).hexdigest()[:16]
    return _CODE_KEY


def fingerprints(conn: sqlite3.Connection, patterns: dict[str, tuple[str, Any]],
                 firsts: dict[str, int]) -> dict[str, str]:
    """``patterns``: pattern id → (tool, key of its occurrences in the window); ``firsts``:
    tool → the id the tool's calls are read from. The fingerprint of each pattern (JSON)."""
    tools = sorted({tool for tool, _ in patterns.values()})
    calls: dict[str, int] = {}
    for i in range(0, len(tools), 500):
        part = tools[i:i + 500]
        calls.update(conn.execute(
            f"SELECT tool_name, sum(calls) FROM selfheal_tool_hours WHERE tool_name IN ({','.join('?' * len(part))})"
            " GROUP BY tool_name", part))
    servers: dict[str, list[list[Any]]] = {}
    wanted = {server_of(t) for t in tools} - {None, ""}
    if wanted:
        for name, errors, max_id in conn.execute(
                "SELECT tool_name, errors, max_event_id FROM selfheal_tool_errors ORDER BY tool_name"):
            server = server_of(name)
            if server in wanted:
                servers.setdefault(server, []).append([name, errors, max_id])
    bad = get_state(conn, "bad_rows", "0")
    out = {}
    for pid, (tool, occ_key) in patterns.items():
        server = server_of(tool)
        out[pid] = json.dumps([code_key(), occ_key, firsts.get(tool), calls.get(tool, 0), bad,
                               servers.get(server, []) if server else None], separators=(",", ":"))
    return out


# What gather() returns; a stored row of another shape (damaged, or written by hand) is not used.
EVIDENCE_KEYS = frozenset({"kind", "kind_share", "kind_votes", "reasons", "runtime_label", "sampled_occurrences",
                           "templates", "codes", "named_arguments", "paths", "path_occurrences", "determinism",
                           "server", "spacing_s", "retry_after_s", "reset_in_s", "durations", "summary"})
_CODE_LISTS = {"errno": str, "http_status": int, "jsonrpc": int}
_UNUSABLE = object()  # a stored text that does not hold what it should


def _usable(ev: Any, named: Any) -> bool:
    return (isinstance(ev, dict) and set(ev) == EVIDENCE_KEYS and ev["kind"] in _evidence.KINDS
            and isinstance(named, list) and all(isinstance(p, dict) and isinstance(p.get("path"), str) for p in named))


def _usable_codes(codes: Any) -> bool:
    return (isinstance(codes, dict) and set(codes) == {*_CODE_LISTS, "retry_after_s", "reset_at"}
            and all(isinstance(codes[k], list) and all(type(v) is t for v in codes[k]) for k, t in _CODE_LISTS.items())
            and all(codes[k] is None or type(codes[k]) in (int, float) for k in ("retry_after_s", "reset_at")))


def load(conn: sqlite3.Connection, wanted: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The stored evidence of the patterns in ``wanted`` (id → fingerprint) whose
    fingerprint matches and whose named paths exist or not as they did."""
    out: dict[str, dict[str, Any]] = {}
    exists: dict[str, bool | None] = {}  # the patterns of a tool name the same paths: each path is stat'ed once

    def same(p: dict[str, Any]) -> bool:
        path = p["path"]
        if path not in exists:
            exists[path] = _evidence._path_exists(path)
        return p.get("exists_now") == exists[path]

    ids = list(wanted)
    for i in range(0, len(ids), 500):
        part = ids[i:i + 500]
        for pid, fingerprint, evidence, paths in conn.execute(
                f"SELECT pattern_id, fingerprint, evidence, paths FROM selfheal_evidence "
                f"WHERE pattern_id IN ({','.join('?' * len(part))})", part):
            if fingerprint != wanted[pid]:
                continue
            try:
                ev, named = json.loads(evidence), json.loads(paths)
            except (ValueError, TypeError):
                continue
            if _usable(ev, named) and all(same(p) for p in named if p.get("exists_now") is not None):
                out[pid] = ev
    return out


def store(conn: sqlite3.Connection, rows: list[tuple[str, str, dict[str, Any], list[dict[str, Any]]]]) -> None:
    """Keep (pattern id, fingerprint, evidence, paths) rows; a file we cannot write now
    (read-only, busy) keeps none, and the next detect reads the evidence again."""
    if not rows:
        return
    try:
        with write_transaction(conn):
            conn.executemany("INSERT OR REPLACE INTO selfheal_evidence VALUES (?,?,?,?)",
                             [(pid, fp, json.dumps(ev), json.dumps(paths)) for pid, fp, ev, paths in rows])
    except sqlite3.Error as exc:
        log.debug("evidence not stored: %s", exc)


def _usable_named(named: Any) -> bool:
    return named is None or (isinstance(named, dict) and set(named) == {"key", "value", "type"}
                             and isinstance(named["value"], str) and named["type"] in ("path", "url", "id")
                             and (named["key"] is None or isinstance(named["key"], str)))


def kind_reader(conn: sqlite3.Connection) -> Callable[[Any, Any, Any, Any], Any] | None:
    """A reader of kept ``selfheal_error_kinds`` values (kind, reason, codes text, named
    text) → ((kind, reason), codes, named argument), or None for values of another shape;
    None itself when the kinds were kept by another evidence code (they are dropped then)."""
    if get_state(conn, "error_kinds_code") != code_key():
        try:
            with write_transaction(conn):
                conn.execute("DELETE FROM selfheal_error_kinds")
                set_state(conn, "error_kinds_code", code_key())
        except sqlite3.Error as exc:
            log.debug("kinds not reset: %s", exc)
        return None
    # what a kept text holds (_UNUSABLE when nothing usable): most rows share one codes text
    seen: dict[str, dict[Any, Any]] = {"codes": {}, "named": {}}
    usable = {"codes": _usable_codes, "named": _usable_named}
    reasons: dict[tuple[str, str], tuple[str, str]] = {}  # one tuple per distinct (kind, reason)

    def parsed(text: Any, column: str) -> Any:
        memo = seen[column]
        try:
            return memo[text]
        except KeyError:
            pass
        except TypeError:  # not a text (damage)
            return _UNUSABLE
        try:
            value = json.loads(text)
        except (ValueError, TypeError):
            value = _UNUSABLE
        memo[text] = value = value if value is not _UNUSABLE and usable[column](value) else _UNUSABLE
        return value

    def read(kind: Any, reason: Any, codes: Any, named: Any) -> Any:
        if not (isinstance(kind, str) and kind in _evidence.KINDS and isinstance(reason, str)):
            return None
        found = parsed(codes, "codes"), parsed(named, "named")
        if _UNUSABLE in found:
            return None
        return (reasons.setdefault((kind, reason), (kind, reason)), *found)  # shared, never changed
    return read


def load_kinds(conn: sqlite3.Connection, labels: dict[int, str | None]) -> dict[int, Any]:
    """Event id → ((kind, reason), codes, named argument) of the occurrences in ``labels``
    (event id → the runtime's label) read before with the same label by the same evidence
    code."""
    read = kind_reader(conn)
    if read is None:
        return {}
    out: dict[int, Any] = {}
    for eid, label, kind, reason, codes, named in read_all(
            conn, "SELECT event_id, label, kind, reason, codes, named FROM selfheal_error_kinds "
            "WHERE event_id IN (SELECT value FROM json_each(?))", (json.dumps(sorted(labels)),)):
        if label == labels[eid] and (known := read(kind, reason, codes, named)) is not None:
            out[eid] = known
    return out


def store_kinds(conn: sqlite3.Connection, labels: dict[int, str | None], kinds: dict[int, Any],
                known: set[int]) -> None:
    """Keep the kinds read now (those of ``kinds`` not in ``known``)."""
    rows = [(eid, labels.get(eid), kind, reason, json.dumps(codes), json.dumps(arg))
            for eid, ((kind, reason), codes, arg) in kinds.items() if eid not in known]
    if not rows:
        return
    try:
        with write_transaction(conn):
            if get_state(conn, "error_kinds_code") == code_key():
                conn.executemany("INSERT OR REPLACE INTO selfheal_error_kinds VALUES (?,?,?,?,?,?)", rows)
    except sqlite3.Error as exc:
        log.debug("kinds not stored: %s", exc)
