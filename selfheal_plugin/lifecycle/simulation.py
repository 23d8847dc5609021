"""Replaying history with a proposed change: the models behind ``agent self-heal test``.

Replay: every finished run (completed, failed or cancelled:
:mod:`selfheal_plugin.history.outcome`) that started in the window is replayed with the
change, so the baseline is the success rate the dashboard shows for the same window. A
completed run stays completed unless the change would break one of its calls (a lowered
timeout below a call's observed duration). A failed run is recovered when every failed
call in it is one the change could fix, with the product of the per-call fix
probabilities; otherwise it stays failed. A cancelled run stays unsuccessful: the user
stopped it, and no model says they would have waited for the change. The simulated success rate is
the mean recovery probability over runs, next to the baseline (observed) rate. A failed
run that *stopped* at the fixed call (no tool call after it) still had steps to run: its
recovery is also multiplied by how often runs of the same workflow that got past that call
(the same tool, the same occurrence) went on to complete (``_Continuation``; without that,
an agent whose later steps fail a quarter of the time was predicted ~5 points too high).

Models (only these; a change without a model is reported as such, never guessed):

* ``tools.NAME.timeout_ms`` — the one duration model of
  :mod:`selfheal_plugin.analysis.durations` (the one the timeout strategy proposes from),
  fitted to the tool's calls in the window (``load_tool_calls``, as the strategy reads
  them): successful calls observed, timed-out calls
  right-censored at the duration they were cut off at — a censored log-normal. A call that
  timed out at ``c`` finishes under the new limit ``L`` with probability ``1 - S(L)/S(c)``.
  Successful calls slower than a lowered limit would fail.
* ``tools.NAME.retry_attempts`` — failure independence from history: of the ``n`` failures
  of that tool (of the pattern's type) followed by another call of the same tool in the
  same run, ``s`` such next calls succeeded. The retry success probability is the shrunk
  estimate ``p = (s + 1) / (n + 2)`` (Laplace's rule: the posterior mean under a uniform
  prior; 6 of 6 gives 0.875, never a certain 1.0), with ``Beta(s + 1, n - s + 1)`` for the
  uncertainty. ``k`` more retries fix a failure with ``1 - (1 - p)^k``. Every targeted
  failure counts at that estimate — also the ones with no follow-up call in history,
  which are never counted as certainly fixed. Fewer than 3 follow-up calls: no model.
* ``retry_backoff_ms`` only changes latency: neutral for success.

Uncertainty: 95% percentile interval over 400 replicates, each a Poisson bootstrap of the
runs combined with a draw of the model parameters (the MLE's normal approximation for
durations, the Beta posterior for retries; the continuation factor is estimated again from
the replicate's weighted runs). That interval is for the success rate the
replayed window would have had. The **prediction interval** is for what the next window of
the same size (as many runs) will show with the change: each replicate's rate, then a
binomial draw of that many runs from it, so the sampling noise of the next window is in it
too (``benchmarks/bench_prediction.py`` measures its coverage over seeds).
"""
from __future__ import annotations

import numbers
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Mapping

from selfheal_plugin.lazy import lazy_module
from selfheal_plugin.analysis.durations import fit_sample, load_tool_calls, sample_from_calls
from selfheal_plugin.history.connection import REFUSAL_PREFIXES, normalize_error_type, wellformed_run_sql
from selfheal_plugin.history.errorindex import wellformed_sql
from selfheal_plugin.history.outcome import SUCCEEDED, finished_sql, success_rate
from selfheal_plugin.history.schema import short_repr
from selfheal_plugin.history.text import Undecodable
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.history.times import format_timestamp, parse_since, utcnow
from selfheal_plugin.lifecycle.apply import APPLICABLE, LifecycleError, update_if_unchanged
from selfheal_plugin.lifecycle.configedit import split_changes
from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.plugins.strategy import HistoryWindow, Proposal, StrategyError
from selfheal_plugin.steps import step

np = lazy_module("numpy")  # imported on first use: start-up does not pay for it

REPLICATES = 400
MIN_CONTINUATION = 5  # runs past a call needed to estimate how often the rest of the run completes
MIN_RETRY_OBSERVATIONS = 3
NEUTRAL_KEYS = ("retry_backoff_ms",)


@dataclass
class Call:
    event_id: int
    tool: str
    ok: bool
    duration_ms: float | None
    error_type: str | None
    refused: bool = False  # ToolPolicy stopped it before it reached the tool (REFUSAL_PREFIXES)


@dataclass
class ReplayRun:
    run_id: str
    completed: bool
    calls: list[Call]
    workflow: str | None = None
    last_call_id: int | None = None  # the run's last tool_complete event (of any tool, failed or not)
    cancelled: bool = False  # finished without success, by the user: never recovered by a replay


def load_runs(conn: sqlite3.Connection, since_epoch: float, until_epoch: float | None,
              tools: list[str] | None = None) -> list[ReplayRun]:
    """Finished runs (:data:`outcome.FINISHED`) that started in [since, until), with their
    ``tool_complete`` calls in order. Instants are compared, not strings.

    With ``tools``, a run keeps only its failed calls and the calls of those tools (all
    a replay or a verification looks at); a cheap text prefilter then spares the JSON
    parse of most rows.
    """
    lo = since_epoch / 86400 + 2440587.5
    hi = until_epoch / 86400 + 2440587.5 if until_epoch is not None else 1e12
    runs: dict[str, ReplayRun] = {}
    for run_id, status, workflow in conn.execute(
            f"SELECT id, status, workflow_name FROM runs WHERE {finished_sql()} "
            f"AND julianday(started_at) >= ? AND julianday(started_at) < ? AND {wellformed_run_sql()} "
            "ORDER BY julianday(started_at), id",
            (lo, hi)):
        runs[run_id] = ReplayRun(run_id, status == SUCCEEDED, [], workflow if isinstance(workflow, str) else None,
                                 cancelled=status == "cancelled")
    if not runs:
        return []
    for run_id, last in conn.execute(
            "SELECT e.run_id, max(e.id) FROM runs r JOIN run_events e ON e.run_id = r.id "
            f"WHERE {finished_sql('r.status')} AND julianday(r.started_at) >= ? "
            f"AND julianday(r.started_at) < ? AND {wellformed_run_sql('r')} AND e.event_type = 'tool_complete' "
            "GROUP BY e.run_id", (lo, hi)):
        if run_id in runs:
            runs[run_id].last_call_id = last
    params: list[Any] = [lo, hi]
    prefilter = ""
    if tools is not None:
        # a failed call's JSON holds the literal `true`; a call of a tool holds its name
        prefilter = " AND (" + " OR ".join(["instr(e.event_data, 'true') > 0"]
                                           + ["instr(e.event_data, ?) > 0"] * len(tools)) + ")"
        params += list(tools)
    refused_sql = " OR ".join(["substr(json_extract(e.event_data, '$.result'), 1, ?) = ?"] * len(REFUSAL_PREFIXES))
    # malformed rows are skipped by the rules of the error index (errorindex.wellformed_sql)
    sql = f"""
    SELECT e.run_id, e.id, json_extract(e.event_data, '$.name'), json_extract(e.event_data, '$.is_error'),
           json_extract(e.event_data, '$.duration'), json_extract(e.event_data, '$.error_type'),
           CASE WHEN json_extract(e.event_data, '$.is_error') = 1 THEN e.event_data END,
           json_extract(e.event_data, '$.is_error') = 1 AND ({refused_sql})
    FROM runs r JOIN run_events e ON e.run_id = r.id
    WHERE {finished_sql('r.status')} AND julianday(r.started_at) >= ? AND julianday(r.started_at) < ?
      AND {wellformed_run_sql('r')} AND e.event_type = 'tool_complete'{prefilter} AND {wellformed_sql('e.event_data')}
    """
    params = [a for p in REFUSAL_PREFIXES for a in (len(p), p)] + params  # the SELECT's, then the WHERE's
    wanted = set(tools) if tools is not None else None
    for run_id, eid, name, is_error, duration, etype, failed_text, refused in conn.execute(sql, params):
        run = runs.get(run_id)
        if (run is None or not isinstance(name, str) or not name or isinstance(name, Undecodable)
                or isinstance(failed_text, Undecodable)):
            continue
        ok = is_error != 1
        if ok and wanted is not None and name not in wanted:
            continue
        dur = float(duration) if isinstance(duration, (int, float)) and duration >= 0 else None
        run.calls.append(Call(eid, name, ok, dur, None if ok else normalize_error_type(etype), bool(refused)))
    for run in runs.values():
        run.calls.sort(key=lambda c: c.event_id)
    return list(runs.values())


def observed_success_rate(runs: list[ReplayRun]) -> float | None:
    """The window's success rate as it happened — ``test``'s baseline, ``verify``'s rates:
    :func:`outcome.success_rate` of the replayed (finished) runs, so it is the dashboard's."""
    return success_rate(sum(r.completed for r in runs), len(runs))


# ------------------------------------------------------------------ retry model


@dataclass
class RetryModel:
    successes: int
    observations: int

    @property
    def p(self) -> float:
        """The shrunk estimate ``(s + 1) / (n + 2)`` (see the module docstring)."""
        return (self.successes + 1) / (self.observations + 2)

    @property
    def observed_rate(self) -> float:
        return self.successes / self.observations

    def draws(self, k: int, rng: np.random.Generator) -> np.ndarray:
        d = rng.beta(self.successes + 1, self.observations - self.successes + 1, size=k)
        d[0] = self.p
        return d


def fit_retry(runs: list[ReplayRun], tool: str, error_type: str | None) -> RetryModel | str:
    """P(the next call of the same tool in the same run succeeds | a failure)."""
    successes = observations = 0
    for run in runs:
        calls = [c for c in run.calls if c.tool == tool]
        for i, c in enumerate(calls[:-1]):
            if c.ok or (error_type and c.error_type != error_type):
                continue
            observations += 1
            successes += calls[i + 1].ok
    if observations < MIN_RETRY_OBSERVATIONS:
        return (f"only {observations} failure(s) of {tool} were followed by another call of it in the same run "
                f"(need {MIN_RETRY_OBSERVATIONS}) to estimate whether a retry succeeds")
    return RetryModel(successes, observations)


# ------------------------------------------------------------------ replay


@dataclass
class Simulation:
    """What a replay found; ``None`` rates mean there was no model to replay with."""

    simulated_success_rate: float | None
    baseline_success_rate: float | None
    simulated_interval: list[float] | None
    improvement_interval: list[float] | None
    runs_replayed: int
    runs_recovered: float | None
    runs_broken: int
    failures_targeted: int
    failures_fixed: float | None
    models: list[dict[str, Any]] = field(default_factory=list)
    unmodeled: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # 95% prediction interval for the success rate of the next window of runs_replayed runs
    prediction_interval: list[float] | None = None
    # the pattern (failed calls of the changed tools, of the pattern's type, per call of those
    # tools): its rate in the replay, that rate's 95% interval, and the 95% prediction interval
    # for a next window with as many calls (pattern_calls)
    pattern_error_rate: float | None = None
    pattern_interval: list[float] | None = None
    pattern_prediction_interval: list[float] | None = None
    pattern_calls: int | None = None

    @property
    def has_model(self) -> bool:
        return self.simulated_success_rate is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _config_sets(changes: list[Any]) -> list[tuple[list[str], Any]]:
    out = []
    for ch in changes or []:
        d = ch.to_dict() if hasattr(ch, "to_dict") else ch
        if isinstance(d, dict) and d.get("kind") == "config" and (d.get("op") or "set") == "set":
            out.append((list(d.get("path") or []), d.get("value")))
    return out


class _Continuation:
    """P(a run goes on to complete | it got past a call): a failed run that stopped at the
    call a change fixes still had its remaining steps to run, and those fail as often as
    they do in the runs that got past the same call. Estimated from the window's runs of
    the same workflow whose ``k``-th call of the same tool succeeded with no failed call
    before it: ``s`` of ``n`` completed. Fewer than :data:`MIN_CONTINUATION` such runs, or
    all of them completed: 1 (nothing seen to fail after it). Uncertainty: each bootstrap
    replicate estimates it again from the runs as it weighs them (``W``, replicate 0 is
    ``s / n``), so the estimate moves with the runs it comes from: a week whose later steps
    failed less has a higher baseline *and* rescues more, and the interval knows it."""

    def __init__(self, runs: list[ReplayRun], W: np.ndarray) -> None:
        self.runs, self.W = runs, W
        self._cache: dict[tuple[str | None, str, int], np.ndarray | float] = {}

    def __call__(self, run: ReplayRun, call: Call) -> np.ndarray | float:
        k = sum(1 for c in run.calls if c.tool == call.tool and c.event_id < call.event_id)
        key = (run.workflow, call.tool, k)
        if key not in self._cache:
            past = np.zeros(len(self.runs))
            done = np.zeros(len(self.runs))
            for j, r in enumerate(self.runs):
                if r.workflow != run.workflow:
                    continue
                same = [c for c in r.calls if c.tool == call.tool]
                if len(same) > k and same[k].ok and all(c.ok for c in r.calls if c.event_id < same[k].event_id):
                    past[j] = 1.0  # got past the call with nothing failed before it
                    done[j] = float(r.completed)
            n, s = int(past.sum()), int(done.sum())
            if n < MIN_CONTINUATION or s == n:
                self._cache[key] = 1.0
            else:
                n_k, s_k = self.W @ past, self.W @ done
                self._cache[key] = np.where(n_k > 0, s_k / np.maximum(n_k, 1.0), s / n)
        return self._cache[key]


def simulate_changes(conn: sqlite3.Connection, changes: list[Any], error_type: str | None, since_epoch: float,
                     until_epoch: float | None, config: dict[str, Any] | None = None,
                     seed: int = 0) -> Simulation:
    """Replay the runs of the window with ``changes`` (see the module docstring)."""
    config = config or {}
    sets = _config_sets(changes)
    tools = sorted({p[1] for p, _ in sets if len(p) >= 2 and p[0] == "tools"})
    runs = load_runs(conn, since_epoch, until_epoch, tools)
    etype = normalize_error_type(error_type) if error_type else None
    rng = np.random.default_rng(seed)
    K = REPLICATES
    models: list[dict[str, Any]] = []
    unmodeled: list[dict[str, Any]] = []
    notes: list[str] = []
    # per call: list of (K,) arrays of fix probabilities; per call: False when the change breaks it
    fix: dict[int, list[np.ndarray]] = {}
    broken: set[int] = set()

    for path, value in sets:
        key = ".".join(path)
        if len(path) == 3 and path[0] == "tools" and path[2] == "timeout_ms" and isinstance(value, (int, float)) \
                and not isinstance(value, bool) and value > 0:
            tool = path[1]
            calls = [c for r in runs for c in r.calls if c.tool == tool]
            tool_cfg = config.get("tools", {}).get(tool)
            configured = tool_cfg.get("timeout_ms") if isinstance(tool_cfg, dict) else None
            old_limit = configured if isinstance(configured, int) and not isinstance(configured, bool) \
                and configured > 0 else None
            since_dt = datetime.fromtimestamp(since_epoch, UTC)
            until_dt = None if until_epoch is None else datetime.fromtimestamp(until_epoch, UTC)
            sample = sample_from_calls(load_tool_calls(conn, tool, since_dt, until_dt), old_limit)
            fitted = fit_sample(sample)
            if isinstance(fitted, str):
                unmodeled.append({"change": key, "reason": fitted})
                continue
            locs, scales = fitted.draws(K, rng)
            pts = [(c, c.duration_ms if c.duration_ms and c.duration_ms > 0 else old_limit)
                   for c in calls if not c.ok and c.error_type == "timeout"]
            pts = [(c, cp) for c, cp in pts if cp]
            if pts:
                P = fitted.p_finish(float(value), np.array([cp for _, cp in pts]), locs, scales)  # (K, n)
                for j, (c, _) in enumerate(pts):
                    fix.setdefault(c.event_id, []).append(P[:, j])
            for c in calls:
                if c.ok and c.duration_ms and c.duration_ms > value:
                    broken.add(c.event_id)
            p_fin = fitted.finish_estimate(float(value), sample.censored) if sample.censored else None
            models.append({"change": key, "model": "duration", "tool": tool, "family": "lognormal",
                           "duration_model": fitted.describe(),
                           "mu": round(fitted.mu, 4), "sigma": round(fitted.sigma, 4),
                           "new_limit_ms": value,
                           "old_limit_ms": old_limit or (max(sample.censored) if sample.censored else None),
                           "successful_calls": fitted.observed, "timed_out_calls": fitted.censored,
                           "median_ms": round(fitted.quantile_ms(0.5)), "p95_ms": round(fitted.quantile_ms(0.95)),
                           "p99_ms": round(fitted.quantile_ms(0.99)),
                           "longest_observed_ms": round(fitted.max_observed_ms),
                           "p_timed_out_call_finishes": None if p_fin is None else round(p_fin[0], 4),
                           "p_timed_out_call_finishes_interval": None if p_fin is None
                           else [round(p_fin[1], 4), round(p_fin[2], 4)],
                           "p_interval_method": "delta method on logit p (95%)",
                           "successful_calls_over_new_limit": sum(1 for c in calls if c.event_id in broken)})
            if pts and value > fitted.max_observed_ms:
                notes.append(f"{tool}: the new limit {value} ms is beyond the longest observed duration "
                             f"({fitted.max_observed_ms:.0f} ms); the tail is the fitted {fitted.name} model's")
        elif len(path) == 3 and path[0] == "tools" and path[2] == "retry_attempts" and isinstance(value, int) \
                and not isinstance(value, bool):
            tool = path[1]
            tool_cfg = config.get("tools", {}).get(tool, {})
            old = tool_cfg.get("retry_attempts", 0) if isinstance(tool_cfg, dict) else 0
            extra = value - (old if isinstance(old, int) else 0)
            if extra <= 0:
                unmodeled.append({"change": key, "reason": f"fewer retries ({old} → {value}): history cannot say "
                                  "which failures the removed retries were hiding"})
                continue
            fitted = fit_retry(runs, tool, etype)
            if isinstance(fitted, str):
                unmodeled.append({"change": key, "reason": fitted})
                continue
            p = fitted.draws(K, rng)
            pfix = 1.0 - (1.0 - p) ** extra
            for r in runs:
                for c in r.calls:
                    if c.tool == tool and not c.ok and (etype is None or c.error_type == etype):
                        fix.setdefault(c.event_id, []).append(pfix)
            models.append({"change": key, "model": "retry", "tool": tool, "extra_retries": extra,
                           "followups_observed": fitted.observations, "followups_succeeded": fitted.successes,
                           "p_retry_succeeds": round(fitted.p, 4),
                           "estimate": "(successes + 1) / (observed + 2)",
                           "p_failure_fixed": round(float(pfix[0]), 4)})
        elif path and path[-1] in NEUTRAL_KEYS:
            models.append({"change": key, "model": "neutral", "reason": "changes latency only, not success"})
        else:
            unmodeled.append({"change": key, "reason": "no simulation model for this setting"})

    n = len(runs)
    targeted = sum(1 for r in runs for c in r.calls if not c.ok and c.event_id in fix)
    if not any(m["model"] in ("duration", "retry") for m in models) or n == 0:
        if n == 0:
            notes.append("no finished runs in the window")
        base = observed_success_rate(runs)
        return Simulation(None, base, None, None, n, None, 0, targeted, None, models, unmodeled, notes)

    W = rng.poisson(1.0, size=(K, n)).astype(float)  # the bootstrap's run weights
    W[0] = 1.0
    continuation = _Continuation(runs, W)
    P = np.zeros((n, K))
    base = np.zeros(n)
    n_broken = 0
    fixed_sum = np.zeros(K)
    for i, r in enumerate(runs):
        base[i] = 1.0 if r.completed else 0.0
        breaks = any(c.event_id in broken for c in r.calls)
        n_broken += bool(breaks and r.completed)
        for c in r.calls:
            if not c.ok and c.event_id in fix:
                fixed_sum += 1.0 - np.prod([1.0 - f for f in fix[c.event_id]], axis=0)
        if breaks:
            continue
        if r.completed:
            P[i] = 1.0
            continue
        if r.cancelled:
            continue
        failures = [c for c in r.calls if not c.ok]
        if not failures or any(c.event_id not in fix for c in failures):
            continue
        prob = np.ones(K)
        for c in failures:
            prob *= 1.0 - np.prod([1.0 - f for f in fix[c.event_id]], axis=0)
        if failures[-1].event_id == r.last_call_id:  # the run stopped there: what it never ran may fail too
            prob *= continuation(r, failures[-1])
        P[i] = prob
    tot = np.maximum(W.sum(axis=1), 1.0)
    sim_k = (W * P.T).sum(axis=1) / tot
    base_k = (W * base).sum(axis=1) / tot
    gain_k = sim_k - base_k
    next_k = rng.binomial(n, np.clip(sim_k, 0.0, 1.0)) / n  # the next window: n new runs at each replicate's rate
    sim = float(P[:, 0].mean())
    recovered = float(P[base == 0, 0].sum())
    pattern = _pattern_replay(runs, tools, etype, fix, broken, W, rng)
    return Simulation(
        simulated_success_rate=round(sim, 4), baseline_success_rate=observed_success_rate(runs),
        simulated_interval=[round(float(np.percentile(sim_k, 2.5)), 4), round(float(np.percentile(sim_k, 97.5)), 4)],
        improvement_interval=[round(float(np.percentile(gain_k, 2.5)), 4),
                              round(float(np.percentile(gain_k, 97.5)), 4)],
        runs_replayed=n, runs_recovered=round(recovered, 2), runs_broken=n_broken, failures_targeted=targeted,
        failures_fixed=round(float(fixed_sum[0]), 2), models=models, unmodeled=unmodeled, notes=notes,
        prediction_interval=[round(float(np.percentile(next_k, 2.5)), 4),
                             round(float(np.percentile(next_k, 97.5)), 4)], **pattern)


def _pattern_replay(runs: list[ReplayRun], tools: list[str], etype: str | None, fix: dict[int, list[np.ndarray]],
                    broken: set[int], W: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
    """The pattern's error rate with the changes: each failed call of the pattern's type on a
    changed tool stays failed with the probability that no model fixes it; a successful call
    the change breaks (slower than a lower limit) becomes a failure. Same run weights ``W`` as
    the success rate; the next window draws as many calls binomially at each replicate's rate."""
    K = W.shape[0]
    calls = np.zeros(len(runs))
    fails = np.zeros((len(runs), K))
    for i, r in enumerate(runs):
        for c in r.calls:
            if c.tool not in tools:
                continue
            calls[i] += 1
            if c.event_id in broken:
                fails[i] += 1.0
            elif not c.ok and (etype is None or normalize_error_type(c.error_type) == etype):
                fails[i] += np.prod([1.0 - f for f in fix[c.event_id]], axis=0) if c.event_id in fix else 1.0
    m = int(calls.sum())
    if m == 0:
        return {}
    rate_k = (W * fails.T).sum(axis=1) / np.maximum((W * calls).sum(axis=1), 1.0)
    next_k = rng.binomial(m, np.clip(rate_k, 0.0, 1.0)) / m
    return {"pattern_error_rate": round(float(fails[:, 0].sum() / m), 4),
            "pattern_interval": [round(float(np.percentile(rate_k, 2.5)), 4),
                                 round(float(np.percentile(rate_k, 97.5)), 4)],
            "pattern_prediction_interval": [round(float(np.percentile(next_k, 2.5)), 4),
                                            round(float(np.percentile(next_k, 97.5)), 4)],
            "pattern_calls": m}


def simulate_proposal(proposal: Any, history: Any, seed: int = 0) -> Simulation:
    """The strategies' ``simulate(proposal, history)``: replay ``history`` (a
    :class:`selfheal_plugin.plugins.strategy.HistoryWindow`) with the proposal's changes."""
    until = history.until.timestamp() if getattr(history, "until", None) else None
    return simulate_changes(history.conn, proposal.changes, getattr(proposal, "error_type", None),
                            history.since.timestamp(), until, config=history.config, seed=seed)


# ------------------------------------------------------------------ verdict


def percent_points(x: float, *alongside: float) -> str:
    """``0.07`` → ``+7%``; small changes keep one decimal. Values printed beside it (an
    interval's ends: ``alongside``) share its precision: one decimal for all when any is small,
    so ``+0.8% (+0.3% to +1.5%)``, never ``+0.8% (+0.3% to +2%)``."""
    small = any(0 < abs(v * 100) < 1 for v in (x, *alongside))
    v = x * 100
    return f"{v:+.1f}%" if small else f"{v:+.0f}%"


def percent_interval(point: float, lo: float, hi: float) -> tuple[str, str, str]:
    """A point and its interval's ends in one precision (see :func:`percent_points`)."""
    return percent_points(point, lo, hi), percent_points(lo, point, hi), percent_points(hi, point, lo)


def recommend(sim: Simulation, risk_level: str | None) -> tuple[str, str]:
    """safe_to_apply / risky / reject, with the reason."""
    if not sim.has_model:
        what = "; ".join(f"{u['change']}: {u['reason']}" for u in sim.unmodeled) or "the proposal changes no " \
            "setting a model covers (manual steps only)"
        if sim.runs_replayed == 0:
            what = "no finished runs in the window to replay"
        return "risky", f"no model: {what}"
    gain = sim.simulated_success_rate - sim.baseline_success_rate
    lo, hi = sim.improvement_interval
    if gain < 0:
        return "reject", (f"the change would have lowered the success rate ({percent_points(gain)}; "
                          f"{sim.runs_broken} completed run(s) would have failed)")
    if gain == 0:
        return "reject", "the change would not have changed the outcome of any run in the window"
    if sim.runs_broken:
        return "risky", (f"{percent_points(gain)} overall, but {sim.runs_broken} completed run(s) would have "
                         "failed under the change")
    if sim.unmodeled:
        return "risky", ("parts of the change have no model: "
                         + "; ".join(f"{u['change']}: {u['reason']}" for u in sim.unmodeled))
    point, low, high = percent_interval(gain, lo, hi)
    if lo <= 0:
        return "risky", f"{point} expected, but the 95% interval ({low} to {high}) includes no improvement"
    if (risk_level or "").lower() == "high":
        return "risky", f"{percent_points(gain)} expected, but the strategy rates the change high-risk"
    return "safe_to_apply", f"{point} expected (95% interval {low} to {high}) over {sim.runs_replayed} replayed runs"


# ------------------------------------------------------------------ the lifecycle step




# What a strategy's own ``simulate`` must return (a Simulation or a dict with these keys); the
# baseline, the number of runs and the improvement interval come from the history instead.
PLUGIN_SIMULATION_FIELDS = ("simulated_success_rate", "simulated_interval", "runs_recovered", "runs_broken",
                            "failures_targeted", "failures_fixed")
_NO_MODEL = object()


class InvalidSimulation(ValueError):
    """A strategy's ``simulate`` returned something that is not a simulation (one line)."""


def _number(data: Mapping[str, Any], key: str, lo: float, hi: float, integer: bool = False) -> float:
    value = data[key]
    ok = isinstance(value, numbers.Integral) if integer else isinstance(value, numbers.Real)
    if isinstance(value, bool) or not ok or not lo <= value <= hi:  # `not` so that NaN fails too
        kind = "an integer" if integer else "a number"
        raise InvalidSimulation(f"{key} must be {kind} between {lo:g} and {hi:g}, got {short_repr(value)}")
    return float(value)


def _pair(data: Mapping[str, Any], key: str) -> list[float]:
    value = data[key]
    if not isinstance(value, (list, tuple)) or len(value) != 2 or any(
            isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v <= 1 for v in value) \
            or value[0] > value[1]:
        raise InvalidSimulation(f"{key} must be [low, high] between 0 and 1, got {short_repr(value)}")
    return [round(float(value[0]), 4), round(float(value[1]), 4)]


def plugin_simulation(out: Any, runs: list[ReplayRun]) -> Simulation | None:
    """A strategy's own ``simulate`` result, checked, on the history's baseline.

    ``out`` is a :class:`Simulation` or a dict with :data:`PLUGIN_SIMULATION_FIELDS`
    (``simulated_success_rate`` None: no model; None is returned). Whatever the plugin says
    the baseline, the runs replayed, the improvement interval or the recommendation are, they
    are not taken: the baseline and the runs are those of ``runs`` (the window's finished
    runs), the improvement interval is the simulated interval less that baseline, and
    ``recommend`` judges. The counts must fit the history: at most the window's failed runs
    recovered, at most its completed runs broken, and the simulated rate what they give,
    ``(completed - runs_broken + runs_recovered) / runs``. ``unmodeled`` (``{"change",
    "reason"}`` items) and ``notes`` (strings) are kept; other keys (``models`` included)
    are not. :class:`InvalidSimulation` names what is missing or wrong."""
    if isinstance(out, Simulation):
        out = asdict(out)
    if not isinstance(out, Mapping):
        raise InvalidSimulation(f"returned {type(out).__name__}, not a Simulation or a dict")
    if "simulated_success_rate" in out and out["simulated_success_rate"] is None:
        return None
    missing = [k for k in PLUGIN_SIMULATION_FIELDS if k not in out]
    if missing:
        raise InvalidSimulation(f"missing {', '.join(missing)} (a simulation needs {', '.join(PLUGIN_SIMULATION_FIELDS)})")
    n = len(runs)
    if n == 0:
        return None  # nothing to compare with: said as "no finished runs in the window"
    completed = sum(r.completed for r in runs)
    rate = _number(out, "simulated_success_rate", 0, 1)
    interval = _pair(out, "simulated_interval")
    recovered = _number(out, "runs_recovered", 0, n - completed)
    broken = _number(out, "runs_broken", 0, completed, integer=True)
    targeted = _number(out, "failures_targeted", 0, 10**12, integer=True)
    fixed = _number(out, "failures_fixed", 0, targeted)
    implied = (completed - broken + recovered) / n
    if abs(rate - implied) > 0.005:
        raise InvalidSimulation(f"simulated_success_rate {rate:g} is not what its runs give: ({completed} completed "
                                f"- {broken:g} broken + {recovered:g} recovered) / {n} runs = {implied:.4f}")
    if not interval[0] - 0.0001 <= rate <= interval[1] + 0.0001:
        raise InvalidSimulation(f"simulated_interval {interval} does not hold simulated_success_rate {rate:g}")
    unmodeled = out.get("unmodeled") or []
    if not isinstance(unmodeled, list) or not all(
            isinstance(u, Mapping) and isinstance(u.get("change"), str) and isinstance(u.get("reason"), str)
            for u in unmodeled):
        raise InvalidSimulation("unmodeled must be a list of {change, reason} texts")
    notes = out.get("notes") or []
    if not isinstance(notes, list) or not all(isinstance(x, str) for x in notes):
        raise InvalidSimulation("notes must be a list of texts")
    prediction = _pair(out, "prediction_interval") if out.get("prediction_interval") is not None else None
    baseline = observed_success_rate(runs)
    notes = list(notes)
    claimed = out.get("baseline_success_rate")
    if isinstance(claimed, numbers.Real) and not isinstance(claimed, bool) and abs(claimed - baseline) > 0.0005:
        notes.append(f"the strategy's own baseline ({claimed:.4g}) is not used: the history's is {baseline:.4g}")
    return Simulation(
        simulated_success_rate=round(rate, 4), baseline_success_rate=baseline, simulated_interval=interval,
        improvement_interval=[round(interval[0] - baseline, 4), round(interval[1] - baseline, 4)],
        runs_replayed=n, runs_recovered=round(recovered, 2), runs_broken=int(broken),
        failures_targeted=int(targeted), failures_fixed=round(fixed, 2),
        unmodeled=[{"change": u["change"], "reason": u["reason"]} for u in unmodeled], notes=notes,
        prediction_interval=prediction)


def _proposal_for(imp: Any) -> Any:
    """The stored improvement as the :class:`~selfheal_plugin.plugins.strategy.Proposal` strategies take."""
    return Proposal(
        pattern_id=imp.pattern_id or "", error_type=imp.error_type or "Unknown", tool_name=imp.tool_name or "",
        strategy=imp.strategy or "", description=imp.description, expected_impact=imp.expected_impact or "",
        risk_level=imp.risk_level if imp.risk_level in ("low", "medium", "high") else "medium",
        changes_required=list(imp.changes_required or []), changes=list(imp.changes or []),
        confidence=imp.confidence)


def test_improvement(conn: sqlite3.Connection, settings: Any, improvement_id: str, *,
                     since: str | None = None, now: Any = None, seed: int = 0) -> dict[str, Any]:
    """Replay the baseline window (``since``, default the lookback setting, up to ``now``)
    with the improvement's changes through its strategy's ``simulate``.

    Stores the result on the row (``test_result``; ``proposed`` becomes ``tested``) and
    fires ``improvement_tested``. (Canary and shadow tests are experiments in config.toml:
    :meth:`selfheal_plugin.service.SelfHeal.test`.) A strategy without a model yields recommendation
    ``risky`` with the reason, and no numbers. A simulation of an improvement past testing
    (applied, verified, rolled back, rejected, in a canary/shadow) is refused with
    :class:`~selfheal_plugin.lifecycle.apply.LifecycleError` and nothing stored.
    """
    store = ImprovementStore(conn)
    imp = store.get(improvement_id)
    if imp.status not in APPLICABLE:  # a test result for something already decided would mislead
        verify = step("verify", imp.id)
        hint = {"applied": f" (measure it: {verify})", "verified": f" (measure it: {verify})",
                "canary": f" (its canary is running: {verify})",
                "shadow": f" (its shadow is running: {verify})"}.get(imp.status, "")
        raise LifecycleError(f"{imp.id} is {imp.status}; only proposed or tested improvements can be tested{hint}")
    split_changes(imp.changes)  # a forbidden change is refused before any work
    now = now or utcnow()
    start = parse_since(since or settings.lookback, now)
    history = HistoryWindow(conn=conn, since=start, until=now, settings=settings)
    source = "selfheal replay"
    sim: Simulation | None = None
    strategy = None
    if imp.strategy or imp.error_type:
        table = plugins.strategies(settings)
        named = [s for s, _ in table.values() if imp.strategy and s.name == imp.strategy]
        strategy = named[0] if named else (table.get(imp.error_type or "", (None, None))[0] if imp.error_type
                                           else None)
    if strategy is not None and imp.changes:
        source = f"strategy {strategy.name}"
        runs = load_runs(conn, start.timestamp(), now.timestamp())
        no_model = f"strategy {strategy.name!r} has no simulation model"
        try:
            proposal = _proposal_for(imp)
            raw = plugins.call_strategy(strategy, "simulate", proposal, history, settings=settings)  # bounded
            if raw is None and getattr(strategy, "replays_with_builtin_models", False):
                sim = simulate_proposal(proposal, history)  # selfheal's own replay, on the history's baseline
            elif raw is not None:
                sim = plugin_simulation(raw, runs)  # the plugin's numbers, checked, on the history's baseline
        except StrategyError:  # raised, timed out: already reported by the plugin manager
            sim = None
        except (InvalidSimulation, RecursionError) as exc:  # its result is not a simulation: said, not dropped
            problem = plugins._one_line(exc).removeprefix("InvalidSimulation: ")
            plugins._record(plugins.PluginError(plugin=plugins.plugin_of(strategy), phase="strategy",
                                                hook="simulate", strategy=strategy.name,
                                                error=f"invalid simulation for {imp.id}: {problem}"))
            no_model = f"strategy {strategy.name!r} returned an invalid simulation ({problem})"
            sim = None
        except Exception as exc:  # noqa: BLE001 — a broken plugin is reported, not fatal
            plugins._record(plugins.PluginError(plugin=plugins.plugin_of(strategy), phase="strategy",
                                                hook="simulate", strategy=strategy.name,
                                                error=plugins._one_line(exc)))
            sim = None
        if sim is None:
            base = observed_success_rate(runs)
            sim = Simulation(None, base, None, None, len(runs), None, 0, 0, None, [],
                             [{"change": "all", "reason": no_model}])
    elif imp.changes:
        sim = simulate_changes(conn, imp.changes, imp.error_type, start.timestamp(), now.timestamp(),
                               config=history.config, seed=seed)
    else:
        runs = load_runs(conn, start.timestamp(), now.timestamp())
        base = observed_success_rate(runs)
        sim = Simulation(None, base, None, None, len(runs), None, 0, 0, None, [],
                         [{"change": "all", "reason": "the improvement lists no changes"}])
    recommendation, reason = recommend(sim, imp.risk_level)
    gain = (None if not sim.has_model or sim.baseline_success_rate is None
            else sim.simulated_success_rate - sim.baseline_success_rate)
    result = {
        "improvement_id": imp.id, "test_mode": "simulation",
        "simulated_success_rate": sim.simulated_success_rate, "baseline_success_rate": sim.baseline_success_rate,
        "expected_improvement": None if gain is None else percent_points(gain),
        "recommendation": recommendation, "reason": reason,
        # the kind the proposal was made for; proposals from before kinds existed, and
        # patterns no rule could read, stay an honest "unknown"
        "failure_kind": (imp.evidence or {}).get("failure_kind") or "unknown",
        "interval": None if not sim.has_model else {
            "confidence": 0.95, "method": f"bootstrap over runs with model-parameter draws ({REPLICATES})",
            "simulated_success_rate": sim.simulated_interval,
            "improvement": sim.improvement_interval,
            # what the next window of as many runs will show with the change (95%): the
            # interval above plus that window's own sampling noise
            "next_window_success_rate": sim.prediction_interval, "next_window_runs": sim.runs_replayed,
            # the pattern's own measure, as verify counts it: failed calls of its type per call
            # of its tool, with the same two intervals (replay; next window of as many calls)
            "pattern_error_rate": sim.pattern_error_rate, "pattern_error_rate_interval": sim.pattern_interval,
            "next_window_pattern_error_rate": sim.pattern_prediction_interval,
            "next_window_pattern_calls": sim.pattern_calls},
        "runs_replayed": sim.runs_replayed, "runs_recovered": sim.runs_recovered, "runs_broken": sim.runs_broken,
        "failures_targeted": sim.failures_targeted, "failures_fixed": sim.failures_fixed,
        "models": sim.models, "unmodeled_changes": sim.unmodeled, "notes": sim.notes, "model_source": source,
        # whoever simulated, the baseline is the window's own (a strategy's is never taken):
        # auto-apply tests again a result stored without this
        "baseline_source": "history",
        "window": {"since": format_timestamp(start), "until": format_timestamp(now)},
        "tested_at": format_timestamp(utcnow()),
    }
    fields: dict[str, Any] = {"test_result": result}
    if imp.status == "proposed":
        fields["status"] = "tested"
    # Compare-and-set under the apply lock: an apply, reject or canary that happened while
    # we simulated wins, and this result is not stored over it.
    imp = update_if_unchanged(store, settings, imp, "the test result was not stored", **fields)
    plugins.fire("improvement_tested", improvement=imp, result=result, settings=settings)
    return result


test_improvement.__test__ = False  # a library function, not a pytest test
