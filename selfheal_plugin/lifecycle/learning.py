"""Learning from success: what got better without us, why, and the fix rules it teaches.

``learn`` compares two windows of equal length that meet at ``since``: ``[since - L, since)``
(before) and ``[since, until)`` (after, ``until`` defaulting to now). Three kinds of subject:

* **signatures** (``error_type:tool``): failures with the signature (``selfheal_errors``) per
  call of the tool (``selfheal_tool_hours``);
* **tools**: all the tool's failures per call;
* **workflows**: failed runs per finished run (``runs``).

Calls are counted per hour, so both windows are whole hours (the split is the hour that holds
``since``). A subject *improved* when its rate fell and a one-sided Fisher exact test (failures
before vs after, ``scipy.stats.fisher_exact``) stays significant after the Benjamini-Hochberg
correction over every subject tested (``scipy.stats.false_discovery_control``) at
``significance_level``; a subject needs ``min_occurrences`` failures before.

**Why.** The home's own git history of config.toml (:mod:`~selfheal_plugin.lifecycle.gitops`;
no path read from the history or git is ever written) between the start of the before window
and ``until``: commits without selfheal's trailers (``Self-Heal-Improvement:``) are a person's
own changes, diffed (old vs new TOML) to the ``tools."X"`` / ``servers."Y"`` keys they changed
(also those an A/B arm or a canary overlays for its share of runs, :data:`OVERLAYS`, so
selfheal's own experiments are named as ours).
A commit is credited with a subject's improvement when it touched the subject's tool (or its
server; any commit for a workflow), the subject's rate after the commit is significantly lower
than before it (one-sided Fisher, ``significance_level``), and the fall happened at the commit:
its hour lies in the 99.9% likelihood-ratio interval of the hourly rates' changepoint (a commit days
before or after the fall is not credited, however lower the rate after it is); of several, the
lowest p-value wins. When no commit touched it the answer is "improved, no config change explains
it"; when commits touched it but the rate did not fall at them, each is named with "the timing
does not fit" and why.

**Rules.** A credited signature becomes a fix rule (:mod:`selfheal_plugin.history.rules`): the
failure kind of the signature's failures before the commit (:mod:`~selfheal_plugin.analysis.evidence`),
the commit's changes to that tool as a template, and the measured effect (rates, calls, p-value,
reduction) under origin ``home:tool``, source ``learned``. A verified improvement (verify says keep)
becomes one with source ``verified`` (:func:`record_verified`). Enabled rules are *priors* for
proposals whose changes have the same keys (:func:`rule_prior`) and may give a proposal themselves
(strategy ``rule:<id>``) for a pattern of their kind whose strategy offers no config change
(:func:`rule_proposal`); they never apply anything by themselves.
"""
from __future__ import annotations

import logging
import math
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from selfheal_plugin.analysis.patterns import Pattern, detect_failure_patterns, get_pattern
from selfheal_plugin.errors import SelfHealError, UsageError
from selfheal_plugin.history.connection import get_state, wellformed_run_sql
from selfheal_plugin.history.errorindex import refresh
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.history.outcome import finished_sql
from selfheal_plugin.history.rules import (
    UNNAMED_HOME, Rule, RuleError, RuleStore, evidence_summary, home_id, instantiate, server_of, template_from_changes,
)
from selfheal_plugin.history.settings import Settings
from selfheal_plugin.history.text import bounded
from selfheal_plugin.history.times import format_timestamp, parse_since, utcnow
from selfheal_plugin.lazy import lazy_module
from selfheal_plugin.lifecycle import gitops
from selfheal_plugin.plugins.strategy import Change, Proposal
from selfheal_plugin.runtime.experiments import AB, CANARY
from selfheal_plugin.steps import step

log = logging.getLogger("selfheal.learning")
stats = lazy_module("scipy.stats")  # imported on first use: scipy costs ~1 s at start-up
tomlkit = lazy_module("tomlkit")

RULE_STRATEGY_PREFIX = "rule:"
NO_CHANGE = "improved, no config change explains it"
MAX_COMMITS = 500
# A commit is out of time only when the data are strongly against a fall at its hour: with
# sparse calls, a run of successes just before the real change moves the likeliest changepoint
# hours earlier (and changepoint likelihood ratios have heavier tails than chi2(1)).
TIMING_CONFIDENCE = 0.999


# ================================================================= counting


@dataclass(frozen=True)
class Windows:
    """Whole hours: before = [lo, split), after = [split, hi)."""

    lo: int
    split: int
    hi: int

    def to_dict(self) -> dict[str, list[str]]:
        return {"before": [_iso_hour(self.lo), _iso_hour(self.split)],
                "after": [_iso_hour(self.split), _iso_hour(self.hi)]}


def _iso_hour(h: float) -> str:
    return format_timestamp(datetime.fromtimestamp(h * 3600, tz=timezone.utc))


def windows(since: datetime, until: datetime) -> Windows:
    split = math.floor(since.timestamp() / 3600)
    hi = math.ceil(until.timestamp() / 3600)
    if hi <= split:
        raise UsageError(f"nothing to compare: the window since {format_timestamp(since)} ends before it starts")
    lo = split - (hi - split)
    if lo < _FIRST_HOUR:
        raise UsageError(f"nothing to compare: the window before {format_timestamp(since)}, as long as the one "
                         "since it, would start before year 1; give a later --since")
    return Windows(lo, split, hi)


_FIRST_HOUR = math.ceil(datetime(1, 1, 1, tzinfo=timezone.utc).timestamp() / 3600)  # the first whole hour of year 1


def _signature_counts(conn: sqlite3.Connection, lo: float, hi: float) -> dict[tuple[str, str], int]:
    return {(e, t): n for e, t, n in conn.execute(
        "SELECT error_type, tool_name, count(*) FROM selfheal_errors WHERE ts >= ? AND ts < ? GROUP BY 1, 2",
        (lo * 3600, hi * 3600))}


def _calls(conn: sqlite3.Connection, lo: float, hi: float, tool: str | None = None) -> dict[str, int]:
    sql = "SELECT tool_name, sum(calls) FROM selfheal_tool_hours WHERE hour >= ? AND hour < ?"
    params: list[Any] = [math.floor(lo), math.floor(hi)]
    if tool is not None:
        sql += " AND tool_name = ?"
        params.append(tool)
    return {t: int(n) for t, n in conn.execute(sql + " GROUP BY tool_name", params)}


_RUN_EPOCH = "(julianday(started_at) - 2440587.5) * 86400.0"
_RUN_OK = wellformed_run_sql()  # a malformed runs row is skipped


def _workflow_counts(conn: sqlite3.Connection, lo: float, hi: float,
                     workflow: str | None = None) -> dict[str, tuple[int, int]]:
    sql = (f"SELECT workflow_name, sum(status = 'failed'), count(*) FROM runs WHERE {finished_sql()} "
           f"AND {_RUN_EPOCH} >= ? AND {_RUN_EPOCH} < ? AND {_RUN_OK}")
    params: list[Any] = [lo * 3600, hi * 3600]
    if workflow is not None:
        sql += " AND workflow_name = ?"
        params.append(workflow)
    return {w: (int(f), int(n)) for w, f, n in conn.execute(sql + " GROUP BY workflow_name", params)
            if isinstance(w, str)}


@dataclass(frozen=True)
class Subject:
    kind: str  # signature | tool | workflow
    key: str  # pattern id, tool name or workflow name
    tool: str | None = None
    error_type: str | None = None

    def bins(self, conn: sqlite3.Connection, lo: int, hi: int) -> list[tuple[int, int]]:
        """(failures, trials) per hour of [lo, hi)."""
        out = [[0, 0] for _ in range(hi - lo)]
        if self.kind == "workflow":
            rows = conn.execute(
                f"SELECT CAST({_RUN_EPOCH} / 3600 AS INTEGER) AS h, sum(status = 'failed'), count(*) FROM runs "
                f"WHERE {finished_sql()} AND workflow_name = ? AND {_RUN_EPOCH} >= ? "
                f"AND {_RUN_EPOCH} < ? AND {_RUN_OK} GROUP BY h", (self.key, lo * 3600, hi * 3600))
            for h, f, n in rows:
                if lo <= h < hi:
                    out[h - lo] = [int(f), int(n)]
            return [(f, n) for f, n in out]
        sql = ("SELECT CAST(ts / 3600 AS INTEGER) AS h, count(*) FROM selfheal_errors "
               "WHERE ts >= ? AND ts < ? AND tool_name = ?")
        params: list[Any] = [lo * 3600, hi * 3600, self.tool]
        if self.kind == "signature":
            sql += " AND error_type = ?"
            params.append(self.error_type)
        for h, f in conn.execute(sql + " GROUP BY h", params):
            if lo <= h < hi:
                out[h - lo][0] = int(f)
        for h, n in conn.execute("SELECT hour, calls FROM selfheal_tool_hours WHERE tool_name = ? AND hour >= ? "
                                 "AND hour < ?", (self.tool, lo, hi)):
            out[h - lo][1] = int(n)
        return [(f, max(f, n)) for f, n in out]


def _sum(bins: list[tuple[int, int]]) -> tuple[int, int]:
    return sum(f for f, _ in bins), sum(n for _, n in bins)


def _loglik(f: int, n: int) -> float:
    if n == 0 or f == 0 or f == n:
        return 0.0
    p = f / n
    return f * math.log(p) + (n - f) * math.log(1 - p)


def changepoint_profile(bins: list[tuple[int, int]]) -> list[float | None]:
    """The log-likelihood of a change of the failure rate at each hour boundary k (the two
    segments binomial), None where a segment has no trials."""
    total_f, total_n = _sum(bins)
    out: list[float | None] = [None]
    f = n = 0
    for k in range(1, len(bins)):
        f += bins[k - 1][0]
        n += bins[k - 1][1]
        rf, rn = total_f - f, total_n - n
        out.append(_loglik(f, n) + _loglik(rf, rn) if n and rn else None)
    return out + [None]


def fall_interval(bins: list[tuple[int, int]], confidence: float) -> tuple[int, int, int] | None:
    """(best, first, last) hour boundaries of the fall: the maximum likelihood changepoint
    among those where the rate falls, and the likelihood-ratio interval around it (boundaries
    whose log-likelihood is within ``chi2(1).ppf(confidence) / 2`` of the best). None without
    a fall."""
    profile = changepoint_profile(bins)
    total_f, total_n = _sum(bins)
    f = n = 0
    best, best_k = None, None
    for k in range(1, len(bins)):
        f += bins[k - 1][0]
        n += bins[k - 1][1]
        ll = profile[k]
        if ll is None or not n or (total_n - n) == 0 or (total_f - f) / (total_n - n) >= f / n:
            continue
        if best is None or ll > best:
            best, best_k = ll, k
    if best is None or best_k is None:
        return None
    crit = float(stats.chi2.ppf(confidence, 1)) / 2
    inside = [k for k, ll in enumerate(profile) if ll is not None and best - ll <= crit]
    return best_k, min(inside), max(inside)


def fell(bf: int, bn: int, af: int, an: int) -> float | None:
    """One-sided p-value that the failure rate after is lower than before (Fisher exact);
    None without trials on either side."""
    if bn <= 0 or an <= 0:
        return None
    bf, af = min(bf, bn), min(af, an)
    return float(stats.fisher_exact([[bf, bn - bf], [af, an - af]], alternative="greater")[1])


def _rate(f: int, n: int) -> float | None:
    return round(f / n, 4) if n else None


# ================================================================= the home's own changes


@dataclass
class ConfigCommit:
    sha: str
    at: float  # committer time, epoch seconds
    author: str
    subject: str
    changes: list[dict[str, Any]]  # Change.to_dict() shape: tools."X"/servers."Y" keys and OVERLAYS' keys
    note: str | None = None  # why its changes could not be read
    improvement: str | None = None  # selfheal's own commit: the improvement (or A/B experiment) its trailer names
    action: str | None = None  # selfheal's own commit: its Self-Heal-Action (apply, ab, canary-end, ...)

    def to_dict(self) -> dict[str, Any]:
        return {"sha": self.sha, "at": format_timestamp(datetime.fromtimestamp(self.at, tz=timezone.utc)),
                "author": self.author, "subject": self.subject, "changes": self.changes,
                **({"note": self.note} if self.note else {}),
                **({"improvement": self.improvement} if self.improvement else {}),
                **({"action": self.action} if self.action else {})}

    def touches(self, tool: str) -> list[dict[str, Any]]:
        return [c for c in self.changes if _touches(c, tool)]

    def what(self) -> str:
        """What selfheal's own commit was for: an experiment of :data:`OVERLAYS` (A/B,
        canary) by its Self-Heal-Action, else an improvement."""
        return next((o.what for o in OVERLAYS if self.action in o.actions), "improvement")


def _flatten(table: Any, prefix: list[str], out: dict[tuple[str, ...], Any]) -> None:
    for key, value in table.items():
        path = [*prefix, str(key)]
        if isinstance(value, dict) and len(path) < 4:
            _flatten(value, path, out)
        elif not isinstance(value, dict):
            out[tuple(path)] = value


def _tool_settings(doc: Mapping[str, Any], prefix: list[str], out: dict[tuple[str, ...], Any]) -> None:
    for top in ("tools", "servers"):
        section = doc.get(top)
        if isinstance(section, dict):
            for name, table in section.items():
                if isinstance(table, dict):
                    _flatten(table, [*prefix, top, str(name)], out)


@dataclass(frozen=True)
class Overlay:
    """A section selfheal writes to config.toml whose ``tools``/``servers`` tables are in force
    for a share of runs: ``[TOP."ID".tools."X"]``, or with ``inner`` one table per arm,
    ``[TOP."ID".INNER."IMP".tools."X"]``."""
    top: str  # the section's table in config.toml
    inner: str | None  # the table of arms inside a section, None when the section is the overlay
    what: str  # how learn names the experiment its commits start and end
    name: str  # how a key set in it is labelled (an arm's id follows)
    actions: tuple[str, ...]  # the Self-Heal-Action of the commits that start and end it

    @property
    def depth(self) -> int:
        """Keys before the overlay's ``tools``/``servers``."""
        return 2 if self.inner is None else 4

    def holds(self, path: list[str] | tuple[str, ...]) -> bool:
        n = self.depth
        return (len(path) > n + 2 and path[0] == self.top and (self.inner is None or path[2] == self.inner)
                and path[n] in ("tools", "servers"))


# The one list of selfheal's own sections that change what a run's calls get (lifecycle.ab's
# start/end commits, lifecycle.canary's). [shadow."ID"] is not one: it only observes, every
# call keeps its outcome, so a fall is never its doing (its commits are still ours by their
# trailers, named so in the commit list).
OVERLAYS = (Overlay(AB, "arms", "A/B experiment", "A/B arm", ("ab", "ab-end")),
            Overlay(CANARY, None, "canary", "canary", ("canary", "canary-end")))


def config_settings(text: str | None) -> dict[tuple[str, ...], Any]:
    """``{("tools", X, key[, subkey]): value, ("servers", Y, key): value}`` of a config's text,
    and the same settings selfheal's :data:`OVERLAYS` set for their share of runs, e.g.
    ``("ab", ID, "arms", IMP, "tools", X, key)``, ``("canary", IMP, "tools", X, key)``
    (:func:`change_target` reads either)."""
    if not text:
        return {}
    doc = tomlkit.parse(text).unwrap()
    out: dict[tuple[str, ...], Any] = {}
    _tool_settings(doc, [], out)
    for o in OVERLAYS:
        sections = doc.get(o.top)
        if not isinstance(sections, dict):
            continue
        for sec_id, sec in sections.items():
            if not isinstance(sec, dict):
                continue
            if o.inner is None:
                _tool_settings(sec, [o.top, str(sec_id)], out)
                continue
            arms = sec.get(o.inner)
            if isinstance(arms, dict):
                for arm_id, arm in arms.items():
                    if isinstance(arm, dict):
                        _tool_settings(arm, [o.top, str(sec_id), o.inner, str(arm_id)], out)
    return out


def overlay_of(path: list[str] | tuple[str, ...]) -> Overlay | None:
    """The section of :data:`OVERLAYS` a change's path sets a tool or server setting in."""
    return next((o for o in OVERLAYS if o.holds(path)), None)


def change_target(path: list[str] | tuple[str, ...]) -> list[str]:
    """The ``[tools, X, key...]`` / ``[servers, Y, key...]`` a change sets, also when it sets
    them in one of selfheal's :data:`OVERLAYS` (``[ab, ID, arms, IMP, tools, X, key...]``,
    ``[canary, IMP, tools, X, key...]``)."""
    o = overlay_of(path)
    return list(path[o.depth:]) if o is not None else list(path)


def overlay_label(path: list[str] | tuple[str, ...]) -> str | None:
    """``A/B arm IMP`` / ``canary`` for a key set in an overlay, None for one in [tools]/[servers]."""
    o = overlay_of(path)
    return None if o is None else o.name + (f" {path[3]}" if o.inner else "")


def config_diff(old: str | None, new: str | None) -> list[dict[str, Any]]:
    """The tool and server settings that changed from ``old`` to ``new`` (as config changes)."""
    a, b = config_settings(old), config_settings(new)
    out = []
    for path in sorted(set(a) | set(b)):
        if path not in b:
            out.append({"kind": "config", "file": "config.toml", "path": list(path), "op": "delete"})
        elif a.get(path, _MISSING) != b[path]:
            out.append({"kind": "config", "file": "config.toml", "path": list(path), "op": "set", "value": b[path]})
    return out


_MISSING = object()


def _ours(body: str) -> tuple[str, str | None] | None:
    """The improvement (or A/B experiment) a selfheal commit's trailers name ("" for one
    without an id) and its action, None for a person's commit."""
    trailers = dict(ln.strip().split(":", 1) for ln in body.splitlines() if ":" in ln)
    if not set(trailers) & {gitops.TRAILER_IMPROVEMENT, gitops.TRAILER_ACTION}:
        return None
    action = trailers.get(gitops.TRAILER_ACTION, "").strip()
    return bounded(trailers.get(gitops.TRAILER_IMPROVEMENT, "").strip(), 80), bounded(action, 40) or None


def config_commits(settings: Settings, lo: float, hi: float) -> list[ConfigCommit]:
    """Commits to the home's config.toml with committer time in [lo, hi) (epoch s), oldest
    first: a person's, and selfheal's own (``improvement`` set from its trailers, so a fall
    it caused is named as ours, never learned as a person's). Only the home's own repository
    is read (from the settings, never from the history); a root commit (the file's first
    version, no change to compare) is left out."""
    try:
        cr = gitops.locate(settings.config_path, settings.home)
    except gitops.GitOpsError as exc:
        log.info("no git history for learning: %s", exc)
        return []
    if cr.repo is None or gitops.head_sha(cr) is None:
        return []
    out = cr.git("log", f"--max-count={MAX_COMMITS}", "--format=%H%x00%P%x00%ct%x00%an%x00%s%x00%B%x1e",
                 "HEAD", "--", cr.rel)
    commits = []
    for entry in out.split("\x1e"):
        parts = entry.strip("\n").split("\x00")
        if len(parts) != 6:
            continue
        sha, parents, ct, author, subject, body = parts
        try:
            at = float(ct)
        except ValueError:
            continue
        if not lo <= at < hi or not parents.strip():
            continue
        ours = _ours(body)
        parent = parents.split()[0]
        note = None
        try:
            changes = config_diff(gitops.file_at(cr, parent), gitops.file_at(cr, sha))
        except Exception as exc:  # noqa: BLE001 - a person's broken TOML: named, not a crash
            changes, note = [], f"config.toml could not be read at this commit: {str(exc).splitlines()[0][:120]}"
        commits.append(ConfigCommit(sha, at, bounded(author, 80), bounded(subject, 120), changes, note,
                                    None if ours is None else ours[0] or "selfheal",
                                    None if ours is None else ours[1]))
    return sorted(commits, key=lambda c: c.at)


# ================================================================= learn


def _entry(subject: Subject, bf: int, bn: int, af: int, an: int, p: float) -> dict[str, Any]:
    rb, ra = _rate(bf, bn), _rate(af, an)
    return {"kind": subject.kind, "subject": subject.key, "tool": subject.tool, "error_type": subject.error_type,
            "before_failures": bf, "before_trials": bn, "after_failures": af, "after_trials": an,
            "before_rate": rb, "after_rate": ra, "reduction": round((bf / bn - af / an) / (bf / bn), 4) if bf else None,
            "p_value": p}


def attribute(conn: sqlite3.Connection, subject: Subject, commits: list[ConfigCommit], w: Windows,
              alpha: float) -> dict[str, Any]:
    """The commit that explains the subject's fall, or why none does.

    A commit explains it when it touched the subject (its tool or that tool's server; any
    commit for a workflow), the failure rate after the commit is significantly lower than
    before it (one-sided Fisher at ``alpha``), and the fall happened at the commit: the
    commit's hour lies in the :data:`TIMING_CONFIDENCE` likelihood-ratio interval of the
    changepoint of the hourly rates (:func:`fall_interval`). Of several, the lowest p-value wins."""
    bins = subject.bins(conn, w.lo, w.hi)
    fall = fall_interval(bins, TIMING_CONFIDENCE)
    fell_at = None if fall is None else _iso_hour(w.lo + fall[0])
    span = None if fall is None else [_iso_hour(w.lo + fall[1]), _iso_hour(w.lo + fall[2])]
    base = {"fell_at": fell_at, "fell_between": span}
    candidates = [c for c in commits if c.changes and (subject.kind == "workflow" or c.touches(subject.tool or ""))]
    if not candidates:
        return {**base, "attributed": False, "commit": None, "rejected": [],
                "explanation": NO_CHANGE + (f" (it fell around {fell_at[:16]})" if fell_at else "")}
    best, rejected = None, []
    for c in candidates:
        k = min(max(math.floor(c.at / 3600) - w.lo, 0), len(bins))
        bf, bn = _sum(bins[:k])
        af, an = _sum(bins[k:])
        p = fell(bf, bn, af, an)
        split = {"before_rate": _rate(bf, bn), "after_rate": _rate(af, an), "n_before": bn, "n_after": an,
                 "failures_before": bf, "failures_after": af, "p_value": p}
        if not an or not bn:  # nothing to compare on one side: say so, not that nothing fell
            unit = "finished run of the workflow" if subject.kind == "workflow" else "call of the tool"
            why = f"no {unit} came {'after' if not an else 'before'} it in the window"
        elif p is None or p >= alpha or af / an >= bf / bn:
            why = "the errors did not fall significantly after it"
        elif fall is None or not fall[1] <= k <= fall[2]:
            why = ("no fall of the errors fits a change at one instant" if fall is None else
                   f"the errors fell between {span[0][:16]} and {span[1][:16]}, not at it")
        else:
            if best is None or p < best[1]["p_value"]:
                best = (c, split)
            continue
        rejected.append({"commit": c.to_dict(), **split, "reason": why})
    if best is None:
        names = "; ".join(f"{r['commit']['sha'][:12]} ({r['commit']['at'][:16]}): {r['reason']}" for r in rejected)
        return {**base, "attributed": False, "commit": None, "rejected": rejected,
                "explanation": f"{NO_CHANGE}: the timing does not fit {names}"}
    c, split = best
    if c.improvement:  # our own fix: not "without us", and its verification keeps its rule
        return {**base, "attributed": False, "by_selfheal": c.improvement, "commit": c.to_dict(), "split": split,
                "rejected": rejected,
                "explanation": f"selfheal's own {c.what()} {c.improvement} (commit {c.sha[:12]} at "
                               f"{c.to_dict()['at'][:16]}); not learned again"}
    return {**base, "attributed": True, "commit": c.to_dict(), "split": split, "rejected": rejected,
            "explanation": f"a person's change {c.sha[:12]} at {c.to_dict()['at'][:16]} "
                           f"({_change_text(subject.tool and c.touches(subject.tool) or c.changes)})"}


def _change_text(changes: list[Mapping[str, Any]]) -> str:
    parts = []
    for ch in changes[:4]:
        key = ".".join(str(p) for p in change_target(ch["path"])[2:])
        parts.append(f"{key} = {ch['value']!r}" if ch.get("op") == "set" else f"{key} removed")
    return ", ".join(parts) + (", ..." if len(changes) > 4 else "")


def _template_text(template: list[Mapping[str, Any]]) -> str:
    return _change_text([{**t, "path": t["path"]} for t in template])


def learn(conn: sqlite3.Connection, settings: Settings, *, since: str | None = None, until: datetime | None = None,
          now: datetime | None = None, record: bool = True) -> dict[str, Any]:
    """What improved between the two windows, why, and the rules learned (see the module docs).
    ``record`` stores the learned rules (merge per origin); without it nothing is written."""
    now = now or utcnow()
    end = until or now
    start = parse_since(since or settings.lookback, now)
    w = windows(start, end)
    refresh(conn)
    alpha = settings.significance_level
    before_sig = _signature_counts(conn, w.lo, w.split)
    after_sig = _signature_counts(conn, w.split, w.hi)
    calls_b, calls_a = _calls(conn, w.lo, w.split), _calls(conn, w.split, w.hi)
    tested: list[tuple[Subject, int, int, int, int]] = []
    for (etype, tool), bf in before_sig.items():
        tested.append((Subject("signature", f"{etype}:{tool}", tool, etype), bf, calls_b.get(tool, 0),
                       after_sig.get((etype, tool), 0), calls_a.get(tool, 0)))
    tool_b: dict[str, int] = {}
    tool_a: dict[str, int] = {}
    for (_, tool), n in before_sig.items():
        tool_b[tool] = tool_b.get(tool, 0) + n
    for (_, tool), n in after_sig.items():
        tool_a[tool] = tool_a.get(tool, 0) + n
    for tool, bf in tool_b.items():
        tested.append((Subject("tool", tool, tool), bf, calls_b.get(tool, 0), tool_a.get(tool, 0),
                       calls_a.get(tool, 0)))
    wf_b, wf_a = _workflow_counts(conn, w.lo, w.split), _workflow_counts(conn, w.split, w.hi)
    for wf, (bf, bn) in wf_b.items():
        af, an = wf_a.get(wf, (0, 0))
        tested.append((Subject("workflow", wf), bf, bn, af, an))
    tested = [t for t in tested if t[1] >= settings.min_occurrences and t[2] and t[4]]
    raw = [fell(bf, bn, af, an) for _, bf, bn, af, an in tested]
    adjusted = list(stats.false_discovery_control(raw, method="bh")) if raw else []
    commits = config_commits(settings, w.lo * 3600, w.hi * 3600)
    improved = []
    for (subject, bf, bn, af, an), p in zip(tested, adjusted):
        if p < alpha and af / an < bf / bn:
            entry = _entry(subject, bf, bn, af, an, float(f"{float(p):.3g}"))
            entry.update(attribute(conn, subject, commits, w, alpha))
            improved.append(entry)
    improved.sort(key=lambda e: ({"signature": 0, "tool": 1, "workflow": 2}[e["kind"]], e["p_value"], e["subject"]))
    learned = _learn_rules(conn, settings, improved, w, now, record)
    current = _current_patterns(conn, settings, start, end, now)
    rules = RuleStore(conn).list(enabled_only=True)
    for r in learned:
        stored = next((x for x in rules if x.id == r["rule"]["id"]), None)
        if stored is None and not record:
            rules.append(Rule(**{k: r["rule"][k] for k in ("id", "failure_kind", "description", "template",
                                                            "evidence", "error_type")}))
    applicable = applicable_rules(conn, rules, current)
    suggestions = _suggestions(learned, applicable)
    return {"since": format_timestamp(start), "until": format_timestamp(end), "windows": w.to_dict(),
            "tested": len(tested), "significance_level": alpha, "correction": "Benjamini-Hochberg",
            "test": "Fisher's exact test, one-sided (fewer failures after)",
            "improved": improved, "commits": [c.to_dict() for c in commits], "learned_rules": learned,
            "applicable": applicable, "suggestions": suggestions, "recorded": record}


def _learn_rules(conn: sqlite3.Connection, settings: Settings, improved: list[dict[str, Any]], w: Windows,
                 now: datetime, record: bool) -> list[dict[str, Any]]:
    out = []
    # a dry run in a home without an id yet makes none (nothing is written): its rules show a
    # placeholder origin of the form every origin has (history.rules.HOME_ID)
    home = home_id(conn) if record else (_home_id_if_any(conn) or UNNAMED_HOME)
    for e in improved:
        if e["kind"] != "signature" or not e.get("attributed"):
            continue
        tool, etype = e["tool"], e["error_type"]
        commit = e["commit"]
        changes = [c for c in commit["changes"] if _touches(c, tool) and change_target(c["path"]) == c["path"]]
        template = template_from_changes(changes, tool)
        if template is None:
            e["rule_note"] = "the change holds no tool or server setting a rule can carry"
            continue
        at = datetime.fromisoformat(commit["at"].replace("Z", "+00:00"))
        try:
            pattern = get_pattern(conn, e["subject"], since=_iso_hour(w.lo), now=now, until=at)
            kind = pattern.failure_kind or "unknown"
        except SelfHealError:
            kind = "unknown"
        split = e["split"]
        reduction = (split["before_rate"] - split["after_rate"]) / split["before_rate"] if split["before_rate"] else 0.0
        evidence = {f"{home}:{tool}": {
            "source": "learned", "subject": tool, "home": home, "before": split["before_rate"],
            "after": split["after_rate"], "n_before": split["n_before"], "n_after": split["n_after"],
            "p_value": split["p_value"], "reduction": round(reduction, 4), "worked": True,
            "measured_at": format_timestamp(now), "note": f"a person's commit {commit['sha'][:12]}"}}
        try:
            rule = Rule.build(kind, template, f"set {_template_text(template)} ({kind} failures)", evidence,
                              error_type=etype.lower() if etype else None)
        except RuleError as exc:
            e["rule_note"] = str(exc)
            continue
        if record:
            rule, _ = RuleStore(conn).merge(rule)
        e["rule_id"] = rule.id
        out.append({"rule": rule.to_dict(), "tool": tool, "pattern_id": e["subject"], "failure_kind": kind,
                    "reduction": round(reduction, 4), "change": _template_text(template)})
    return out


def _touches(change: Mapping[str, Any], tool: str) -> bool:
    """Does the change set the tool's settings or its server's (directly or in an overlay)?"""
    path = change_target(change["path"])
    server = server_of(tool)
    return len(path) > 2 and ((path[0] == "tools" and path[1] == tool)
                              or (server is not None and path[0] == "servers" and path[1] == server))


def _home_id_if_any(conn: sqlite3.Connection) -> str | None:
    return get_state(conn, "home_id")


def _current_patterns(conn: sqlite3.Connection, settings: Settings, start: datetime, end: datetime,
                      now: datetime) -> list[Pattern]:
    return detect_failure_patterns(conn, since=format_timestamp(start), min_occurrences=settings.min_occurrences,
                                   confidence_threshold=0.0, now=now, until=end).patterns


def _fixed_here(rule: Rule, home: str | None) -> set[str]:
    return {origin.split(":", 1)[1] for origin in rule.evidence if home and origin.startswith(f"{home}:")}


def applicable_rules(conn: sqlite3.Connection, rules: list[Rule], patterns: list[Pattern]) -> list[dict[str, Any]]:
    """Where enabled rules could apply now: patterns of the rule's kind on other tools that still
    fail and have no fix in force (applied or verified: their failures in the window may all
    predate it, and it is what verification measures)."""
    home = _home_id_if_any(conn)
    in_force = ImprovementStore(conn).in_force_for_patterns([p.id for p in patterns]) if rules else {}
    out = []
    for rule in rules:
        if not rule.enabled:
            continue
        fixed = _fixed_here(rule, home)
        for p in patterns:
            if p.failure_kind != rule.failure_kind or p.tool_name in fixed or p.id in in_force:
                continue
            try:
                instantiate(rule.template, p.tool_name)
            except RuleError:
                continue
            out.append({"rule_id": rule.id, "pattern_id": p.id, "tool": p.tool_name, "failure_kind": p.failure_kind,
                        "occurrences": p.occurrences, "failure_rate": p.failure_rate, "summary": rule.summary(),
                        "change": _template_text(rule.template)})
    return out


def _suggestions(learned: list[dict[str, Any]], applicable: list[dict[str, Any]]) -> list[str]:
    out = []
    for r in learned:
        for a in applicable:
            if a["rule_id"] == r["rule"]["id"] and a["tool"] != r["tool"]:
                out.append(f"the change you made for {r['tool']} ({r['change']}) cut its {r['pattern_id'].split(':')[0]} "
                           f"errors by {r['reduction']:.0%}; {a['tool']} fails the same way ({a['failure_kind']}, "
                           f"{a['occurrences']} failures)")
    return out


# ================================================================= verified improvements


def record_verified(conn: sqlite3.Connection, imp: Any, pattern: Mapping[str, Any] | None,
                    now: datetime | None = None) -> Rule | None:
    """A kept improvement as a rule (source ``verified``); None when its changes make no
    template or its kind is unknown. Never raises for a rule it cannot make."""
    tool = getattr(imp, "tool_name", None)
    kind = (getattr(imp, "evidence", None) or {}).get("failure_kind")
    if not tool or not kind or not pattern:
        return None
    template = template_from_changes(list(imp.changes or []), tool)
    if template is None:
        return None
    home = home_id(conn)
    rb, ra = pattern.get("before_error_rate"), pattern.get("after_error_rate")
    entry = {"source": "verified", "subject": tool, "home": home, "before": rb, "after": ra,
             "n_before": pattern.get("before_calls"), "n_after": pattern.get("after_calls"),
             "p_value": pattern.get("p_value"), "reduction": pattern.get("reduction"), "worked": True,
             "measured_at": format_timestamp(now or utcnow()), "note": f"improvement {imp.id}"}
    try:
        rule = Rule.build(kind, template, f"set {_template_text(template)} ({kind} failures)",
                          {f"{home}:{tool}": {k: v for k, v in entry.items() if v is not None}},
                          error_type=(imp.error_type or "").lower() or None)
        return RuleStore(conn).merge(rule)[0]
    except RuleError as exc:
        log.warning("%s: no rule recorded: %s", imp.id, exc)
        return None


# ================================================================= rules in proposals


def _keys(template: list[Mapping[str, Any]]) -> frozenset[tuple[str, ...]]:
    return frozenset(tuple(t["path"]) for t in template)


def rule_prior(conn: sqlite3.Connection, tool: str, failure_kind: str | None,
               changes: list[Mapping[str, Any]]) -> dict[str, Any] | None:
    """What enabled rules of this kind with the same keys as ``changes`` measured elsewhere
    (other tools or homes): None when there is no such evidence."""
    if not failure_kind:
        return None
    template = template_from_changes([c for c in changes if c.get("kind") == "config"], tool)
    if template is None:
        return None
    own = f"{_home_id_if_any(conn)}:{tool}"
    matching = [r for r in RuleStore(conn).list(failure_kind, enabled_only=True) if _keys(r.template) == _keys(template)]
    entries = {o: e for r in matching for o, e in r.evidence.items() if o != own}
    if not entries:
        return None
    told = evidence_summary(entries)
    med = told["median_reduction"]
    return {"rules": [r.id for r in matching], **told, "median_reduction": None if med is None else round(med, 4)}


def with_prior(conn: sqlite3.Connection, proposal: Proposal) -> Proposal:
    """The proposal carrying the prior of matching rules (evidence ``prior``, a clause in its
    expected impact); unchanged when there is none."""
    prior = rule_prior(conn, proposal.tool_name, proposal.failure_kind, [c.to_dict() for c in proposal.changes])
    if prior is not None:
        proposal.evidence["prior"] = prior
        proposal.expected_impact = f"{proposal.expected_impact}; a learned rule {prior['summary']}"
    return proposal


def is_rule_strategy(name: str | None) -> bool:
    return bool(name) and name.startswith(RULE_STRATEGY_PREFIX)


def rule_usable(conn: sqlite3.Connection, strategy: str) -> bool:
    """Is the rule behind a ``rule:<id>`` proposal still stored and enabled?"""
    rid = strategy[len(RULE_STRATEGY_PREFIX):]
    row = conn.execute("SELECT enabled FROM selfheal_rules WHERE id = ?", (rid,)).fetchone()
    return bool(row and row[0])


def rule_proposal(conn: sqlite3.Connection, pattern: Pattern, proposal: Proposal | None) -> Proposal | None:
    """A proposal from the best enabled rule of the pattern's kind, when the strategy's
    ``proposal`` has no config change (None otherwise, or when no rule fits the tool).
    Medium risk: auto-apply (low risk only) never takes it."""
    if proposal is not None and any(c.kind == "config" for c in proposal.changes):
        return None
    if not pattern.failure_kind:
        return None
    own = f"{_home_id_if_any(conn)}:{pattern.tool_name}"
    best: tuple[tuple[int, float], Rule, list[dict[str, Any]]] | None = None
    for rule in RuleStore(conn).list(pattern.failure_kind, enabled_only=True):
        if rule.worked == 0 or own in rule.evidence:
            continue
        try:
            changes = instantiate(rule.template, pattern.tool_name)
        except RuleError:
            continue
        score = (rule.worked, rule.median_reduction or 0.0)
        if best is None or score > best[0]:
            best = (score, rule, changes)
    if best is None:
        return None
    _, rule, changes = best
    prior = rule_prior(conn, pattern.tool_name, pattern.failure_kind, changes)
    manual = [c for c in (proposal.changes if proposal else []) if c.kind == "manual"]
    made = [Change.from_dict(c) for c in changes] + manual
    return Proposal(
        pattern_id=pattern.id, error_type=pattern.error_type, tool_name=pattern.tool_name,
        strategy=f"{RULE_STRATEGY_PREFIX}{rule.id}",
        description=f"Apply learned rule {rule.id} to {pattern.tool_name}: {_template_text(rule.template)}",
        expected_impact=f"like where it was measured: {rule.summary()}", risk_level="medium",
        changes_required=[c.describe() for c in made], changes=made,
        confidence=pattern.confidence, expected_reduction=rule.median_reduction,
        evidence={"rule": {"id": rule.id, "failure_kind": rule.failure_kind, "summary": rule.summary()},
                  **({"prior": prior} if prior else {}),
                  **({"strategy_proposal": proposal.strategy} if proposal else {})},
        failure_kind=pattern.failure_kind)


def rules_list(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    return [r.to_dict() for r in RuleStore(conn).list()]


def set_rule_enabled(conn: sqlite3.Connection, rule_id: str, enabled: bool) -> dict[str, Any]:
    """``{"rule": ..., "changed": bool}``; a rule that already is so is not written again."""
    if not isinstance(rule_id, str) or not rule_id.strip():
        raise UsageError(f"a rule id is needed (see: {step('learn --rules')})")
    rule, changed = RuleStore(conn).set_enabled(rule_id.strip(), enabled)
    return {"rule": rule.to_dict(), "changed": changed}


__all__ = ["learn", "record_verified", "rule_prior", "with_prior", "rule_proposal", "is_rule_strategy",
           "rule_usable", "applicable_rules", "config_commits", "config_diff", "windows", "fell",
           "rules_list", "set_rule_enabled"]
