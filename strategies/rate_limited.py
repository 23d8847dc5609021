"""Rate limited (HTTP 429, "Too Many Requests", "rate limit exceeded"): back off, then retry.

Answers for the failure kind ``rate_limited`` whatever the runtime's label (runtimes call
a 429 a ``tool_error``), and for the error type ``rate_limited``. The wait comes from the
history, first that is known:

1. the server's own ``Retry-After`` or reset time in the messages (``retry_after_s``,
   ``reset_in_s`` of the evidence): the first retry waits that long;
2. the observed delay from a failure to the tool's next success in the same run (median);
3. the observed spacing of the failures (median gap), the length of a limit's window.

The first delay (``retry_backoff_ms``, doubled per retry) is sized so that the
:data:`ATTEMPTS` retries together wait at least that long (from a header: the first one
does). Expected impact: the share of the pattern's failures followed by a success of the
tool in the same run, when at least 3 were followed by a call at all (the retry model of
``test`` replays the same history); else unknown. Risk: low (retries only widen what
already works). A manual change asks a person to lower the request rate or raise the quota.
"""
from __future__ import annotations

from typing import Any

from selfheal_plugin import hookimpl
from selfheal_plugin.plugins.strategy import (
    Change,
    HistoryWindow,
    ModeledStrategy,
    Proposal,
    impact_text,
    nice_ceil_ms,
    percent,
    recovered_in_run,
    server_of,
    tool_path,
)

ATTEMPTS = 3
MIN_WAIT_MS = 1_000
MAX_WAIT_MS = 300_000
MIN_FOLLOW_UPS = 3


def wait_from_evidence(pattern: Any, history: HistoryWindow) -> tuple[float | None, str]:
    """(total wait in ms the retries should cover, where it came from)."""
    ev = getattr(pattern, "evidence", None) or {}
    header = max([v for v in (ev.get("retry_after_s"), ev.get("reset_in_s")) if isinstance(v, (int, float)) and v > 0],
                 default=None)
    if header is not None:
        return header * 1000, "the server's Retry-After/reset time"
    _, delays = recovered_in_run(pattern, history)
    if delays:
        delays.sort()
        return delays[len(delays) // 2], "the median delay until the tool next succeeded in the same run"
    spacing = (ev.get("spacing_s") or {}).get("median")
    if isinstance(spacing, (int, float)) and spacing > 0:
        return spacing * 1000, "the median spacing of the rate-limit failures"
    return None, "no timing evidence: default wait"


class RateLimitedStrategy(ModeledStrategy):
    name = "rate_limited"
    error_types = ("rate_limited",)
    kinds = ("rate_limited",)
    summary = "Back off for the server's rate-limit window, then retry"

    def propose(self, pattern: Any, history: HistoryWindow) -> Proposal:
        tool = pattern.tool_name
        wait, source = wait_from_evidence(pattern, history)
        wait_ms = min(MAX_WAIT_MS, max(MIN_WAIT_MS, wait if wait is not None else 10_000))
        from_header = source.startswith("the server's")
        backoff = nice_ceil_ms(wait_ms if from_header else wait_ms / (2 ** ATTEMPTS - 1))
        det = ((getattr(pattern, "evidence", None) or {}).get("determinism") or {})
        follow, follow_ok = int(det.get("followed_in_run") or 0), int(det.get("follow_up_succeeded") or 0)
        recovered, _ = recovered_in_run(pattern, history)
        n = len(pattern.occurrences_detail) or 1
        reduction = round(recovered / n, 4) if follow >= MIN_FOLLOW_UPS else None
        basis = (f"{recovered} of {n} rate-limited calls were followed by a success in the same run; "
                 f"first wait {backoff / 1000:g} s from {source}") if reduction is not None else \
            f"too few follow-up calls to estimate; first wait {backoff / 1000:g} s from {source}"
        server = server_of(tool) or "the tool's upstream"
        changes = [Change.config(tool_path(tool, "retry_attempts"), ATTEMPTS),
                   Change.config(tool_path(tool, "retry_backoff_ms"), int(backoff)),
                   Change.manual(f"If {server} keeps rate limiting, lower the agent's request rate or raise the quota")]
        return self.make_proposal(
            pattern, description=f"Back off {backoff / 1000:g} s (doubling) and retry {tool} up to {ATTEMPTS} times "
                                 f"when rate limited",
            expected_impact=impact_text(reduction, f"rate-limit errors on {tool}", basis),
            risk_level="low", changes=changes, expected_reduction=reduction,
            evidence={"wait_ms": round(wait_ms), "wait_source": source, "retry_backoff_ms": int(backoff),
                      "retry_attempts": ATTEMPTS, "followed_in_run": follow, "follow_up_succeeded": follow_ok,
                      "recovered_in_run": recovered, "recovered_share": percent(recovered / n)},
        )


@hookimpl
def register_strategies(register: Any) -> None:
    register(RateLimitedStrategy())
