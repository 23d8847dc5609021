"""A third-party strategy: replaces the built-in one for ``server_crashed``.

It proposes a restart-only fix, so a test can tell it answered instead of the built-in.
"""
from __future__ import annotations

from typing import Any

from selfheal_plugin import hookimpl
from selfheal_plugin.plugins.strategy import Change, Strategy, server_of, server_path, tool_path


class RestartOnlyStrategy(Strategy):
    name = "restart-only"
    error_types = ("ServerCrashed",)  # any spelling of the type works
    summary = "Restart the crashed server, nothing else"

    def propose(self, pattern: Any, history: Any):
        server = server_of(pattern.tool_name)
        change = (Change.config(server_path(server, "auto_restart"), True) if server
                  else Change.config(tool_path(pattern.tool_name, "retry_attempts"), 1))
        return self.make_proposal(pattern, description=f"Restart {server or pattern.tool_name} when it crashes",
                                  expected_impact="unknown (third-party test strategy)", risk_level="low",
                                  changes=[change])


@hookimpl
def register_strategies(register):
    register(RestartOnlyStrategy())
