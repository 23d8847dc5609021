"""The closed-loop testbed: real MCP tool servers over stdio (:mod:`.servers`) and a
scripted agent that calls them through ``ToolPolicy`` and records with ``RunRecorder``
(:mod:`.agent`)."""
from selfheal_plugin.testbed.agent import TestbedConfig, WorkloadSummary, arun_workload, run_workload, tool_name

__all__ = ["TestbedConfig", "WorkloadSummary", "arun_workload", "run_workload", "tool_name"]
