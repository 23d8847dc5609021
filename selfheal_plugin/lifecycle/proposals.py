"""The improvement lifecycle: propose → (test) → apply → verify | roll back.

Each step is a plain function over a sqlite3 connection and :class:`Settings`; the CLI
and the MCP server only call them. Sections below are kept apart by step.
"""
from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Mapping

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.lifecycle import learning
from selfheal_plugin.lifecycle.configedit import ChangeError, check_changes
from selfheal_plugin.lifecycle.cooldown import mark_if_undone, undone_before
from selfheal_plugin.history.improvements import (
    REPLACEABLE, Improvement, ImprovementStore, Replacement, new_improvement_id,
)
from selfheal_plugin.analysis.patterns import Pattern, get_pattern
from selfheal_plugin.history.settings import Settings
from selfheal_plugin.plugins.strategy import HistoryWindow, Proposal, StrategyError, validate_proposal
from selfheal_plugin.history.times import parse_since, parse_timestamp, utcnow

log = logging.getLogger("selfheal.lifecycle")


# ================================================================= propose


def history_window(conn: sqlite3.Connection, settings: Settings, since: str | None = None, *,
                   now: datetime | None = None, until: datetime | None = None) -> HistoryWindow:
    """The window strategies read: ``since`` (default: the lookback setting) to ``until``
    (default: ``now``, itself defaulting to the current instant; never None)."""
    now = now or utcnow()
    return HistoryWindow(conn=conn, since=parse_since(since or settings.lookback, now), until=until or now,
                         settings=settings)


def attach_fixes(conn: sqlite3.Connection, patterns: list[Pattern], history: HistoryWindow,
                 made: Mapping[str, Proposal | StrategyError] | None = None) -> list[Pattern]:
    """Each pattern's one suggested fix, the one rule every surface reads (the service's
    ``detect``, ``show`` and ``health``, auto-analysis): the description of its fix of record
    (:func:`fixes_of_record`: its open proposal, else a verified fix that still stands;
    ``suggested_by`` ``proposal``, ``improvement_id``/``improvement_status`` naming it), else
    :func:`attach_suggested_fixes` (the proposal its strategy makes now, or why none)."""
    rows = fixes_of_record(conn, history.settings, patterns)
    without = []
    for p in patterns:
        row = rows.get(p.id)
        if row is not None:
            p.suggested_fix, p.suggested_by, p.improvement_id = row.description, "proposal", row.id
            p.improvement_status = row.status
            p.same_change_undone = undone_before(row)
        else:
            without.append(p)
    if without:
        attach_suggested_fixes(without, history, made)
    return patterns


def fixes_of_record(conn: sqlite3.Connection, settings: Settings | None, patterns: list[Pattern]
                    ) -> dict[str, Improvement]:
    """Each pattern's fix of record, for the ids that have one: its open proposal
    (``OPEN_STATUSES``, an applied fix among them), else its verified fix while that stands
    (:func:`verified_fix_stands`). Proposing returns it rather than a new proposal."""
    store = ImprovementStore(conn)
    rows = store.open_for_patterns([p.id for p in patterns])
    if settings is not None:
        rows.update(standing_verified_fixes(store, settings, [p for p in patterns if p.id not in rows]))
    return rows


def standing_verified_fixes(store: ImprovementStore, settings: Settings, patterns: list[Pattern]
                            ) -> dict[str, Improvement]:
    """The verified fix of each of ``patterns`` (none with an open proposal) that still stands
    (:func:`verified_fix_stands`), by pattern id."""
    if not patterns:
        return {}
    in_force = store.in_force_for_patterns([p.id for p in patterns])
    return {p.id: fix for p in patterns
            if (fix := in_force.get(p.id)) is not None and verified_fix_stands(fix, p, settings)}


def verified_fix_stands(fix: Improvement, pattern: Pattern, settings: Settings) -> bool:
    """A verified fix is in force and answers for its pattern (nothing is suggested or
    proposed in its place) until the pattern keeps failing after it: ``min_occurrences`` of
    its failures in the window came after the fix was applied (its failures before are what
    the fix fixed). The same yardstick as a rejection's (:func:`rejection_stands`)."""
    return fix.status == "verified" and failures_since(pattern, fix.applied_at) < settings.min_occurrences


def attach_suggested_fixes(patterns: list[Pattern], history: HistoryWindow,
                           made: Mapping[str, Proposal | StrategyError] | None = None) -> list[Pattern]:
    """Fill each pattern's ``suggested_fix`` with the first line of the description of the
    proposal :func:`make_proposal` makes for it now, not stored (``suggested_by``
    ``strategy``): what :class:`~selfheal_plugin.service.SelfHeal` reports for a pattern
    without an open proposal (whose description is the suggested fix otherwise), so a
    read-only detect suggests the fix a proposing one stores. ``made``: what the strategy
    already answered for a pattern in this command (:func:`propose_all`'s
    :func:`made_by_strategies`), taken as it is rather than asked again.

    No suggestion, and ``no_fix_reason`` says why, when a person's rejection still stands
    (:func:`rejection_stands`, the rule that keeps a proposing detect from storing it;
    ``improvement_id`` and ``improvement_status`` then name the rejected row) or when the
    strategy makes no proposal (its one-line error)."""
    settings = history.settings
    for p in patterns:
        rejected = latest_rejection(history.conn, p.id) if settings is not None else None
        if rejected is not None and (reason := rejection_stands(rejected, p, settings)):
            _withhold(p, reason, rejected)
            continue
        answer = (made or {}).get(p.id)
        try:
            if isinstance(answer, StrategyError):
                raise answer
            proposal = answer or make_proposal(p, history)
        except StrategyError as exc:  # a broken plugin costs the hint, not the command
            # debug: the plugin's failure is already its one warning line (plugins.manager
            # records it), and the reason is the pattern's no_fix_reason in the output
            log.debug("no suggested fix for %s: %s", p.id, exc)
            _withhold(p, str(exc))
            continue
        if rejected is not None and (reason := rejection_stands(rejected, p, settings, proposal)):
            _withhold(p, reason, rejected)
            continue
        p.suggested_fix, p.suggested_by = proposal.description.strip().splitlines()[0], "strategy"
    return patterns


def _withhold(pattern: Pattern, reason: str, rejected: Improvement | None = None) -> None:
    pattern.suggested_fix = pattern.suggested_by = None
    pattern.no_fix_reason = reason
    if rejected is not None:
        pattern.improvement_id, pattern.improvement_status = rejected.id, rejected.status


def make_proposal(pattern: Pattern, history: HistoryWindow) -> Proposal:
    """Ask the strategy for ``pattern.error_type`` and ``pattern.failure_kind`` (see
    :func:`~selfheal_plugin.plugins.manager.resolve_strategy`) for a proposal (not stored).

    The strategy runs contained and bounded (``plugins.call_strategy``) and what it returns
    is checked by :func:`check_proposal` (also the changes: what apply would refuse is refused
    here, so it is neither stored nor suggested). Any failure —
    the type's strategy failed to load, it raised, timed out or returned an invalid
    proposal — is one :class:`StrategyError` line naming the strategy and its plugin (also
    recorded in the plugin errors); nothing is stored for that pattern.
    """
    strategy, plugin = plugins.resolve_strategy(pattern.error_type, history.settings, pattern.failure_kind)
    proposal = plugins.call_strategy(strategy, "propose", pattern, history, settings=history.settings)
    try:
        valid = check_proposal(proposal, pattern.id, history)
        if pattern.evidence:
            valid.failure_kind = valid.failure_kind or pattern.failure_kind
            valid.evidence.setdefault("failure", failure_summary(pattern.evidence))
        # Learned and imported fix rules (lifecycle.learning): a rule of the pattern's kind
        # gives a proposal when the strategy offers no config change; else a matching rule
        # is the proposal's prior. Neither ever applies anything by itself.
        by_rule = learning.rule_proposal(history.conn, pattern, valid)
        if by_rule is not None:
            if valid.evidence.get("failure") is not None:
                by_rule.evidence.setdefault("failure", valid.evidence["failure"])
            return check_proposal(by_rule, pattern.id, history)
        return learning.with_prior(history.conn, valid)
    except (ValueError, TypeError, RecursionError, ChangeError) as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        plugins._record(plugins.PluginError(plugin=plugin, phase="strategy", hook="propose",
                                            strategy=getattr(strategy, "name", None),
                                            error=f"invalid proposal for {pattern.id}: {problem}"))
        raise StrategyError(f"strategy {strategy.name!r} (plugin {plugin}) returned an invalid proposal for "
                            f"{pattern.id}: {problem}") from None


def check_proposal(proposal: Any, pattern_id: str, history: HistoryWindow) -> Proposal:
    """What a strategy returned, checked before anything is stored or suggested: a valid
    :class:`Proposal` (:func:`~selfheal_plugin.plugins.strategy.validate_proposal`) whose
    changes ``apply`` would make (:func:`~selfheal_plugin.lifecycle.configedit.check_changes`:
    only the ``[tools]``/``[servers]`` keys ToolPolicy reads, no value it refuses, over the
    home's config.toml as it is). ValueError or :class:`ChangeError` with the first problem."""
    valid = validate_proposal(proposal, pattern_id)
    check_changes(valid.changes, history.config)
    return valid


def failure_summary(evidence: dict[str, Any]) -> dict[str, Any]:
    """The part of a pattern's evidence stored with its proposal: the kind and why."""
    keys = ("kind", "summary", "kind_share", "reasons", "runtime_label", "codes", "determinism", "server",
            "retry_after_s", "reset_in_s", "spacing_s")
    out = {k: evidence[k] for k in keys if evidence.get(k) is not None}
    if evidence.get("paths"):
        out["paths"] = evidence["paths"][:5]
    return out


def improvement_from_proposal(proposal: Proposal) -> Improvement:
    return Improvement(
        id=new_improvement_id(), status="proposed", description=proposal.description,
        pattern_id=proposal.pattern_id, error_type=proposal.error_type, tool_name=proposal.tool_name,
        strategy=proposal.strategy, risk_level=proposal.risk_level, confidence=proposal.confidence,
        expected_impact=proposal.expected_impact, changes_required=list(proposal.changes_required),
        changes=[c.to_dict() for c in proposal.changes],
        evidence={**proposal.evidence, "expected_reduction": proposal.expected_reduction,
                  **({"failure_kind": proposal.failure_kind} if proposal.failure_kind else {})},
    )


@dataclass
class Proposed:
    """The outcome of proposing for one pattern: the stored improvement and whether it is new."""

    improvement: Improvement
    created: bool
    pattern: Pattern | None = None
    skipped: str | None = None  # set when a rejection still stands: improvement is the rejected row
    proposal: Proposal | None = None  # what the strategy proposed when the rejection kept it out

    def to_dict(self) -> dict[str, Any]:
        if self.skipped:
            return {"improvement_id": self.improvement.id, "pattern_id": self.improvement.pattern_id,
                    "status": self.improvement.status, "created": False, "skipped": self.skipped}
        return {**proposal_result(self.improvement), "created": self.created}


def latest_rejection(conn: sqlite3.Connection, pattern_id: str) -> Improvement | None:
    row = conn.execute("SELECT * FROM improvements WHERE pattern_id = ? AND status = 'rejected' "
                       "ORDER BY julianday(updated_at) DESC LIMIT 1", (pattern_id,)).fetchone()
    return Improvement.from_row(row) if row else None


def failures_since(pattern: Pattern, instant: str | None) -> int:
    """The pattern's failures in the window that happened after ``instant``."""
    if not instant:
        return pattern.occurrences
    try:
        after = parse_timestamp(instant).timestamp()
    except ValueError:
        return pattern.occurrences
    return sum(1 for o in pattern.occurrences_detail if o.get("ts", 0) > after)


def rejection_stands(rejected: Improvement, pattern: Pattern, settings: Settings,
                     proposal: Proposal | None = None) -> str | None:
    """Why a person's rejection of ``rejected`` still holds for ``pattern``, or None.

    The rule: a rejected pattern is proposed again only when its evidence changed, that is
    when at least ``min_occurrences`` of its failures happened after the rejection AND its
    strategy now proposes something different (other changes or another description).
    Without ``proposal`` only the first half is checked (no strategy call needed)."""
    new = failures_since(pattern, rejected.updated_at)
    if new < settings.min_occurrences:
        return (f"{rejected.id} for {pattern.id} was rejected; {new} new failure(s) since, "
                f"{settings.min_occurrences} needed before proposing again")
    if proposal is not None and [c.to_dict() for c in proposal.changes] == (rejected.changes or []) \
            and proposal.description == rejected.description:
        return f"{rejected.id} for {pattern.id} was rejected and its strategy proposes the same fix again"
    return None


def propose_for_pattern(conn: sqlite3.Connection, settings: Settings, pattern: Pattern,
                        history: HistoryWindow | None = None) -> Proposed:
    """Propose for an already loaded pattern; returns the open proposal if there is one.

    Fires ``improvement_proposed`` for a new row only.
    """
    store = ImprovementStore(conn)
    found = _prepare(store, settings, pattern, history or history_window(conn, settings),
                     store.open_for_pattern(pattern.id))
    if isinstance(found, Proposed):
        return found
    return _stored(store, settings, [pattern], [found])[0]


def _stored(store: ImprovementStore, settings: Settings, patterns: list[Pattern],
            new: list[tuple[Improvement, Replacement | None]]) -> list[Proposed]:
    """Store the new improvements :func:`_prepare` made, each superseding the open row it
    replaces, in one write transaction; ``improvement_proposed`` fires for each row created."""
    stored = store.insert_many_unless_open([imp for imp, _ in new], [replaces for _, replaces in new])
    out = []
    for pattern, (imp, created), (_, replaces) in zip(patterns, stored, new):
        if created and replaces is not None:
            log.info("%s superseded by %s (%s)", replaces.improvement_id, imp.id,
                     replaces.evidence["superseded_by_strategy"])
        if created:
            plugins.fire("improvement_proposed", improvement=imp, settings=settings)
        out.append(Proposed(imp, created, pattern))
    return out


def _replacing(existing: Improvement, by: str) -> Replacement:
    return Replacement(existing.id, {"superseded_by_strategy": by})


def _prepare(store: ImprovementStore, settings: Settings, pattern: Pattern, history: HistoryWindow,
             existing: Improvement | None) -> Proposed | tuple[Improvement, Replacement | None]:
    """The pattern's open proposal or standing rejection (a :class:`Proposed`), else the new
    improvement its strategy proposes, not yet stored, with the open row it replaces, if any.
    ``existing``: the pattern's open proposal as read before (``store.open_for_pattern``).

    An open proposal not yet acted on gives way when a disabled rule made it, when it holds
    only steps for a person and a rule now offers a config change, or when another strategy
    has taken over its error type (a third-party one replacing a built-in). It is superseded
    only when the new proposal is stored, in the same transaction (:func:`_stored`): a
    strategy that fails, or a standing rejection, leaves it open."""
    conn = store.conn
    replaces: Replacement | None = None
    if existing is None:  # a verified fix that stands answers as an open proposal does (fixes_of_record)
        existing = standing_verified_fixes(store, settings, [pattern]).get(pattern.id)
    if existing is not None and existing.status not in REPLACEABLE:
        return Proposed(existing, False, pattern)
    if existing is not None and learning.is_rule_strategy(existing.strategy):
        # a rule's proposal stands while its rule is enabled; a disabled rule's is superseded
        if learning.rule_usable(conn, existing.strategy):
            return Proposed(existing, False, pattern)
        replaces = _replacing(existing, "rule disabled")
    elif existing is not None and not any(c.get("kind") == "config" for c in existing.changes or []) and \
            (by_rule := learning.rule_proposal(conn, pattern, None)) is not None:
        # an open proposal of steps for a person only gives way to a rule's config change
        replaces = _replacing(existing, by_rule.strategy)
    elif existing is not None:
        current = plugins.strategy_for(pattern.error_type, settings, pattern.failure_kind)
        if not existing.strategy or existing.strategy == current.name:
            return Proposed(existing, False, pattern)
        replaces = _replacing(existing, current.name)  # another strategy took over its error type
    rejected = latest_rejection(conn, pattern.id)
    if rejected is not None and (reason := rejection_stands(rejected, pattern, settings)):
        return Proposed(rejected, False, pattern, skipped=reason)
    proposal = make_proposal(pattern, history)
    if rejected is not None and (reason := rejection_stands(rejected, pattern, settings, proposal)):
        return Proposed(rejected, False, pattern, skipped=reason, proposal=proposal)
    return mark_if_undone(conn, improvement_from_proposal(proposal), history.until), replaces  # a fix undone before


def propose_improvement(conn: sqlite3.Connection, settings: Settings, pattern_id: str, *,
                        since: str | None = None, now: datetime | None = None) -> Improvement:
    """Persist a proposal for ``pattern_id`` (idempotent: an open proposal is returned).

    Raises :class:`NotFoundError` when the window holds no failure with that signature.
    """
    return propose_detailed(conn, settings, pattern_id, since=since, now=now).improvement


def propose_detailed(conn: sqlite3.Connection, settings: Settings, pattern_id: str, *,
                     since: str | None = None, now: datetime | None = None) -> Proposed:
    """:func:`propose_improvement`, also saying whether the row is new."""
    pattern = get_pattern(conn, pattern_id, since=since or settings.lookback, now=now)
    return propose_for_pattern(conn, settings, pattern, history_window(conn, settings, since, now=now))


def propose_all(conn: sqlite3.Connection, settings: Settings, patterns: list[Pattern], *,
                since: str | None = None, now: datetime | None = None,
                should_stop: Callable[[], bool] | None = None,
                history: HistoryWindow | None = None) -> list[Proposed | StrategyError]:
    """Propose for each detected pattern (one shared history scan: ``history``, default the
    window of ``since`` to ``now``); a failing strategy yields its :class:`StrategyError` in
    place of that pattern's result. ``should_stop`` is asked before each pattern: when it says
    so, the patterns left get no result.

    Without ``should_stop`` the strategies run first, outside any transaction, and the new
    rows are then stored in one write transaction (each still only when its pattern has no
    open proposal), ``improvement_proposed`` firing for each row created. With it, each
    pattern's row is stored and announced before the next pattern, so that a stop request
    (a hook may make one) lands between two patterns."""
    history = history or history_window(conn, settings, since, now=now)
    store = ImprovementStore(conn)
    # read at once: nothing is stored before every pattern is prepared (with should_stop, each in its turn)
    open_rows = store.open_for_patterns([p.id for p in patterns]) if should_stop is None else {}
    out: list[Proposed | StrategyError | tuple[Improvement, Replacement | None]] = []
    for p in patterns:
        if should_stop is not None and should_stop():
            break
        try:
            out.append(_prepare(store, settings, p, history, open_rows.get(p.id)) if should_stop is None
                       else propose_for_pattern(conn, settings, p, history))
        except StrategyError as exc:
            out.append(exc)
    new = [i for i, r in enumerate(out) if isinstance(r, tuple)]
    stored = _stored(store, settings, [patterns[i] for i in new], [out[i] for i in new])  # type: ignore[misc]
    for i, proposed in zip(new, stored):
        out[i] = proposed
    return out  # type: ignore[return-value]


def made_by_strategies(patterns: list[Pattern], results: list[Proposed | StrategyError]
                       ) -> dict[str, Proposal | StrategyError]:
    """What :func:`propose_all`'s strategies answered for the patterns it stored nothing for
    (a rejection that stands against their proposal, or their error), by pattern id: the
    suggested fix of such a pattern comes from it, without running the strategy again."""
    out: dict[str, Proposal | StrategyError] = {}
    for pattern, r in zip(patterns, results):
        if isinstance(r, StrategyError):
            out[pattern.id] = r
        elif r.proposal is not None:
            out[pattern.id] = r.proposal
    return out


def proposal_result(imp: Improvement) -> dict[str, Any]:
    """The design document's ``propose_improvement`` result, plus our fields."""
    return {
        "improvement_id": imp.id, "pattern_id": imp.pattern_id, "status": imp.status,
        "description": imp.description, "expected_impact": imp.expected_impact,
        "changes_required": imp.changes_required, "risk_level": imp.risk_level,
        "strategy": imp.strategy, "confidence": imp.confidence, "changes": imp.changes,
        "expected_reduction": (imp.evidence or {}).get("expected_reduction"),
        "failure_kind": (imp.evidence or {}).get("failure_kind"),
        "proposed_at": imp.proposed_at,
        "same_change_undone": undone_before(imp),
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
            "legacy": imp.pattern_id is None, "same_change_undone": undone_before(imp),
        })
    return out


def _compact(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"), default=str)
