"""The watcher: watch the run history's files and ask :mod:`selfheal_plugin.lifecycle.events`
what is new, which fires ``history_changed`` and ``run_failed`` exactly once.

File events are only hints. A watchdog observer on the database's folder reports changes
to the file and its ``-wal``/``-journal`` siblings (the runtime may use either journal
mode); the watcher waits a few milliseconds (a WAL commit becomes visible to readers only
after the ``-wal`` write that announced it), then asks SQLite itself: ``PRAGMA
data_version`` says whether another connection committed.

Where native file events are unavailable (no inotify watches left, a network file
system) the watcher polls ``PRAGMA data_version`` instead; ``SELFHEAL_WATCH=poll`` (or
``mode="poll"``) selects polling explicitly.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

from selfheal_plugin.errors import SelfHealError, UsageError
from selfheal_plugin.history.connection import (connect, file_identity)
from selfheal_plugin.history.settings import Settings
from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.plugins.manager import Interrupted

from selfheal_plugin.lifecycle.events import (
    CheckResult, check_history, ensure_watch_schema, recover_unfired, retry_marking,
)

log = logging.getLogger("selfheal.watcher")

MODES = ("native", "poll")
MODE_ENV = "SELFHEAL_WATCH"

# Settling delays after a file event (seconds): the first check comes after the debounce,
# the later ones catch a commit that was not visible yet when the event arrived.
SETTLE_DELAYS = (0.005, 0.03, 0.15, 0.6)


def resolve_mode(mode: str | None = None) -> str:
    """``mode`` if given, else ``$SELFHEAL_WATCH``, else ``native``; anything else is a UsageError."""
    value = (mode or os.environ.get(MODE_ENV) or "native").strip().lower()
    if value not in MODES:
        raise UsageError(f"invalid watch mode {value!r} (from {'--watch' if mode else MODE_ENV}): use native or poll")
    return value


class _Hints:
    """watchdog handler: any write-ish event on the database file or its journals is a hint."""

    IGNORED = ("opened", "closed_no_write")

    def __init__(self, db_path: Path, hint: Callable[[], None]):
        name = db_path.name
        self.names = {name, f"{name}-wal", f"{name}-journal"}
        self.hint = hint

    def dispatch(self, event: Any) -> None:
        if event.event_type in self.IGNORED or event.is_directory:
            return
        paths = [event.src_path, getattr(event, "dest_path", "") or ""]
        if any(os.path.basename(os.fsdecode(p)) in self.names for p in paths if p):
            self.hint()


class Watcher:
    """Watches one history and fires the hooks from a background thread.

    ``start()`` opens the database, fires ``run_failed`` for claims a dead process left
    unfired, looks at the history once (hooking what was written while no watcher ran),
    then reacts to file events (``native``) or polls (``poll``) until ``stop()``.
    ``on_check`` is called with each :class:`CheckResult` that found something.

    :param mode: ``native``, ``poll``, or None for ``$SELFHEAL_WATCH`` (default native).
    :param poll_interval: seconds between looks when polling.
    :param safety_interval: with native events, a look every so many seconds anyway (a
        missed event, a change on a file system without notifications).
    """

    def __init__(self, settings: Settings, *, mode: str | None = None, poll_interval: float = 0.25,
                 safety_interval: float = 5.0, on_check: Callable[[CheckResult], None] | None = None):
        self.settings = settings
        self.db_path = Path(settings.db_path)
        self.requested_mode = resolve_mode(mode)
        self.mode = self.requested_mode
        self.poll_interval = poll_interval
        self.safety_interval = safety_interval
        self.on_check = on_check
        self.checks = 0
        self.errors = 0
        self._hint = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._observer: Any = None
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._data_version: int | None = None

    # -------------------------------------------------------------- lifecycle

    def start(self) -> "Watcher":
        plugins.load_plugins(self.settings.plugins_dir)  # once, now: not on the first failure's clock
        self._identity = file_identity(self.db_path)
        self._conn = connect(self.db_path)
        ensure_watch_schema(self._conn)
        recover_unfired(self._conn, self.settings)
        self._check(force=True)
        if self.mode == "native":
            self._start_observer()
        self._thread = threading.Thread(target=self._loop, name="selfheal-watcher", daemon=True)
        self._thread.start()
        log.info("watching %s (%s)", self.db_path, self.mode)
        return self

    def _start_observer(self) -> None:
        from watchdog.observers import Observer

        handler = _Hints(self.db_path, self._hint.set)
        observer = Observer()
        try:
            observer.schedule(handler, str(self.db_path.parent), recursive=False)
            observer.start()
        except (OSError, RuntimeError) as exc:
            log.warning("native file events unavailable (%s); polling every %.2fs instead", exc, self.poll_interval)
            self.mode = "poll"
            return
        self._observer = observer

    def stop(self, timeout: float = 1.0) -> None:
        """Stop watching; returns within about ``timeout`` seconds (a hook that is running
        finishes in the background thread, which is a daemon thread)."""
        self._stop.set()
        self._hint.set()
        deadline = time.monotonic() + timeout
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(max(0.0, deadline - time.monotonic()))
            self._observer = None
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                log.warning("watcher thread still busy in a hook; leaving it to finish")
            self._thread = None
        if self._conn is not None and not self._lock.locked():
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "Watcher":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -------------------------------------------------------------- the loop

    def hint(self) -> None:
        """Ask for a look soon (what a file event does)."""
        self._hint.set()

    def _loop(self) -> None:
        pending: list[float] = []
        next_safety = time.monotonic() + (self.poll_interval if self.mode == "poll" else self.safety_interval)
        while not self._stop.is_set():
            now = time.monotonic()
            wake = min([next_safety, *pending])
            if self._hint.wait(max(0.0, wake - now)):
                self._hint.clear()
                if self._stop.is_set():
                    break
                now = time.monotonic()
                # Keep an earlier pending look: a stream of events must not postpone it.
                first = [min(pending)] if pending else []
                pending = first + [now + d for d in SETTLE_DELAYS]
                continue
            now = time.monotonic()
            due = [t for t in pending if t <= now]
            pending = [t for t in pending if t > now]
            if now >= next_safety:
                next_safety = now + (self.poll_interval if self.mode == "poll" else self.safety_interval)
                due.append(now)
            if due:
                try:
                    self._check()
                except Interrupted:  # stopping while a plugin was running: its run stays unfired
                    return

    def _check(self, force: bool = False) -> CheckResult | None:
        with self._lock:
            if self._conn is None:
                return None
            if self._reopen_if_replaced():
                force = True
            try:
                version = int(self._conn.execute("PRAGMA data_version").fetchone()[0])
                if not force and version == self._data_version:
                    return None
                self._data_version = version
                self.checks += 1
                result = check_history(self._conn, self.settings)
                retry_marking(self._conn)
            except sqlite3.Error as exc:
                self.errors += 1
                self._data_version = None  # look again next time
                log.warning("could not read %s (%s); will retry", self.db_path, exc)
                return None
        if result.changed and self.on_check is not None:
            try:
                self.on_check(result)
            except Exception:  # noqa: BLE001 — a callback must not stop the watcher
                log.exception("watcher callback failed")
        return result

    def _reopen_if_replaced(self) -> bool:
        """Reopen the history when its file is another one than the connection's (the
        runtime deleted and recreated it, or renamed a new file over it): the old
        connection would read the old file forever. A new file that cannot be opened yet
        is retried at the next look, the old connection kept meanwhile."""
        identity = file_identity(self.db_path)
        if identity is None or identity == self._identity:
            return False
        try:
            fresh = connect(self.db_path)
            ensure_watch_schema(fresh)
        except (SelfHealError, sqlite3.Error) as exc:
            self.errors += 1
            log.warning("%s was replaced but cannot be opened yet (%s); will retry", self.db_path, exc)
            return False
        log.info("%s was replaced: reopened it", self.db_path)
        assert self._conn is not None
        self._conn.close()
        self._conn, self._identity, self._data_version = fresh, identity, None
        return True

    def check_now(self) -> CheckResult | None:
        """Look at the history now, in the calling thread (whatever data_version says)."""
        return self._check(force=True)
