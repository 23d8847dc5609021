"""Server crashes: a circuit breaker on the tool and auto-restart for its MCP server.

Sized from the tool's calls in time order:

* ``failure_threshold`` — the fewest consecutive failures ``k >= 2`` that independent
  failures at the tool's overall error rate ``f`` would produce by chance at most 0.1 % of
  the time (``f^k <= 0.001``), so the breaker opens on outages, not on noise;
* ``timeout_duration_sec`` — the median outage length (first failure of a streak to the
  next success), rounded up to 30 s, between 30 s and 1 h; 300 s when no recovery was seen;
* ``half_open_requests = 1``.

Expected impact: the breaker does not make a crashed server answer, so the reduction in
failures is unknown; the evidence reports how many failed calls it would have
short-circuited (failures past the threshold within a streak).
"""
from __future__ import annotations

import math
import statistics
from typing import Any

from selfheal_plugin import hookimpl
from selfheal_plugin.plugins.strategy import (
    Change, HistoryWindow, ModeledStrategy, Proposal, impact_text, percent, server_of, server_path, tool_path,
)

FALSE_OPEN = 0.001
DEFAULT_OPEN_SEC = 300


def streaks(calls: list[Any]) -> list[tuple[int, float, float | None]]:
    """(length, first failure ts, next success ts or None) for each run of failures."""
    out, length, first = [], 0, 0.0
    for c in calls:
        if not c.ok:
            if length == 0:
                first = c.ts
            length += 1
        elif length:
            out.append((length, first, c.ts))
            length = 0
    if length:
        out.append((length, first, None))
    return out


class ServerCrashedStrategy(ModeledStrategy):
    name = "server_crashed"
    error_types = ("server_crashed",)
    kinds = ("server_down",)
    summary = "Circuit breaker on the tool, auto-restart for its server"

    def _headline(self, pattern: Any) -> str:
        server = server_of(pattern.tool_name)
        restart = f" and auto-restart MCP server {server}" if server else ""
        return f"Add a circuit breaker to {pattern.tool_name}{restart}"

    def propose(self, pattern: Any, history: HistoryWindow) -> Proposal:
        tool = pattern.tool_name
        calls = history.tool_calls(tool)
        failures = sum(1 for c in calls if not c.ok)
        rate = failures / len(calls) if calls else pattern.failure_rate
        threshold = 2
        while threshold < 10 and rate ** threshold > FALSE_OPEN:
            threshold += 1
        runs = streaks(calls)
        outages = [(end - start) for _, start, end in runs if end is not None]
        if outages:
            open_sec = int(min(3600, max(30, math.ceil(statistics.median(outages) / 30) * 30)))
        else:
            open_sec = DEFAULT_OPEN_SEC
        short_circuited = sum(max(0, length - threshold) for length, _, _ in runs)
        server = server_of(tool)
        # A breaker only helps against streaks of failures; when the crashes in the window are
        # isolated (it would have short-circuited nothing), restarting the server is the fix.
        breaker = short_circuited > 0 or not server
        changes = []
        if breaker:
            changes += [Change.config(tool_path(tool, "circuit_breaker", "failure_threshold"), threshold),
                        Change.config(tool_path(tool, "circuit_breaker", "timeout_duration_sec"), open_sec),
                        Change.config(tool_path(tool, "circuit_breaker", "half_open_requests"), 1)]
        if server:
            changes += [Change.config(server_path(server, "auto_restart"), True),
                        Change.config(server_path(server, "health_check"), True)]
        evidence = {"tool_error_rate": round(rate, 4), "failure_streaks": len(runs),
                    "longest_streak": max((s[0] for s in runs), default=0),
                    "median_outage_sec": round(statistics.median(outages), 1) if outages else None,
                    "short_circuited_calls": short_circuited, "failed_calls": failures, "server": server}
        basis = (f"the breaker would have short-circuited {short_circuited} of the tool's {failures} failed calls "
                 f"(all error types) in the window "
                 f"({percent(short_circuited / failures) if failures else '0%'}); tool error rate {percent(rate)}")
        if breaker:
            description, risk = self._headline(pattern), "medium"
        else:
            description, risk = f"Health-check and auto-restart MCP server {server} (crashes of {tool} are isolated)", "low"
            basis += "; crashes are isolated, so no breaker"
        return self.make_proposal(
            pattern, description=description,
            expected_impact=impact_text(None, f"crashes on {tool}", basis),
            risk_level=risk, changes=changes, expected_reduction=None, evidence=evidence,
        )


@hookimpl
def register_strategies(register: Any) -> None:
    register(ServerCrashedStrategy())
