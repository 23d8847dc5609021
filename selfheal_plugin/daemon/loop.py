"""The self-heal daemon: the watcher plus periodic detection, verification and rollback.

``agent self-heal-daemon`` runs :class:`Daemon`. Between ticks a :class:`~selfheal_plugin.
watcher.Watcher` fires ``run_failed`` for each failed run (the built-in auto-analysis hook
proposes and notifies). Every ``interval`` a tick:

1. detects patterns over the lookback window and fires ``patterns_detected`` for those
   not notified within ``cooldown_minutes`` (shared with auto-analysis);
2. with ``auto_detect``, proposes a fix for each pattern found;
3. with auto-apply on (``[self_heal] auto_apply_enabled = true`` and no
   ``--no-auto-apply``), tests untested proposals by simulation and applies those that are
   low-risk, ``safe_to_apply`` and at least ``auto_apply_confidence_threshold`` confident —
   but never a change that was rolled back or rejected for the same pattern in the last
   ``REAPPLY_COOLDOWN_DAYS`` (30) days (:mod:`selfheal_plugin.lifecycle.cooldown`; a person may
   still apply it), so a rollback is not followed by the same apply every window;
4. verifies every applied improvement whose ``verification_scheduled`` instant has come:
   *keep* marks it verified, *rollback* reverts it at once (a revert commit) with an
   urgent notification, *extend* schedules the next verification one measurement window
   later, measured then over everything since the apply. After ``MAX_EXTENSIONS`` (3)
   extensions the verdict is final: inconclusive, monitoring ends (no more scheduled
   verification, the change stays applied) and a notification asks a person to decide —
   every look is another chance of a false verdict, so the looks are capped. A rollback
   that fails (e.g. the user edited the key since) is retried every tick, with one urgent
   notification, not one per tick.

Stopping: SIGTERM/SIGINT set a stop event that long steps check — the error index build
after each chunk, detection between patterns, auto-apply and verification between
improvements — so the daemon exits within about a second even mid-tick.

Time comes from an injectable clock, so tests pass a week in a call. One daemon per home:
``BINKS_HOME/selfheal/locks/daemon.lock`` (filelock, with ``daemon.pid`` beside it); a
second one gets :class:`DaemonBusyError`.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.history.clock import Clock, wall_clock
from selfheal_plugin.lifecycle.configedit import split_changes
from selfheal_plugin.lifecycle.cooldown import REAPPLY_COOLDOWN_DAYS, claim_notification, claim_once, forget, undone_same_change
from selfheal_plugin.errors import SelfHealError, UsageError
from selfheal_plugin.history.settings import lock_dir
from selfheal_plugin.history.connection import connect, file_identity, get_state, set_state, write_transaction
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.lifecycle.proposals import StrategyError, attach_suggested_fixes, history_window, propose_for_pattern
from selfheal_plugin.lifecycle.apply import apply_improvement, rollback_improvement
from selfheal_plugin.lifecycle.recovery import recover
from selfheal_plugin.lifecycle.simulation import test_improvement
from selfheal_plugin.lifecycle.verification import verify_improvement
from selfheal_plugin.analysis.patterns import detect_failure_patterns
from selfheal_plugin.history.settings import Settings, load_settings
from selfheal_plugin.history.times import format_timestamp, parse_timestamp
from selfheal_plugin.daemon.watcher import CheckResult, Watcher, check_history, ensure_watch_schema, recover_unfired

log = logging.getLogger("selfheal.daemon")

_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, None: 1}


MAX_EXTENSIONS = 3  # extend-monitoring verdicts before the daemon concludes "inconclusive"
EXTENSIONS_KEY = "monitoring:extensions:"  # + improvement id, in selfheal_state
ROLLBACK_FAILED_KEY = "auto_rollback_failed:"  # + improvement id: notified once


class DaemonBusyError(SelfHealError):
    """Another daemon holds this home's lock."""


class Stopped(Exception):
    """Raised inside a long step when the daemon was asked to stop (not an error)."""


def parse_interval(text: str | float | int) -> float:
    """``"1h"`` → 3600.0; accepts ``90``/``90s``, ``30m``, ``1.5h``, ``1d``; must be > 0."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = _INTERVAL.match(str(text or ""))
        if not m:
            raise UsageError(f"invalid interval {text!r}: use e.g. 90s, 30m, 1h, 1d")
        unit = m.group(2).lower() if m.group(2) else None
        seconds = float(m.group(1)) * _UNIT_SECONDS[unit]
    if seconds <= 0:
        raise UsageError(f"invalid interval {text!r}: it must be longer than zero")
    return seconds


def lock_path(settings: Settings) -> Path:
    return lock_dir(settings.home) / "daemon.lock"


@dataclass
class TickReport:
    """What one tick did (JSON-ready)."""

    at: str
    patterns: list[str] = field(default_factory=list)
    notified_patterns: list[str] = field(default_factory=list)
    proposed: list[str] = field(default_factory=list)
    tested: list[dict[str, Any]] = field(default_factory=list)
    applied: list[dict[str, Any]] = field(default_factory=list)
    verified: list[dict[str, Any]] = field(default_factory=list)
    rolled_back: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # auto-apply held back, with the reason
    concluded: list[dict[str, Any]] = field(default_factory=list)  # monitoring ended inconclusive
    errors: list[str] = field(default_factory=list)
    stopped: bool = False  # the tick was cut short by a stop request

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"{len(self.patterns)} pattern(s)"]
        for label, items in (("proposed", self.proposed), ("tested", self.tested), ("applied", self.applied),
                             ("held back", self.skipped), ("verified", self.verified),
                             ("rolled back", self.rolled_back), ("concluded inconclusive", self.concluded),
                             ("error(s)", self.errors)):
            if items:
                parts.append(f"{len(items)} {label}")
        return ", ".join(parts) + (" (stopped early)" if self.stopped else "")


class Daemon:
    """One home's daemon. ``run()`` blocks until :meth:`stop` (or SIGTERM/SIGINT when
    ``install_signals``); :meth:`tick` does one round of periodic work and is what tests call.

    :param interval: seconds between ticks.
    :param auto_detect: propose a fix for every pattern periodic detection finds.
    :param auto_apply: None → ``settings.auto_apply_enabled``; False forces it off.
    :param clock: returns the current instant (aware); a ``SimulatedClock`` in tests.
    :param watch_mode: ``native``/``poll``/None (``$SELFHEAL_WATCH``).
    :param on_report: called with each :class:`TickReport`.
    :param reload_config: re-read ``[self_heal]`` from config.toml before each tick (the
        CLI does; a library caller passing its own overrides should not).
    """

    def __init__(self, settings: Settings, *, interval: float = 3600.0, auto_detect: bool = False,
                 auto_apply: bool | None = None, clock: Clock = wall_clock, watch_mode: str | None = None,
                 on_report: Callable[[TickReport], None] | None = None, reload_config: bool = False):
        self.settings = settings
        self.interval = parse_interval(interval)
        self.auto_detect = auto_detect
        self._auto_apply_requested = auto_apply
        self.auto_apply = settings.auto_apply_enabled if auto_apply is None else (auto_apply and
                                                                                 settings.auto_apply_enabled)
        self.clock = clock
        self.watch_mode = watch_mode
        self.on_report = on_report
        self.reload_config = reload_config
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock: FileLock | None = None
        self._conn: sqlite3.Connection | None = None
        self._conn_identity: tuple[int, int] | None = None
        self.watcher: Watcher | None = None

    # -------------------------------------------------------------- lock

    def acquire(self) -> None:
        """Take the home's daemon lock or raise :class:`DaemonBusyError` at once."""
        path = lock_path(self.settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            pid = _read_pid(path.with_suffix(".pid"))
            raise DaemonBusyError(f"another self-heal daemon is already running for {self.settings.home}"
                                  + (f" (pid {pid})" if pid else "") + f"; lock {path}") from None
        self._lock = lock
        path.with_suffix(".pid").write_text(f"{os.getpid()}\n", encoding="utf-8")

    def release(self) -> None:
        if self._lock is not None:
            lock_path(self.settings).with_suffix(".pid").unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    # -------------------------------------------------------------- connection

    @property
    def conn(self) -> sqlite3.Connection:
        """The history's connection, reopened when the file was replaced (the runtime
        recreated it: another inode) since it was opened."""
        identity = file_identity(self.settings.db_path)
        if self._conn is not None and identity is not None and identity != self._conn_identity:
            log.info("%s was replaced: reopening it", self.settings.db_path)
            self.close()
        if self._conn is None:
            self._conn = connect(self.settings.db_path)
            self._conn_identity = identity
            ensure_watch_schema(self._conn)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -------------------------------------------------------------- one round

    def tick(self, now: datetime | None = None) -> TickReport:
        """Detection, optional proposals and auto-apply, due verifications (see module doc).

        A step that fails is logged and listed in ``errors``; the others still run.
        """
        now = now or self.clock()
        report = TickReport(at=format_timestamp(now))
        if self.reload_config:
            self._reload_settings()
        try:
            conn = self.conn
        except (SelfHealError, sqlite3.Error) as exc:  # e.g. the file is being replaced right now
            report.errors.append(f"history: {exc}")
            log.warning("cannot open the history: %s", exc)
            if self.on_report is not None:
                self.on_report(report)
            return report
        recover(conn, self.settings)
        steps: list[tuple[str, Callable[[], None]]] = [("detection", lambda: self._detect(conn, now, report))]
        if self.auto_apply:
            steps.append(("auto-apply", lambda: self._auto_apply(conn, now, report)))
        steps.append(("verification", lambda: self._verify_due(conn, now, report)))
        for name, step in steps:
            if self._stop.is_set():
                report.stopped = True
                break
            try:
                step()
            except Stopped:
                report.stopped = True
                log.info("%s interrupted: stopping", name)
                break
            except (SelfHealError, sqlite3.Error) as exc:
                report.errors.append(f"{name}: {exc}")
                log.warning("%s failed: %s", name, exc)
        log.info("tick at %s: %s", report.at, report.summary())
        if self.on_report is not None:
            self.on_report(report)
        return report

    def _reload_settings(self) -> None:
        """Pick up edits of ``[self_heal]`` in config.toml (thresholds, auto-apply) without a
        restart; a config that no longer parses keeps the settings in force, with a warning."""
        s = self.settings
        try:
            fresh = load_settings(s.home, s.db_path)
        except SelfHealError as exc:
            log.warning("keeping the current settings: %s", exc)
            return
        if fresh != s:
            log.info("settings changed in %s: reloaded", s.config_path)
            self.settings = fresh
            if self._auto_apply_requested is not False:
                self.auto_apply = fresh.auto_apply_enabled
            if self.watcher is not None:
                self.watcher.settings = fresh

    def _check_stop(self, *_progress: Any) -> None:
        """Raise :class:`Stopped` when a stop was requested (also a refresh progress callback)."""
        if self._stop.is_set():
            raise Stopped

    def _detect(self, conn: sqlite3.Connection, now: datetime, report: TickReport) -> None:
        s = self.settings
        result = detect_failure_patterns(conn, since=s.lookback, min_occurrences=s.min_occurrences,
                                         confidence_threshold=s.confidence_threshold, now=now,
                                         progress=self._check_stop)  # the first index build can take long
        patterns = attach_suggested_fixes(result.patterns, s)
        report.patterns = [p.id for p in patterns]
        fresh = [p for p in patterns if claim_notification(conn, p.id, now, s.cooldown_minutes)]
        report.notified_patterns = [p.id for p in fresh]
        if patterns:
            log.info("detected %d pattern(s): %s", len(patterns), ", ".join(report.patterns))
        if fresh:
            plugins.fire("patterns_detected", patterns=fresh, settings=s)
        if self.auto_detect and patterns:
            history = history_window(conn, s, now=now)  # one shared history scan
            for p in patterns:
                self._check_stop()
                try:
                    outcome = propose_for_pattern(conn, s, p, history)
                except StrategyError as exc:
                    report.errors.append(f"proposal: {exc}")
                    log.warning("proposal failed: %s", exc)
                    continue
                if outcome.created:
                    report.proposed.append(outcome.improvement.id)
                    log.info("proposed %s for %s: %s", outcome.improvement.id, outcome.improvement.pattern_id,
                             outcome.improvement.description)

    def _auto_apply(self, conn: sqlite3.Connection, now: datetime, report: TickReport) -> None:
        """Apply what is low-risk, confident enough and simulated safe; test what is untested."""
        s = self.settings
        store = ImprovementStore(conn)
        for imp in [*store.list(status="proposed", limit=None), *store.list(status="tested", limit=None)]:
            if self._stop.is_set():
                return
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
                if imp.status == "proposed" or not result:
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

    def _verify_due(self, conn: sqlite3.Connection, now: datetime, report: TickReport) -> None:
        s = self.settings
        store = ImprovementStore(conn)
        for imp in store.list(status="applied", limit=None):
            if self._stop.is_set():
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
                result = verify_improvement(conn, s, imp.id, measurement_window_days=days, now=now)
            except SelfHealError as exc:
                report.errors.append(f"verify {imp.id}: {exc}")
                log.warning("verification of %s failed: %s", imp.id, exc)
                continue
            rec = result["recommendation"]
            report.verified.append({"improvement_id": imp.id, "recommendation": rec,
                                    "actual_impact": result["actual_impact"]})
            log.info("verified %s: %s (%s)", imp.id, rec, result["actual_impact"])
            if rec == "rollback":
                self._auto_rollback(conn, imp.id, result, now, report)
            elif rec != "keep":
                self._extend_or_conclude(conn, imp.id, result, now, report)

    def _extend_or_conclude(self, conn: sqlite3.Connection, improvement_id: str, verification: dict[str, Any],
                            now: datetime, report: TickReport) -> None:
        """Extend monitoring by a window, at most :data:`MAX_EXTENSIONS` times; then end it
        as inconclusive (the change stays applied) and ask a person to decide."""
        s = self.settings
        store = ImprovementStore(conn)
        key = EXTENSIONS_KEY + improvement_id
        done = int(get_state(conn, key, "0") or 0)
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
            plugins.notify(plugins.Notification(
                title=f"No clear effect of {improvement_id} after {done} extensions",
                body=(f"Verification of {improvement_id} found no significant change over {weeks:g} days "
                      f"({verification['actual_impact']}). Monitoring has ended; the change stays applied.\n\n"
                      f"Keep it, or roll it back: agent self-heal rollback {improvement_id}"),
                tags=["improvement", "verification", "inconclusive"], priority="normal"), s)
            return
        with write_transaction(conn):
            set_state(conn, key, str(done + 1))
        nxt = now + timedelta(days=s.measurement_window_days)
        store.update(improvement_id, verification_scheduled=format_timestamp(nxt))
        log.info("monitoring of %s extended (%d of %d): next verification at %s", improvement_id, done + 1,
                 MAX_EXTENSIONS, format_timestamp(nxt))

    def _auto_rollback(self, conn: sqlite3.Connection, improvement_id: str, verification: dict[str, Any],
                       now: datetime, report: TickReport) -> None:
        reason = f"Automatic rollback by the self-heal daemon: {verification['actual_impact']}"
        key = ROLLBACK_FAILED_KEY + improvement_id
        try:
            done = rollback_improvement(conn, self.settings, improvement_id, reason=reason, now=now)
        except SelfHealError as exc:
            report.errors.append(f"rollback {improvement_id}: {exc}")
            log.error("automatic rollback of %s failed: %s", improvement_id, exc)
            # try again next tick (the user may resolve it), but tell them once
            retry = now + timedelta(seconds=self.interval)
            ImprovementStore(conn).update(improvement_id, verification_scheduled=format_timestamp(retry))
            if not claim_once(conn, key, now):
                return
            plugins.notify(plugins.Notification(
                title=f"Automatic rollback of {improvement_id} failed",
                body=(f"Verification says {improvement_id} made things significantly worse "
                      f"({verification['actual_impact']}), but the rollback failed: {exc}\n\n"
                      f"Roll it back by hand: agent self-heal rollback {improvement_id}"),
                tags=["improvement", "rollback", "failed"], priority="urgent"), self.settings)
            return
        forget(conn, key)
        report.rolled_back.append({"improvement_id": improvement_id, "rollback_sha": done["rollback_sha"],
                                   "method": done["method"]})
        log.warning("rolled back %s automatically (revert commit %s): %s", improvement_id,
                    (done["rollback_sha"] or "")[:12], verification["actual_impact"])
        metrics = verification.get("metrics") or {}
        plugins.notify(plugins.Notification(
            title=f"Automatically rolled back {improvement_id}",
            body="\n".join([
                f"Improvement {improvement_id} made things significantly worse and was rolled back.",
                f"Actual impact: {verification['actual_impact']}",
                f"Success rate before: {_pct(metrics.get('before_success_rate'))}, "
                f"after: {_pct(metrics.get('after_success_rate'))} (p = {metrics.get('p_value')})",
                f"Revert commit: {(done['rollback_sha'] or 'none')[:7]}",
            ]),
            tags=["improvement", "rolled-back", "automatic"], priority="urgent"), self.settings)

    # -------------------------------------------------------------- running

    def _watch_result(self, result: CheckResult) -> None:
        if result.failed_runs and self.auto_apply:
            self._wake.set()  # a proposal may have appeared: run auto-apply soon

    def start_watcher(self) -> Watcher:
        self.watcher = Watcher(self.settings, mode=self.watch_mode, on_check=self._watch_result).start()
        return self.watcher

    def run_once(self) -> tuple[CheckResult, TickReport]:
        """Hook what is new once (no watcher thread), then one tick."""
        plugins.load_plugins(self.settings.plugins_dir)
        recover_unfired(self.conn, self.settings)
        checked = check_history(self.conn, self.settings)
        return checked, self.tick()

    def run(self, install_signals: bool = True) -> None:
        """Watch and tick every interval until stopped. The lock must be held."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
        s = self.settings
        log.info("self-heal daemon started (pid %d): home %s, history %s, interval %ss, auto-detect %s, "
                 "auto-apply %s", os.getpid(), s.home, s.db_path, f"{self.interval:g}",
                 "on" if self.auto_detect else "off", "on" if self.auto_apply else "off")
        try:
            watcher = self.start_watcher()
            log.info("watching %s with %s file events", s.db_path, watcher.mode)
            next_tick = 0.0
            while not self._stop.is_set():
                if time.monotonic() >= next_tick:
                    self._safe(self.tick)
                    next_tick = time.monotonic() + self.interval
                if self._wake.wait(max(0.0, next_tick - time.monotonic())):
                    self._wake.clear()
                    if self._stop.is_set():
                        break
                    self._safe(lambda: self._auto_apply_now())
        finally:
            if self.watcher is not None:
                self.watcher.stop(timeout=0.5)
            self.close()
            log.info("self-heal daemon stopped")

    def _auto_apply_now(self) -> None:
        now = self.clock()
        report = TickReport(at=format_timestamp(now))
        self._auto_apply(self.conn, now, report)
        if report.applied or report.tested or report.errors:
            log.info("after failed runs: %s", report.summary())
            if self.on_report is not None:
                self.on_report(report)

    def _safe(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Stopped:
            log.info("step interrupted: stopping")
        except Exception:  # noqa: BLE001 — the daemon keeps running; the next tick tries again
            log.exception("daemon step failed")

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("received %s: stopping", signal.Signals(signum).name)
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _pct(value: Any) -> str:
    return f"{value * 100:.0f}%" if isinstance(value, (int, float)) else "n/a"
