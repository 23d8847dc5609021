"""The daemon's automatic decisions, kept in the engine so that every shell that runs them
(the daemon today, any runtime calling :class:`~selfheal_plugin.service.SelfHeal`) decides
and words them the same way:

* **auto-apply** — only low-risk proposals whose confidence reaches
  ``auto_apply_confidence_threshold`` and whose simulation says ``safe_to_apply`` against the
  history's own baseline (untested ones, and ones whose stored result predates that rule,
  are tested first); never a change rolled back or rejected in the last
  :data:`~selfheal_plugin.lifecycle.cooldown.REAPPLY_COOLDOWN_DAYS` days; manual steps wait
  for a person;
* **scheduled verification** — keep; extend monitoring by a window at most
  :data:`MAX_EXTENSIONS` times, then end it inconclusive (the change stays) and ask a person;
  roll back at once when the change made things significantly worse.
"""
from __future__ import annotations

import logging
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable

from selfheal_plugin.errors import SelfHealError
from selfheal_plugin.history.connection import get_int_state, set_state, write_transaction
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.history.settings import Settings
from selfheal_plugin.history.text import markdown_inline as md
from selfheal_plugin.history.times import format_timestamp, parse_timestamp
from selfheal_plugin.lifecycle import ab
from selfheal_plugin.lifecycle.apply import apply_improvement, rollback_improvement
from selfheal_plugin.lifecycle.configedit import split_changes
from selfheal_plugin.lifecycle.cooldown import REAPPLY_COOLDOWN_DAYS, claim_once, forget, undone_same_change
from selfheal_plugin.lifecycle.simulation import test_improvement
from selfheal_plugin.lifecycle.verification import verify_improvement
from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.steps import step

log = logging.getLogger("selfheal.daemon")

MAX_EXTENSIONS = 3  # extend-monitoring verdicts before the daemon concludes "inconclusive"
EXTENSIONS_KEY = "monitoring:extensions:"  # + improvement id, in selfheal_state
ROLLBACK_FAILED_KEY = "auto_rollback_failed:"  # + improvement id: notified once


@dataclass
class AutopilotReport:
    """What one round of automatic decisions did (JSON-ready)."""

    tested: list[dict[str, Any]] = field(default_factory=list)
    applied: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # auto-apply held back, with the reason
    verified: list[dict[str, Any]] = field(default_factory=list)
    rolled_back: list[dict[str, Any]] = field(default_factory=list)
    concluded: list[dict[str, Any]] = field(default_factory=list)  # monitoring ended inconclusive
    errors: list[str] = field(default_factory=list)
    ab_judged: list[dict[str, Any]] = field(default_factory=list)  # A/B experiments judged (verdict)
    ab_promoted: list[dict[str, Any]] = field(default_factory=list)  # A/B winners promoted automatically

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def auto_apply(conn: sqlite3.Connection, settings: Settings, now: datetime, report: AutopilotReport, *,
               should_stop: Callable[[], bool] = lambda: False) -> None:
    """Apply what is low-risk, confident enough and simulated safe; test what is untested."""
    s = settings
    store = ImprovementStore(conn)
    experimenting = {e.pattern_id for e in ab.running_experiments(conn)}
    for imp in [*store.list(status="proposed", limit=None), *store.list(status="tested", limit=None)]:
        if should_stop():
            return
        if imp.pattern_id in experimenting:  # an A/B experiment of the pattern decides (judge_experiments)
            report.skipped.append({"improvement_id": imp.id, "reason": f"an A/B experiment of {imp.pattern_id} is "
                                   "running; its winner is promoted instead"})
            continue
        if (imp.risk_level or "").lower() != "low" or imp.confidence is None \
                or imp.confidence < s.auto_apply_confidence_threshold:
            continue
        undone = undone_same_change(conn, imp.pattern_id, imp.changes, now, exclude=imp.id)
        if undone is not None:
            when = undone.rolled_back_at if undone.status == "rolled_back" else undone.updated_at
            reason = (f"the same change ({undone.id}) was {undone.status.replace('_', ' ')} on {when}; no "
                      f"automatic re-apply for {REAPPLY_COOLDOWN_DAYS} days (a person may apply it)")
            report.skipped.append({"improvement_id": imp.id, "reason": reason})
            log.info("not auto-applying %s: %s", imp.id, reason)
            continue
        try:
            config_changes, _manual = split_changes(imp.changes)
            if not config_changes:
                continue  # manual steps need a person
            result = imp.test_result
            # a result stored before the baseline came from the history alone (a strategy's own
            # simulate could set it) is not taken: it is tested again
            if imp.status == "proposed" or not result or result.get("baseline_source") != "history":
                result = test_improvement(conn, s, imp.id, now=now)
                report.tested.append({"improvement_id": imp.id, "recommendation": result["recommendation"]})
                log.info("tested %s: %s (%s)", imp.id, result["recommendation"], result.get("reason"))
            if result.get("recommendation") != "safe_to_apply":
                continue
            applied = apply_improvement(conn, s, imp.id, now=now,
                                        changes_made="Applied automatically by the self-heal daemon")
        except SelfHealError as exc:
            report.errors.append(f"auto-apply {imp.id}: {exc}")
            log.warning("auto-apply of %s refused: %s", imp.id, exc)
            continue
        report.applied.append({"improvement_id": imp.id, "commit_sha": applied["commit_sha"]})
        log.info("auto-applied %s (commit %s, confidence %.0f%%, verification at %s)", imp.id,
                 (applied["commit_sha"] or "")[:12], imp.confidence * 100, applied["verification_scheduled"])

def verify_due(conn: sqlite3.Connection, settings: Settings, now: datetime, report: AutopilotReport, *,
               retry_seconds: float, should_stop: Callable[[], bool] = lambda: False) -> None:
    """Verify every applied improvement whose verification is due: keep, extend monitoring
    (at most :data:`MAX_EXTENSIONS` times, then conclude inconclusive), or roll back at once
    when it made things significantly worse (a failed rollback is retried after
    ``retry_seconds`` and notified once)."""
    s = settings
    store = ImprovementStore(conn)
    for imp in store.list(status="applied", limit=None):
        if should_stop():
            return
        try:
            due = parse_timestamp(imp.verification_scheduled or "")
            applied_at = parse_timestamp(imp.applied_at or "")
        except ValueError:
            continue
        if due > now:
            continue
        # the whole time since the apply (at least one window): an extended monitoring
        # period measures everything gathered so far
        days = max(float(s.measurement_window_days), (now - applied_at).total_seconds() / 86400)
        try:
            result = verify_improvement(conn, s, imp.id, measurement_window_days=days, now=now, rollback_follows=True)
        except SelfHealError as exc:
            report.errors.append(f"verify {imp.id}: {exc}")
            log.warning("verification of %s failed: %s", imp.id, exc)
            continue
        rec = result["recommendation"]
        report.verified.append({"improvement_id": imp.id, "recommendation": rec,
                                "actual_impact": result["actual_impact"]})
        log.info("verified %s: %s (%s)", imp.id, rec, result["actual_impact"])
        if rec == "rollback":
            _auto_rollback(conn, settings, imp.id, result, now, report, retry_seconds)
        elif rec != "keep":
            _extend_or_conclude(conn, settings, imp.id, result, now, report)

def _extend_or_conclude(conn: sqlite3.Connection, settings: Settings, improvement_id: str,
                    verification: dict[str, Any], now: datetime, report: AutopilotReport) -> None:
    """Extend monitoring by a window, at most :data:`MAX_EXTENSIONS` times; then end it
    as inconclusive (the change stays applied) and ask a person to decide."""
    s = settings
    store = ImprovementStore(conn)
    key = EXTENSIONS_KEY + improvement_id
    done = get_int_state(conn, key) or 0
    if done >= MAX_EXTENSIONS:
        metrics = {**(store.get(improvement_id).metrics or {}),
                   "monitoring": f"ended inconclusive after {done} extension(s)", "monitoring_ended_at":
                   format_timestamp(now)}
        store.update(improvement_id, verification_scheduled=None, metrics=metrics)
        weeks = (done + 1) * s.measurement_window_days
        report.concluded.append({"improvement_id": improvement_id, "extensions": done,
                                 "actual_impact": verification["actual_impact"]})
        log.warning("monitoring of %s ended inconclusive after %d extension(s): %s", improvement_id, done,
                    verification["actual_impact"])
        # the verdict quotes the history (its error type): escaped, as the hooks' bodies are
        plugins.notify(plugins.Notification(
            title=f"No clear effect of {md(improvement_id)} after {done} extensions",
            body=(f"Verification of {md(improvement_id)} found no significant change over {weeks:g} days "
                  f"({md(verification['actual_impact'])}). Monitoring has ended; the change stays applied.\n\n"
                  f"Keep it, or roll it back: {md(step('rollback', improvement_id))}"),
            tags=["improvement", "verification", "inconclusive"], priority="normal"), s)
        return
    with write_transaction(conn):
        set_state(conn, key, str(done + 1))
    nxt = now + timedelta(days=s.measurement_window_days)
    store.update(improvement_id, verification_scheduled=format_timestamp(nxt))
    log.info("monitoring of %s extended (%d of %d): next verification at %s", improvement_id, done + 1,
             MAX_EXTENSIONS, format_timestamp(nxt))

def _auto_rollback(conn: sqlite3.Connection, settings: Settings, improvement_id: str,
               verification: dict[str, Any], now: datetime, report: AutopilotReport, retry_seconds: float) -> None:
    reason = f"Automatic rollback by the self-heal daemon: {verification['actual_impact']}"
    key = ROLLBACK_FAILED_KEY + improvement_id
    try:
        done = rollback_improvement(conn, settings, improvement_id, reason=reason, now=now, automatic=True)
    except SelfHealError as exc:
        report.errors.append(f"rollback {improvement_id}: {exc}")
        log.error("automatic rollback of %s failed: %s", improvement_id, exc)
        # try again next tick (the user may resolve it), but tell them once
        retry = now + timedelta(seconds=retry_seconds)
        ImprovementStore(conn).update(improvement_id, verification_scheduled=format_timestamp(retry))
        if not claim_once(conn, key, now):
            return
        plugins.notify(plugins.Notification(
            title=f"Automatic rollback of {md(improvement_id)} failed",
            body=(f"Verification says {md(improvement_id)} made things significantly worse "
                  f"({md(verification['actual_impact'])}), but the rollback failed: {md(exc)}\n\n"
                  f"Roll it back by hand: {md(step('rollback', improvement_id))}"),
            tags=["improvement", "rollback", "failed"], priority="urgent"), settings)
        return
    forget(conn, key)
    report.rolled_back.append({"improvement_id": improvement_id, "rollback_sha": done["rollback_sha"],
                               "method": done["method"]})
    # its one urgent notification comes from the improvement_rolled_back hook (hooks/notifications.py)
    log.warning("rolled back %s automatically (revert commit %s): %s", improvement_id,
                (done["rollback_sha"] or "")[:12], verification["actual_impact"])


def judge_experiments(conn: sqlite3.Connection, settings: Settings, now: datetime, report: AutopilotReport, *,
                      should_stop: Callable[[], bool] = lambda: False) -> None:
    """Judge every running A/B experiment and store its verdict; notify (``ab_verdict``)
    once per verdict reached. With auto-apply enabled, a winner whose risk is low and whose
    confidence reaches ``auto_apply_confidence_threshold`` is promoted (as auto-apply does
    for a proposal); anything else waits for a person."""
    for exp in ab.running_experiments(conn):
        if should_stop():
            return
        try:
            status, fresh = ab.record_verdict(conn, settings, exp.id, now=now)
        except SelfHealError as exc:
            report.errors.append(f"judge {exp.id}: {exc}")
            log.warning("judging %s failed: %s", exp.id, exc)
            continue
        verdict = status.get("verdict") or {}
        report.ab_judged.append({"experiment_id": exp.id, "verdict": verdict.get("verdict"),
                                 "winner": verdict.get("winner")})
        if fresh:
            plugins.fire("ab_verdict", experiment=status, settings=settings)
        winner = verdict.get("winner")
        if verdict.get("verdict") != "winner" or not winner or not settings.auto_apply_enabled:
            continue
        imp = ImprovementStore(conn).get(winner)
        if (imp.risk_level or "").lower() != "low" or imp.confidence is None \
                or imp.confidence < settings.auto_apply_confidence_threshold:
            report.skipped.append({"improvement_id": winner, "reason": f"A/B winner of {exp.id} is not low-risk and "
                                   "confident enough to promote automatically"})
            continue
        try:
            done = ab.end_ab(conn, settings, exp.id, "promoted", now=now)
        except SelfHealError as exc:
            report.errors.append(f"promote {exp.id}: {exc}")
            log.warning("automatic promotion of %s refused: %s", exp.id, exc)
            continue
        report.ab_promoted.append({"experiment_id": exp.id, "winner": winner,
                                   "commit_sha": (done.get("applied") or {}).get("commit_sha")})
        log.info("promoted A/B winner %s of %s", winner, exp.id)
