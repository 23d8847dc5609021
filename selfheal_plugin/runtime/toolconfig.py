"""The ``[tools."NAME"]`` and ``[servers."NAME"]`` tables of ``config.toml``: their keys and
validation, shared by :mod:`~selfheal_plugin.runtime.policy` (what is in force) and
:mod:`~selfheal_plugin.runtime.experiments` (what a canary or shadow section adds)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfheal_plugin.history import schema

log = logging.getLogger("selfheal.policy")

# The keys, their types, ranges and defaults are declared once in the schema.
PREFLIGHT_CHECKS = schema.PREFLIGHT_CHECKS
TOOL_KEYS = {*schema.TOOL, "circuit_breaker"}
BREAKER_KEYS = set(schema.CIRCUIT_BREAKER)
SERVER_KEYS = set(schema.SERVER)

@dataclass(frozen=True)
class CircuitBreakerSettings:
    failure_threshold: int
    timeout_duration_sec: float
    half_open_requests: int = schema.CIRCUIT_BREAKER["half_open_requests"].default


def _where(path: Path, table: str) -> str:
    return f"{path}: [{table}]"


def validate_tool_table(table: Any, where: str) -> dict[str, Any]:
    """Checked values of one ``[tools."NAME"]`` table: only the keys it sets (unknown keys are
    kept out, with a warning). :class:`ConfigError` names the file, table and key."""
    if isinstance(table, dict) and not table:
        return {}
    checked = schema.validate("tool", table, where)
    out: dict[str, Any] = {k: getattr(checked, k) for k in sorted(TOOL_KEYS) if k in checked.model_fields_set}
    for extra in checked.model_extra or {}:
        log.warning("%s: unknown key %r ignored", where, extra)
    breaker = out.get("circuit_breaker")
    if breaker is not None:
        for extra in breaker.model_extra or {}:
            log.warning("%s: unknown key %r ignored", where[:-1] + ".circuit_breaker]", extra)
        out["circuit_breaker"] = CircuitBreakerSettings(
            breaker.failure_threshold, breaker.timeout_duration_sec, breaker.half_open_requests)
    elif "circuit_breaker" in out:  # `circuit_breaker = ...` cannot be None in TOML; keep the shape
        del out["circuit_breaker"]
    return out


def validate_server_table(table: Any, where: str) -> dict[str, Any]:
    """The keys selfheal reads from one ``[servers."NAME"]`` table (the runtime's own keys,
    command, args, ..., are left alone)."""
    if isinstance(table, dict) and not set(table) & SERVER_KEYS:
        return {}
    checked = schema.validate("server", table, where)
    return {k: getattr(checked, k) for k in sorted(SERVER_KEYS) if k in checked.model_fields_set}
