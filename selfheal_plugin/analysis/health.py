"""Health analysis: one run's health, per-agent metrics, per-tool reliability, the dashboard.

The design document's health score is

    health = 100 · (0.5·success + 0.2·duration + 0.2·tool_reliability + 0.1·resource_efficiency)

with every component in [0, 1] and computed from the history (README "Health"):

* **success** — ``0.7·outcome + 0.3·tool-call success``; outcome is 1 for ``completed``,
  0.5 for ``cancelled``, 0 for ``failed`` and unknown while ``running`` (then the
  tool-call success alone); without tool calls, the outcome alone.
* **duration** — ``min(1, median / duration)`` against the median duration of the same
  workflow's completed runs (a running run uses its elapsed time so far).
* **tool reliability** — the run's tools' success rates across the indexed history,
  weighted by how often the run called each.
* **resource efficiency** — the mean of ``min(1, median / value)`` over iterations, tokens
  and tool calls against the workflow's medians from ``run_metrics``; a run without a
  ``run_metrics`` row is measured from its events (iterations, tool calls; tokens unknown).

A component that cannot be computed (no reference runs, no tool calls, ...) is reported as
``null`` and the weights of the others are re-normalised; with nothing known at all the
score is the neutral 50 and ``score_basis`` says ``no_data``.

All windows compare instants (``julianday`` in SQL, :func:`times.parse_timestamp` in
Python), never timestamp strings: the runtime writes mixed UTC offsets.
"""
from __future__ import annotations

import bisect
import functools
import json
import logging
import math
import sqlite3
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from selfheal_plugin.history.errorindex import indexed_up_to, refresh, sane_duration, wellformed_sql
from selfheal_plugin.errors import NotFoundError, UsageError
from selfheal_plugin.history.connection import (malformed_runs, normalize_error_type, read_all, rows_by_id,
                                                 wellformed_run_sql)
from selfheal_plugin.history.outcome import FINISHED, SUCCEEDED, success_rate
from selfheal_plugin.history.text import Undecodable
from selfheal_plugin.history.abstore import AbStore, has_ab_table
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.plugins.strategy import Change, server_of
from selfheal_plugin.history.times import format_timestamp, parse_since, parse_timestamp, utc_text, utcnow
from selfheal_plugin.steps import step

log = logging.getLogger("selfheal.health")

WEIGHTS: dict[str, float] = {"success": 0.5, "duration": 0.2, "tool_reliability": 0.2, "resource_efficiency": 0.1}
OUTCOME_SCORE: dict[str, float] = {"completed": 1.0, "cancelled": 0.5, "failed": 0.0}  # one per FINISHED status
OUTCOME_SHARE = 0.7  # success = 0.7·outcome + 0.3·tool-call success
MIN_REFERENCE_RUNS = 5  # a workflow median needs at least this many runs
TREND_THRESHOLD = 0.05  # ±5 percentage points of success rate
MIN_TREND_RUNS = 10  # finished runs each period needs for the dashboard trend
MIN_AGENT_TREND_RUNS = 5  # finished runs each half-window needs for an agent's trend
RECENT_DAYS, HISTORICAL_DAYS = 7, 30
MIN_TOOL_CALLS_RANKED = 5  # a tool needs this many calls to be listed among the worst
UNRELIABLE_TOOL = 0.9  # a used tool below this history success rate is an issue
NOT_MEASURED = "not yet measured"
_JD_EPOCH = 2440587.5
_SEVERITY_ORDER = {"high": 0, "medium": 1, "low": 2}

Progress = Callable[[int, int], None]
NextStep = Callable[[Any], tuple[str, str]]  # an open proposal -> (apply | canary | reject, the step)


def _jd(dt: datetime) -> float:
    return dt.timestamp() / 86400.0 + _JD_EPOCH


def _epoch_of_jd(jd: float) -> float:
    return (jd - _JD_EPOCH) * 86400.0


@functools.lru_cache(maxsize=256)
def _norm_type(value: Any) -> str:
    return normalize_error_type(value)


def _ratio_score(value: float | None, median: float | None) -> float | None:
    """1 at or below the reference median, ``median / value`` above it."""
    if value is None or median is None:
        return None
    if value <= median or value <= 0:
        return 1.0
    return median / value


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


# ------------------------------------------------------------------ reference data


@dataclass
class Reference:
    """What a run is compared with: the workflow's medians and the tools' history rates."""
    duration_median_ms: dict[str, float] = field(default_factory=dict)
    resource_medians: dict[str, dict[str, float]] = field(default_factory=dict)
    tool_rates: dict[str, tuple[int, int]] = field(default_factory=dict)  # tool -> (calls, errors)

    def tool_success(self, tool: str) -> float | None:
        calls, errors = self.tool_rates.get(tool, (0, 0))
        return (calls - errors) / calls if calls else None


def load_reference(conn: sqlite3.Connection, workflows: set[str] | None = None) -> Reference:
    """Medians per workflow and tool success rates over the whole history.

    Call :func:`errorindex.refresh` first: tool rates come from the error index (calls per
    tool from ``selfheal_tool_hours``, failures from ``selfheal_errors``).
    """
    ref = Reference()
    durations: dict[str, list[int]] = defaultdict(list)
    for wf, dur in conn.execute(
            "SELECT workflow_name, duration_ms FROM runs WHERE status = 'completed' AND duration_ms >= 0 "
            f"AND {wellformed_run_sql()}"):
        if workflows is None or wf in workflows:
            if isinstance(dur, int):
                durations[wf].append(dur)
    ref.duration_median_ms = {wf: float(statistics.median(v)) for wf, v in durations.items()
                              if len(v) >= MIN_REFERENCE_RUNS}
    measures: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for wf, iters, tin, tout, calls in conn.execute(
            "SELECT r.workflow_name, m.total_iterations, m.total_tokens_in, m.total_tokens_out, m.total_tool_calls "
            f"FROM run_metrics m JOIN runs r ON r.id = m.run_id AND {wellformed_run_sql('r')}"):
        if workflows is not None and wf not in workflows:
            continue
        for name, value in _resource_values(iters, tin, tout, calls).items():
            if value is not None:
                measures[wf][name].append(value)
    ref.resource_medians = {
        wf: {name: float(statistics.median(v)) for name, v in by.items() if len(v) >= MIN_REFERENCE_RUNS}
        for wf, by in measures.items()}
    errors = dict(conn.execute("SELECT tool_name, count(*) FROM selfheal_errors GROUP BY tool_name"))
    ref.tool_rates = {t: (int(c or 0), min(int(c or 0), int(errors.get(t, 0)))) for t, c in conn.execute(
        "SELECT tool_name, sum(calls) FROM selfheal_tool_hours GROUP BY tool_name")}
    return ref


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 else None


def _resource_values(iters: Any, tokens_in: Any, tokens_out: Any, calls: Any) -> dict[str, float | None]:
    tin, tout = _num(tokens_in), _num(tokens_out)
    return {"iterations": _num(iters), "tokens": None if tin is None else tin + (tout or 0.0),
            "tool_calls": _num(calls)}


# ------------------------------------------------------------------ one run's facts and score


@dataclass
class RunFacts:
    run_id: str
    workflow: str
    status: str
    started_at: str
    duration_ms: int | None
    error: str | None = None
    tool_calls: dict[str, list[int]] = field(default_factory=dict)  # tool -> [calls, errors]
    iteration_events: int = 0
    metrics: dict[str, Any] | None = None  # run_metrics row, when there is one

    @property
    def calls(self) -> int:
        return sum(c for c, _ in self.tool_calls.values())

    @property
    def errors(self) -> int:
        return sum(e for _, e in self.tool_calls.values())


def score_run(f: RunFacts, ref: Reference, now: datetime, *, details: bool = True) -> dict[str, Any]:
    """The four components, the weighted score and how each was obtained; without
    ``details`` only ``health_score`` (the dashboard scores every run of its window and
    keeps only that)."""
    outcome = OUTCOME_SCORE.get(f.status)
    calls, errors = f.calls, f.errors
    source = "run_events"
    if not calls and f.metrics and (f.metrics.get("total_tool_calls") or 0) > 0:
        calls = int(f.metrics["total_tool_calls"])
        errors = max(0, calls - int(f.metrics.get("successful_tool_calls") or 0))
        source = "run_metrics"
    call_success = (calls - errors) / calls if calls else None
    if outcome is not None and call_success is not None:
        success = OUTCOME_SHARE * outcome + (1 - OUTCOME_SHARE) * call_success
    else:
        success = outcome if outcome is not None else call_success

    median = ref.duration_median_ms.get(f.workflow)
    elapsed = None
    if f.status == "running":
        try:
            elapsed = max(0, int((now - parse_timestamp(f.started_at)).total_seconds() * 1000))
        except ValueError:
            elapsed = None
    duration = f.duration_ms if f.status != "running" and isinstance(f.duration_ms, int) else elapsed
    duration_score = _ratio_score(duration, median)

    weighted, weight = 0.0, 0
    for tool, (n, _) in f.tool_calls.items():
        rate = ref.tool_success(tool)
        if rate is not None:
            weighted += n * rate
            weight += n
    reliability = weighted / weight if weight else None

    if f.metrics is not None:
        m = f.metrics
        values = _resource_values(m.get("total_iterations"), m.get("total_tokens_in"),
                                  m.get("total_tokens_out"), m.get("total_tool_calls"))
        rsource = "run_metrics"
    else:
        values = {"iterations": float(f.iteration_events), "tokens": None, "tool_calls": float(f.calls)}
        rsource = "run_events"
    medians = ref.resource_medians.get(f.workflow, {})
    ratios = {k: _ratio_score(v, medians.get(k)) for k, v in values.items()}
    known = [r for r in ratios.values() if r is not None]
    resources = sum(known) / len(known) if known else None

    scores = {"success": success, "duration": duration_score, "tool_reliability": reliability,
              "resource_efficiency": resources}
    total_w = sum(WEIGHTS[k] for k, c in scores.items() if c is not None)
    if total_w:
        score = 100.0 * sum(WEIGHTS[k] * c for k, c in scores.items() if c is not None) / total_w
        basis = "all_components" if total_w == sum(WEIGHTS.values()) else "reweighted"
    else:
        score, basis = 50.0, "no_data"
    health = round(min(100.0, max(0.0, score)), 1)
    if not details:
        return {"health_score": health}
    comps: dict[str, dict[str, Any]] = {
        "success": {"score": success, "outcome": f.status, "outcome_score": outcome, "tool_calls": calls,
                    "failed_tool_calls": errors, "tool_call_success_rate": _round(call_success), "source": source},
        "duration": {"score": duration_score, "duration_ms": duration, "workflow_median_ms": median,
                     "elapsed_so_far": f.status == "running"},
        "tool_reliability": {"score": reliability,
                             "tools": {tool: _round(ref.tool_success(tool)) for tool in f.tool_calls}},
        "resource_efficiency": {"score": resources, "source": rsource, "values": values,
                                "workflow_medians": {k: medians.get(k) for k in values}},
    }
    for name, c in comps.items():
        c["weight"] = WEIGHTS[name]
        c["effective_weight"] = round(WEIGHTS[name] / total_w, 4) if total_w and c["score"] is not None else 0.0
        c["score"] = _round(c["score"])
    return {"health_score": health, "score_basis": basis, "components": comps}


# ------------------------------------------------------------------ analyze_run_health


def resolve_run(conn: sqlite3.Connection, run_id: str) -> sqlite3.Row:
    """The run whose id is ``run_id`` or starts with it (a unique prefix)."""
    prefix = (run_id or "").strip()
    if not prefix:
        raise UsageError("a run id (or a unique prefix of one) is required")
    row = conn.execute(f"SELECT *, {wellformed_run_sql()} AS selfheal_ok FROM runs WHERE id = ?", (prefix,)).fetchone()
    if row is not None:
        return _wellformed_run(row)
    for candidate in dict.fromkeys((prefix, prefix.lower())):
        # a range on the primary key finds prefixes with the index, case-sensitively
        rows = conn.execute(f"SELECT *, {wellformed_run_sql()} AS selfheal_ok FROM runs WHERE id >= ? AND id < ? "
                            "ORDER BY id LIMIT 6", (candidate, candidate + "\U0010ffff")).fetchall()
        if len(rows) == 1:
            return _wellformed_run(rows[0])
        if len(rows) > 1:
            shown = ", ".join(r["id"] for r in rows[:5])
            raise UsageError(f"run id prefix {prefix!r} is ambiguous: matches {shown}"
                             f"{' and more' if len(rows) > 5 else ''}; give more characters")
    raise NotFoundError(f"no run {prefix!r} in the history")


def _wellformed_run(row: sqlite3.Row) -> sqlite3.Row:
    """``row`` when every reader reads it (connection.wellformed_run_sql), else one line."""
    if not row["selfheal_ok"]:
        raise NotFoundError(f"run {row['id']!r} is a malformed row of the history (a workflow, "
                            "status or start that is not text or not a timestamp); it is skipped")
    return row


def _metrics_row(conn: sqlite3.Connection, run_id: str) -> dict[str, Any] | None:
    row = conn.execute("SELECT * FROM run_metrics WHERE run_id = ?", (run_id,)).fetchone()
    return dict(row) if row else None


def analyze_run_health(conn: sqlite3.Connection, run_id: str, *, now: datetime | None = None,
                       progress: Progress | None = None,
                       suggest: Callable[[str], str | None] | None = None,
                       next_step: NextStep | None = None) -> dict[str, Any]:
    """Health score (0–100) and issues with recommendations for one run.

    ``run_id`` may be a unique prefix. Raises :class:`NotFoundError` for an unknown id and
    :class:`UsageError` for an ambiguous prefix. ``suggest``: a pattern id → the fix detect
    suggests for it (the service's), what a failed call's issue recommends when the pattern
    has no open improvement. ``next_step``: an open proposal → (``apply`` | ``canary`` |
    ``reject``, the step), the service's one choice (what ``test`` says next too); without
    it a proposal is cited without a command.
    """
    now = now or utcnow()
    run = resolve_run(conn, run_id)
    refresh(conn, progress)
    facts = RunFacts(run["id"], run["workflow_name"], run["status"], run["started_at"],
                     run["duration_ms"], run["error"], metrics=_metrics_row(conn, run["id"]))
    failures: list[dict[str, Any]] = []
    malformed = 0
    events = 0
    # the error index's rules, which the dashboard's calls come from (errorindex.wellformed_sql, fields
    # taken apart by SQLite, invalid UTF-8 in a failed call's text makes it malformed)
    for etype, ok, name, name_type, is_error, error_type, duration, result, failed_text in conn.execute(
            "SELECT event_type, ok, "
            "CASE WHEN ok THEN json_extract(event_data, '$.name') END, "
            "CASE WHEN ok THEN json_type(event_data, '$.name') END, "
            "CASE WHEN ok THEN json_extract(event_data, '$.is_error') END, "
            "CASE WHEN ok THEN json_extract(event_data, '$.error_type') END, "
            "CASE WHEN ok THEN json_extract(event_data, '$.duration') END, "
            "CASE WHEN ok THEN json_extract(event_data, '$.result') END, "
            "CASE WHEN ok AND json_extract(event_data, '$.is_error') = 1 THEN event_data END "
            f"FROM (SELECT *, {wellformed_sql('event_data')} AND julianday(timestamp) IS NOT NULL AS ok "
            "FROM run_events WHERE run_id = ?) ORDER BY id", (facts.run_id,)):
        events += 1
        if etype == "iteration" and ok:
            facts.iteration_events += 1
        if etype != "tool_complete":
            continue
        if (not ok or name_type != "text" or not name or isinstance(name, Undecodable)
                or isinstance(failed_text, Undecodable) or not sane_duration(duration)):
            malformed += 1
            continue
        counts = facts.tool_calls.setdefault(name, [0, 0])
        counts[0] += 1
        if is_error == 1:  # JSON true
            counts[1] += 1
            failures.append({"tool": name, "error_type": _norm_type(error_type),
                             "duration": _num(duration), "message": result})
    ref = load_reference(conn, {facts.workflow})
    scored = score_run(facts, ref, now)
    issues = _run_issues(facts, scored["components"], failures, malformed, events, ref, ImprovementStore(conn),
                         suggest, next_step)
    return {
        "run_id": facts.run_id, "workflow_name": facts.workflow, "status": facts.status,
        "started_at": None if facts.started_at is None else utc_text(facts.started_at),
        "duration_ms": facts.duration_ms,
        "health_score": scored["health_score"], "score_basis": scored["score_basis"],
        "components": scored["components"], "issues": issues,
        "events": events, "skipped_events": malformed,
    }


def _cite_improvement(imp: Any, next_step: NextStep | None = None) -> str:
    """The open improvement for an issue's pattern and its changes, with the next step."""
    changes = []
    for raw in imp.changes or []:
        try:
            changes.append(Change.from_dict(raw).describe())
        except (TypeError, ValueError, KeyError):
            continue
    what = f"{imp.id} ({'; '.join(changes) or imp.description})"
    if imp.status in ("proposed", "tested"):
        if next_step is None:
            return f"Open proposal {what} ({imp.status})"
        kind, command = next_step(imp)
        if kind == "reject":
            return f"{what} would not help, its test says; reject it: {command}"
        if kind == "canary":
            return f"Try {what} on a share of runs first (its test says risky): {command}"
        return f"Apply {what}: {command}"
    if imp.status == "applied":
        return f"{what} is applied; check its effect: {step('verify', imp.id)}"
    return f"{what} is under {imp.status} test; apply it when the test passes"


def _recommendation(tool: str, etype: str, durations: list[float], store: ImprovementStore,
                    suggest: Callable[[str], str | None] | None, next_step: NextStep | None = None) -> str:
    """An open improvement for the pattern when there is one (the same fix ``detect``
    proposed), else the fix ``detect`` suggests for it (``suggest``); otherwise (no strategy
    answers) the setting to change, by error type."""
    imp = store.open_for_pattern(f"{etype}:{tool}")
    if imp is not None:
        return _cite_improvement(imp, next_step)
    if suggest is not None and (fix := suggest(f"{etype}:{tool}")):
        return fix
    key = f'tools."{tool}"'
    server = server_of(tool)
    if etype == "timeout":
        # The value is the timeout strategy's (fitted to all the tool's calls in the window),
        # not a rule over this run's calls: point to where it is computed.
        seen = f" (calls here timed out after {int(max(durations))} ms)" if durations else ""
        return (f"Fix the timeouts{seen}: {step('propose', f'timeout:{tool}')} proposes {key}.timeout_ms "
                "from the p99 of the tool's call durations, or retries when they look like hangs "
                f"(pattern timeout:{tool})")
    if etype == "connection_refused":
        target = f'servers."{server}"' if server else key
        return (f"Enable health checks and restarts ({target}.health_check = true, auto_restart = true) "
                f"and retries ({key}.retry_attempts)")
    if etype == "server_crashed":
        return f"Add a circuit breaker ({key}.circuit_breaker) and check the server's resource limits"
    if etype == "transport_error":
        return f"Retry transient transport failures ({key}.retry_attempts, retry_backoff_ms)"
    if etype == "tool_error":
        return f"Check inputs before the call ({key}.preflight, e.g. [\"path_exists\"]) or fix the calling prompt"
    if etype == "permission_denied":
        return f"Grant the permission the tool needs or stop calling {tool} where it is not allowed"
    return f"Inspect the failing calls ({step('show', f'{etype}:{tool}')}) to classify the error"


def _run_issues(f: RunFacts, comps: dict[str, Any], failures: list[dict[str, Any]], malformed: int,
                events: int, ref: Reference, store: ImprovementStore,
                suggest: Callable[[str], str | None] | None = None,
                next_step: NextStep | None = None) -> list[dict[str, Any]]:
    issues: list[dict[str, Any]] = []

    def add(severity: str, description: str, recommendation: str, **extra: Any) -> None:
        issues.append({"severity": severity, "description": description, "recommendation": recommendation, **extra})

    if f.status == "failed":
        add("high", f"Run failed: {f.error or 'no error message recorded'}",
            "Fix the failing tool calls below" if failures else
            "Read the run's error event and step results; no tool call failed")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for fail in failures:
        groups.setdefault((fail["tool"], fail["error_type"]), []).append(fail)
    for (tool, etype), items in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        label = "timeout" if etype == "timeout" else f"{etype} error"
        times = f" ({len(items)}×)" if len(items) > 1 else ""
        durations = [d["duration"] for d in items if d["duration"] is not None]
        add("high" if f.status == "failed" else "medium", f"Tool {label} on {tool}{times}",
            _recommendation(tool, etype, durations, store, suggest, next_step), tool=tool, error_type=etype, pattern_id=f"{etype}:{tool}",
            count=len(items))
    for tool, rate in comps["tool_reliability"]["tools"].items():
        if rate is not None and rate < UNRELIABLE_TOOL:
            calls = ref.tool_rates.get(tool, (0, 0))[0]
            add("medium" if rate < 0.75 else "low",
                f"Tool {tool} succeeds in only {rate * 100:.0f}% of its {calls} calls across history",
                f"See its failure patterns: {step('detect', since='-30d')} (tool {tool})", tool=tool)
    dur = comps["duration"]
    if dur["score"] is not None and dur["score"] < 0.5:
        factor = dur["duration_ms"] / dur["workflow_median_ms"] if dur["workflow_median_ms"] else 0
        if f.status == "running":
            add("medium", f"Run still running after {dur['duration_ms'] / 1000:.0f} s, {factor:.1f}× the "
                f"workflow's median duration", "Check whether the runtime that ran it crashed; "
                "a run that never finishes counts as unhealthy")
        else:
            add("low", f"Run took {factor:.1f}× the median duration of {f.workflow} runs",
                "Look for slow tools in this run (duration of each tool call) and raise parallelism or limits")
    elif f.status == "running":
        add("low", "Run is still running: its score is provisional", "Analyze it again when it has finished")
    eff = comps["resource_efficiency"]
    meds = eff["workflow_medians"]
    for name, value in eff["values"].items():
        med = meds.get(name)
        if value is not None and med and value > 2 * med:
            add("low", f"{name.replace('_', ' ').capitalize()}: {value:.0f}, {value / med:.1f}× the workflow's "
                f"median ({med:.0f})", "Check for retries or loops in the agent's plan (repeated tool calls)")
    if events == 0:
        add("low", "No events were recorded for this run", "Check that the runtime records run events")
    if malformed:
        add("low", f"{malformed} malformed tool_complete event(s) skipped", "Check the writer of run_events")
    missing = [k for k, c in comps.items() if c["score"] is None]
    if missing:
        add("low", f"Not enough data for: {', '.join(missing)} (weights re-normalised over the rest)",
            f"Needs at least {MIN_REFERENCE_RUNS} completed runs of {f.workflow} with metrics, and tool calls")
    issues.sort(key=lambda i: _SEVERITY_ORDER[i["severity"]])
    return issues


# ------------------------------------------------------------------ window scans


@dataclass
class WindowRun:
    run_id: str
    workflow: str
    status: str
    started_at: str
    jd: float
    duration_ms: int | None
    error: str | None


def _window_runs(conn: sqlite3.Connection, start: datetime, end: datetime) -> list[WindowRun]:
    return [WindowRun(*r) for r in conn.execute(
        "SELECT id, workflow_name, status, started_at, jd, duration_ms, error FROM "
        f"(SELECT *, julianday(started_at) AS jd FROM runs WHERE {wellformed_run_sql()}) "
        "WHERE jd >= ? AND jd < ? ORDER BY jd, id",
        (_jd(start), _jd(end)))]


def run_facts(conn: sqlite3.Connection, runs: list[WindowRun]) -> dict[str, RunFacts]:
    """The facts of ``runs`` keyed by run id, with their ``run_metrics`` rows (the calls and
    iterations are filled in by :func:`scan_window`)."""
    facts = {r.run_id: RunFacts(r.run_id, r.workflow, r.status, r.started_at, r.duration_ms, r.error) for r in runs}
    for run_id, m in rows_by_id(conn, "run_metrics", "run_id", list(facts)).items():
        facts[run_id].metrics = m
    return facts


@dataclass
class ToolStats:
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    durations: list[float] = field(default_factory=list)
    error_types: Counter = field(default_factory=Counter)


@dataclass
class WindowScan:
    tools: dict[str, ToolStats]
    runs: dict[str, RunFacts]  # facts of the runs started in the window (tool calls, iterations)
    errors_by_day: dict[int, Counter]  # epoch day -> normalised error type -> count
    skipped_rows: int


# A window's tool calls as the error index keeps them (every well-formed call; refreshed first).
# Our table lives in a file another program writes: a row of another shape is left out.
_CALLS_SQL = ("SELECT run_id, tool_name, ok, error_type, duration, jd FROM selfheal_calls "
              "WHERE jd >= ? AND jd < ? AND event_id <= ? AND typeof(jd) = 'real' AND typeof(run_id) = 'text' "
              "AND typeof(tool_name) = 'text' AND (ok = 1 OR (ok = 0 AND typeof(error_type) = 'text')) "
              "AND (duration IS NULL OR typeof(duration) IN ('integer', 'real'))")
# The window's tool_complete rows the index refused (those without an instant are in every window).
_BAD_CALLS_SQL = "SELECT count(*) FROM selfheal_bad_calls WHERE event_id <= ? AND (jd IS NULL OR (jd >= ? AND jd < ?))"
# The window's iteration events ({runs}: of some runs, by the run index), with what makes one
# malformed (the index's rules: errorindex.wellformed_sql, and invalid UTF-8 in a failure's text).
_ITERATIONS_SQL = f"""
SELECT run_id, ok, CASE WHEN ok AND json_extract(event_data, '$.is_error') = 1 THEN event_data END
FROM (SELECT run_id, event_data, {wellformed_sql('event_data')} AS ok, julianday(timestamp) AS jd
      FROM run_events WHERE {{runs}} event_type = 'iteration' AND id <= ?)
WHERE jd >= ? AND jd < ?
"""
# Past this share of the window's runs, one pass over every iteration event beats a lookup per
# run (1M events: 0.16 s for a tenth of 19.7k runs by lookup; 1.7 s for all of them, 0.6 s by a pass).
ITERATION_LOOKUP_SHARE = 0.25


def scan_window(conn: sqlite3.Connection, start: datetime, end: datetime,
                runs: dict[str, RunFacts] | None = None) -> WindowScan:
    """The tool calls in [start, end) as the error index keeps them (``selfheal_calls``: every
    well-formed call; the caller refreshes the index first), per tool and per run of ``runs``
    (facts keyed by run id), and the number of the window's ``tool_complete`` rows the index
    refused (``selfheal_bad_calls``: malformed by the same rules as for detection). The
    iteration events are counted for the runs of ``runs`` whose score reads them: those
    without a ``run_metrics`` row."""
    upto = indexed_up_to(conn)
    lo_jd, hi_jd = _jd(start), _jd(end)
    tools: dict[str, ToolStats] = {}
    errors_by_day: dict[int, Counter] = defaultdict(Counter)
    runs = runs if runs is not None else {}
    for run_id, name, ok, error_type, duration, jd in read_all(conn, _CALLS_SQL, (lo_jd, hi_jd, upto)):
        st = tools.get(name)
        if st is None:
            st = tools[name] = ToolStats()
        st.calls += 1
        failed = not ok
        if failed:
            st.errors += 1
            st.error_types[error_type] += 1
            if error_type == "timeout":
                st.timeouts += 1
            errors_by_day[int(_epoch_of_jd(jd) // 86400)][error_type] += 1
        if duration is not None:
            st.durations.append(duration)
        facts = runs.get(run_id)
        if facts is not None:
            counts = facts.tool_calls.setdefault(name, [0, 0])
            counts[0] += 1
            counts[1] += failed
    need = {r for r, f in runs.items() if f.metrics is None and not isinstance(r, Undecodable)}
    if need:
        few = len(need) <= ITERATION_LOOKUP_SHARE * len(runs)
        sql = _ITERATIONS_SQL.format(runs="run_id IN (SELECT value FROM json_each(?)) AND" if few else "")
        params = (json.dumps(sorted(need)), upto, lo_jd, hi_jd) if few else (upto, lo_jd, hi_jd)
        for run_id, ok, failed_data in read_all(conn, sql, params):
            if ok and run_id in need and not isinstance(run_id, Undecodable) and not isinstance(failed_data, Undecodable):
                runs[run_id].iteration_events += 1
    skipped = conn.execute(_BAD_CALLS_SQL, (upto, lo_jd, hi_jd)).fetchone()[0]
    if skipped:
        log.info("window scan skipped %d malformed tool_complete row(s)", skipped)
    return WindowScan(tools, runs, dict(errors_by_day), skipped)


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    k = max(0, math.ceil(q * len(sorted_values)) - 1)
    return sorted_values[k]


def _tool_entries(scan: WindowScan) -> list[dict[str, Any]]:
    out = []
    for name, st in scan.tools.items():
        durs = sorted(st.durations)
        out.append({
            "name": name,
            "success_rate": round((st.calls - st.errors) / st.calls, 4),
            "total_calls": st.calls,
            "failed_calls": st.errors,
            "timeout_rate": round(st.timeouts / st.calls, 4),
            "error_rate": round((st.errors - st.timeouts) / st.calls, 4),
            "avg_duration_ms": round(sum(durs) / len(durs), 1) if durs else None,
            "p95_duration_ms": _percentile(durs, 0.95),
            "top_error_types": [{"error_type": t, "count": c}
                                for t, c in sorted(st.error_types.items(), key=lambda kv: (-kv[1], kv[0]))[:3]],
        })
    out.sort(key=lambda t: (t["success_rate"], -t["total_calls"], t["name"]))
    return out


def _window(since: str, now: datetime | None) -> tuple[datetime, datetime]:
    end = now or utcnow()
    start = parse_since(since, end)
    if start >= end:
        raise UsageError(f"time window {since!r} starts at {format_timestamp(start)}, not before now")
    return start, end


def _window_dict(start: datetime, end: datetime, since: str) -> dict[str, str]:
    return {"since": since, "start": format_timestamp(start), "end": format_timestamp(end)}


def compute_tool_reliability(conn: sqlite3.Connection, since: str = "-7d", *, now: datetime | None = None,
                             progress: Progress | None = None) -> dict[str, Any]:
    """Per tool over the window: success, timeout and other-error rates, average and p95
    duration (ms) and the most common normalised error types; worst tools first."""
    start, end = _window(since, now)
    refresh(conn, progress)
    scan = scan_window(conn, start, end)
    return {"tools": _tool_entries(scan), "window": _window_dict(start, end, since),
            "skipped_rows": scan.skipped_rows}


# ------------------------------------------------------------------ agents


def _success_rate(runs: list[WindowRun]) -> tuple[float | None, int]:
    finished = [r for r in runs if r.status in FINISHED]
    return success_rate(sum(r.status == SUCCEEDED for r in finished), len(finished)), len(finished)


def classify_trend(recent: float | None, earlier: float | None, n_recent: int, n_earlier: int,
                   min_runs: int) -> str:
    """improving / degrading / stable by ±5 percentage points; insufficient_data below ``min_runs``."""
    if recent is None or earlier is None or n_recent < min_runs or n_earlier < min_runs:
        return "insufficient_data"
    if recent > earlier + TREND_THRESHOLD:
        return "improving"
    if recent < earlier - TREND_THRESHOLD:
        return "degrading"
    return "stable"


def _agent_entries(runs: list[WindowRun], start: datetime, end: datetime) -> list[dict[str, Any]]:
    mid_jd = _jd(start + (end - start) / 2)
    by_wf: dict[str, list[WindowRun]] = defaultdict(list)
    for r in runs:
        by_wf[r.workflow].append(r)
    out = []
    for wf, rs in by_wf.items():
        rate, finished = _success_rate(rs)
        durations = [r.duration_ms for r in rs if r.status in FINISHED and isinstance(r.duration_ms, int)]
        first, n1 = _success_rate([r for r in rs if r.jd < mid_jd])
        second, n2 = _success_rate([r for r in rs if r.jd >= mid_jd])
        out.append({
            "name": wf,
            "success_rate": _round(rate),
            "total_runs": len(rs),
            "finished_runs": finished,
            "completed_runs": sum(r.status == "completed" for r in rs),
            "failed_runs": sum(r.status == "failed" for r in rs),
            "cancelled_runs": sum(r.status == "cancelled" for r in rs),
            "running_runs": sum(r.status == "running" for r in rs),
            "avg_duration_seconds": round(sum(durations) / len(durations) / 1000.0, 3) if durations else None,
            "trend": classify_trend(second, first, n2, n1, MIN_AGENT_TREND_RUNS),
            "first_half_success_rate": _round(first),
            "second_half_success_rate": _round(second),
        })
    out.sort(key=lambda a: (-a["total_runs"], a["name"]))
    return out


def compute_agent_metrics(conn: sqlite3.Connection, since: str = "-7d", *,
                          now: datetime | None = None) -> dict[str, Any]:
    """Per agent (``workflow_name``) over the runs started in the window.

    ``success_rate`` is completed / finished runs (completed, failed or cancelled: the one
    definition of :mod:`selfheal_plugin.history.outcome`; running runs are in no rate);
    ``trend`` compares the window's second half with its first half.
    """
    start, end = _window(since, now)
    runs = _window_runs(conn, start, end)
    return {"agents": _agent_entries(runs, start, end), "window": _window_dict(start, end, since),
            "skipped_runs": malformed_runs(conn)}


# ------------------------------------------------------------------ dashboard


def _daily_series(runs: list[WindowRun], errors_by_day: dict[int, Counter], start: datetime,
                  end: datetime) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    first_day = int(start.timestamp() // 86400)
    last_day = int((end.timestamp() - 1e-6) // 86400)
    per_day: dict[int, list[WindowRun]] = defaultdict(list)
    for r in runs:
        per_day[int(_epoch_of_jd(r.jd) // 86400)].append(r)
    daily, errors = [], []
    for day in range(first_day, last_day + 1):
        label = datetime.fromtimestamp(day * 86400, timezone.utc).strftime("%Y-%m-%d")
        rs = per_day.get(day, [])
        rate, finished = _success_rate(rs)
        daily.append({"date": label, "runs": len(rs), "finished_runs": finished,
                      "completed_runs": sum(r.status == "completed" for r in rs),
                      "failed_runs": sum(r.status == "failed" for r in rs), "success_rate": _round(rate)})
        counts = errors_by_day.get(day, Counter())
        errors.append({"date": label, "counts": dict(sorted(counts.items())), "total": sum(counts.values())})
    return daily, errors


def _improvement_entries(conn: sqlite3.Connection, limit: int) -> list[dict[str, Any]]:
    out = []
    for imp in ImprovementStore(conn).list(limit=None):  # the latest status change first, as `improvements`
        if len(out) >= limit:
            break
        if imp.status == "rejected":
            continue
        impact = imp.actual_impact
        if not impact and imp.impact not in (None, "", {}, []):
            impact = imp.impact if isinstance(imp.impact, str) else json.dumps(imp.impact)
        m = imp.metrics or {}
        out.append({
            "id": imp.id, "description": imp.description, "status": imp.status, "pattern_id": imp.pattern_id,
            "expected_impact": imp.expected_impact, "impact": impact or NOT_MEASURED,
            # the failure kind the fix was made for, and the evidence behind it in one line
            "failure_kind": (imp.evidence or {}).get("failure_kind") or "unknown",
            "kind_evidence": ((imp.evidence or {}).get("failure") or {}).get("summary"),
            "measured": bool(impact),
            "before_success_rate": m.get("before_success_rate"), "after_success_rate": m.get("after_success_rate"),
            "runs_analyzed": m.get("runs_analyzed"),
            "applied_at": imp.applied_at, "verified_at": imp.verified_at,
        })
    return out


def get_health_dashboard(conn: sqlite3.Connection, detailed: bool = False, since: str = "-7d", *,
                         now: datetime | None = None, progress: Progress | None = None,
                         improvements_limit: int = 5) -> dict[str, Any]:
    """System-wide health over the window (default the last 7 days before ``now``).

    ``overall_health_score`` is the mean health score of the window's finished runs (the
    same scoring as :func:`analyze_run_health`); ``trend`` compares the success rate of the
    last 7 days with the 30 days before (±5 points). With ``detailed``, per-agent and
    per-tool tables are included.
    """
    start, end = _window(since, now)
    refresh(conn, progress)
    recent_start = end - timedelta(days=RECENT_DAYS)
    hist_start = recent_start - timedelta(days=HISTORICAL_DAYS)
    every = _window_runs(conn, min(start, hist_start), end)  # read once for the window and both trend periods
    instants = [r.jd for r in every]

    def between(a: datetime, b: datetime) -> list[WindowRun]:
        return every[bisect.bisect_left(instants, _jd(a)):bisect.bisect_left(instants, _jd(b))]

    runs = between(start, end)
    facts = run_facts(conn, runs)
    scan = scan_window(conn, start, end, facts)
    ref = load_reference(conn, {r.workflow for r in runs})
    scores = [score_run(f, ref, end, details=False)["health_score"] for f in facts.values() if f.status in FINISHED]
    rate, finished = _success_rate(runs)

    recent_rate, n_recent = _success_rate(between(recent_start, end))
    hist_rate, n_hist = _success_rate(between(hist_start, recent_start))
    trend = classify_trend(recent_rate, hist_rate, n_recent, n_hist, MIN_TREND_RUNS)

    tools = _tool_entries(scan)
    daily, errors_over_time = _daily_series(runs, scan.errors_by_day, start, end)
    result: dict[str, Any] = {
        "overall_health_score": round(sum(scores) / len(scores), 1) if scores else None,
        "trend": trend,
        "success_rate": _round(rate),
        "recent_improvements": _improvement_entries(conn, improvements_limit),
        "window": _window_dict(start, end, since),
        "runs": {"total": len(runs), "finished": finished,
                 "completed": sum(r.status == "completed" for r in runs),
                 "failed": sum(r.status == "failed" for r in runs),
                 "cancelled": sum(r.status == "cancelled" for r in runs),
                 "running": sum(r.status == "running" for r in runs), "scored": len(scores)},
        "trend_detail": {
            "recent": {"start": format_timestamp(recent_start), "end": format_timestamp(end),
                       "success_rate": _round(recent_rate), "finished_runs": n_recent},
            "historical": {"start": format_timestamp(hist_start), "end": format_timestamp(recent_start),
                           "success_rate": _round(hist_rate), "finished_runs": n_hist},
            "threshold": TREND_THRESHOLD, "min_runs": MIN_TREND_RUNS,
        },
        "daily_success": daily,
        "error_types_over_time": errors_over_time,
        "worst_tools": [t for t in tools if t["total_calls"] >= MIN_TOOL_CALLS_RANKED][:5],
        "skipped_rows": scan.skipped_rows,
        "skipped_runs": malformed_runs(conn),
        "experiments": running_ab_entries(conn),
    }
    if detailed:
        result["agents"] = _agent_entries(runs, start, end)
        result["tools"] = tools
    return result


def running_ab_entries(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Running A/B experiments with their arms and the last verdict the daemon stored."""
    if not has_ab_table(conn):
        return []
    out = []
    for e in AbStore(conn).list("running"):
        v = e.verdict or {}
        measured = {a.get("improvement_id"): a for a in v.get("arms") or [] if isinstance(a, dict)}
        out.append({"experiment_id": e.id, "pattern_id": e.pattern_id, "started_at": e.started_at,
                    "verdict": v.get("verdict"), "winner": v.get("winner"), "checked_at": v.get("checked_at"),
                    "arms": [{"improvement_id": a.get("improvement_id"), "description": a.get("description"),
                              "fraction": a.get("fraction"),
                              "error_rate": (measured.get(a.get("improvement_id")) or {}).get("error_rate"),
                              "runs": (measured.get(a.get("improvement_id")) or {}).get("runs")}
                             for a in e.arms if isinstance(a, dict)]})
    return out
