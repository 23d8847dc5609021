"""Failure patterns: recurring (error_type, tool_name) signatures of failed tool calls.

Correlation comes from the Jaccard similarity of the occurrences' contexts, a context
being the set of message-template tokens (numbers, paths, ids masked), argument keys of
the call, the run's workflow and the step index: each occurrence's mean similarity to
the others, and the median of those (see :func:`context_correlation`). Confidence combines

* sample size ``n / (n + 2)`` (3 occurrences → 0.6, 10 → 0.83, 30 → 0.94),
* the correlation, and
* frequency: the share of the tool's calls in the window that failed this way,
  saturating at 2 % (``min(1, rate / 0.02)``),

as ``0.35·size + 0.45·correlation + 0.20·frequency``. See README "Detection".
"""
from __future__ import annotations

import functools
import json
import random
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from selfheal_plugin.analysis import evidencecache, windowcache
from selfheal_plugin.analysis.evidence import (MAX_OCCURRENCES, STREAK_SECONDS, evidence_of, followups_from_calls,
                                              known_of, read_followups, read_unknown, recent, servers_errors)
from selfheal_plugin.analysis.tally import NOT_READ, ContextKey, Tally, tallies_of
from selfheal_plugin.history.errorindex import RefreshResult, followup_ok, refresh, template_tokens
from selfheal_plugin.errors import NotFoundError, UsageError
from selfheal_plugin.history.connection import normalize_error_type, read_all, server_of, wellformed_run_sql
from selfheal_plugin.history.text import bounded
from selfheal_plugin.history.times import format_timestamp, parse_since, utc_text
from selfheal_plugin.plugins.pattern import Pattern

SIZE_K = 2.0
FREQUENCY_SATURATION = 0.02
WEIGHTS = (0.35, 0.45, 0.20)
MAX_CONTEXT_GROUPS = 300  # above this many distinct contexts, pairs are sampled (seeded)
MAX_EXAMPLE_CHARS = 500  # what `show` gives of a template's example message (as templates)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _bitsets(contexts: list[frozenset[str]]) -> list[int]:
    bit: dict[str, int] = {}
    out = []
    for ctx in contexts:
        m = 0
        for token in ctx:
            m |= 1 << bit.setdefault(token, len(bit))
        out.append(m)
    return out


def _bit_jaccard(a: int, b: int) -> float:
    union = (a | b).bit_count()
    return (a & b).bit_count() / union if union else 1.0


def context_correlation(contexts: list[frozenset[str]], seed: int = 0) -> float:
    return _correlation(Counter(contexts), len(contexts), seed)


def _correlation(groups: Counter, n: int, seed: int = 0) -> float:
    """How alike a pattern's occurrences are: for each occurrence, its mean Jaccard
    similarity to every other occurrence; the correlation is the median of those.

    The median keeps a recurring failure recognisable when unrelated errors share its
    signature (a plain mean over all pairs falls with the square of the share of
    strangers). Identical contexts are grouped and compared as integer bitsets, so the
    cost grows with the number of distinct contexts; past :data:`MAX_CONTEXT_GROUPS`
    distinct contexts, occurrences and their partners are drawn with a seeded generator,
    so the result stays deterministic. Fewer than two occurrences carry no evidence: 0.0.
    """
    if n < 2:
        return 0.0
    if len(groups) <= MAX_CONTEXT_GROUPS:
        keys = list(groups)
        masks = _bitsets(keys)
        counts = [groups[k] for k in keys]
        per_group = []
        for i, a in enumerate(masks):
            total = sum(c * _bit_jaccard(a, b) for b, c in zip(masks, counts)) - 1.0  # not with itself
            per_group.append((total / (n - 1), counts[i]))
        return _weighted_median(per_group)
    rng = random.Random(seed)
    ordered = sorted((ctx for ctx, c in groups.items() for _ in range(c)), key=lambda s: sorted(s))
    probes = rng.sample(range(n), MAX_CONTEXT_GROUPS)
    partners = rng.sample(range(n), MAX_CONTEXT_GROUPS)
    chosen = sorted(set(probes) | set(partners))
    masks = dict(zip(chosen, _bitsets([ordered[i] for i in chosen])))
    per = []
    for i in probes:
        sims = [_bit_jaccard(masks[i], masks[j]) for j in partners if j != i]
        per.append((sum(sims) / len(sims), 1))
    return _weighted_median(per)


def _weighted_median(values: list[tuple[float, int]]) -> float:
    """The lower median of values given with their counts."""
    values.sort()
    half, seen = sum(c for _, c in values) / 2, 0
    for value, count in values:
        seen += count
        if seen >= half:
            return value
    return values[-1][0]


def sample_size_score(n: int) -> float:
    return n / (n + SIZE_K)


def confidence_score(n: int, correlation: float, failure_rate: float) -> float:
    w_size, w_corr, w_freq = WEIGHTS
    freq = min(1.0, failure_rate / FREQUENCY_SATURATION)
    return w_size * sample_size_score(n) + w_corr * correlation + w_freq * freq


def context_of(row: dict[str, Any]) -> frozenset[str]:
    ctx = {f"msg:{t}" for t in template_tokens(row["template"])}
    ctx.update(f"arg:{k}" for k in row["arg_keys"])
    ctx.add(f"workflow:{row['workflow']}")
    ctx.add(f"step:{row['step_index']}")
    return frozenset(ctx)


@dataclass(frozen=True)
class _Window:
    """Where a detect's occurrences are read: the window, and the runs it is narrowed to."""

    conn: sqlite3.Connection
    since_epoch: float
    until_epoch: float | None
    run_ids: tuple[str, ...] | None

    def where(self, error_type: str | None = None, tool_name: str | None = None,
              signatures: list[tuple[str, str]] | None = None) -> tuple[str, list[Any]]:
        """:func:`_where` of this window."""
        return _where(self.since_epoch, self.until_epoch, error_type, tool_name,
                      list(self.run_ids) if self.run_ids else None, signatures)

    def rows(self, signatures: list[tuple[str, str]]) -> dict[tuple[str, str], list[dict]]:
        """The occurrences of each of ``signatures`` in the window, read in one query."""
        out: dict[tuple[str, str], list[dict]] = {sig: [] for sig in signatures}
        for row in _rows(self.conn, *self.where(signatures=signatures)):
            out[(row["error_type"], row["tool_name"])].append(row)
        return out


class _LazyRows(list):
    """A pattern's ``occurrences_detail``, read from the index when first looked at: detect
    builds patterns from grouped counts, and only a strategy proposing for a pattern (or
    ``show``) needs its rows. Those of several patterns are read together by
    :func:`_fill_together`."""

    def __init__(self, window: _Window, signature: tuple[str, str]) -> None:
        super().__init__()
        self._source: tuple[_Window, tuple[str, str]] | None = (window, signature)

    def _fill(self) -> None:
        if self._source is not None:
            window, sig = self._source
            self._set(window.rows([sig])[sig])

    def _set(self, rows: list[dict]) -> None:
        self._source = None
        super().extend(rows)

    def _filled(name: str) -> Any:  # noqa: N805 - a decorator factory inside the class body
        method = getattr(list, name)

        def call(self: "_LazyRows", *args: Any, **kwargs: Any) -> Any:
            self._fill()
            return method(self, *args, **kwargs)
        call.__name__ = name
        return call

    for _name in ("__iter__", "__len__", "__getitem__", "__contains__", "__reversed__", "__eq__", "__ne__",
                  "__repr__", "__add__", "__mul__", "__lt__", "__le__", "__gt__", "__ge__", "index", "count",
                  "copy", "append", "extend", "insert", "pop", "remove", "sort", "reverse", "clear",
                  "__setitem__", "__delitem__", "__iadd__", "__imul__"):
        locals()[_name] = _filled(_name)
    del _name, _filled
    __hash__ = None  # type: ignore[assignment]

    def __reduce_ex__(self, protocol: Any) -> Any:
        self._fill()
        return list, (list(self),)


def _fill_together(details: list[list[dict]]) -> None:
    """Read the rows of the patterns' ``occurrences_detail`` not read yet, those of one
    window in one query (a query per pattern costs more than the rows)."""
    pending: dict[_Window, list[_LazyRows]] = {}
    for rows in details:
        if isinstance(rows, _LazyRows) and rows._source is not None:
            pending.setdefault(rows._source[0], []).append(rows)
    for window, lazy in pending.items():
        read = window.rows([rows._source[1] for rows in lazy if rows._source is not None])
        for rows in lazy:
            if rows._source is not None:
                rows._set(read[rows._source[1]])


def _where(since_epoch: float, until_epoch: float | None, error_type: str | None, tool_name: str | None,
           run_ids: list[str] | None, signatures: list[tuple[str, str]] | None = None) -> tuple[str, list[Any]]:
    """SQL conditions on ``selfheal_errors e`` for the window and the filters; ``signatures``:
    only the failures of these (error type, tool) pairs."""
    sql = ["e.ts >= ?"]
    params: list[Any] = [since_epoch]
    if until_epoch is not None:
        sql.append(" AND e.ts < ?")
        params.append(until_epoch)
    if error_type:
        sql.append(" AND e.error_type = ?")
        params.append(normalize_error_type(error_type))
    if tool_name:
        sql.append(" AND e.tool_name = ?")
        params.append(tool_name)
    if run_ids:
        sql.append(f" AND e.run_id IN ({','.join('?' * len(run_ids))})")
        params.extend(run_ids)
    if signatures is not None:
        sql.append(" AND (e.error_type, e.tool_name) IN"
                   " (SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]') FROM json_each(?))")
        params.append(json.dumps(signatures))
    return "".join(sql), params


def _error_rows(conn: sqlite3.Connection, since_epoch: float, until_epoch: float | None,
                error_type: str | None, tool_name: str | None, run_ids: list[str] | None = None,
                signatures: list[tuple[str, str]] | None = None) -> list[dict]:
    """The failures of the window (with the filters), oldest first, as ``occurrences_detail``
    rows; ``signatures``: only those of these (error type, tool) pairs."""
    return _rows(conn, *_where(since_epoch, until_epoch, error_type, tool_name, run_ids, signatures))


# The runs a failure is read with: a malformed one (a BLOB id or workflow, say) is skipped.
_RUN_OK = wellformed_run_sql("r")


def _rows(conn: sqlite3.Connection, where: str, params: list[Any]) -> list[dict]:
    """The failures ``where`` selects (on ``selfheal_errors e``), oldest first, as
    ``occurrences_detail`` rows (with their run's workflow, start and status)."""
    sql = ("SELECT e.event_id, e.run_id, e.step_index, e.ts, e.timestamp, e.tool_name, e.error_type,"
           " e.raw_error_type, e.message, e.template, e.duration_ms, e.arg_keys,"
           " r.workflow_name, r.started_at, r.status"
           " FROM selfheal_errors e JOIN runs r ON r.id = e.run_id AND " + _RUN_OK + " WHERE " + where +
           " ORDER BY e.event_id")
    return [{"event_id": r[0], "run_id": r[1], "step_index": r[2], "ts": r[3], "timestamp": r[4],
             "tool_name": r[5], "error_type": r[6], "raw_error_type": r[7], "message": r[8],
             "template": r[9], "duration_ms": r[10], "arg_keys": r[11].split("\x1f") if r[11] else [],
             "workflow": r[12], "run_started_at": r[13], "run_status": r[14]} for r in read_all(conn, sql, params)]


def _tool_calls(conn: sqlite3.Connection, since_epoch: float, until_epoch: float | None) -> dict[str, int]:
    lo = int(since_epoch // 3600)
    hi = int(until_epoch // 3600) if until_epoch is not None else 2**62
    return {t: c for t, c in conn.execute(
        "SELECT tool_name, sum(calls) FROM selfheal_tool_hours WHERE hour >= ? AND hour <= ? GROUP BY tool_name",
        (lo, hi))}


@dataclass
class Detection:
    patterns: list[Pattern]
    since: str
    scanned: RefreshResult
    candidates: int  # signatures with enough occurrences, before the confidence filter
    failing: int = 0  # signatures with a failed call in the window, before the occurrence floor


def detect_failure_patterns(
    conn: sqlite3.Connection,
    since: str = "-7d",
    min_occurrences: int = 3,
    confidence_threshold: float = 0.75,
    error_type: str | None = None,
    tool_name: str | None = None,
    *,
    now: datetime | None = None,
    until: datetime | None = None,
    run_ids: list[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    lazy_detail: bool = False,
) -> Detection:
    """Recurring failure signatures in the window, most frequent first.

    ``run_ids`` narrows detection to errors of those runs (the auto-analysis hook uses
    it); occurrences then count only those runs' errors within the window.

    Each pattern's ``occurrences_detail`` (one dict per failure) is read with it; with
    ``lazy_detail`` it is read when first looked at instead (the connection must still be
    open then), which spares a detect that proposes nothing new the reading of every row.
    """
    start = parse_since(since, now)
    scanned = refresh(conn, progress)
    window = _Window(conn, start.timestamp(), until.timestamp() if until else None,
                     tuple(run_ids) if run_ids else None)
    where, params = window.where(error_type, tool_name)
    calls = _tool_calls(conn, window.since_epoch, window.until_epoch)
    failures = _Failures(window, error_type, tool_name, kept=run_ids is None)
    sigs = _window_signatures(conn, where, params, failures, stored=run_ids is None)
    patterns: list[Pattern] = []
    keys: dict[str, tuple[int, list[int]]] = {}
    candidates = 0
    for (etype, tool), sig in sigs.items():
        if sig.n < max(1, min_occurrences):
            continue
        candidates += 1
        detail = _LazyRows(window, (etype, tool))
        pattern = _pattern(etype, tool, sig, calls.get(tool, 0), detail)
        if pattern.confidence >= confidence_threshold:
            patterns.append(pattern)
            keys[pattern.id] = (_recent_first(conn, sig, window, etype, tool),
                                [sig.n, sig.min_id, sig.max_id, sig.sum_ids])
    if not lazy_detail:
        _fill_together([p.occurrences_detail for p in patterns])
    attach_evidence_all(conn, patterns, keys=keys if run_ids is None else None, failures=failures)
    patterns.sort(key=lambda p: (-p.occurrences, p.id))
    return Detection(patterns, format_timestamp(start), scanned, candidates, len(sigs))


class _Failures:
    """The window's failures as tallies, read in one query when a detect first needs them
    (:func:`_read_tallies`): all of them to group the window, or those of the signatures
    whose evidence is read again. ``kept``: the kinds kept by earlier detects are read with
    them (else every kind is read from its message)."""

    def __init__(self, window: _Window, error_type: str | None, tool_name: str | None, kept: bool) -> None:
        self.window, self.error_type, self.tool_name, self.kept = window, error_type, tool_name, kept
        self._all: dict[tuple[str, str], Tally] | None = None

    def tallies(self, signatures: list[tuple[str, str]] | None = None) -> dict[tuple[str, str], Tally]:
        """The tallies of the window's signatures (``signatures``: of those only)."""
        if self._all is None and signatures is None:
            self._all = self._read(None)
        if self._all is not None:
            return self._all if signatures is None else {sig: self._all[sig] for sig in signatures}
        return self._read(signatures)

    def _read(self, signatures: list[tuple[str, str]] | None) -> dict[tuple[str, str], Tally]:
        conn = self.window.conn
        where, params = self.window.where(self.error_type, self.tool_name, signatures)
        return _read_tallies(conn, where, params, evidencecache.kind_reader(conn) if self.kept else None)


# A failure with its run's workflow, its kept kind (when read with the same label) and its follow-ups.
_TALLY_SQL = ("SELECT e.event_id, e.run_id, e.step_index, e.ts, e.tool_name, e.error_type, e.message, e.template,"
              " e.duration_ms, e.arg_keys, r.workflow_name, k.kind, k.reason, k.codes, k.named,"
              " f.tool_name, f.run_id, f.args_key, f.follow, f.repeat, f.repeat_run"
              " FROM selfheal_errors e JOIN runs r ON r.id = e.run_id AND " + _RUN_OK +
              " LEFT JOIN selfheal_error_kinds k ON k.event_id = e.event_id AND k.label IS e.error_type"
              " LEFT JOIN selfheal_followups f ON f.event_id = e.event_id WHERE ")


def _read_tallies(conn: sqlite3.Connection, where: str, params: list[Any],
                  read_kind: Callable[[Any, Any, Any, Any], Any] | None) -> dict[tuple[str, str], Tally]:
    """The failures ``where`` selects as one tally per signature, read in one query with
    what the index keeps of each: the follow-ups (a row missing or of another shape: read
    from the calls, :func:`~selfheal_plugin.analysis.evidence.followups_from_calls`) and,
    with ``read_kind`` (:func:`~selfheal_plugin.analysis.evidencecache.kind_reader`), the
    kinds read before."""
    out: dict[tuple[str, str], Tally] = {}
    unknown: list[tuple[Tally, int, dict[str, Any]]] = []  # follow-ups to read from the calls
    for (eid, run, step, ts, tool, etype, message, template, duration, arg_keys, workflow, kind, reason, codes, named,
         f_tool, f_run, key, follow, repeat, repeat_run) in read_all(conn, _TALLY_SQL + where + " ORDER BY e.event_id",
                                                                     params):
        t = out.get((etype, tool))
        if t is None:
            t = out[(etype, tool)] = Tally(etype, tool)
        good = followup_ok(f_tool, f_run, key, follow, repeat, repeat_run)  # a row missing: no tool
        i = t.append(eid, ts, run, duration, (template, tuple(arg_keys.split("\x1f")) if arg_keys else (), workflow, step),
                     message, follow if good else None, repeat if good else None, repeat_run if good else None)
        if not good:
            unknown.append((t, i, {"event_id": eid, "run_id": run, "tool_name": tool}))
        if read_kind is not None and kind is not None and (known := read_kind(kind, reason, codes, named)) is not None:
            t.know(i, known)
    found = followups_from_calls(conn, [o for _, _, o in unknown])
    for t, i, o in unknown:
        f = found[o["event_id"]]
        t.follow[i], t.repeat[i], t.repeat_run[i] = f.follow, f.repeat, f.repeat_run
    return out


@dataclass
class _Signature:
    """What detection needs of one signature's failures in the window (:func:`_signature_of`)."""

    n: int = 0
    contexts: Counter = field(default_factory=Counter)  # in order of first occurrence
    runs: list[str] = field(default_factory=list)  # in order of first occurrence
    first_ts: float = float("inf")
    last_ts: float = float("-inf")
    # the event ids of the failures: what their stored evidence is keyed by
    min_id: int = 2**63 - 1
    max_id: int = -1
    sum_ids: int = 0
    correlation: float | None = None  # of the contexts, once computed (a stored grouping keeps only this)


def _signature_of(tally: Tally) -> _Signature:
    """What detection needs of one signature's failures in the window: their count,
    contexts (in order of first occurrence; contexts that read the same are one), runs (in
    order of first occurrence), span and ids."""
    sig = _Signature(n=len(tally), runs=list(dict.fromkeys(tally.runs)), first_ts=min(tally.ts),
                     last_ts=max(tally.ts), min_id=tally.ids[0], max_id=tally.ids[-1], sum_ids=sum(tally.ids))
    for c, count in Counter(tally.contexts).items():
        sig.contexts[_context(tally.context_keys[c])] += count
    return sig


@functools.lru_cache(maxsize=8192)
def _context(key: ContextKey) -> frozenset[str]:
    """:func:`context_of` of a failure whose context key (template, argument keys, workflow, step) is ``key``."""
    template, arg_keys, workflow, step = key
    return context_of({"template": template, "arg_keys": arg_keys, "workflow": workflow, "step_index": step})


_SIGNATURE_FIELDS = ("n", "runs", "first_ts", "last_ts", "min_id", "max_id", "sum_ids", "correlation")


def _stored_signature(s: dict[str, Any]) -> _Signature:
    sig = _Signature(**{f: s[f] for f in _SIGNATURE_FIELDS})
    if not (isinstance(sig.n, int) and sig.n > 0 and isinstance(sig.runs, list)
            and all(isinstance(r, str) for r in sig.runs) and isinstance(sig.correlation, (int, float))
            and all(isinstance(getattr(sig, f), (int, float)) for f in ("first_ts", "last_ts", "min_id", "max_id",
                                                                          "sum_ids"))):
        raise ValueError("not a stored signature")
    return sig


def _window_signatures(conn: sqlite3.Connection, where: str, params: list[Any], failures: _Failures,
                       stored: bool) -> dict[tuple[str, str], _Signature]:
    """The window's failures grouped by signature (:func:`_signature_of` their tallies), or
    with ``stored`` the grouping a detect stored for the same failures
    (:mod:`~selfheal_plugin.analysis.windowcache`; a new grouping is stored)."""
    key = windowcache.window_key(conn, where, params, Path(__file__)) if stored else None
    found = windowcache.load(conn, key) if key is not None else None
    if found is not None:
        try:
            return {(s["error_type"], s["tool_name"]): _stored_signature(s) for s in found}
        except (KeyError, TypeError, ValueError):
            pass  # a stored row of another shape (damaged, or written by hand): group again
    sigs = {sig: _signature_of(t) for sig, t in failures.tallies().items()}
    if key is not None:
        for sig in sigs.values():
            sig.correlation = _correlation(sig.contexts, sig.n)
        windowcache.store(conn, key, [{"error_type": etype, "tool_name": tool,
                                       **{f: getattr(sig, f) for f in _SIGNATURE_FIELDS}}
                                      for (etype, tool), sig in sigs.items()])
    return sigs


def _recent_first(conn: sqlite3.Connection, sig: _Signature, window: _Window, etype: str, tool: str) -> int:
    """The id of the oldest of the signature's occurrences the evidence reads (the most
    recent :data:`MAX_OCCURRENCES` in the window)."""
    if sig.n <= MAX_OCCURRENCES:
        return sig.min_id
    where, params = window.where(etype, tool)
    return conn.execute("SELECT e.event_id FROM selfheal_errors e JOIN runs r ON r.id = e.run_id AND " + _RUN_OK +
                        " WHERE " + where +
                        " ORDER BY e.event_id DESC LIMIT 1 OFFSET ?", (*params, MAX_OCCURRENCES - 1)).fetchone()[0]


def _build_pattern(etype: str, tool: str, occ: list[dict], tool_calls: int) -> Pattern:
    sig = _Signature(n=len(occ), contexts=Counter(context_of(r) for r in occ),
                     runs=list(dict.fromkeys(r["run_id"] for r in occ)),
                     first_ts=min(r["ts"] for r in occ), last_ts=max(r["ts"] for r in occ))
    return _pattern(etype, tool, sig, tool_calls, occ)


def _pattern(etype: str, tool: str, sig: _Signature, tool_calls: int, detail: list[dict]) -> Pattern:
    n = sig.n
    correlation = sig.correlation if sig.correlation is not None else _correlation(sig.contexts, n)
    rate = n / max(tool_calls, n)
    return Pattern(
        id=f"{etype}:{tool}", error_type=etype, tool_name=tool, occurrences=n,
        correlation_score=round(correlation, 4),
        confidence=round(confidence_score(n, correlation, rate), 4),
        affected_runs=sig.runs,
        first_seen=format_timestamp(datetime.fromtimestamp(sig.first_ts, timezone.utc)),
        last_seen=format_timestamp(datetime.fromtimestamp(sig.last_ts, timezone.utc)),
        failure_rate=round(rate, 4),
        occurrences_detail=detail,
    )


def split_pattern_id(pattern_id: str) -> tuple[str, str]:
    """``"timeout:mcp__k8s__pods_list"`` → (``"timeout"``, tool).

    The rule: the id splits at its first ``:``. A normalised error type never holds ``:``
    (:func:`~selfheal_plugin.history.connection.normalize_error_type` writes it as ``_``;
    the runtime's types such as ``HTTP:503`` become ``http_503``), while tool names may:
    the runtime's MCP names are ``mcp__server__tool``, but a runtime's own or a
    third-party tool can be named ``server:tool``. So ``"http_503:api:get"`` is the type
    ``http_503`` on the tool ``api:get``; an id typed with the raw ``HTTP:503`` type is
    not found (``show`` prints the normalised id)."""
    etype, sep, tool = (pattern_id or "").partition(":")
    if not sep or not etype or not tool:
        raise UsageError(f"invalid pattern id {pattern_id!r}: expected error_type:tool_name")
    return normalize_error_type(etype), tool


def get_pattern(conn: sqlite3.Connection, pattern_id: str, since: str = "-7d", *,
                now: datetime | None = None, until: datetime | None = None) -> Pattern:
    """One pattern's data in the window, whatever the thresholds (for `show` and proposals).

    Raises :class:`NotFoundError` when the window holds no failure with that signature.
    """
    etype, tool = split_pattern_id(pattern_id)
    start = parse_since(since, now)
    refresh(conn)
    until_epoch = until.timestamp() if until else None
    occ = _error_rows(conn, start.timestamp(), until_epoch, etype, tool)
    if not occ:
        raise NotFoundError(f"no pattern {etype}:{tool} in the history since {format_timestamp(start)}")
    calls = _tool_calls(conn, start.timestamp(), until_epoch).get(tool, 0)
    return attach_evidence(conn, _build_pattern(etype, tool, occ, calls))


def attach_evidence(conn: sqlite3.Connection, pattern: Pattern) -> Pattern:
    """Read the pattern's evidence and failure kind (:func:`selfheal_plugin.analysis.evidence.gather`)."""
    attach_evidence_all(conn, [pattern])
    return pattern


def attach_evidence_all(conn: sqlite3.Connection, patterns: list[Pattern],
                        keys: dict[str, tuple[int, list[int]]] | None = None,
                        failures: _Failures | None = None) -> None:
    """:func:`attach_evidence` for several patterns, their failures read together.

    ``keys`` (pattern id → the id of the oldest occurrence the evidence reads, and a key of
    its occurrences in the window) lets a pattern's stored evidence stand in for reading it
    again when nothing it depends on changed (:mod:`~selfheal_plugin.analysis.evidencecache`);
    the occurrences of a pattern found there are not read. ``failures``: the detect's
    tallies (else the patterns' ``occurrences_detail`` are read into tallies)."""
    stored: dict[str, dict[str, Any]] = {}
    prints: dict[str, str] = {}
    if keys is not None and patterns:
        firsts: dict[str, int] = {}  # tool -> the oldest occurrence any of its patterns' evidence reads
        for p in patterns:
            firsts[p.tool_name] = min(firsts.get(p.tool_name, keys[p.id][0]), keys[p.id][0])
        prints = evidencecache.fingerprints(conn, {p.id: (p.tool_name, keys[p.id][1]) for p in patterns}, firsts)
        stored = evidencecache.load(conn, prints)
    todo = [p for p in patterns if p.id not in stored]
    parts: dict[str, tuple[Tally, int]] = {}  # pattern id -> its tally, and where the evidence starts in it
    if todo:  # nothing is read when every evidence is stored
        if failures is not None:
            tallies = failures.tallies([(p.error_type, p.tool_name) for p in todo])
        else:
            rows = [o for p in todo for o in recent(p.occurrences_detail)]
            tallies = tallies_of(rows, read_followups(conn, rows) if rows else {})
        for p in todo:
            t = tallies[(p.error_type, p.tool_name)]
            parts[p.id] = (t, max(0, len(t) - MAX_OCCURRENCES))
        _read_kinds(conn, list(parts.values()), cached=bool(prints))
    spans: dict[str, tuple[float, float]] = {}  # server -> the span of its patterns' occurrences
    for p in todo:
        server = server_of(p.tool_name)
        t, start = parts[p.id]
        if server and len(t) > start:
            times = t.ts[start:]
            lo, hi = spans.get(server, (min(times), max(times)))
            spans[server] = (min(lo, *times), max(hi, *times))
    servers = servers_errors(conn, {s: (lo - STREAK_SECONDS, hi + STREAK_SECONDS) for s, (lo, hi) in spans.items()})
    fresh = []
    for p in patterns:
        if p.id in stored:
            p.evidence = stored[p.id]
        else:
            t, start = parts[p.id]
            p.evidence, paths = evidence_of(conn, t, start, p.error_type,
                                            server=servers.get(server_of(p.tool_name) or ""))
            if prints:
                fresh.append((p.id, prints[p.id], p.evidence, paths))
        p.failure_kind = p.evidence["kind"]
    if prints:
        evidencecache.store(conn, fresh)


def _read_kinds(conn: sqlite3.Connection, parts: list[tuple[Tally, int]], cached: bool) -> None:
    """Read the kind of each failure of each tally from its start on not read yet: kept
    ones first (with ``cached``), the rest from its message and its call's arguments (and
    kept, with ``cached``)."""
    missing = [(t, i) for t, start in parts for i in range(start, len(t)) if t.kinds[i] == NOT_READ]
    labels = {t.ids[i]: t.error_type for t, i in missing}
    kinds = evidencecache.load_kinds(conn, labels) if cached and labels else {}
    known = set(kinds)
    texts = read_unknown(conn, labels, kinds)
    for t, i in missing:
        eid = t.ids[i]
        if eid not in kinds:
            kinds[eid] = known_of(t.messages[eid], t.error_type, texts.get(eid))
        t.know(i, kinds[eid])
    if cached and labels:
        evidencecache.store_kinds(conn, labels, {eid: kinds[eid] for eid in labels}, known)


def pattern_details(pattern: Pattern) -> dict[str, Any]:
    """What `show` prints: runs with times and workflows, message templates with counts,
    and the context-similarity analysis."""
    occ = pattern.occurrences_detail
    runs: dict[str, dict[str, Any]] = {}
    for r in occ:
        entry = runs.setdefault(r["run_id"], {
            "run_id": r["run_id"], "workflow": r["workflow"], "started_at": utc_text(r["run_started_at"]),
            "status": r["run_status"], "errors": 0, "first_error_at": utc_text(r["timestamp"]), "_ts": r["ts"]})
        entry["errors"] += 1
    templates = Counter(r["template"] for r in occ)
    examples: dict[str, str] = {}
    for r in occ:
        if r["template"] not in examples:
            examples[r["template"]] = bounded(r["message"], MAX_EXAMPLE_CHARS)
    workflows = Counter(r["workflow"] for r in occ)
    steps = Counter(r["step_index"] for r in occ)
    arg_keys = Counter(k for r in occ for k in r["arg_keys"])
    spellings = Counter(r["raw_error_type"] if r["raw_error_type"] is not None else "(absent)" for r in occ)
    durations = [r["duration_ms"] for r in occ if r["duration_ms"] is not None]
    kinds = {t["template"]: t["kind"] for t in (pattern.evidence or {}).get("templates", [])}
    d = pattern.to_dict()
    d.update({
        "runs": [{k: v for k, v in e.items() if k != "_ts"} for e in sorted(runs.values(), key=lambda e: e["_ts"])],
        "templates": [{"template": t, "count": c, "example": examples[t],
                       **({"kind": kinds[t]} if t in kinds else {})} for t, c in templates.most_common()],
        "context": {
            "workflows": dict(workflows.most_common()),
            "steps": {str(k): v for k, v in steps.most_common()},
            "argument_keys": dict(arg_keys.most_common()),
            "error_type_spellings": dict(spellings.most_common()),
        },
        "duration_ms": {
            "min": min(durations), "max": max(durations),
            "median": sorted(durations)[len(durations) // 2],
        } if durations else None,
    })
    return d
