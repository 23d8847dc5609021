"""The improvement lifecycle: propose → (test) → apply → verify | roll back.

Each step is a plain function over a sqlite3 connection and :class:`Settings`; the CLI
and the MCP server only call them. Sections below are kept apart by step.
"""
from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.lifecycle.cooldown import mark_if_undone
from selfheal_plugin.history.improvements import Improvement, ImprovementStore, new_improvement_id
from selfheal_plugin.analysis.patterns import Detection, Pattern, detect_failure_patterns, get_pattern
from selfheal_plugin.history.settings import Settings
from selfheal_plugin.plugins.strategy import HistoryWindow, Proposal, StrategyError, validate_proposal
from selfheal_plugin.history.times import parse_since, utcnow

log = logging.getLogger("selfheal.lifecycle")


# ================================================================= propose


def history_window(conn: sqlite3.Connection, settings: Settings, since: str | None = None, *,
                   now: datetime | None = None, until: datetime | None = None) -> HistoryWindow:
    """The window strategies read: ``since`` (default: the lookback setting) to ``until``
    (default: ``now``, itself defaulting to the current instant; never None)."""
    now = now or utcnow()
    return HistoryWindow(conn=conn, since=parse_since(since or settings.lookback, now), until=until or now,
                         settings=settings)


def attach_suggested_fixes(patterns: list[Pattern], settings: Settings | None = None) -> list[Pattern]:
    """Fill each pattern's ``suggested_fix`` from its strategy's one-line ``suggest``.

    The only definition of ``suggested_fix``: ``detect`` (CLI and MCP, through
    :func:`detect_with_fixes`), ``show`` and the daemon all use it, so a pattern has one
    suggested fix everywhere; a proposal's own ``description`` is reported beside it."""
    for p in patterns:
        try:
            strategy = plugins.strategy_for(p.error_type, settings)
            fix = plugins.call_strategy(strategy, "suggest", p, settings=settings)
        except StrategyError as exc:  # a broken plugin costs the hint, not the command
            log.warning("no suggested fix for %s: %s", p.id, exc)
            continue
        if isinstance(fix, str) and fix.strip():
            p.suggested_fix = fix.strip().splitlines()[0]
        else:
            log.warning("no suggested fix for %s: strategy %r returned %r, not a line of text", p.id,
                        getattr(strategy, "name", "?"), type(fix).__name__)
    return patterns


def detect_with_fixes(conn: sqlite3.Connection, settings: Settings, **detect_args: Any) -> Detection:
    """Detect patterns with the settings' window and thresholds, each with its
    ``suggested_fix`` (:func:`attach_suggested_fixes`). The one detection behind the CLI's
    ``detect`` and the MCP ``detect_failure_patterns`` tool; read-only: it neither proposes
    nor notifies (the CLI then proposes and fires ``patterns_detected``). ``detect_args`` go to
    :func:`patterns.detect_failure_patterns` (``now``, ``progress``, ``error_type``, ...)."""
    result = detect_failure_patterns(conn, since=settings.lookback, min_occurrences=settings.min_occurrences,
                                     confidence_threshold=settings.confidence_threshold, **detect_args)
    attach_suggested_fixes(result.patterns, settings)
    return result


def make_proposal(pattern: Pattern, history: HistoryWindow) -> Proposal:
    """Ask the strategy for ``pattern.error_type`` for a proposal (not stored).

    The strategy runs contained and bounded (``plugins.call_strategy``) and what it returns
    is checked by :func:`~selfheal_plugin.plugins.strategy.validate_proposal`. Any failure —
    the type's strategy failed to load, it raised, timed out or returned an invalid
    proposal — is one :class:`StrategyError` line naming the strategy and its plugin (also
    recorded in the plugin errors); nothing is stored for that pattern.
    """
    strategy, plugin = plugins.resolve_strategy(pattern.error_type, history.settings)
    proposal = plugins.call_strategy(strategy, "propose", pattern, history, settings=history.settings)
    try:
        return validate_proposal(proposal, pattern.id)
    except (ValueError, TypeError, RecursionError) as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        plugins._record(plugins.PluginError(plugin=plugin, phase="strategy", hook="propose",
                                            strategy=getattr(strategy, "name", None),
                                            error=f"invalid proposal for {pattern.id}: {problem}"))
        raise StrategyError(f"strategy {strategy.name!r} (plugin {plugin}) returned an invalid proposal for "
                            f"{pattern.id}: {problem}") from None


def improvement_from_proposal(proposal: Proposal) -> Improvement:
    return Improvement(
        id=new_improvement_id(), status="proposed", description=proposal.description,
        pattern_id=proposal.pattern_id, error_type=proposal.error_type, tool_name=proposal.tool_name,
        strategy=proposal.strategy, risk_level=proposal.risk_level, confidence=proposal.confidence,
        expected_impact=proposal.expected_impact, changes_required=list(proposal.changes_required),
        changes=[c.to_dict() for c in proposal.changes],
        evidence={**proposal.evidence, "expected_reduction": proposal.expected_reduction},
    )


@dataclass
class Proposed:
    """The outcome of proposing for one pattern: the stored improvement and whether it is new."""

    improvement: Improvement
    created: bool
    pattern: Pattern | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**proposal_result(self.improvement), "created": self.created}


def propose_for_pattern(conn: sqlite3.Connection, settings: Settings, pattern: Pattern,
                        history: HistoryWindow | None = None) -> Proposed:
    """Propose for an already loaded pattern; returns the open proposal if there is one.

    Fires ``improvement_proposed`` for a new row only.
    """
    store = ImprovementStore(conn)
    existing = store.open_for_pattern(pattern.id)
    if existing is not None:
        return Proposed(existing, False, pattern)
    history = history or history_window(conn, settings)
    proposal = make_proposal(pattern, history)
    fresh = mark_if_undone(conn, improvement_from_proposal(proposal), history.until)  # a fix undone before
    imp, created = store.insert_unless_open(fresh)
    if created:
        plugins.fire("improvement_proposed", improvement=imp, settings=settings)
    return Proposed(imp, created, pattern)


def propose_improvement(conn: sqlite3.Connection, settings: Settings, pattern_id: str, *,
                        since: str | None = None, now: datetime | None = None) -> Improvement:
    """Persist a proposal for ``pattern_id`` (idempotent: an open proposal is returned).

    Raises :class:`NotFoundError` when the window holds no failure with that signature.
    """
    return propose_detailed(conn, settings, pattern_id, since=since, now=now).improvement


def propose_detailed(conn: sqlite3.Connection, settings: Settings, pattern_id: str, *,
                     since: str | None = None, now: datetime | None = None) -> Proposed:
    """:func:`propose_improvement`, also saying whether the row is new."""
    store = ImprovementStore(conn)
    pattern = get_pattern(conn, pattern_id, since=since or settings.lookback, now=now)
    existing = store.open_for_pattern(pattern.id)
    if existing is not None:
        return Proposed(existing, False, pattern)
    return propose_for_pattern(conn, settings, pattern, history_window(conn, settings, since, now=now))


def propose_all(conn: sqlite3.Connection, settings: Settings, patterns: list[Pattern], *,
                since: str | None = None, now: datetime | None = None) -> list[Proposed | StrategyError]:
    """Propose for each detected pattern (one shared history scan); a failing strategy
    yields its :class:`StrategyError` in place of that pattern's result."""
    history = history_window(conn, settings, since, now=now)
    out: list[Proposed | StrategyError] = []
    for p in patterns:
        try:
            out.append(propose_for_pattern(conn, settings, p, history))
        except StrategyError as exc:
            out.append(exc)
    return out


def proposal_result(imp: Improvement) -> dict[str, Any]:
    """The design document's ``propose_improvement`` result, plus our fields."""
    return {
        "improvement_id": imp.id, "pattern_id": imp.pattern_id, "status": imp.status,
        "description": imp.description, "expected_impact": imp.expected_impact,
        "changes_required": imp.changes_required, "risk_level": imp.risk_level,
        "strategy": imp.strategy, "confidence": imp.confidence, "changes": imp.changes,
        "expected_reduction": (imp.evidence or {}).get("expected_reduction"),
        "proposed_at": imp.proposed_at,
    }


def list_improvements(conn: sqlite3.Connection, status: str | None = None, limit: int | None = 20
                      ) -> list[dict[str, Any]]:
    """Rows for ``improvements``: ours and the runtime's older ones (``category``/``impact``)."""
    out = []
    for imp in ImprovementStore(conn).list(status=status, limit=limit):
        actual = imp.actual_impact
        if actual is None and imp.impact is not None:  # the runtime's own JSON impact column
            actual = imp.impact if isinstance(imp.impact, str) else _compact(imp.impact)
        out.append({
            "id": imp.id, "status": imp.status, "description": imp.description, "pattern_id": imp.pattern_id,
            "strategy": imp.strategy, "category": imp.category, "risk_level": imp.risk_level,
            "expected_impact": imp.expected_impact, "actual_impact": actual,
            "proposed_at": imp.proposed_at or imp.created_at, "applied_at": imp.applied_at,
            "verified_at": imp.verified_at, "rolled_back_at": imp.rolled_back_at, "commit_sha": imp.commit_sha,
            "legacy": imp.pattern_id is None,
        })
    return out


def _compact(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"), default=str)


# ================================================================= test, apply, rollback, verify
# Implemented in their own modules (simulation, apply, verification); the names are
# re-exported here so the lifecycle reads as one API.

