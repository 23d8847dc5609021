"""Timeouts: raise the tool's timeout to what its slow calls actually need.

The new limit is the 99th percentile of a log-normal fitted by maximum likelihood to
the tool's durations in the window, where successful calls are observed and timed-out
calls are *censored* at the limit they hit (they would have taken at least that long).
Expected impact: the share of timed-out calls the new limit would have let finish,
``mean_j (F(T) - F(c_j)) / (1 - F(c_j))``. When the fitted percentile is not above the
old limit the timeouts look like hangs, not slow tails, and the fix is a retry instead.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

from selfheal_plugin import hookimpl
from selfheal_plugin.plugins.strategy import (
    Change, HistoryWindow, ModeledStrategy, Proposal, impact_text, nice_ceil_ms, percent, retries_needed, tool_path,
)

TARGET_QUANTILE = 0.99
MAX_TIMEOUT_MS = 600_000
MIN_SUCCESSES = 5


def fit_censored_lognormal(observed: list[float], censored: list[float]) -> tuple[float, float]:
    """(mu, sigma) of log-duration by maximum likelihood with right-censoring."""
    from scipy import optimize, stats
    xs = [math.log(max(x, 1.0)) for x in observed]
    cs = [math.log(max(c, 1.0)) for c in censored]
    mu0 = statistics.fmean(xs + cs)
    s0 = max(statistics.pstdev(xs + cs), 0.1)

    def nll(theta: Any) -> float:
        mu, log_s = theta
        s = math.exp(log_s)
        return -(stats.norm.logpdf(xs, mu, s).sum() + stats.norm.logsf(cs, mu, s).sum())

    res = optimize.minimize(nll, [mu0, math.log(s0)], method="Nelder-Mead",
                            options={"xatol": 1e-6, "fatol": 1e-8, "maxiter": 2000})
    mu, log_s = res.x
    return float(mu), float(math.exp(log_s))


class TimeoutStrategy(ModeledStrategy):
    name = "timeout"
    error_types = ("timeout",)
    summary = "Increase the timeout to the observed p99 duration"

    def suggest(self, pattern: Any) -> str:
        return f"Increase the timeout of {pattern.tool_name} to fit its slow calls"

    def propose(self, pattern: Any, history: HistoryWindow) -> Proposal:
        from scipy import stats

        tool = pattern.tool_name
        successes = [c.duration_ms for c in history.tool_calls(tool) if c.ok and c.duration_ms]
        timed_out = [o["duration_ms"] for o in pattern.occurrences_detail if o.get("duration_ms")]
        configured = history.tool_setting(tool, "timeout_ms")
        old_limit = configured if isinstance(configured, int) and configured > 0 else (
            int(round(statistics.median(timed_out), -3)) if timed_out else None)
        evidence: dict[str, Any] = {"successful_calls": len(successes), "timed_out_calls": len(timed_out),
                                    "old_timeout_ms": old_limit, "old_timeout_source":
                                    "config.toml" if configured else "observed timed-out durations"}
        if len(successes) >= MIN_SUCCESSES and timed_out:
            mu, sigma = fit_censored_lognormal(successes, timed_out)
            q = math.exp(mu + sigma * stats.norm.ppf(TARGET_QUANTILE))
            evidence.update({"lognormal_mu": round(mu, 4), "lognormal_sigma": round(sigma, 4),
                             "p99_ms": round(q)})
            if old_limit is None or q > old_limit * 1.05:
                new = min(nice_ceil_ms(q), MAX_TIMEOUT_MS)
                dist = stats.lognorm(s=sigma, scale=math.exp(mu))
                avoided = [(dist.cdf(new) - dist.cdf(c)) / max(dist.sf(c), 1e-12) for c in timed_out]
                reduction = max(0.0, min(1.0, statistics.fmean(avoided)))
                return self._raise(pattern, old_limit, new, reduction, evidence,
                                   f"censored log-normal fit of {len(successes)} successful and "
                                   f"{len(timed_out)} timed-out calls, p99 {q / 1000:.1f} s")
            return self._retry(pattern, history, old_limit, evidence)
        # Too few successful calls to fit: the tool rarely finishes in time at all.
        new = min(nice_ceil_ms(1.5 * max(timed_out or [old_limit or 30_000])), MAX_TIMEOUT_MS)
        return self._raise(pattern, old_limit, new, None, evidence,
                           f"only {len(successes)} successful call(s) in the window, no duration model")

    def _raise(self, pattern: Any, old: int | None, new: int, reduction: float | None,
               evidence: dict[str, Any], basis: str) -> Proposal:
        evidence["new_timeout_ms"] = new
        change = Change.config(tool_path(pattern.tool_name, "timeout_ms"), new)
        before = f"{old} → {new}" if old else f"{new}"
        return self.make_proposal(
            pattern,
            description=f"Increase the timeout of {pattern.tool_name} to {new / 1000:g} s",
            expected_impact=impact_text(reduction, f"timeouts on {pattern.tool_name}", basis),
            risk_level="low" if not old or new <= 3 * old else "medium",
            changes=[change], expected_reduction=reduction, evidence=evidence,
            changes_required=[f"Set [tools.\"{pattern.tool_name}\"] timeout_ms: {before}"],
        )

    def _retry(self, pattern: Any, history: HistoryWindow, old: int | None, evidence: dict[str, Any]) -> Proposal:
        rate = pattern.failure_rate
        n = retries_needed(rate)
        reduction = 1 - rate ** n
        evidence.update({"failure_rate": rate, "retry_attempts": n})
        changes = [Change.config(tool_path(pattern.tool_name, "retry_attempts"), n),
                   Change.config(tool_path(pattern.tool_name, "retry_backoff_ms"), 1000)]
        return self.make_proposal(
            pattern,
            description=(f"Retry {pattern.tool_name} up to {n} time(s): its timeouts look like hangs "
                         f"(p99 of completed calls is below the {old} ms limit)"),
            expected_impact=impact_text(reduction, f"timeouts on {pattern.tool_name}",
                                        f"{percent(rate)} of calls time out; retries assumed independent"),
            risk_level="low", changes=changes, expected_reduction=reduction, evidence=evidence,
        )


@hookimpl
def register_strategies(register: Any) -> None:
    register(TimeoutStrategy())
