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
   notification, not one per tick;
5. when a person set a sync remote (``agent self-heal sync --remote URL``), shares fix packs
   through it (:mod:`selfheal_plugin.lifecycle.sharing`); a refusing remote is a tick error.

Stopping: SIGTERM/SIGINT set a stop event that long steps check — the error index build
after each chunk, detection between patterns, auto-apply and verification between
improvements — so the daemon exits within about a second even mid-tick. SIGUSR1 writes
every thread's stack to stderr and changes nothing (what is it doing right now?).

Time comes from an injectable clock, so tests pass a week in a call. One daemon per home:
``BINKS_HOME/selfheal/locks/daemon.lock`` (filelock, with ``daemon.pid`` beside it); a
second one gets :class:`DaemonBusyError`.
"""
from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sqlite3
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.history.clock import Clock, wall_clock
from selfheal_plugin.errors import SelfHealError, UsageError
from selfheal_plugin.history import schema
from selfheal_plugin.history.settings import lock_dir
from selfheal_plugin.history.connection import file_identity
from selfheal_plugin.lifecycle.recovery import recover
from selfheal_plugin.history.settings import Settings, load_settings
from selfheal_plugin.service import SelfHeal
from selfheal_plugin.history.times import format_timestamp
from selfheal_plugin.daemon.watcher import Watcher
from selfheal_plugin.lifecycle.events import CheckResult, check_history, ensure_watch_schema, recover_unfired

log = logging.getLogger("selfheal.daemon")





class DaemonBusyError(SelfHealError):
    """Another daemon holds this home's lock."""


class Stopped(plugins.Interrupted):
    """Raised inside a long step when the daemon was asked to stop (not an error); a wait
    for a plugin interrupted by the stop raises the base class,
    :class:`~selfheal_plugin.plugins.manager.Interrupted`."""


def parse_interval(text: str | float | int) -> float:
    """``"1h"`` → 3600.0; accepts ``90``/``90s``, ``30m``, ``1.5h``, ``1d``; longer than zero and at
    most the schema's bound for ``--interval`` (30 days: a longer wait overflows the timers)."""
    try:
        return schema.interval_seconds(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


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
    plugin_errors: list[str] = field(default_factory=list)  # plugins that failed since the last report
    ab_judged: list[dict[str, Any]] = field(default_factory=list)  # A/B experiments judged this tick
    ab_promoted: list[dict[str, Any]] = field(default_factory=list)  # A/B winners promoted automatically
    stopped: bool = False  # the tick was cut short by a stop request
    synced: list[dict[str, Any]] = field(default_factory=list)  # fix packs shared (remote, read, added, updated)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line: what the tick did, by count. Verifications are counted by verdict (an
        *extend* or a *rollback* is a verification, not a verified improvement)."""
        parts = [f"{len(self.patterns)} pattern(s)"]
        for label, items in (("proposed", self.proposed), ("tested", self.tested), ("applied", self.applied),
                             ("held back", self.skipped), (self._verdicts(), self.verified),
                             ("rolled back", self.rolled_back), ("concluded inconclusive", self.concluded),
                             ("A/B experiment(s) judged", self.ab_judged), ("A/B winner(s) promoted", self.ab_promoted),
                             ("error(s)", self.errors), ("plugin error(s)", self.plugin_errors),
                             ("fix pack sync(s)", self.synced)):
            if items:
                parts.append(f"{len(items)} {label}")
        return ", ".join(parts) + (" (stopped early)" if self.stopped else "")

    def _verdicts(self) -> str:
        """``verification(s) (2 keep, 1 extend)``: the verdicts of this tick's verifications."""
        counts = Counter(str(v.get("recommendation")) for v in self.verified)
        order = ("keep", "extend", "rollback")
        kinds = sorted(counts, key=lambda k: (order.index(k) if k in order else len(order), k))
        return f"verification(s) ({', '.join(f'{counts[k]} {k}' for k in kinds)})"


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
        self._service: SelfHeal | None = None
        self._now: datetime | None = None  # the instant of the round in progress (the service's clock)
        self._db_identity: tuple[int, int] | None = None
        self.watcher: Watcher | None = None
        self._errors_mark = plugins.errors_mark()

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
    def service(self) -> SelfHeal:
        """The one service the daemon's rounds call (opened once; its clock is the round's instant)."""
        identity = file_identity(self.settings.db_path)
        if self._service is not None and identity is not None and identity != self._db_identity:
            log.info("%s was replaced: reopening it", self.settings.db_path)  # the runtime recreated it
            self.close()
        if self._service is None:
            self._service = SelfHeal(settings=self.settings, clock=lambda: self._now or self.clock())
            self._db_identity = identity
            ensure_watch_schema(self._service.conn)
        return self._service

    @property
    def conn(self) -> sqlite3.Connection:
        return self.service.conn

    def open(self) -> None:
        """Open the history now: a missing, foreign or damaged database is one line before
        anything else is done (the lock, the watcher)."""
        self.service  # noqa: B018 — the property opens it

    def close(self) -> None:
        if self._service is not None:
            self._service.close()
            self._service = None

    # -------------------------------------------------------------- one round

    def tick(self, now: datetime | None = None, *, log_summary: bool = True) -> TickReport:
        """Detection, optional proposals and auto-apply, due verifications (see module doc).

        A step that fails is logged and listed in ``errors``; the others still run.
        ``log_summary``: also say the round's summary in the log (False when the caller prints
        the returned report itself, as ``--once`` does: said once, not twice).
        """
        now = now or self.clock()
        self._now = now
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
        steps.append(("experiments", lambda: self._merge(report, self.service.ab_judge_due(
            should_stop=self._stop.is_set))))
        steps.append(("sync", lambda: self._sync(report)))
        for name, step in steps:
            if self._stop.is_set():
                report.stopped = True
                break
            try:
                step()
            except plugins.Interrupted:
                report.stopped = True
                log.info("%s interrupted: stopping", name)
                break
            except (SelfHealError, sqlite3.Error) as exc:
                report.errors.append(f"{name}: {exc}")
                log.warning("%s failed: %s", name, exc)
        self._report_plugin_errors(report)
        if log_summary:
            log.info("tick at %s: %s", report.at, report.summary())
        if self.on_report is not None:
            self.on_report(report)
        return report

    def _report_plugin_errors(self, report: TickReport) -> None:
        """Plugin failures recorded in this process since the last report (the watcher's
        hooks between ticks included); they are also persisted for ``plugins``."""
        report.plugin_errors = [e.line() for e in plugins.errors_since(self._errors_mark)]
        self._errors_mark = plugins.errors_mark()

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
            if self._service is not None:
                self._service.settings = fresh
            if self._auto_apply_requested is not False:
                self.auto_apply = fresh.auto_apply_enabled
            if self.watcher is not None:
                self.watcher.settings = fresh

    def _check_stop(self, *_progress: Any) -> None:
        """Raise :class:`Stopped` when a stop was requested (also a refresh progress callback)."""
        if self._stop.is_set():
            raise Stopped

    def _detect(self, conn: sqlite3.Connection, now: datetime, report: TickReport) -> None:
        """The service's detect: proposals when ``auto_detect``, the inbox once per cooldown."""
        result = self.service.detect(propose=self.auto_detect, notify=True, progress=self._check_stop,
                                     should_stop=self._stop.is_set)  # the first index build can take long
        report.patterns = [p["id"] for p in result["patterns"]]
        report.notified_patterns = result["notified"]
        if report.patterns:
            log.info("detected %d pattern(s): %s", len(report.patterns), ", ".join(report.patterns))
        for outcome in result["proposals"]:
            if outcome.get("error"):
                report.errors.append(f"proposal: {outcome['error']}")
                log.warning("proposal failed: %s", outcome["error"])
            elif outcome.get("created"):
                report.proposed.append(outcome["improvement_id"])
                log.info("proposed %s for %s: %s", outcome["improvement_id"], outcome["pattern_id"],
                         outcome["description"])
        if result["stopped"]:
            raise Stopped

    def _auto_apply(self, conn: sqlite3.Connection, now: datetime, report: TickReport) -> None:
        self._merge(report, self.service.auto_apply(should_stop=self._stop.is_set))

    def _verify_due(self, conn: sqlite3.Connection, now: datetime, report: TickReport) -> None:
        self._merge(report, self.service.verify_due(retry_seconds=self.interval, should_stop=self._stop.is_set))

    def _sync(self, report: TickReport) -> None:
        """Share fix packs when a person set a remote (``agent self-heal sync --remote URL``)."""
        r = self.service.sync_remembered()
        if r is not None:
            report.synced.append({"remote": r["remote"], "packs_read": len(r["packs_read"]), "pushed": r["pushed"],
                                  "added": len(r["added"]), "updated": len(r["updated"])})

    @staticmethod
    def _merge(report: TickReport, done: dict[str, Any]) -> None:
        for key, items in done.items():
            getattr(report, key).extend(items)

    # -------------------------------------------------------------- running

    def _watch_result(self, result: CheckResult) -> None:
        if result.failed_runs and self.auto_apply:
            self._wake.set()  # a proposal may have appeared: run auto-apply soon

    def start_watcher(self) -> Watcher:
        self.watcher = Watcher(self.settings, mode=self.watch_mode, on_check=self._watch_result).start()
        return self.watcher

    def run_once(self) -> tuple[CheckResult, TickReport]:
        """Hook what is new once (no watcher thread), then one tick, whose report the caller
        prints (so its summary is not logged as well)."""
        plugins.load_plugins(self.settings.plugins_dir)
        recover_unfired(self.conn, self.settings)
        checked = check_history(self.conn, self.settings)
        return checked, self.tick(log_summary=False)

    def run(self, install_signals: bool = True) -> None:
        """Watch and tick every interval until stopped. The lock must be held."""
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            if hasattr(signal, "SIGUSR1"):  # `kill -USR1 PID`: every thread's stack to stderr, and go on
                faulthandler.register(signal.SIGUSR1, all_threads=True)
        s = self.settings
        log.info("self-heal daemon started (pid %d): home %s, history %s, interval %ss, auto-detect %s, "
                 "auto-apply %s", os.getpid(), s.home, s.db_path, f"{self.interval:g}",
                 "on" if self.auto_detect else "off", "on" if self.auto_apply else "off")
        plugins.add_stop_event(self._stop)  # SIGTERM ends any wait for a plugin (Interrupted)
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
        except plugins.Interrupted:
            log.info("stopped while a plugin was running")
        finally:
            plugins.remove_stop_event(self._stop)
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
        except plugins.Interrupted:
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

