"""What a message tells its reader to do next, said the way that reader can do it.

Messages are made deep in the engine ("measure it: agent self-heal verify ID"), but who reads
them depends on the shell that asked: a person at a terminal runs the CLI command, an agent
on the MCP server calls a tool. :func:`step` writes a command for whoever asked: the CLI's
words by default, the MCP tool call inside :func:`for_agent` (the MCP server's calls), when a
tool does it (``rollback``, ``reject`` and ``show`` are CLI-only and stay as they are);
:func:`option` does the same for one option of the command at hand.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

CLI = "agent self-heal"

# CLI verb -> (MCP tool, the argument the CLI's positional value goes to)
TOOLS: dict[str, tuple[str, str | None]] = {
    "detect": ("detect_failure_patterns", None),  # read-only over MCP: it never proposes
    "propose": ("propose_improvement", "pattern_id"),
    "test": ("test_improvement", "improvement_id"),
    "apply": ("apply_improvement", "improvement_id"),
    "verify": ("verify_improvement", "improvement_id"),
    "canary promote": ("canary_promote", "improvement_id"),
    "canary drop": ("canary_drop", "improvement_id"),
    "ab start": ("ab_start", "pattern_id"),
    "ab status": ("ab_status", "experiment_id"),
    "ab promote": ("ab_promote", "experiment_id"),
    "ab drop": ("ab_drop", "experiment_id"),
    "learn --rules": ("list_rules", None),
}

# MCP-only verbs -> the CLI command that does it for a person (`detect` proposes for every
# pattern it finds; the CLI has no propose command)
CLI_INSTEAD: dict[str, str] = {"propose": "detect"}

_agent: ContextVar[bool] = ContextVar("selfheal_steps_agent", default=False)


@contextmanager
def for_agent() -> Iterator[None]:
    """Within it, :func:`step` names MCP tools (the MCP server wraps each call in it)."""
    token = _agent.set(True)
    try:
        yield
    finally:
        _agent.reset(token)


def step(verb: str, value: str | None = None, **options: str | bool) -> str:
    """``step("verify", "imp-1", early=True)``: ``agent self-heal verify imp-1 --early`` for a
    person, ``verify_improvement(improvement_id="imp-1", early=true)`` for an agent. A verb of
    two alternatives (``"canary promote|drop"``) names both."""
    group, _, last = verb.rpartition(" ")
    if "|" in last:
        return " or ".join(step(f"{group} {alt}".strip(), value, **options) for alt in last.split("|")) \
            if _agent.get() else _cli(verb, value, options)
    if _agent.get() and verb in TOOLS:
        tool, arg = TOOLS[verb]
        args = ({arg: value} if arg and value is not None else {}) | options
        return f"{tool}({', '.join(f'{k}={json.dumps(v)}' for k, v in args.items())})"
    if verb in CLI_INSTEAD:
        return _cli(CLI_INSTEAD[verb], None, {})
    return _cli(verb, value, options)


def option(name: str, placeholder: str | None = None) -> str:
    """One option of the command at hand: ``--force`` / ``--changes-made TEXT`` for a person,
    ``force=true`` / ``the changes_made argument`` for an agent."""
    if _agent.get():
        return f"the {name} argument" if placeholder else f"{name}=true"
    return _flag(name, True if placeholder is None else placeholder)


def _flag(name: str, value: str | bool) -> str:
    flag = "--" + name.replace("_", "-")
    return flag if value is True else f"{flag} {value}"


def _cli(verb: str, value: str | None, options: dict[str, str | bool]) -> str:
    words = [CLI, verb, *([value] if value is not None else [])]
    return " ".join([*words, *(_flag(name, v) for name, v in options.items())])
