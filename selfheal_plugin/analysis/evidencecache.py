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
occurrences' messages go through the rules and their arguments are parsed. What came after
each occurrence (:class:`~selfheal_plugin.analysis.evidence.Followup`: the next call of its
tool in its run, the next with its arguments) comes from ``selfheal_followups`` (emptied
with the kinds): a question answered stays answered, and one still open is looked for only
in the calls ingested since it was last looked at.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Callable

from selfheal_plugin.analysis import evidence as _evidence
from selfheal_plugin.history.connection import get_state, server_of, set_state, write_transaction

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


def load_kinds(conn: sqlite3.Connection, labels: dict[int, str | None]) -> dict[int, Any]:
    """Event id → ((kind, reason), codes, named argument) of the occurrences in ``labels``
    (event id → the runtime's label) read before with the same label by the same evidence
    code."""
    if get_state(conn, "error_kinds_code") != code_key():
        try:
            with write_transaction(conn):
                conn.execute("DELETE FROM selfheal_error_kinds")
                conn.execute("DELETE FROM selfheal_followups")
                set_state(conn, "error_kinds_code", code_key())
        except sqlite3.Error as exc:
            log.debug("kinds not reset: %s", exc)
        return {}
    out: dict[int, Any] = {}
    read: dict[Any, Any] = {}  # codes or named text -> what it holds (_UNUSABLE): most rows share one

    def parsed(text: Any, usable: Callable[[Any], bool], column: str) -> Any:
        if (column, text) not in read:
            try:
                value = json.loads(text)
            except (ValueError, TypeError):
                value = _UNUSABLE
            read[column, text] = value if value is not _UNUSABLE and usable(value) else _UNUSABLE
        return read[column, text]

    for eid, label, kind, reason, codes, named in conn.execute(
            "SELECT event_id, label, kind, reason, codes, named FROM selfheal_error_kinds "
            "WHERE event_id IN (SELECT value FROM json_each(?))", (json.dumps(sorted(labels)),)):
        if label == labels[eid] and kind in _evidence.KINDS and isinstance(reason, str):
            found = parsed(codes, _usable_codes, "codes"), parsed(named, _usable_named, "named")
            if _UNUSABLE not in found:  # shared by the rows of the same text: read, never changed
                out[eid] = ((kind, reason), *found)
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


def _flag(value: Any) -> bool:
    return value is None or (type(value) is int and value in (0, 1))


def load_followups(conn: sqlite3.Connection, ids: list[int]) -> dict[int, _evidence.Followup]:
    """Event id → the :class:`~selfheal_plugin.analysis.evidence.Followup` kept of the
    occurrences ``ids``, written by the same evidence code (rows of another shape, or
    looked at beyond what the index has read, are not used: their occurrences are looked
    at again)."""
    out: dict[int, _evidence.Followup] = {}
    if get_state(conn, "error_kinds_code") != code_key():
        return out
    end = _evidence.indexed_up_to(conn)
    for eid, key, follow, repeat, repeat_run, checked in conn.execute(
            "SELECT event_id, args_key, follow, repeat, repeat_run, checked FROM selfheal_followups "
            "WHERE event_id IN (SELECT value FROM json_each(?))", (json.dumps(sorted(ids)),)):
        if (key is None or isinstance(key, str)) and _flag(follow) and _flag(repeat) and _flag(repeat_run) \
                and type(checked) is int and checked <= end:
            out[eid] = _evidence.Followup(key, follow, repeat, repeat_run, checked)
    return out


def store_followups(conn: sqlite3.Connection, followups: dict[int, _evidence.Followup], changed: Iterable[int],
                    looked: Iterable[int], up_to: int) -> None:
    """Keep the follow-ups of ``changed`` (new or answered) whole, and for the others
    ``looked`` at again up to id ``up_to`` with nothing found only how far."""
    rows = [(eid, f.args_key, f.follow, f.repeat, f.repeat_run, f.checked)
            for eid in sorted(set(changed)) if (f := followups[eid])]
    again = sorted(set(looked) - set(changed))
    if not rows and not again:
        return
    try:
        with write_transaction(conn):
            if get_state(conn, "error_kinds_code") != code_key():
                return
            conn.executemany("INSERT OR REPLACE INTO selfheal_followups VALUES (?,?,?,?,?,?)", rows)
            if again:
                conn.execute("UPDATE selfheal_followups SET checked = ? WHERE event_id IN "
                             "(SELECT value FROM json_each(?))", (up_to, json.dumps(again)))
    except sqlite3.Error as exc:
        log.debug("follow-ups not stored: %s", exc)
