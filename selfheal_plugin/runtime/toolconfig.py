"""The ``[tools."NAME"]`` and ``[servers."NAME"]`` tables of ``config.toml``: their keys and
validation, shared by :mod:`~selfheal_plugin.runtime.policy` (what is in force) and
:mod:`~selfheal_plugin.runtime.experiments` (what a canary or shadow section adds)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selfheal_plugin.errors import ConfigError

log = logging.getLogger("selfheal.policy")

PREFLIGHT_CHECKS = ("path_exists",)
TOOL_KEYS = {"timeout_ms", "retry_attempts", "retry_backoff_ms", "preflight", "circuit_breaker"}
BREAKER_KEYS = {"failure_threshold", "timeout_duration_sec", "half_open_requests"}
SERVER_KEYS = {"health_check", "auto_restart"}

@dataclass(frozen=True)
class CircuitBreakerSettings:
    failure_threshold: int
    timeout_duration_sec: float
    half_open_requests: int = 1


def _where(path: Path, table: str) -> str:
    return f"{path}: [{table}]"


def _int(value: Any, where: str, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{where} {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{where} {key} must be a number >= 0, got {value!r}")
    return float(value)


def _bool(value: Any, where: str, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where} {key} must be true or false, got {value!r}")
    return value


def validate_tool_table(table: Any, where: str) -> dict[str, Any]:
    """Checked values of one ``[tools."NAME"]`` table (unknown keys are kept out, with a warning)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key == "timeout_ms":
            out[key] = _int(value, where, key, 1)
        elif key in ("retry_attempts", "retry_backoff_ms"):
            out[key] = _int(value, where, key, 0)
        elif key == "preflight":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where} preflight must be a list of check names, got {value!r}")
            unknown = [v for v in value if v not in PREFLIGHT_CHECKS]
            if unknown:
                raise ConfigError(f"{where} unknown preflight check {unknown[0]!r} "
                                  f"(known: {', '.join(PREFLIGHT_CHECKS)})")
            out[key] = tuple(value)
        elif key == "circuit_breaker":
            bwhere = where[:-1] + ".circuit_breaker]"
            if not isinstance(value, dict):
                raise ConfigError(f"{bwhere} must be a table")
            if "failure_threshold" not in value or "timeout_duration_sec" not in value:
                raise ConfigError(f"{bwhere} needs failure_threshold and timeout_duration_sec")
            for extra in set(value) - BREAKER_KEYS:
                log.warning("%s: unknown key %r ignored", bwhere, extra)
            out[key] = CircuitBreakerSettings(
                _int(value["failure_threshold"], bwhere, "failure_threshold", 1),
                _number(value["timeout_duration_sec"], bwhere, "timeout_duration_sec"),
                _int(value.get("half_open_requests", 1), bwhere, "half_open_requests", 1))
        else:
            log.warning("%s: unknown key %r ignored", where, key)
    return out


def validate_server_table(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    out = {}
    for key, value in table.items():
        if key in SERVER_KEYS:
            out[key] = _bool(value, where, key)
        # other server keys (command, args, ...) belong to the runtime, not to us
    return out
