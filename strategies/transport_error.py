"""Transport errors (failed to parse, serialization, protocol): retries, and a person to
check the server's protocol version when they keep coming back.

Retries are sized from the observed failure rate (``RetryPlan``); the expected impact is
``1 − rate^attempts`` under independence.
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
    summary = "Retry with backoff; check protocol versions"

    def suggest(self, pattern: Any) -> str:
        return f"Retry {pattern.tool_name} on transport errors and check the server's protocol version"

    def propose(self, pattern: Any, history: HistoryWindow) -> Proposal:
        plan = retry_plan(pattern, history)
        server = server_of(pattern.tool_name) or "the tool's server"
        top = Counter(o["template"] for o in pattern.occurrences_detail).most_common(1)
        example = top[0][0] if top else "no message"
        changes = plan.changes(pattern.tool_name) + [Change.manual(
            f"Check that {server} and the runtime speak the same MCP protocol version; most common error: {example}")]
        return self.make_proposal(
            pattern, description=self.suggest(pattern),
            expected_impact=impact_text(plan.reduction, f"transport errors on {pattern.tool_name}",
                                        f"{percent(plan.failure_rate)} of calls fail; retries assumed independent"),
            risk_level="low", changes=changes, expected_reduction=plan.reduction, evidence=plan.evidence(),
        )


@hookimpl
def register_strategies(register: Any) -> None:
    register(TransportErrorStrategy())
