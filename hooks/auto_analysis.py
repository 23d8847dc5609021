"""Auto-analysis: when a run fails, look at the patterns its errors belong to.

For each signature ``(error_type, tool_name)`` among the failed run's tool errors, the
pattern is measured over the whole lookback window ending at the run (so the
thresholds apply to all of the pattern's occurrences, not just this run's); when it
reaches ``min_occurrences`` and ``confidence_threshold``, a proposal is made (or the open
one found) and the user is notified — at most once per pattern per
``cooldown_minutes``, however many runs fail in a burst (the cooldown is shared with the
daemon's periodic detection, see :mod:`selfheal_plugin.lifecycle.cooldown`).

Times come from the run itself, so a history written with a simulated clock is analysed in
its own time: the window ends when the run ended (its ``completed_at``, else the moment it
failed: its latest tool error), and failures of runs after it are not counted — when the
daemon catches up on a burst, each run is judged on what had happened by its end.
"""
from __future__ import annotations

import logging
import sqlite3
from datetime import datetime, timedelta, timezone
from typing import Any

from selfheal_plugin import hookimpl
from selfheal_plugin.lifecycle.cooldown import claim_notification, release_notifications
from selfheal_plugin.history.connection import connect
from selfheal_plugin.lifecycle.proposals import (
    Proposed, StrategyError, attach_fixes, history_window, made_by_strategies, propose_for_pattern,
)
from selfheal_plugin.analysis.patterns import Pattern, detect_failure_patterns, get_pattern
from selfheal_plugin.history.improvements import IN_FORCE, Improvement, already_fixed
from selfheal_plugin.history.settings import Settings
from selfheal_plugin.plugins.manager import Notification, notify
from selfheal_plugin.history.text import markdown_inline as md
from selfheal_plugin.history.times import parse_timestamp, utcnow

log = logging.getLogger("selfheal.hooks.auto_analysis")
_INCLUSIVE = timedelta(microseconds=1)  # the finest step of a runtime timestamp we keep


def run_end(run: dict[str, Any], failed_at: list[str] = ()) -> datetime:
    """When the run ended: its ``completed_at``, else the moment it failed (the latest of
    ``failed_at``, its tool errors' timestamps), else its ``started_at``; now when none parses."""
    for candidates in ([run.get("completed_at")], sorted(failed_at, key=_instant_or_min, reverse=True),
                       [run.get("started_at")]):
        for text in candidates:
            try:
                return parse_timestamp(text or "")
            except ValueError:
                continue
    return utcnow()


def _instant_or_min(text: str) -> datetime:
    try:
        return parse_timestamp(text)
    except ValueError:
        return datetime.min.replace(tzinfo=timezone.utc)


@hookimpl
def run_failed(run: dict[str, Any], settings: Settings) -> None:
    """The ``run_failed`` hook: :func:`analyse_failed_run`; returns nothing, as its spec says."""
    analyse_failed_run(run, settings)


def analyse_failed_run(run: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """Propose and notify for the patterns of ``run``'s errors that pass the thresholds;
    one outcome per such pattern: ``pattern_id``, ``improvement_id`` (None when the
    strategy failed), ``created``, ``notified``."""
    run_id = run.get("id")
    if not run_id:
        return []
    conn = connect(settings.db_path)
    try:
        own = detect_failure_patterns(conn, since=settings.lookback, min_occurrences=1, confidence_threshold=0.0,
                                      now=run_end(run), run_ids=[run_id])
        now = run_end(run, [p.last_seen for p in own.patterns])
        until = now + _INCLUSIVE  # the window's end is exclusive; the run's own last error is in it
        outcomes = []
        for sig in own.patterns:
            pattern = get_pattern(conn, sig.id, since=settings.lookback, now=now, until=until)
            if pattern.occurrences < settings.min_occurrences or pattern.confidence < settings.confidence_threshold:
                log.debug("run %s: %s below thresholds (%d occurrences, confidence %.2f)", run_id, pattern.id,
                          pattern.occurrences, pattern.confidence)
                continue
            outcomes.append(_react(conn, settings, run, pattern, now))
        return outcomes
    finally:
        conn.close()


def _react(conn: sqlite3.Connection, settings: Settings, run: dict[str, Any], pattern: Pattern,
           now: datetime) -> dict[str, Any]:
    improvement, created, problem = None, False, None
    history = history_window(conn, settings, now=now)
    try:
        answer: Proposed | StrategyError = propose_for_pattern(conn, settings, pattern, history)
        if answer.skipped:  # a rejection that still stands
            problem = answer.skipped
        else:
            improvement, created = answer.improvement, answer.created
    except StrategyError as exc:
        answer = exc
        problem = str(exc)
        log.warning("auto-analysis could not propose for %s: %s", pattern.id, exc)
    # the one suggested fix, by the service's rule (the strategy's answer above is not asked again)
    attach_fixes(conn, [pattern], history, made_by_strategies([pattern], [answer]))
    if created:
        log.info("run %s failed: proposed %s for %s", run["id"], improvement.id, pattern.id)
    notified = claim_notification(conn, pattern.id, now, settings.cooldown_minutes)
    if notified and not notify(_notification(run, pattern, improvement, created, problem), settings):
        release_notifications(conn, [pattern.id], now)  # delivered nowhere: the next failure tells it
        notified = False
    return {"pattern_id": pattern.id, "improvement_id": improvement.id if improvement else None,
            "created": created, "notified": notified}


def _notification(run: dict[str, Any], pattern: Pattern, improvement: Improvement | None, created: bool,
                  problem: str | None) -> Notification:
    # every value here comes from the history or a plugin: escaped, one line each (no forged headings)
    lines = [f"Run {md(run['id'])} ({md(run.get('workflow_name') or 'unknown workflow')}) failed with "
             f"{md(pattern.error_type)} on {md(pattern.tool_name)}.",
             f"Pattern {md(pattern.id)}: {pattern.occurrences} occurrence(s) in {len(pattern.affected_runs)} run(s), "
             f"confidence {pattern.confidence * 100:.0f}%.",
             f"Failure kind: {md((pattern.evidence or {}).get('summary') or pattern.failure_kind or 'unknown')}."]
    if pattern.suggested_fix and improvement is None:
        lines.append(f"Suggested fix: {md(pattern.suggested_fix)}")
    lines.append("")
    if improvement is not None and improvement.status in IN_FORCE:  # its failures may all predate the fix
        lines.append(already_fixed(improvement.id, improvement.status, improvement.description, md))
    elif improvement is not None:
        verb = "Proposed" if created else f"Open proposal ({md(improvement.status)})"
        lines.append(f"{verb}: {md(improvement.id)} — {md(improvement.description)}")
        if improvement.status == "proposed":
            lines.append(f"Next: agent self-heal test {md(improvement.id)}")
    else:
        lines.append(f"No proposal: {md(problem)}")
    return Notification(title=f"Recurring failure {md(pattern.id)}", body="\n".join(lines),
                        tags=["self-heal", "auto-analysis"], priority="high")
