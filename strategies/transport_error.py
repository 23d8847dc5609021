"""Transport errors (failed to parse, serialization, protocol): retries, and a person to
check the server's protocol version when they keep coming back.

Retries are sized by ``RetryPlan`` (from observed in-run retry success when there is some;
the expected impact is unknown otherwise).

It also answers for the failure kind ``transient_upstream`` (HTTP 5xx, a refused or reset
upstream connection) whatever the runtime's label: retries whose number comes from how
often a retry in the same run succeeded (``RetryPlan`` model ``observed``), and none when
the same calls failed again every time (``deterministic``).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from selfheal_plugin import hookimpl
from selfheal_plugin.plugins.strategy import (
    Change, HistoryWindow, Proposal, Strategy, impact_text, percent, retry_plan, server_of,
)


class TransportErrorStrategy(Strategy):
    name = "transport_error"
    error_types = ("transport_error",)
    kinds = ("transient_upstream",)
    summary = "Retry with backoff; check protocol versions"

    def _headline(self, pattern: Any) -> str:
        return f"Retry {pattern.tool_name} on transport errors and check the server's protocol version"

    def propose(self, pattern: Any, history: HistoryWindow) -> Proposal:
        if getattr(pattern, "failure_kind", None) == "transient_upstream":
            return self._upstream(pattern, history)
        plan = retry_plan(pattern, history)
        server = server_of(pattern.tool_name) or "the tool's server"
        top = Counter(o["template"] for o in pattern.occurrences_detail).most_common(1)
        example = top[0][0] if top else "no message"
        changes = plan.changes(pattern.tool_name) + [Change.manual(
            f"Check that {server} and the runtime speak the same MCP protocol version; most common error: {example}")]
        return self.make_proposal(
            pattern, description=self._headline(pattern),
            expected_impact=impact_text(plan.reduction, f"transport errors on {pattern.tool_name}",
                                        f"a retry in the same run succeeded with p≈{plan.p_retry_succeeds:.2f}"
                                        if plan.model == "observed" else
                                        f"{percent(plan.failure_rate)} of calls fail; no retry seen in the history"),
            risk_level="low", changes=changes, expected_reduction=plan.reduction, evidence=plan.evidence(),
        )


    def _upstream(self, pattern: Any, history: HistoryWindow) -> Proposal:
        tool = pattern.tool_name
        plan = retry_plan(pattern, history)
        top = [t["template"] for t in (pattern.evidence or {}).get("templates", [])[:2]]
        if plan.model == "deterministic":
            return self.make_proposal(
                pattern, description=f"Fix the upstream {tool} depends on: its calls fail the same way every time",
                expected_impact=impact_text(0.0, f"upstream errors on {tool}",
                                            "the same calls failed again every time they were repeated: "
                                            "retries would not help"),
                risk_level="low", expected_reduction=0.0, evidence=plan.evidence(),
                changes=[Change.manual(f"The upstream behind {tool} fails deterministically ({'; '.join(top)}): "
                                       f"check that it is up and configured; retries will not help")])
        basis = (f"a retry in the same run succeeded with p≈{plan.p_retry_succeeds:.2f}" if plan.model == "observed"
                 else f"{percent(plan.failure_rate)} of calls fail; no retry seen in the history")
        return self.make_proposal(
            pattern, description=f"Retry {tool} up to {plan.attempts} time(s) with backoff on upstream errors",
            expected_impact=impact_text(plan.reduction, f"upstream errors on {tool}", basis),
            risk_level="low", changes=plan.changes(tool), expected_reduction=plan.reduction, evidence=plan.evidence())


@hookimpl
def register_strategies(register: Any) -> None:
    register(TransportErrorStrategy())
