"""Timeouts: raise the tool's timeout to what its slow calls actually need.

The durations come from the one duration model, :mod:`selfheal_plugin.analysis.durations`
(the simulation behind ``test`` uses the same one, so a proposal and its test agree):
a log-normal fitted by maximum likelihood to the tool's calls in the window, successful
calls observed and timed-out calls *censored* at the limit they hit (they would have taken
at least that long). The new limit is the fitted 99th percentile, rounded up.
Expected impact: the share of timed-out calls the new limit would have let finish,
``mean_j P(T <= new | T > c_j)`` (with a delta-method interval in the evidence). When the
fitted percentile is not above the old limit the timeouts look like hangs, not slow tails,
and the fix is a retry instead. Too few successful calls to fit: no model, and the limit
is raised to 1.5 × the longest timed-out call, with the impact unknown.
"""
from __future__ import annotations

import statistics
from typing import Any

from selfheal_plugin import hookimpl
from selfheal_plugin.analysis.durations import fit_sample, sample_from_calls
from selfheal_plugin.plugins.strategy import (
    Change, HistoryWindow, ModeledStrategy, Proposal, config_change_text, impact_text, nice_ceil_ms, percent,
    retry_plan, tool_path,
)

TARGET_QUANTILE = 0.99
MAX_TIMEOUT_MS = 600_000


class TimeoutStrategy(ModeledStrategy):
    name = "timeout"
    error_types = ("timeout",)
    kinds = ("slow_tail", "hang")
    summary = "Increase the timeout to the observed p99 duration"

    def propose(self, pattern: Any, history: HistoryWindow) -> Proposal:
        tool = pattern.tool_name
        configured = history.tool_setting(tool, "timeout_ms")
        limit = configured if isinstance(configured, int) and not isinstance(configured, bool) and configured > 0 \
            else None
        sample = sample_from_calls(history.tool_calls(tool), limit)  # the window's calls, read once for all strategies
        timed_out = list(sample.censored)
        old_limit = limit if limit is not None else (
            int(round(statistics.median(timed_out), -3)) if timed_out else None)
        evidence: dict[str, Any] = {"successful_calls": len(sample.observed), "timed_out_calls": len(timed_out),
                                    "old_timeout_ms": old_limit, "old_timeout_source":
                                    "config.toml" if limit is not None else "observed timed-out durations"}
        model = fit_sample(sample) if timed_out else "no timed-out call with a known duration or limit"
        if not isinstance(model, str):
            q = model.quantile_ms(TARGET_QUANTILE)
            q_lo, q_hi = model.quantile_interval_ms(TARGET_QUANTILE)
            evidence.update({"duration_model": model.describe(), "lognormal_mu": round(model.mu, 4),
                             "lognormal_sigma": round(model.sigma, 4), "p99_ms": round(q),
                             "p99_interval_ms": [round(q_lo), round(q_hi)]})
            if old_limit is None or q > old_limit * 1.05:
                new = min(nice_ceil_ms(q), MAX_TIMEOUT_MS)
                p, lo, hi = model.finish_estimate(new, timed_out)
                evidence["timed_out_finish_interval"] = [round(lo, 4), round(hi, 4)]
                reduction = max(0.0, min(1.0, p))
                return self._raise(pattern, old_limit, new, reduction, evidence,
                                   f"durations ~ {model.describe()}, p99 {q / 1000:.1f} s")
            cut = statistics.median(timed_out)
            if limit is not None and cut < 0.9 * limit:
                return self._covered(pattern, limit, cut, q, evidence)
            return self._retry(pattern, history, old_limit, evidence)
        # Too few successful calls to fit: the tool rarely finishes in time at all.
        evidence["duration_model"] = f"no model: {model}"
        new = min(nice_ceil_ms(1.5 * max(timed_out or [old_limit or 30_000])), MAX_TIMEOUT_MS)
        return self._raise(pattern, old_limit, new, None, evidence, f"no duration model: {model}")

    def candidates(self, pattern: Any, history: HistoryWindow) -> list[Proposal]:
        """The proposal, plus the other kind of fix: retries when it raises the timeout, a
        raised timeout (to the fitted p99, at least 1.5 × the old limit) when it retries."""
        main = self.propose(pattern, history)
        keys = {c.path[-1] for c in main.changes if c.kind == "config" and c.path}
        ev = dict(main.evidence)
        old = ev.get("old_timeout_ms") if isinstance(ev.get("old_timeout_ms"), int) else None
        out = [main]
        if "retry_attempts" not in keys:
            alt = self._retry(pattern, history, old, dict(ev), alternative=True)
            if any(c.kind == "config" for c in alt.changes):
                out.append(alt)
        if "timeout_ms" not in keys and old:
            p99 = ev.get("p99_ms") if isinstance(ev.get("p99_ms"), (int, float)) else 0
            new = min(nice_ceil_ms(max(float(p99), 1.5 * old)), MAX_TIMEOUT_MS)
            out.append(self._raise(pattern, old, new, None, dict(ev), "an alternative to retries, to compare"))
        return out

    def _raise(self, pattern: Any, old: int | None, new: int, reduction: float | None,
               evidence: dict[str, Any], basis: str) -> Proposal:
        evidence["new_timeout_ms"] = new
        change = Change.config(tool_path(pattern.tool_name, "timeout_ms"), new)
        return self.make_proposal(
            pattern,
            description=f"Increase the timeout of {pattern.tool_name} to {new / 1000:g} s",
            expected_impact=impact_text(reduction, f"timeouts on {pattern.tool_name}", basis),
            risk_level="low" if not old or new <= 3 * old else "medium",
            changes=[change], expected_reduction=reduction, evidence=evidence,
            # config.toml's value as the from value (as apply and its commit say it), not ``old``:
            # where config.toml sets none, ``old`` is the limit the calls show (evidence)
            changes_required=["Set " + config_change_text(
                change.path, old if evidence.get("old_timeout_source") == "config.toml" else None, new)],
        )

    def _covered(self, pattern: Any, limit: int, cut: float, q: float, evidence: dict[str, Any]) -> Proposal:
        """The timeouts were cut well below the limit config.toml sets now (a window that spans
        the change that raised it), and that limit covers the fitted p99: nothing to change."""
        evidence.update({"timed_out_at_ms": round(cut), "covered_by_current_limit": True})
        return self.make_proposal(
            pattern,
            description=(f"Keep the timeout of {pattern.tool_name} at {limit / 1000:g} s: it covers the p99 "
                         f"({q / 1000:.1f} s); these timeouts were cut at {cut / 1000:g} s, before it"),
            expected_impact=impact_text(None, f"timeouts on {pattern.tool_name}",
                                        f"the timed-out calls stopped at a median {cut / 1000:g} s, below the "
                                        f"{limit / 1000:g} s limit in config.toml now; judge it on the runs since "
                                        "(a --since after the change)"),
            risk_level="low", expected_reduction=None, evidence=evidence,
            changes=[Change.manual(f"Nothing to change in config.toml: {pattern.tool_name}'s timeout is already "
                                   f"{limit} ms")])

    def _retry(self, pattern: Any, history: HistoryWindow, old: int | None, evidence: dict[str, Any],
               alternative: bool = False) -> Proposal:
        """Retries: the fix when the timeouts look like hangs, or (``alternative``) the other
        candidate beside a raised limit, whatever the durations say."""
        rate = pattern.failure_rate
        plan = retry_plan(pattern, history)
        n, reduction = plan.attempts, plan.reduction
        evidence.update({"failure_rate": rate, "retry_attempts": n, "retry_model": plan.model})
        if n <= 0:
            return self.make_proposal(
                pattern, description=f"Find out why {pattern.tool_name} hangs: repeats of the same call hang too",
                expected_impact=impact_text(0.0, f"timeouts on {pattern.tool_name}",
                                            "the same calls timed out again every time they were repeated"),
                risk_level="low", expected_reduction=0.0, evidence=evidence,
                changes=[Change.manual(f"{pattern.tool_name} hangs on the same calls every time (p99 of completed "
                                       f"calls is below the {old} ms limit): check its server or upstream")])
        changes = plan.changes(pattern.tool_name)
        return self.make_proposal(
            pattern,
            description=(f"Retry {pattern.tool_name} up to {n} time(s): " + (
                "an alternative to raising its limit, to compare" if alternative else
                f"its timeouts look like hangs (p99 of completed calls is below the {old} ms limit)")),
            expected_impact=impact_text(reduction, f"timeouts on {pattern.tool_name}",
                                        f"{percent(rate)} of calls time out; no retry seen in the history"
                                        if plan.model == "independence" else
                                        f"a retry in the same run succeeded with p≈{plan.p_retry_succeeds:.2f}"),
            risk_level="low", changes=changes, expected_reduction=reduction, evidence=evidence,
        )


@hookimpl
def register_strategies(register: Any) -> None:
    register(TimeoutStrategy())
