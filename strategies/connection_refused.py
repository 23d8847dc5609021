"""Connection refused: health checks and auto-restart for the MCP server, plus retries.

Retries are sized by ``RetryPlan``: from how often a retry in the same run succeeded when
the history shows at least 3 (the expected impact is then ``1 − (1 − p)^attempts``);
otherwise from the failure rate as if failures were independent, with the impact unknown. Health checks and auto-restart apply to the
server named in ``mcp__<server>__<tool>``; built-in tools get retries only.

It also answers for the failure kind ``server_down`` (a closed connection, a server whose
command is missing, all tools of one server failing together), whatever the runtime's
label. Retries follow :func:`retry_plan`: none when the evidence says a repeat fails too.
"""
from __future__ import annotations

from typing import Any

from selfheal_plugin import hookimpl
from selfheal_plugin.plugins.strategy import (
    Change, HistoryWindow, ModeledStrategy, Proposal, impact_text, percent, retry_plan, server_of, server_path,
)


class ConnectionRefusedStrategy(ModeledStrategy):
    name = "connection_refused"
    error_types = ("connection_refused",)
    kinds = ("server_down",)
    summary = "Health checks, auto-restart and retries with backoff"

    def _headline(self, pattern: Any) -> str:
        server = server_of(pattern.tool_name)
        if server:
            return f"Health-check and auto-restart MCP server {server}; retry {pattern.tool_name} with backoff"
        return f"Retry {pattern.tool_name} with backoff"

    def propose(self, pattern: Any, history: HistoryWindow) -> Proposal:
        plan = retry_plan(pattern, history)
        server = server_of(pattern.tool_name)
        changes = plan.changes(pattern.tool_name)
        if server:
            changes += [Change.config(server_path(server, "health_check"), True),
                        Change.config(server_path(server, "auto_restart"), True)]
        if not changes:
            changes = [Change.manual(f"Find out why {pattern.tool_name} cannot reach its server: a repeat of the "
                                     f"same call failed every time, so retries will not help")]
        if plan.model == "deterministic":
            basis = "the same calls failed again every time they were repeated: no retries"
        elif plan.model == "observed":
            basis = (f"a retry in the same run succeeded with p≈{plan.p_retry_succeeds:.2f}; "
                     f"{plan.attempts} retr{'y' if plan.attempts == 1 else 'ies'}")
        else:
            basis = (f"{percent(plan.failure_rate)} of calls refused; no retry of it seen in the history, so "
                     f"{plan.attempts} retr{'y' if plan.attempts == 1 else 'ies'} sized as if independent")
        return self.make_proposal(
            pattern, description=self._headline(pattern),
            expected_impact=impact_text(plan.reduction, f"connection failures on {pattern.tool_name}", basis),
            risk_level="medium" if server else "low", changes=changes, expected_reduction=plan.reduction,
            evidence={**plan.evidence(), "server": server},
        )


@hookimpl
def register_strategies(register: Any) -> None:
    register(ConnectionRefusedStrategy())
