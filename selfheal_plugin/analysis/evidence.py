"""Evidence per failure pattern, and the failure kind read from it.

The runtime's error label (``connection_refused``, ``tool_error``...) is a hint taken from
a substring of the message; it calls every ``ENOENT`` a refused connection and every HTTP
429 a tool error. The fix should follow what the failures *are*, so this module reads, for
one pattern (its occurrences and the history around them):

* message templates with counts, and the **codes** in the messages: errno names
  (``ENOENT``, ``EACCES``, ``ECONNREFUSED``, ``ETIMEDOUT``..., also Python's
  ``[Errno 2]``), HTTP statuses (``status code 404``, ``HTTP 429`` or a reason phrase such
  as ``Too Many Requests``), JSON-RPC codes (``MCP error -32602``), and ``Retry-After``
  seconds or reset instants;
* the **argument** a message names (a path, a URL or an id of the call) and, for paths,
  whether the path exists now on this machine;
* **determinism**: did the same arguments fail again, succeed later, and did a retry of
  the same tool in the same run succeed;
* **server streaks**: did other tools of the same MCP server fail within
  :data:`STREAK_SECONDS` of each occurrence (the server, not the call, is down);
* the spacing of the failures and, for timeouts, how long the tool's successful calls take.

The **failure kind** (:data:`KINDS`) comes from rules on those signals — codes first, then
phrases, then the runtime label when the messages say nothing — voted over the
occurrences, then adjusted by history: a streak across a server's tools makes a refused or
closed connection ``server_down``; timeouts are a ``slow_tail`` when the tool's successful
calls come close to the limit and a ``hang`` when none do; messages no rule reads that name
a path argument which does not exist now make a ``missing_resource``. No rule names a server or a
message of one; the accuracy on the real corpus (tests/data/mcp_error_corpus.jsonl) is
computed by tests/test_evidence.py and quoted in the README.
"""
from __future__ import annotations

import bisect
import functools
import itertools
import json
import os
import re
import sqlite3
import statistics
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from operator import itemgetter
from typing import Any

from selfheal_plugin.analysis.tally import EXAMPLE_CHARS, Known, Tally
from selfheal_plugin.history.connection import read_all, scan_id_range, server_of
from selfheal_plugin.history.errorindex import followup_ok, indexed_up_to
from selfheal_plugin.plugins.strategy import FAILURE_KINDS

KINDS = FAILURE_KINDS
MAX_OCCURRENCES = 500  # the most recent occurrences read for arguments
STREAK_SECONDS = 60.0
STREAK_SHARE = 0.5
HANG_SHARE = 0.5  # a success at least this share of the cut-off duration makes the timeouts a slow tail
_EVENT_ID = itemgetter("event_id")

# ---------------------------------------------------------------- codes in a message

ERRNO_NAMES = ("ENOENT", "EACCES", "EPERM", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "EHOSTUNREACH",
               "ENETUNREACH", "ENOTFOUND", "EAI_AGAIN", "EPIPE", "EISDIR", "ENOTDIR", "EEXIST", "EROFS",
               "ENOSPC", "EMFILE", "EINVAL")
_ERRNO = re.compile(r"\b(" + "|".join(ERRNO_NAMES) + r")\b")
_PY_ERRNO = {2: "ENOENT", 13: "EACCES", 1: "EPERM", 111: "ECONNREFUSED", 104: "ECONNRESET", 110: "ETIMEDOUT",
             32: "EPIPE", 21: "EISDIR", 20: "ENOTDIR", 17: "EEXIST", 30: "EROFS", 113: "EHOSTUNREACH"}
_PY_ERRNO_RE = re.compile(r"\[(?:Errno|WinError) (\d+)\]")
_STATUS_RE = re.compile(r"\b(?:status(?: code)?|HTTP(?:/\d(?:\.\d)?)?|code)[:= ]+([45]\d\d)\b", re.IGNORECASE)
REASONS = {"Bad Request": 400, "Unauthorized": 401, "Forbidden": 403, "Not Found": 404, "Request Timeout": 408,
           "Conflict": 409, "Unprocessable Entity": 422, "Too Many Requests": 429, "Internal Server Error": 500,
           "Bad Gateway": 502, "Service Unavailable": 503, "Gateway Timeout": 504}
_REASON_RE = re.compile(r"\b(" + "|".join(re.escape(r) for r in REASONS) + r")\b")
_JSONRPC_RE = re.compile(r"(?:MCP error|JSON-?RPC error|\bcode)[: ]+(-32\d\d\d)\b", re.IGNORECASE)
_RETRY_AFTER_RE = re.compile(r"retry[- ]after[:= ]+(\d+(?:\.\d+)?)\s*(ms|milliseconds?|s|sec|seconds?|m|min|minutes?)?"
                             r"|(?:try again|retry) in (\d+(?:\.\d+)?)\s*(ms|milliseconds?|s|sec|seconds?|m|min|minutes?)",
                             re.IGNORECASE)
_RESET_RE = re.compile(r"(?:rate.?limit.?reset|resets? at|reset)[:= ]+(\d{10}(?:\.\d+)?|\d{4}-\d\d-\d\dT[\d:.]+(?:Z|[+-]\d\d:?\d\d)?)",
                       re.IGNORECASE)


def _seconds(value: str, unit: str | None) -> float:
    v = float(value)
    u = (unit or "s").lower()
    if u.startswith(("ms", "milli")):
        return v / 1000
    if u.startswith("m"):
        return v * 60
    return v


def message_codes(message: str) -> dict[str, Any]:
    """The machine-readable signals in one message: ``errno`` names, ``http_status``
    numbers, ``jsonrpc`` codes, ``retry_after_s`` and ``reset_at`` (epoch seconds)."""
    text = message or ""
    errno = [m for m in _ERRNO.findall(text)]
    errno += [_PY_ERRNO[int(n)] for n in _PY_ERRNO_RE.findall(text) if int(n) in _PY_ERRNO]
    status = [int(s) for s in _STATUS_RE.findall(text)]
    status += [REASONS[r] for r in _REASON_RE.findall(text)]
    jsonrpc = [int(c) for c in _JSONRPC_RE.findall(text)]
    retry_after = None
    for m in _RETRY_AFTER_RE.finditer(text):
        value, unit = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        retry_after = max(retry_after or 0.0, _seconds(value, unit))
    reset_at = None
    for m in _RESET_RE.finditer(text):
        raw = m.group(1)
        try:
            reset_at = float(raw) if raw[:4].isdigit() and "-" not in raw else \
                datetime.fromisoformat(raw).timestamp()
        except ValueError:
            continue
    return {"errno": sorted(set(errno)), "http_status": sorted(set(status)), "jsonrpc": sorted(set(jsonrpc)),
            "retry_after_s": retry_after, "reset_at": reset_at}


# ---------------------------------------------------------------- the kind of one message

# The phrase rules are written in lower case and read the lowercased message: a search
# without IGNORECASE is 5-8x faster in Python's re (a first detect reads ~12k messages).
_RATE = re.compile(r"too many requests|rate.?limit|quota exceeded|throttl|slow down")
_CREDENTIALS = re.compile(r"unauthori[sz]ed|invalid (?:api[ _-]?key|token|credentials)|(?:api[ _-]?key|token) "
                          r"(?:is )?(?:missing|invalid|expired|revoked)|authentication (?:failed|required)|"
                          r"not authenticated")
_PERMISSION = re.compile(r"permission denied|access denied|access is denied|forbidden|not permitted|"
                         r"operation not allowed|is not allowed|not allowed to|outside (?:the )?allowed|"
                         r"not in the allowed|dubious ownership|read-only|insufficient (?:privileges|scope)|"
                         r"refused to fetch|not a public address")
_INVALID = re.compile(r"validation error|invalid input|invalid (?:arguments?|params?|parameters?|option|value|"
                      r"format)|\binvalid [\w ]{1,30}(?::| format)|unknown tool|tool \S+ not found|field required|"
                      r"missing required|required (?:argument|parameter|property|field)|expected \w+, received|"
                      r"input should be|must be (?:a|an|one of|at least|at most|greater|less)|"
                      r"unexpected (?:argument|keyword|property)|unsupported (?:url )?(?:protocol|scheme)|"
                      r"already exists|could not find exact match|malformed|bad request|additional propert")
_MISSING = re.compile(r"not found|does not exist|doesn't exist|no such (?:file|directory|entity|object|key|"
                      r"table|ref|branch|path)|did not resolve|did not match any|cannot find|can't find|"
                      r"could not find|unknown revision|no longer exists")
_UPSTREAM = re.compile(r"fetch failed|connection issue|temporar(?:y|ily) unavailable|try again later|"
                       r"socket hang up|upstream|bad gateway|service unavailable|internal server error|"
                       r"gateway timeout|connection reset|network (?:error|is unreachable)")
_SERVER_DOWN = re.compile(r"connection closed|not connected|broken pipe|server (?:exited|has exited|disconnected)|"
                          r"process exited|transport closed|spawn \S+ enoent|cannot find module|"
                          r"failed to start")
_TIMEOUT = re.compile(r"timed out|time-?out|deadline (?:has )?(?:elapsed|exceeded)|took more than .{0,40}abort")
# A launch failure: Python's "[Errno 2] No such file or directory: 'cmd'" naming a bare
# command (no slash), Node's "spawn cmd ENOENT", or Node's "Cannot find module" (the
# server's script is missing).
_MISSING_COMMAND = re.compile(r"\[Errno 2\] No such file or directory: '([^'/]+)'|spawn \S+ ENOENT|"
                              r"cannot find module", re.I)

LABEL_KINDS = {"timeout": "slow_tail", "connection_refused": "server_down", "server_crashed": "server_down",
               "permission_denied": "permission", "rate_limited": "rate_limited", "rate_limit": "rate_limited"}


def message_kind(message: str, label: str | None = None, codes: dict[str, Any] | None = None) -> tuple[str, str]:
    """(kind, reason) for one message: codes first, then phrases, then the runtime's label
    (``label``) when the message says nothing a rule knows; else ``unknown``. ``codes`` are
    :func:`message_codes` of the message when the caller has them."""
    text = message or ""
    codes = codes if codes is not None else message_codes(text)
    low = text.lower()  # what the phrase rules read
    errno, status, rpc = set(codes["errno"]), set(codes["http_status"]), set(codes["jsonrpc"])
    if 429 in status or _RATE.search(low):
        return "rate_limited", "HTTP 429" if 429 in status else "rate-limit phrase"
    if _MISSING_COMMAND.search(text):
        return "server_down", "the server's command was not found"
    if -32602 in rpc or -32601 in rpc:
        return "invalid_arguments", f"JSON-RPC {min(rpc & {-32602, -32601})}"
    if status & {401, 403} or errno & {"EACCES", "EPERM", "EROFS"}:
        return "permission", ", ".join([*(f"HTTP {s}" for s in sorted(status & {401, 403})),
                                        *sorted(errno & {"EACCES", "EPERM", "EROFS"})])
    if _CREDENTIALS.search(low):
        return "permission", "credential phrase"
    if errno & {"EISDIR", "ENOTDIR", "EEXIST", "EINVAL"} or status & {400, 409, 422}:
        return "invalid_arguments", ", ".join([*sorted(errno & {"EISDIR", "ENOTDIR", "EEXIST", "EINVAL"}),
                                               *(f"HTTP {s}" for s in sorted(status & {400, 409, 422}))])
    if _INVALID.search(low):  # before the permission phrases: "property x is not allowed" is a schema error
        return "invalid_arguments", "validation phrase"
    if _PERMISSION.search(low):
        return "permission", "permission phrase"
    if "ENOENT" in errno or 404 in status:
        return "missing_resource", "ENOENT" if "ENOENT" in errno else "HTTP 404"
    if _MISSING.search(low):
        return "missing_resource", "not-found phrase"
    if any(500 <= s < 600 for s in status) or 408 in status or errno & {"ECONNREFUSED", "ECONNRESET", "EHOSTUNREACH",
                                                                          "ENETUNREACH", "ENOTFOUND", "EAI_AGAIN"}:
        found = [f"HTTP {s}" for s in sorted(status) if s >= 500 or s == 408]
        found += sorted(errno & {"ECONNREFUSED", "ECONNRESET", "EHOSTUNREACH", "ENETUNREACH", "ENOTFOUND", "EAI_AGAIN"})
        return "transient_upstream", ", ".join(found)
    if _UPSTREAM.search(low):
        return "transient_upstream", "upstream phrase"
    if _SERVER_DOWN.search(low) or "EPIPE" in errno:
        return "server_down", "connection to the server closed"
    if _TIMEOUT.search(low) or "ETIMEDOUT" in errno or -32001 in rpc:
        return "slow_tail", "timed out (slow tail unless the history shows a hang)"
    if label in LABEL_KINDS:
        return LABEL_KINDS[label], f"runtime label {label} (the message says nothing more)"
    return "unknown", "no rule matches the message"


# ---------------------------------------------------------------- arguments named by a message

_URL = re.compile(r"https?://[^\s'\"<>)]+")


def _flat_args(args: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(args, dict):
        for k, v in args.items():
            yield from _flat_args(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(args, list):
        for i, v in enumerate(args[:20]):
            yield from _flat_args(v, f"{prefix}[{i}]")
    else:
        yield prefix, args


def named_argument(message: str, args: Any) -> dict[str, Any] | None:
    """The argument of the call that the message names: ``{"key", "value", "type"}`` with
    type ``path``, ``url`` or ``id``; None when the message names none of them."""
    text = message or ""
    best = None
    for key, value in _flat_args(args):
        if not isinstance(value, str) or len(value) < 2 or value not in text:
            continue
        if _URL.fullmatch(value):
            kind = "url"
        elif value.startswith(("/", "~/", "./", "../")) or re.search(r"[\\/]", value) and "." in value.rsplit("/", 1)[-1]:
            kind = "path"
        else:
            kind = "id"
        if best is None or len(value) > len(best["value"]):
            best = {"key": key, "value": value, "type": kind}
    if best is None:  # a path argument the server resolved (../ folded, ~ expanded)
        for key, value in _flat_args(args):
            if isinstance(value, str) and value.startswith(("/", "~")) and os.path.normpath(value) in text:
                return {"key": key, "value": value, "type": "path"}
    return best


_MESSAGE_PATH = re.compile(r"(?<![\w:/.])(?:~|\.{1,2})?(?:/[\w.@+-]+){2,}/?")


def message_path(message: str) -> dict[str, Any] | None:
    """A path the message names when the call's arguments do not hold it (arguments
    unknown, or the server resolved them): ``{"key": None, "value", "type": "path"}``."""
    if _URL.search(message or ""):
        return None
    m = _MESSAGE_PATH.search(message or "")
    return {"key": None, "value": m.group(0), "type": "path"} if m else None


def _path_exists(value: str) -> bool | None:
    try:
        return os.path.exists(os.path.expanduser(value))
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- history reads


@dataclass(slots=True)  # one per call read: no per-instance __dict__
class _Call:
    event_id: int
    run_id: str
    ok: bool
    args_key: str | None


@dataclass(slots=True)
class Followup:
    """What the history says after one occurrence (a failed call): ``follow``, the outcome
    (1 ok, 0 failed) of the next call of its tool in its run; ``repeat``, of the next call
    of its tool with the same arguments (``args_key``, the hash of the call's arguments), and
    ``repeat_run``, 1 when that call is in the same run; None while there is none. The index
    keeps them (``selfheal_followups``), answered as the calls come in."""

    args_key: str | None
    follow: int | None = None
    repeat: int | None = None
    repeat_run: int | None = None


def read_unknown(conn: sqlite3.Connection, ids: Iterable[int], kinds: dict[int, Known]) -> dict[int, str]:
    """The JSON texts of the arguments of the calls of the occurrences ``ids`` missing
    from ``kinds`` (what was kept of them), for the arguments their messages name."""
    return failed_calls(conn, [eid for eid in ids if eid not in kinds])[1]


def failed_calls(conn: sqlite3.Connection, ids: Iterable[int]) -> tuple[dict[int, str | None], dict[int, str]]:
    """For failed calls (their ``tool_complete`` ids), from the index's ``selfheal_calls``:
    the key of each one's arguments and, when kept, their JSON text. Text is decoded by
    sqlite3's C decoder unless a row holds invalid UTF-8 (:func:`scan_id_range`)."""
    wanted = sorted(set(ids))
    keys: dict[int, str | None] = {}
    texts: dict[int, str] = {}
    if wanted:
        sql = ("SELECT event_id, args_key, arguments FROM selfheal_calls WHERE event_id > ? AND event_id <= ? "
               "AND event_id IN (SELECT value FROM json_each(?)) ORDER BY event_id")
        for eid, key, text in scan_id_range(conn, sql, wanted[0] - 1, wanted[-1], json.dumps(wanted)):
            keys[eid] = key
            if text is not None:
                texts[eid] = text
    return keys, texts


def read_followups(conn: sqlite3.Connection, occ: Iterable[dict[str, Any]]) -> dict[int, Followup]:
    """Event id → the :class:`Followup` of each occurrence of ``occ``, as the index keeps
    it; one it does not hold, or holds in a row of another shape (damage: our table lives in
    a file another program writes), is read from the calls (:func:`followups_from_calls`)."""
    occ = list(occ)
    out: dict[int, Followup] = {}
    sql = ("SELECT event_id, tool_name, run_id, args_key, follow, repeat, repeat_run FROM selfheal_followups "
           "WHERE event_id > ? AND event_id <= ? AND event_id IN (SELECT value FROM json_each(?)) ORDER BY event_id")
    ids = sorted({o["event_id"] for o in occ})
    for eid, tool, run, key, follow, repeat, repeat_run in scan_id_range(conn, sql, ids[0] - 1, ids[-1],
                                                                         json.dumps(ids)) if ids else ():
        if followup_ok(tool, run, key, follow, repeat, repeat_run):
            out[eid] = Followup(key, follow, repeat, repeat_run)
    out.update(followups_from_calls(conn, [o for o in occ if o["event_id"] not in out]))
    return out


def followups_from_calls(conn: sqlite3.Connection, occ: list[dict[str, Any]]) -> dict[int, Followup]:
    """The :class:`Followup` of each occurrence of ``occ`` (event_id, run_id, tool_name)
    found in the calls themselves (:func:`_tool_followups`, per tool)."""
    by_tool: dict[str, list[dict[str, Any]]] = {}
    for o in occ:
        by_tool.setdefault(o["tool_name"], []).append(o)
    out: dict[int, Followup] = {}
    for tool, some in by_tool.items():
        out.update(_tool_followups(conn, tool, some))
    return out


def _tool_followups(conn: sqlite3.Connection, tool: str, occ: list[dict[str, Any]]) -> dict[int, Followup]:
    """The follow-ups of occurrences of ``tool``: its calls after the first of them, in
    their runs or with their arguments, read in one range read on (tool, id) filtered by
    SQLite."""
    keys, _ = failed_calls(conn, [o["event_id"] for o in occ])
    runs = sorted({o["run_id"] for o in occ if isinstance(o["run_id"], str)})
    wanted = sorted({k for k in keys.values() if isinstance(k, str)})
    sql = ("SELECT event_id, run_id, ok, args_key FROM selfheal_calls WHERE event_id > ? AND event_id <= ? "
           "AND tool_name = ? AND (run_id IN (SELECT value FROM json_each(?)) "
           "OR args_key IN (SELECT value FROM json_each(?))) ORDER BY event_id")
    calls = [_Call(eid, run_id, bool(ok), key) for eid, run_id, ok, key in scan_id_range(
        conn, sql, min(o["event_id"] for o in occ), indexed_up_to(conn), tool, json.dumps(runs), json.dumps(wanted))]
    return _followups_among(occ, call_index(calls), keys)


def _parsed(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return None


class ServerErrors:
    """The failed calls of one MCP server's tools between two instants, sorted by time,
    all together and per tool, so that a pattern's streak is counted by bisection (read
    once per server for all the patterns of a detect, see :func:`server_errors`)."""

    def __init__(self, server: str, lo: float, hi: float, rows: list[tuple[float, str]]) -> None:
        self.server, self.lo, self.hi = server, lo, hi
        self.all = sorted(ts for ts, _ in rows)
        self.by_tool: dict[str, list[float]] = {}
        for ts, name in rows:
            self.by_tool.setdefault(name, []).append(ts)
        for times in self.by_tool.values():
            times.sort()


def server_errors(conn: sqlite3.Connection, server: str, lo: float, hi: float) -> ServerErrors:
    """The server's failed calls (its tools' names begin ``mcp__{server}__``) with
    ``lo <= ts <= hi``: :func:`servers_errors` of the one server."""
    return servers_errors(conn, {server: (lo, hi)})[server]


def servers_errors(conn: sqlite3.Connection, spans: dict[str, tuple[float, float]]) -> dict[str, ServerErrors]:
    """:func:`server_errors` of several servers (server → (lo, hi)), read together in one
    indexed range read over all their spans: a read per server would walk the window's
    failures of every server once for each."""
    if not spans:
        return {}
    lo, hi = min(a for a, _ in spans.values()), max(b for _, b in spans.values())
    rows: dict[str, list[tuple[float, str]]] = {s: [] for s in spans}
    server: dict[Any, str | None] = {}  # tool name -> the server of `spans` whose prefix mcp__{server}__ it has
    for ts, name in read_all(conn, "SELECT ts, tool_name FROM selfheal_errors WHERE ts >= ? AND ts <= ?", (lo, hi)):
        if name not in server:
            head, sep, _ = name[5:].partition("__") if isinstance(name, str) and name.startswith("mcp__") else ("", "", "")
            server[name] = head if sep and head in spans else None
        s = server[name]
        if s is not None and spans[s][0] <= ts <= spans[s][1]:
            rows[s].append((float(ts), name))
    return {s: ServerErrors(s, a, b, rows[s]) for s, (a, b) in spans.items()}


def _between(times: list[float], lo: float, hi: float) -> int:
    return bisect.bisect_right(times, hi) - bisect.bisect_left(times, lo)


# ---------------------------------------------------------------- the evidence of a pattern


CallIndex = tuple[list[_Call], list[tuple[str, int, int]], list[tuple[str, int, int]]]


def call_index(calls: list[_Call]) -> CallIndex:
    """A tool's calls (oldest first, ids ascending) sorted by run and by arguments, as
    (run or arguments, event id, position) tuples, so that the first call after an
    occurrence, of its run or with its arguments, is found by bisection (built once per tool
    for all its patterns; two tuples a call, which keeps the collector out of it)."""
    by_run = sorted((c.run_id, c.event_id, i) for i, c in enumerate(calls)
                    if isinstance(c.run_id, str))  # an occurrence's run is text: no other run id can be its
    by_key = sorted((c.args_key, c.event_id, i) for i, c in enumerate(calls) if c.args_key is not None)
    return calls, by_run, by_key


def _next_after(index: CallIndex, entries: list[tuple[str, int, int]], key: str, event_id: int) -> _Call | None:
    i = bisect.bisect_right(entries, (key, event_id, len(index[0])))
    return index[0][entries[i][2]] if i < len(entries) and entries[i][0] == key else None


def _followups_among(occ: list[dict[str, Any]], index: CallIndex, keys: dict[int, Any]) -> dict[int, Followup]:
    """The :class:`Followup` of each occurrence among the calls of ``index``
    (``keys``: occurrence id → the key of its arguments)."""
    found = {}
    for o in occ:
        f = found[o["event_id"]] = Followup(keys.get(o["event_id"]))
        nxt = _next_after(index, index[1], o["run_id"], o["event_id"])
        if nxt is not None:
            f.follow = int(nxt.ok)
        if f.args_key is not None:
            nxt = _next_after(index, index[2], f.args_key, o["event_id"])
            if nxt is not None:
                f.repeat, f.repeat_run = int(nxt.ok), int(nxt.run_id == o["run_id"])
    return found


def determinism(occ: list[dict[str, Any]], calls: list[_Call], args: dict[int, Any],
                index: CallIndex | None = None) -> dict[str, Any]:
    """:func:`determinism_of` the occurrences ``occ`` among ``calls`` (the tool's calls,
    oldest first; ``args``: occurrence id → the key of its arguments; ``index``:
    :func:`call_index` of ``calls``)."""
    return determinism_of(_followups_among(occ, index if index is not None else call_index(calls), args).values())


def determinism_of(followups: Iterable[Followup]) -> dict[str, Any]:
    """:func:`determinism_counts` of :class:`Followup` objects."""
    found = list(followups)
    return determinism_counts([f.follow for f in found], [f.repeat for f in found], [f.repeat_run for f in found])


def determinism_counts(follow: list[int | None], repeat: list[int | None],
                       repeat_run: list[int | None]) -> dict[str, Any]:
    """Did the same arguments fail again or succeed later; did a retry in the run succeed
    (the occurrences' follow-ups as three columns: see :class:`Followup`).

    ``verdict``: ``deterministic`` when repeats of failed arguments (later calls with the
    same arguments, or retries in the same run) all failed and there were at least two;
    ``transient`` when at least half of those repeats succeeded; else ``mixed``, or
    ``undetermined`` with no repeat in the history."""
    same_ok, same_failed = repeat.count(1), repeat.count(0)
    in_run = Counter(zip(repeat, repeat_run))
    retried, retry_ok = in_run[(0, 1)] + in_run[(1, 1)], in_run[(1, 1)]
    follow_ok = follow.count(1)
    repeats = same_failed + same_ok
    if repeats >= 2 and same_ok == 0:
        verdict = "deterministic"
    elif repeats >= 1 and same_ok / repeats >= 0.5:
        verdict = "transient"
    elif repeats:
        verdict = "mixed"
    else:
        verdict = "undetermined"
    return {"verdict": verdict, "same_args_failed_again": same_failed, "same_args_succeeded_later": same_ok,
            "retried_in_run": retried, "retry_succeeded_in_run": retry_ok,
            "followed_in_run": len(follow) - follow.count(None), "follow_up_succeeded": follow_ok}


def server_streak(conn: sqlite3.Connection, tool: str, instants: list[float],
                  errors: ServerErrors | None = None) -> dict[str, Any] | None:
    """How often another tool of the same MCP server failed within :data:`STREAK_SECONDS`
    of an occurrence (``instants``: the occurrences' ``ts``); None for a tool of no MCP
    server. ``errors`` are the server's failed calls over at least the occurrences' span
    widened by :data:`STREAK_SECONDS` (read here when not given)."""
    server = server_of(tool)
    if not server or not instants:
        return None
    times = sorted(instants)
    lo, hi = times[0] - STREAK_SECONDS, times[-1] + STREAK_SECONDS
    if errors is None or errors.server != server or errors.lo > lo or errors.hi < hi:
        errors = server_errors(conn, server, lo, hi)
    own = errors.by_tool.get(tool, [])
    tools = sum(1 for name, ts in errors.by_tool.items() if name != tool and _between(ts, lo, hi))
    together = 0
    for t in times:  # a failure of another tool within the seconds around t: all of them minus this tool's
        if _between(errors.all, t - STREAK_SECONDS, t + STREAK_SECONDS) > _between(own, t - STREAK_SECONDS,
                                                                                  t + STREAK_SECONDS):
            together += 1
    return {"server": server, "other_tools_failing": tools, "occurrences_with_server_streak": together,
            "streak_share": round(together / len(times), 4)}


def timeout_durations(conn: sqlite3.Connection, tool: str, cut_offs: list[Any], first_id: int) -> dict[str, Any]:
    """The timed-out occurrences' median cut-off (``cut_offs``: their ``duration_ms``) and
    the tool's successful calls from id ``first_id`` on (those with a duration): how many,
    how many came within :data:`HANG_SHARE` of the cut-off, the longest; summed by SQLite."""
    cut = [d for d in cut_offs if d is not None]
    limit = statistics.median(cut) if cut else None
    successes, near, longest = conn.execute(
        "SELECT count(duration), coalesce(sum(duration >= ?), 0), max(duration) FROM selfheal_calls "
        "WHERE tool_name = ? AND event_id >= ? AND event_id <= ? AND ok = 1",
        (HANG_SHARE * limit if limit else None, tool, first_id, indexed_up_to(conn))).fetchone()
    return {"cut_off_ms_median": limit, "successes": successes, "successes_near_limit": near if limit else 0,
            "success_ms_max": None if longest is None else float(longest)}


def recent(occurrences: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The occurrences the evidence reads: the most recent :data:`MAX_OCCURRENCES`, oldest first."""
    return sorted(occurrences, key=_EVENT_ID)[-MAX_OCCURRENCES:]


@functools.lru_cache(maxsize=16384)
def _kind_and_codes(message: str, label: str | None) -> tuple[tuple[str, str], dict[str, Any]]:
    """:func:`message_kind` and :func:`message_codes` of one message, read once per distinct
    message (a recurring failure repeats its messages; the result is not to be changed)."""
    codes = message_codes(message)
    return message_kind(message, label, codes), codes


def known_of(message: str, label: str | None, arguments: str | None) -> Known:
    """What one failure says: the (kind, reason) and codes of its message (``label``: the
    runtime's error type), and the argument of its call (``arguments``, their JSON text) or
    the path the message names."""
    return (*_kind_and_codes(message, label), named_argument(message, _parsed(arguments)) or message_path(message))


def gather(conn: sqlite3.Connection, tool: str, error_type: str | None, occurrences: list[dict[str, Any]],
           *, check_paths: bool = True, server: ServerErrors | None = None) -> dict[str, Any]:
    """The evidence for one pattern (JSON data) with its ``kind``; see the module docstring
    and :func:`evidence_of`.

    ``occurrences`` are the pattern's ``occurrences_detail`` (event_id, run_id, ts, message,
    template, duration_ms); the most recent :data:`MAX_OCCURRENCES` are read. ``server``:
    the failed calls of the tool's server (:func:`server_errors`), read here when not given."""
    occ = recent(occurrences)
    if not occ:
        return {"kind": "unknown", "reasons": ["no occurrences"]}
    found = read_followups(conn, occ)
    texts = read_unknown(conn, [o["event_id"] for o in occ], {})
    tally = Tally(error_type or "", tool)
    for i, o in enumerate(occ):
        f = found[o["event_id"]]
        tally.add(o, f.follow, f.repeat, f.repeat_run)
        tally.know(i, known_of(o["message"], error_type, texts.get(o["event_id"])))
    return evidence_of(conn, tally, 0, error_type, check_paths=check_paths, server=server)[0]


def evidence_of(conn: sqlite3.Connection, tally: Tally, start: int, error_type: str | None, *,
                check_paths: bool = True, server: ServerErrors | None = None,
                ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The evidence of the failures of ``tally`` from position ``start`` on (the most recent
    :data:`MAX_OCCURRENCES`), and the paths their messages name whose existence it looked
    at (``path``, ``argument``, ``count``, ``exists_now``): what a stored evidence depends on
    outside the history.

    Every failure from ``start`` on must be known (:meth:`Tally.know`), and the message of
    the first failure of each template read (:meth:`Tally.first_positions`). Sums are
    taken per distinct kind and context (``Counter`` keeps the order of first appearance,
    which ties follow, as counting the occurrences one by one would)."""
    n = len(tally) - start
    if n <= 0:
        return {"kind": "unknown", "reasons": ["no occurrences"]}, []
    values = tally.kind_values
    votes: Counter = Counter()
    reasons: Counter = Counter()
    errno: Counter = Counter()
    status: Counter = Counter()
    rpc: Counter = Counter()
    named: Counter = Counter()
    paths: dict[str, dict[str, Any]] = {}
    retry_after: list[float] = []
    resets: set[int] = set()  # the kinds whose codes give a reset instant
    kinds = tally.kinds[start:]
    for k, count in Counter(kinds).items():
        kind_reason, codes = values[k]
        votes[kind_reason[0]] += count
        reasons[kind_reason] += count
        for code in codes["errno"]:
            errno[code] += count
        for code in codes["http_status"]:
            status[str(code)] += count
        for code in codes["jsonrpc"]:
            rpc[str(code)] += count
        if codes["retry_after_s"] is not None:
            retry_after.append(codes["retry_after_s"])
        if codes["reset_at"] is not None:
            resets.add(k)
    for arg in tally.named[start:]:
        if arg:
            named[arg["type"]] += 1
            if arg["type"] == "path":
                p = paths.get(arg["value"])
                if p is None:
                    p = paths[arg["value"]] = {"path": arg["value"], "argument": arg["key"], "count": 0,
                                               "exists_now": None}
                p["count"] += 1
    keys = tally.context_keys
    templates: dict[str, dict[str, Any]] = {}
    for c, count in Counter(tally.contexts[start:]).items():
        t = templates.get(keys[c][0])
        if t is None:
            t = templates[keys[c][0]] = {"template": keys[c][0], "count": 0}
        t["count"] += count
    for template, i in tally.first_positions(start).items():
        templates[template].update(kind=values[tally.kinds[i]][0][0],
                                   example=tally.messages[tally.ids[i]][:EXAMPLE_CHARS])
    # Whether a path exists now is looked at only where it shows: the ten most named, and for
    # messages no rule reads, the path arguments (a stored evidence checks them again).
    shown = sorted(paths.values(), key=lambda p: -p["count"])[:10]
    for p in shown:
        p["exists_now"] = _path_exists(p["path"]) if check_paths else None
    times = tally.ts[start:]
    gaps = [b - a for a, b in itertools.pairwise(times) if b >= a]
    det = determinism_counts(tally.follow[start:], tally.repeat[start:], tally.repeat_run[start:])
    streak = server_streak(conn, tally.tool_name, times, server)
    (kind, top), = votes.most_common(1)
    share = top / n
    why = [f"{k}: {r}" for (k, r), _ in reasons.most_common(3)]
    durations = None
    if kind in ("slow_tail", "hang"):
        durations = timeout_durations(conn, tally.tool_name, tally.durations[start:], tally.ids[start])
        if durations["cut_off_ms_median"] and durations["successes"] >= 3 and durations["successes_near_limit"] == 0:
            kind = "hang"
            why.append(f"none of {durations['successes']} successful calls came within "
                       f"{HANG_SHARE:.0%} of the {durations['cut_off_ms_median']:.0f} ms cut-off: a hang")
        elif durations["successes"] == 0 and n >= 3:
            kind = "hang"
            why.append(f"no call of the tool finished in the history, {n} timed out: a hang")
    if kind == "unknown" and check_paths:
        # A message that is only the path the call named ("Error executing tool git_log:
        # /srv/repo", a NoSuchPathError) says nothing a rule knows, but a path argument that
        # does not exist on this machine is itself the evidence of a missing resource.
        for p in paths.values():
            if p["argument"] is not None and p["exists_now"] is None:
                p["exists_now"] = _path_exists(p["path"])
        gone = sum(p["count"] for p in paths.values() if p["argument"] is not None and p["exists_now"] is False)
        if gone and gone >= votes["unknown"] / 2:
            kind = "missing_resource"
            why.append(f"{gone} of {n} messages name a path argument of the call that does not exist now: "
                       "a missing resource")
    if kind in ("transient_upstream", "server_down", "unknown") and streak and streak["other_tools_failing"] >= 1 \
            and streak["streak_share"] >= STREAK_SHARE:
        if kind != "server_down":
            why.append(f"{streak['streak_share']:.0%} of failures came with failures of "
                       f"{streak['other_tools_failing']} other tool(s) of server {streak['server']}: the server is down")
        kind = "server_down"
    reset_in = [values[k][1]["reset_at"] - t for k, t in zip(kinds, times) if k in resets] if resets else []
    out = {
        "kind": kind,
        "kind_share": round(share, 4),
        "kind_votes": dict(votes.most_common()),
        "reasons": why,
        "runtime_label": error_type,
        "sampled_occurrences": n,
        "templates": sorted(templates.values(), key=lambda t: -t["count"])[:10],
        "codes": {"errno": dict(errno.most_common()), "http_status": dict(status.most_common()),
                  "jsonrpc": dict(rpc.most_common())},
        "named_arguments": dict(named.most_common()),
        "paths": shown,
        "path_occurrences": sum(p["count"] for p in paths.values()),
        "determinism": det,
        "server": streak,
        "spacing_s": {"median": round(statistics.median(gaps), 3), "min": round(min(gaps), 3)} if gaps else None,
        "retry_after_s": max(retry_after) if retry_after else None,
        "reset_in_s": round(max(reset_in), 3) if reset_in else None,
        "durations": durations,
    }
    out["summary"] = kind_line(out)
    return out, [p for p in paths.values() if p["exists_now"] is not None]


def kind_line(evidence: dict[str, Any] | None) -> str:
    """One line for people: the kind and the strongest evidence for it, e.g.
    ``missing_resource (runtime label connection_refused; ENOENT ×5; deterministic)``."""
    if not evidence:
        return "unknown (no evidence read)"
    parts = []
    if evidence.get("runtime_label"):
        parts.append(f"runtime label {evidence['runtime_label']}")
    codes = evidence.get("codes") or {}
    for name, fmt in (("errno", "{}"), ("http_status", "HTTP {}"), ("jsonrpc", "JSON-RPC {}")):
        for code, count in list((codes.get(name) or {}).items())[:2]:
            parts.append(f"{fmt.format(code)} ×{count}")
    verdict = (evidence.get("determinism") or {}).get("verdict")
    if verdict and verdict != "undetermined":
        parts.append(verdict)
    server = evidence.get("server") or {}
    if server.get("streak_share"):
        parts.append(f"server streak {server['streak_share']:.0%}")
    if evidence.get("retry_after_s"):
        parts.append(f"Retry-After {evidence['retry_after_s']:g} s")
    if evidence.get("kind") == "unknown":
        parts.append("no rule reads a cause from the messages")
    return f"{evidence.get('kind', 'unknown')} ({'; '.join(parts)})" if parts else str(evidence.get("kind", "unknown"))
