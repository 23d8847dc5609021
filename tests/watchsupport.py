"""Shared pieces of the watcher, auto-analysis and daemon tests."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from selfheal_plugin import hookimpl

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.history.connection import connect

WRITER = Path(__file__).with_name("watch_writer.py")
AUTO_ANALYSIS = "selfheal.hooks.auto_analysis"
DEADLINE = 120.0  # generous: waiting for events is not a timing assertion (a loaded 2-core
# machine takes over 15 s just to start a command)


def new_history(path: Path) -> Path:
    """An empty history with the runtime's schema."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connect(path, create=True).close()
    return path


def write_runs(db: Path, *args: str) -> dict[str, str]:
    """Run the writer in another process; returns run id → final status."""
    out = subprocess.run([sys.executable, str(WRITER), str(db), *args], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return dict(line.split() for line in out.splitlines() if line.strip())


def failed_ids(written: dict[str, str]) -> set[str]:
    return {r for r, status in written.items() if status == "failed"}


def wait_until(predicate: Callable[[], bool], deadline: float = DEADLINE) -> bool:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Collector:
    """A test plugin recording hook calls in order (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, Any]] = []

    @hookimpl
    def run_failed(self, run: dict[str, Any], settings: Any) -> None:
        with self.lock:
            self.calls.append(("run_failed", run["id"]))

    @hookimpl
    def history_changed(self, new_runs: list[str], new_event_count: int, settings: Any) -> None:
        with self.lock:
            self.calls.append(("history_changed", (list(new_runs), new_event_count)))

    @hookimpl
    def notify(self, notification: Any, settings: Any) -> None:
        with self.lock:
            self.calls.append(("notify", notification))

    def of(self, hook: str) -> list[Any]:
        with self.lock:
            return [arg for name, arg in self.calls if name == hook]

    def failed(self) -> Counter:
        return Counter(self.of("run_failed"))


@contextmanager
def collecting(block_auto_analysis: bool = True) -> Iterator[Collector]:
    """Register a :class:`Collector` (and keep the built-in auto-analysis out unless
    told otherwise); everything is undone in ``finally``."""
    collector = Collector()
    if block_auto_analysis:
        plugins.pm.set_blocked(AUTO_ANALYSIS)
    plugins.register(collector, "test-collector")
    try:
        yield collector
    finally:
        plugins.unregister(collector)
        if block_auto_analysis:
            plugins.pm.unblock(AUTO_ANALYSIS)
            plugins.reset()  # the blocked built-in is loaded again by the next test that fires a hook
