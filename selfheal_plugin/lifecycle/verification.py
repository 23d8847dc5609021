"""Did an applied improvement work? Before vs after its apply time, with a significance test.

Two windows of ``measurement_window_days`` meet at ``applied_at``: runs that *started*
in ``[applied_at - w, applied_at)`` against runs that started in ``[applied_at,
min(applied_at + w, now))`` (instants compared, never timestamp strings — the runtime
writes mixed offsets). Two measures:

* overall run success: completed / finished runs (completed, failed or cancelled — the
  one definition of :mod:`selfheal_plugin.history.outcome`, so the before-rate is the
  dashboard's and ``test``'s baseline for the same runs; a cancelled run is a run that did
  not succeed);
* the pattern's own error rate: failed calls with the pattern's signature per call of
  its tool, in those same finished runs.

Each is compared with Fisher's exact test (two-sided, ``scipy.stats.fisher_exact``).
Two tests decide one verdict, so each is held to a Bonferroni-corrected level: a p-value
counts as significant below ``significance_level / 2`` (``/ 1`` when the improvement has
no pattern measure), keeping the chance of a false verdict at ``significance_level``.
With fewer than ``min_sample_size`` finished runs on either side the answer is "extend
monitoring". Otherwise a significant worsening of either measure says **rollback**
(``failed``), else a significant improvement of either says **keep** (``verified``),
else **extend** (``inconclusive``).

A keep needs the whole measurement window after the apply: before the window has
ended a significant improvement is only *provisional* — the recommendation is extend,
the status stays applied, and ``provisional_recommendation`` says keep — unless the
caller accepts it early (``early=True``, ``verify --early``). A rollback on significant
harm stands at once. A rollback recommendation does not roll back by itself: ``agent
self-heal rollback`` does, and the daemon does when it runs.
"""
from __future__ import annotations

import math
import re
import sqlite3
from datetime import datetime, timedelta
from typing import Any

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.lifecycle.apply import LifecycleError, update_if_unchanged
from selfheal_plugin.lifecycle.learning import record_verified
from selfheal_plugin.errors import SelfHealError, UsageError
from selfheal_plugin.history.connection import normalize_error_type, one_line
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.history.outcome import success_rate
from selfheal_plugin.analysis.patterns import split_pattern_id
from selfheal_plugin.history.settings import Settings
from selfheal_plugin.lifecycle.simulation import ReplayRun, load_runs, percent_points
from selfheal_plugin.history.times import format_timestamp, parse_timestamp, utcnow
from selfheal_plugin.steps import step

VERIFIABLE = ("applied", "verified")
EXPERIMENT_STATUSES = ("canary", "shadow")


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def _fisher(a: int, b: int, c: int, d: int) -> float | None:
    """Two-sided p-value of [[a, b], [c, d]]; None when a row or column is empty."""
    if (a + b) == 0 or (c + d) == 0 or (a + c) == 0 or (b + d) == 0:
        return None if (a + b) == 0 or (c + d) == 0 else 1.0
    from scipy import stats  # imported on use: scipy costs ~1 s at start-up

    return float(stats.fisher_exact([[a, b], [c, d]])[1])


def _pattern_counts(runs: list[ReplayRun], error_type: str, tool: str) -> tuple[int, int, int, int]:
    """(calls of the tool, failures with the signature, runs with such a failure, those of
    the failures that ToolPolicy refused before the call)."""
    calls = errors = runs_hit = refused = 0
    for r in runs:
        hit = False
        for c in r.calls:
            if c.tool != tool:
                continue
            calls += 1
            if not c.ok and normalize_error_type(c.error_type) == error_type:
                errors += 1
                refused += c.refused
                hit = True
        runs_hit += hit
    return calls, errors, runs_hit, refused


_NUMBER = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*(?:-\s*(\d+(?:\.\d+)?))?\s*%")


def compare_with_expected(expected: str | None, success_delta: float | None,
                          reduction: float | None) -> str | None:
    """"better than expected!" / "as expected" / "less than expected", or None when the
    expected impact names no number we can compare."""
    if not expected:
        return None
    m = _NUMBER.search(expected)
    if not m:
        return None
    lo = float(m.group(1))
    hi = float(m.group(2)) if m.group(2) else lo
    text = expected.lower().split("(")[0]  # the claim, not its basis ("fit of 78 successful calls")
    if "success" in text and success_delta is not None:
        actual = success_delta * 100
    elif reduction is not None:
        actual, lo, hi = reduction * 100, abs(lo), abs(hi)
    else:
        return None
    if actual > max(lo, hi) + 5:
        return "better than expected!"
    if actual >= min(lo, hi) - 5:
        return "as expected"
    return "less than expected"


_Z95 = 1.959964


def _interval_for(stored: list[float] | None, replay: list[float] | None, point: float | None,
                  stored_n: int | None, n: int) -> list[float] | None:
    """The 95% prediction interval for a window of ``n`` (runs or calls): the stored one when
    ``n`` is the size it was made for; else the replay's interval (the model's uncertainty)
    widened by ``n``'s binomial noise, in the normal approximation."""
    if not stored or len(stored) != 2:
        return None
    if n == stored_n or not replay or len(replay) != 2 or point is None or n <= 0:
        return [float(stored[0]), float(stored[1])]
    sd = math.sqrt(((replay[1] - replay[0]) / (2 * _Z95)) ** 2 + point * (1 - point) / n)
    return [max(0.0, point - _Z95 * sd), min(1.0, point + _Z95 * sd)]


def compare_with_prediction(test_result: dict[str, Any] | None, after_success_rate: float | None, runs_after: int,
                            after_error_rate: float | None = None, calls_after: int = 0) -> str | None:
    """The measured week against ``test``'s 95% prediction intervals (``interval`` of a
    stored test result): the success rate against ``next_window_success_rate`` and the
    pattern's error rate against ``next_window_pattern_error_rate``, each for as many runs
    (calls) as were measured. "as expected" only when every measure with an interval lies
    inside it; "less than expected" when one fell short (success below, error rate above);
    "better than expected!" when one did better and none fell short. None when the test
    left no interval (no model, or never tested)."""
    iv = (test_result or {}).get("interval") if isinstance(test_result, dict) else None
    if not isinstance(iv, dict):
        return None
    verdicts = []
    if after_success_rate is not None:
        band = _interval_for(iv.get("next_window_success_rate"), iv.get("simulated_success_rate"),
                             test_result.get("simulated_success_rate"), iv.get("next_window_runs"), runs_after)
        if band:
            verdicts.append("short" if after_success_rate < band[0] - 1e-9 else
                            "better" if after_success_rate > band[1] + 1e-9 else "inside")
    if after_error_rate is not None:
        band = _interval_for(iv.get("next_window_pattern_error_rate"), iv.get("pattern_error_rate_interval"),
                             iv.get("pattern_error_rate"), iv.get("next_window_pattern_calls"), calls_after)
        if band:
            verdicts.append("short" if after_error_rate > band[1] + 1e-9 else
                            "better" if after_error_rate < band[0] - 1e-9 else "inside")
    if not verdicts:
        return None
    if "short" in verdicts:
        return "less than expected"
    if "better" in verdicts:
        return "better than expected!"
    return "as expected"


def pattern_tool(imp: Any) -> str | None:
    """The tool of the improvement's pattern; None for a legacy row without a usable id
    (then only overall run success is measured)."""
    if not imp.pattern_id:
        return None
    try:
        return split_pattern_id(imp.pattern_id)[1]
    except SelfHealError:
        return None


def assess(imp: Any, settings: Settings, before: list[ReplayRun], after: list[ReplayRun], window_complete: bool,
           labels: tuple[str, str] = ("before the apply", "since the apply")) -> dict[str, Any]:
    """The comparison behind every verdict: two groups of finished runs (before/after the
    apply, or control/canary arms of one period) → rates, Fisher p-values, recommendation.
    ``labels`` name the two groups in the extend-monitoring reason and in an actual impact
    that cannot be measured."""
    tool = pattern_tool(imp)
    ok_b, ok_a = sum(r.completed for r in before), sum(r.completed for r in after)
    n_b, n_a = len(before), len(after)
    sr_b, sr_a = success_rate(ok_b, n_b), success_rate(ok_a, n_a)
    p_success = _fisher(ok_b, n_b - ok_b, ok_a, n_a - ok_a) if n_b and n_a else None
    alpha = settings.significance_level

    pattern: dict[str, Any] | None = None
    reduction = None
    reached_reduction = None  # of the failures that reached the tool (refusals left out)
    p_pattern = None
    if imp.pattern_id:
        etype = split_pattern_id(imp.pattern_id)[0] if tool else None
        if etype and tool:
            calls_b, err_b, runs_hit_b, refused_b = _pattern_counts(before, etype, tool)
            calls_a, err_a, runs_hit_a, refused_a = _pattern_counts(after, etype, tool)
            rate_b, rate_a = _rate(err_b, calls_b), _rate(err_a, calls_a)
            if calls_b and calls_a:
                p_pattern = _fisher(err_b, calls_b - err_b, err_a, calls_a - err_a)
            if rate_b and rate_a is not None:
                reduction = (rate_b - rate_a) / rate_b
            reached_b, reached_a = _rate(err_b - refused_b, calls_b), _rate(err_a - refused_a, calls_a)
            if reached_b and reached_a is not None:
                reached_reduction = (reached_b - reached_a) / reached_b
            pattern = {"pattern_id": imp.pattern_id, "error_type": etype, "tool_name": tool,
                       "before_error_rate": rate_b, "after_error_rate": rate_a,
                       "before_errors": err_b, "after_errors": err_a, "before_calls": calls_b, "after_calls": calls_a,
                       "before_runs_affected": runs_hit_b, "after_runs_affected": runs_hit_a,
                       "before_refused": refused_b, "after_refused": refused_a,
                       "reached_reduction": None if reached_reduction is None else round(reached_reduction, 4),
                       "p_value": p_pattern,  # scipy's value: a tiny p is data, not 0.0
                       "reduction": None if reduction is None else round(reduction, 4)}

    success_delta = None if sr_a is None or sr_b is None else sr_a - sr_b
    tests = (p_success is not None) + (p_pattern is not None)
    alpha_each = alpha / max(tests, 1)  # Bonferroni over the tests actually made
    sig_s = p_success is not None and p_success < alpha_each
    sig_p = p_pattern is not None and p_pattern < alpha_each
    worse = (sig_s and success_delta is not None and success_delta < 0) or \
        (sig_p and pattern is not None and pattern["after_error_rate"] > pattern["before_error_rate"])
    better = (sig_s and success_delta is not None and success_delta > 0) or \
        (sig_p and pattern is not None and pattern["after_error_rate"] < pattern["before_error_rate"])
    floor = settings.min_sample_size
    if n_b < floor or n_a < floor:
        recommendation, status = "extend", "inconclusive"
        reason = (f"extend monitoring: {n_a} finished run(s) {labels[1]} and {n_b} {labels[0]} "
                  f"(min_sample_size {floor})")
    elif worse:
        recommendation, status = "rollback", "failed"
        reason = (f"the change made things significantly worse; roll it back with {step('rollback', imp.id)} "
                  "(the daemon does so automatically)")
    elif better:
        recommendation, status = "keep", "verified"
        reason = "significant improvement"
    else:
        recommendation, status = "extend", "inconclusive"
        reason = ("extend monitoring: no significant change yet" if not window_complete else
                  "extend monitoring: no significant change over the full window")

    parts = []
    if success_delta is not None:
        parts.append(f"{percent_points(success_delta)} success rate" if success_delta else "+0% success rate")
    if pattern is not None and reduction is not None:
        word = "reduction" if reduction >= 0 else "increase"
        parts.insert(0, f"{abs(reduction) * 100:.0f}% {word} in {pattern['error_type']} errors")
        if pattern["after_refused"] and reached_reduction is not None:
            parts.insert(1, f"{pattern['after_refused']} refused before the call "
                            f"({reached_reduction * 100:.0f}% fewer reached the tool)")
    elif pattern is not None and pattern["before_error_rate"] == 0 and pattern["after_errors"]:
        parts.insert(0, f"new {pattern['error_type']} errors ({pattern['after_errors']} after, none before)")
    # Against the simulation's prediction intervals when `test` made them; else against the
    # number the proposal's expected impact names (a strategy's estimate without a replay).
    comparison = compare_with_prediction(getattr(imp, "test_result", None), sr_a, n_a,
                                         None if pattern is None else pattern["after_error_rate"],
                                         0 if pattern is None else pattern["after_calls"])
    if comparison is None:
        # a refusal by the policy is the fix at work (a preflight stops the call it targets):
        # the claim is about the failures that reach the tool
        refusing = pattern is not None and pattern["after_refused"] > 0
        comparison = compare_with_expected(imp.expected_impact, success_delta,
                                           reached_reduction if refusing else reduction)
    if comparison == "less than expected" and _went_wrong_way(pattern, reduction, success_delta):
        comparison = "the opposite of the expected improvement"  # "less" reads as a smaller gain
    # nothing to compare only when a side has no finished run: say which
    empty = " or ".join(label for label, n in zip(labels, (n_b, n_a)) if not n)
    actual = ", ".join(parts) if parts else f"not measurable (no finished run {empty or 'to compare'})"
    if comparison:
        actual += f" ({comparison})"

    return {"n_b": n_b, "n_a": n_a, "sr_b": sr_b, "sr_a": sr_a, "p_success": p_success, "pattern": pattern,
            "recommendation": recommendation, "status": status, "reason": reason, "comparison": comparison,
            "actual": actual, "success_delta": success_delta, "reduction": reduction, "tests": tests,
            "alpha_per_test": alpha_each}


def _went_wrong_way(pattern: dict[str, Any] | None, reduction: float | None, success_delta: float | None) -> bool:
    """Whether the measured change is a worsening: the pattern's errors rose (or, with no
    pattern measure, run success fell)."""
    if pattern is not None and reduction is not None:
        return reduction < 0
    return success_delta is not None and success_delta < 0


def verify_improvement(conn: sqlite3.Connection, settings: Settings, improvement_id: str,
                       measurement_window_days: float | None = None, now: datetime | None = None, *,
                       early: bool = False, rollback_follows: bool = False) -> dict[str, Any]:
    """Measure an applied improvement; store and notify the result (see module docstring).

    Returns the design document's fields (``expected_impact``, ``actual_impact``,
    ``verification_status``, ``recommendation``, ``metrics``) plus p-values, the
    pattern's error rates and the windows. ``early`` accepts a keep before the
    measurement window after the apply has ended (otherwise it is provisional: extend).
    ``rollback_follows``: the caller rolls back at once on a rollback recommendation (the
    daemon); the result's ``rollback_follows`` then says whether it will, and the
    rollback's own notification reports the verdict.
    """
    days = settings.measurement_window_days if measurement_window_days is None else measurement_window_days
    if not isinstance(days, (int, float)) or isinstance(days, bool) or days <= 0:
        raise UsageError(f"measurement window must be a positive number of days, got {days!r}")
    store = ImprovementStore(conn)
    imp = store.get(improvement_id)
    if imp.status not in VERIFIABLE or not imp.applied_at:
        hint = " (a running experiment: measure it with SelfHeal.verify)" if imp.status in EXPERIMENT_STATUSES else ""
        raise LifecycleError(f"{imp.id} is {imp.status}; only applied improvements can be verified{hint}")
    now = now or utcnow()
    # a keep accepted before the window ended (--early, or a complete window) stands: measuring it
    # again reports what the history says now, not "extend" for a fix already verified
    early = early or imp.status == "verified"
    previous = (imp.metrics or {}).get("recommendation") if isinstance(imp.metrics, dict) else None
    try:  # a row of the runtime's own older shape, or written by hand, may hold anything
        applied = parse_timestamp(imp.applied_at)
    except (TypeError, ValueError):
        raise LifecycleError(f"{imp.id} has an unreadable applied_at ({one_line(repr(imp.applied_at), 60)}), not "
                             "an RFC 3339 timestamp; nothing was changed") from None
    window = timedelta(days=days)
    after_end = min(applied + window, now)
    tool = pattern_tool(imp)
    tools = [tool] if tool else []
    before = load_runs(conn, (applied - window).timestamp(), applied.timestamp(), tools)
    after = load_runs(conn, applied.timestamp(), after_end.timestamp(), tools) if now > applied else []
    window_complete = now >= applied + window
    a = assess(imp, settings, before, after, window_complete)
    n_b, n_a, sr_b, sr_a, p_success = a["n_b"], a["n_a"], a["sr_b"], a["sr_a"], a["p_success"]
    pattern, recommendation, status, reason, comparison, actual = (
        a["pattern"], a["recommendation"], a["status"], a["reason"], a["comparison"], a["actual"])
    alpha, floor = settings.significance_level, settings.min_sample_size
    provisional = None
    if recommendation == "keep" and not window_complete and not early:
        provisional = "keep"
        recommendation, status = "extend", "inconclusive"
        reason = (f"significant improvement so far, but the {days:g}-day window after the apply ends "
                  f"{format_timestamp(applied + window)}: extend monitoring (a keep before then is provisional; "
                  f"accept it now with {step('verify', imp.id, early=True)})")

    metrics = {"before_success_rate": sr_b, "after_success_rate": sr_a, "runs_analyzed": n_b + n_a,
               "runs_before": n_b, "runs_after": n_a, "p_value": p_success,
               "test": "Fisher's exact test, two-sided", "significance_level": alpha, "min_sample_size": floor,
               "tests": a["tests"], "alpha_per_test": round(a["alpha_per_test"], 6),
               "correction": "Bonferroni over the success and pattern tests", "pattern": pattern}
    result = {
        "improvement_id": imp.id, "expected_impact": imp.expected_impact, "actual_impact": actual,
        "verification_status": status, "recommendation": recommendation, "reason": reason,
        "comparison": comparison, "metrics": metrics, "provisional_recommendation": provisional,
        "p_value": metrics["p_value"], "pattern_p_value": None if pattern is None else pattern["p_value"],
        "before_error_rate": None if pattern is None else pattern["before_error_rate"],
        "after_error_rate": None if pattern is None else pattern["after_error_rate"],
        "window": {"days": days, "before": [format_timestamp(applied - window), format_timestamp(applied)],
                   "after": [format_timestamp(applied), format_timestamp(after_end)], "complete": window_complete},
        "checked_at": format_timestamp(now),
        "previous_recommendation": previous if isinstance(previous, str) else None,
    }
    if rollback_follows:
        result["rollback_follows"] = recommendation == "rollback"
    fields: dict[str, Any] = {"metrics": {**metrics, "verification_status": status, "recommendation": recommendation,
                                          "checked_at": result["checked_at"], "window": result["window"]},
                              "actual_impact": actual}
    if recommendation == "keep":
        fields.update(status="verified", verified_at=format_timestamp(now))
    imp = update_if_unchanged(store, settings, imp, "the verification was not stored", **fields)
    result["status"] = imp.status
    if imp.status == "verified" and recommendation == "keep":  # a fix that worked: a rule to share
        rule = record_verified(conn, imp, pattern, now)
        result["rule_id"] = rule.id if rule is not None else None
    plugins.fire("improvement_verified", improvement=imp, verification=result, settings=settings)
    return result
