"""Canary and shadow sections of ``config.toml``: what ``ToolPolicy`` reads for experiments.

selfheal writes these sections (``agent self-heal test ID --mode canary|shadow``); a
runtime's ``ToolPolicy`` honours them::

    [canary."imp-20261126-1a2b3c4d"]
    fraction = 0.5                              # share of runs in the canary arm
    started_at = "2026-11-19T12:00:00.000000Z"  # verification compares arms from here on
    [canary."imp-20261126-1a2b3c4d".tools."mcp__search__web_search"]
    timeout_ms = 40000                          # the improvement's settings, canary arm only

    [shadow."imp-20261126-5e6f7a8b"]
    started_at = "2026-11-19T12:00:00.000000Z"
    [shadow."imp-20261126-5e6f7a8b".tools."mcp__search__web_search"]
    timeout_ms = 40000                          # observed, never enforced

Canary: a run is in the canary arm when ``sha256("IMP-ID:RUN-ID")`` read as a number in
[0, 1) is below ``fraction`` — deterministic, so every call of a run sees the same arm and
a restarted runtime puts the run back in it. Canary-arm runs get the section's
``tools``/``servers`` tables layered over ``[tools]``/``[servers]``; both arms record
``{"selfheal_arm": "canary"|"control", "selfheal_improvement": ID}`` in the run's
``metadata`` at their first tool call.

A/B (``agent self-heal ab start``): k arms beside a control, one section per experiment::

    [ab."ab-20261127-1a2b3c4d"]
    started_at = "2026-11-19T12:00:00.000000Z"
    pattern = "timeout:mcp__search__web_search"
    [ab."ab-20261127-1a2b3c4d".arms."imp-20261127-aaaaaaaa"]
    fraction = 0.3333333333333333               # default: equal shares for the arms and control
    [ab."ab-20261127-1a2b3c4d".arms."imp-20261127-aaaaaaaa".tools."mcp__search__web_search"]
    timeout_ms = 90000

A run's position ``sha256("AB-ID:RUN-ID")`` in [0, 1) picks the arm whose cumulative
fraction (in the section's order) first exceeds it, else the control. The arm's
``tools``/``servers`` tables are layered like a canary's; the run records
``{"selfheal_experiment": AB-ID, "selfheal_arm": IMP-ID|"control"}`` in ``metadata`` at its
first tool call (and ``{"selfheal_ab_arms": {AB-ID: arm}}``, which stays right when a canary
or a second experiment runs at the same time).

Shadow: calls run under the normal settings and the agent sees their normal outcome; the
policy also observes what the shadow ``timeout_ms`` would have done. A call that times out
under the current limit keeps running in the background up to the shadow limit (its
result is discarded), so "would have finished under the new timeout" is a measurement, not
an estimate; a call that succeeds slower than a lower shadow limit would have failed. Each
run records ``{"selfheal_shadow": {"improvement": ID, "calls": n, "would_change": k,
"would_succeed": a, "would_fail": b, "changes": [...]}}`` in ``metadata``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from selfheal_plugin.errors import ConfigError
from selfheal_plugin.runtime.toolconfig import validate_server_table, validate_tool_table

CANARY = "canary"
SHADOW = "shadow"
AB = "ab"
ARM_CANARY = "canary"
ARM_CONTROL = "control"
SHADOW_KEYS = ("timeout_ms",)  # what a shadow can observe without changing the outcome


@dataclass(frozen=True)
class CanarySection:
    improvement_id: str
    fraction: float
    started_at: str | None
    tools: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    servers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class ShadowSection:
    improvement_id: str
    started_at: str | None
    tools: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class AbArm:
    improvement_id: str
    fraction: float
    tools: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    servers: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class AbSection:
    """``[ab."AB-ID"]``: k arms (improvements) beside a control, run by run."""
    experiment_id: str
    pattern: str | None
    started_at: str | None
    arms: tuple[AbArm, ...] = ()


@dataclass(frozen=True)
class Experiments:
    canaries: tuple[CanarySection, ...] = ()
    shadows: tuple[ShadowSection, ...] = ()
    abs: tuple[AbSection, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.canaries or self.shadows or self.abs)


def arm_fraction(improvement_id: str, run_id: str) -> float:
    """The run's deterministic position in [0, 1) for this improvement."""
    digest = hashlib.sha256(f"{improvement_id}:{run_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def arm_for(improvement_id: str, run_id: str, fraction: float) -> str:
    """``canary`` for a ``fraction`` share of run ids, ``control`` for the rest."""
    return ARM_CANARY if arm_fraction(improvement_id, run_id) < fraction else ARM_CONTROL


def _where(path: Path, table: str) -> str:
    return f"{path}: [{table}]"


def _tables(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    return raw


def parse_experiments(data: Mapping[str, Any], path: Path) -> Experiments:
    """The validated ``[canary.*]`` and ``[shadow.*]`` sections (empty when absent)."""

    canaries = []
    for imp_id, sec in sorted(_tables(data.get(CANARY), _where(path, CANARY)).items()):
        where = _where(path, f'canary."{imp_id}"')
        if not isinstance(sec, dict):
            raise ConfigError(f"{where} must be a table")
        fraction = sec.get("fraction", 0.5)
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise ConfigError(f"{where} fraction must be a number between 0 and 1 (exclusive), got {fraction!r}")
        tools = {n: validate_tool_table(t, _where(path, f'canary."{imp_id}".tools."{n}"'))
                 for n, t in _tables(sec.get("tools"), where[:-1] + '.tools]').items()}
        servers = {n: validate_server_table(t, _where(path, f'canary."{imp_id}".servers."{n}"'))
                   for n, t in _tables(sec.get("servers"), where[:-1] + '.servers]').items()}
        started = sec.get("started_at")
        canaries.append(CanarySection(imp_id, float(fraction), started if isinstance(started, str) else None,
                                      tools, servers))
    shadows = []
    for imp_id, sec in sorted(_tables(data.get(SHADOW), _where(path, SHADOW)).items()):
        where = _where(path, f'shadow."{imp_id}"')
        if not isinstance(sec, dict):
            raise ConfigError(f"{where} must be a table")
        tools = {}
        for n, t in _tables(sec.get("tools"), where[:-1] + '.tools]').items():
            twhere = _where(path, f'shadow."{imp_id}".tools."{n}"')
            checked = validate_tool_table(t, twhere)
            extra = sorted(set(checked) - set(SHADOW_KEYS))
            if extra:
                raise ConfigError(f"{twhere} a shadow can only observe {', '.join(SHADOW_KEYS)}, not {extra[0]}")
            tools[n] = checked
        started = sec.get("started_at")
        shadows.append(ShadowSection(imp_id, started if isinstance(started, str) else None, tools))
    return Experiments(tuple(canaries), tuple(shadows), parse_ab_sections(data, path))


def parse_ab_sections(data: Mapping[str, Any], path: Path) -> tuple[AbSection, ...]:
    """The validated ``[ab."AB-ID"]`` sections: ``started_at``, ``pattern`` and at least two
    ``arms."IMP-ID"`` tables, each with a ``fraction`` (default: an equal share for every
    arm and the control) and its ``tools``/``servers`` overlay; the fractions must leave the
    control a share (sum below 1)."""
    out = []
    for ab_id, sec in _tables(data.get(AB), _where(path, AB)).items():
        where = _where(path, f'ab."{ab_id}"')
        if not isinstance(sec, dict):
            raise ConfigError(f"{where} must be a table")
        arms_raw = _tables(sec.get("arms"), where[:-1] + '.arms]')
        if len(arms_raw) < 2:
            raise ConfigError(f"{where} needs at least two arms (arms.\"IMP-ID\" tables), has {len(arms_raw)}")
        default = 1 / (len(arms_raw) + 1)
        arms = []
        for imp_id, arm in arms_raw.items():
            awhere = _where(path, f'ab."{ab_id}".arms."{imp_id}"')
            if not isinstance(arm, dict):
                raise ConfigError(f"{awhere} must be a table")
            fraction = arm.get("fraction", default)
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
                raise ConfigError(f"{awhere} fraction must be a number between 0 and 1 (exclusive), got {fraction!r}")
            tools = {n: validate_tool_table(t, _where(path, f'ab."{ab_id}".arms."{imp_id}".tools."{n}"'))
                     for n, t in _tables(arm.get("tools"), awhere[:-1] + '.tools]').items()}
            servers = {n: validate_server_table(t, _where(path, f'ab."{ab_id}".arms."{imp_id}".servers."{n}"'))
                       for n, t in _tables(arm.get("servers"), awhere[:-1] + '.servers]').items()}
            arms.append(AbArm(imp_id, float(fraction), tools, servers))
        total = sum(a.fraction for a in arms)
        if total >= 1:
            raise ConfigError(f"{where} arm fractions add up to {total:g}; they must leave the control a share "
                              "(sum below 1)")
        started, pattern = sec.get("started_at"), sec.get("pattern")
        out.append(AbSection(ab_id, pattern if isinstance(pattern, str) else None,
                             started if isinstance(started, str) else None, tuple(arms)))
    return tuple(out)


def ab_arm_for(section: AbSection, run_id: str) -> str:
    """The arm (an improvement id) or ``control`` of a run: ``sha256("AB-ID:RUN-ID")`` read as
    a number in [0, 1) against the arms' cumulative fractions, in the section's order."""
    u = arm_fraction(section.experiment_id, run_id)
    edge = 0.0
    for arm in section.arms:
        edge += arm.fraction
        if u < edge:
            return arm.improvement_id
    return ARM_CONTROL


def ab_layers(experiments: Experiments, run_id: str | None) -> list[tuple[AbSection, AbArm | None]]:
    """(section, the run's arm or None for control) of every A/B experiment for this run."""
    if run_id is None:
        return []
    out: list[tuple[AbSection, AbArm | None]] = []
    for sec in experiments.abs:
        chosen = ab_arm_for(sec, run_id)
        out.append((sec, next((a for a in sec.arms if a.improvement_id == chosen), None)))
    return out


def canary_layers(experiments: Experiments, run_id: str | None) -> list[tuple[CanarySection, str]]:
    """(section, arm) of every canary for this run (no run: no arm, nothing applies)."""
    if run_id is None:
        return []
    return [(c, arm_for(c.improvement_id, run_id, c.fraction)) for c in experiments.canaries]


def shadow_timeout(experiments: Experiments, tool: str) -> tuple[str, int] | None:
    """(improvement id, shadow timeout_ms) observed for ``tool``, if any shadow names it."""
    for sh in experiments.shadows:
        limit = (sh.tools.get(tool) or {}).get("timeout_ms")
        if limit is not None:
            return sh.improvement_id, int(limit)
    return None


class ShadowLog:
    """Per-run tally of shadow observations, written to the run's ``metadata``."""

    MAX_DETAILS = 20

    def __init__(self) -> None:
        self._runs: dict[str, dict[str, Any]] = {}

    def record(self, run: Any, improvement_id: str, observation: dict[str, Any]) -> None:
        entry = self._runs.setdefault(run.id, {"improvement": improvement_id, "calls": 0, "would_change": 0,
                                              "would_succeed": 0, "would_fail": 0, "changes": []})
        entry["calls"] += 1
        if observation["actual"] != observation["shadow"]:
            entry["would_change"] += 1
            entry["would_succeed" if observation["shadow"] == "success" else "would_fail"] += 1
            if len(entry["changes"]) < self.MAX_DETAILS:
                entry["changes"].append(observation)
        try:
            run.update_metadata(selfheal_shadow=entry)
        except Exception:  # noqa: BLE001 - a closed recorder loses the note, never the call
            import logging

            logging.getLogger("selfheal.policy").warning("could not record a shadow observation for run %s", run.id)
