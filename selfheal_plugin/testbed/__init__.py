"""The closed-loop testbed: real MCP tool servers over stdio (:mod:`.servers`) and a
scripted agent that calls them through ``ToolPolicy`` and records with ``RunRecorder``
(:mod:`.agent`).

The agent's names load on first use: the package itself imports nothing, so a submodule
(the fork server importing :mod:`.servers`) never runs the agent's import through it."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["TestbedConfig", "WorkloadSummary", "arun_workload", "run_workload", "tool_name"]

if TYPE_CHECKING:
    from selfheal_plugin.testbed.agent import TestbedConfig, WorkloadSummary, arun_workload, run_workload, tool_name


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("selfheal_plugin.testbed.agent"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
