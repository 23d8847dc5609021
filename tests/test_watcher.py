"""The watcher: another process writes runs; every failed run is hooked exactly once."""
from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from selfheal_plugin.errors import UsageError
from selfheal_plugin.testbed.generator import generate_history
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.settings import load_settings
from selfheal_plugin.daemon.watcher import Watcher, resolve_mode
from selfheal_plugin.lifecycle.events import (
    FLOOR_KEY, WATERMARK_KEY, check_history, ensure_watch_schema, notify_run_finished,
)

from .conftest import NOW
from .watchsupport import collecting, failed_ids, new_history, wait_until, write_runs


@pytest.fixture
def home(binks_home):
    new_history(binks_home / "conversations.db")
    return binks_home


def journal_mode(db) -> str:
    with sqlite3.connect(db) as c:
        return c.execute("PRAGMA journal_mode").fetchone()[0]


@pytest.mark.parametrize("mode", ["native", "poll"])
@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_every_failed_run_is_hooked_once_while_another_process_writes(home, mode, journal):
    settings = load_settings(home)
    with collecting() as seen:
        w = Watcher(settings, mode=mode, poll_interval=0.05).start()
        try:
            assert w.mode == mode
            written = write_runs(settings.db_path, "--runs", "40", "--journal", journal)
            expected = failed_ids(written)
            assert len(expected) == 30  # 3 of every 4 kinds fail
            assert wait_until(lambda: set(seen.failed()) >= expected)
            w.check_now()  # one more look changes nothing
        finally:
            w.stop()
        assert journal_mode(settings.db_path) == journal
        assert seen.failed() == {r: 1 for r in expected}
        # history_changed reported every new event exactly once, and came before run_failed
        changed = seen.of("history_changed")
        with sqlite3.connect(settings.db_path) as c:
            assert sum(n for _, n in changed) == c.execute("SELECT count(*) FROM run_events").fetchone()[0]
        order = [name for name, _ in seen.calls]
        for run_id in expected:
            fired_at = seen.calls.index(("run_failed", run_id))
            assert any(name == "history_changed" and run_id in arg[0] for name, arg in seen.calls[:fired_at])
        assert order[0] == "history_changed"


def test_restart_hooks_nothing_twice_and_misses_nothing(home):
    settings = load_settings(home)
    db = settings.db_path
    with collecting() as seen:
        w = Watcher(settings).start()
        try:
            first = failed_ids(write_runs(db, "--runs", "12"))
            assert wait_until(lambda: set(seen.failed()) >= first)
            # a run still running when the watcher stops, failing while it is stopped
            conn = connect(db)
            conn.execute("INSERT INTO runs(id, workflow_name, task, status, model, started_at) "
                         "VALUES ('long-run', 'k8s-ops', 't', 'running', 'm', '2026-11-20T10:00:00Z')")
            w.check_now()
        finally:
            w.stop()
        second = failed_ids(write_runs(db, "--runs", "12", "--start", "2026-11-20T12:00:00+00:00"))
        conn.execute("UPDATE runs SET status = 'failed', error = 'killed' WHERE id = 'long-run'")
        conn.close()
        assert not set(seen.failed()) & second
        restarted = Watcher(settings).start()  # start looks at once: no wait needed
        restarted.stop()
        assert seen.failed() == {r: 1 for r in first | second | {"long-run"}}
        again = Watcher(settings).start()
        again.stop()
        assert seen.failed() == {r: 1 for r in first | second | {"long-run"}}


def test_two_watchers_at_once_hook_each_run_once(home):
    settings = load_settings(home)
    with collecting() as seen:
        a = Watcher(settings, mode="native").start()
        b = Watcher(settings, mode="poll", poll_interval=0.02).start()
        try:
            expected = failed_ids(write_runs(settings.db_path, "--runs", "60", "--journal", "wal"))
            assert wait_until(lambda: set(seen.failed()) >= expected)
            a.check_now()
            b.check_now()
        finally:
            a.stop()
            b.stop()
        assert seen.failed() == {r: 1 for r in expected}
        assert a.checks + b.checks > 2


def test_runtime_in_process_notify_and_a_watcher_hook_each_run_once(home):
    """A Python runtime (RunRecorder + notify_run_finished in its own process) and a
    watcher here: each failed run is hooked by exactly one of them. Hook calls of both
    processes go to a file through a user plugin."""
    log = home / "hooked.log"
    plugin_dir = home / "selfheal" / "plugins"
    plugin_dir.mkdir(parents=True)
    (plugin_dir / "record_failed.py").write_text(textwrap.dedent(f"""
        import os
        from selfheal_plugin import hookimpl

        @hookimpl
        def run_failed(run, settings):
            with open({str(log)!r}, "a") as fh:
                fh.write(f"{{os.getpid()}} {{run['id']}}\\n")
    """))
    runtime = textwrap.dedent(f"""
        from datetime import datetime, timezone
        from selfheal_plugin.plugins import manager as plugins
        from selfheal_plugin.history.clock import SimulatedClock
        from selfheal_plugin.runtime.recorder import RunRecorder
        from selfheal_plugin.history.settings import load_settings
        from selfheal_plugin.lifecycle.events import notify_run_finished
        plugins.pm.set_blocked("selfheal.hooks.auto_analysis")
        settings = load_settings({str(home)!r})
        clock = SimulatedClock(datetime(2026, 11, 20, 11, tzinfo=timezone.utc))
        with RunRecorder(settings.db_path, clock=clock) as rec:
            for i in range(30):
                run = rec.start_run("k8s-ops", "list pods")
                run.record_tool_call("mcp__kubernetes__pods_list", {{"namespace": "a"}},
                                     "Tool mcp__kubernetes__pods_list timed out after 60s" if i % 2 else "ok",
                                     60003 if i % 2 else 900, is_error=bool(i % 2))
                clock.advance(60)
                run.finish("failed" if i % 2 else "completed", "timed out" if i % 2 else None)
                fired = notify_run_finished(rec._conn, run.id, settings)
                print(run.id, run.status, fired, flush=True)
    """)
    settings = load_settings(home)
    with collecting():
        w = Watcher(settings).start()
        try:
            out = subprocess.run([sys.executable, "-c", runtime], capture_output=True, text=True, check=True,
                                 timeout=120).stdout
            rows = [line.split() for line in out.splitlines()]
            expected = {r for r, status, _ in rows if status == "failed"}
            assert len(expected) == 15
            assert all(fired == "False" for _, status, fired in rows if status == "completed")

            def hooked() -> list[str]:
                return [line.split()[1] for line in log.read_text().splitlines()] if log.exists() else []
            assert wait_until(lambda: set(hooked()) >= expected)
            w.check_now()
        finally:
            w.stop()
    runs = hooked()
    assert sorted(runs) == sorted(expected)  # each exactly once, whoever fired it
    claimed_by_runtime = {r for r, status, fired in rows if fired == "True"}
    assert claimed_by_runtime  # the runtime fired some itself


def test_notify_run_finished_claims_once(home):
    settings = load_settings(home)
    written = write_runs(settings.db_path, "--runs", "4")
    failed = sorted(failed_ids(written))
    completed = [r for r, s in written.items() if s == "completed"]
    with collecting() as seen:
        assert notify_run_finished(settings.db_path, failed[0], settings) is True
        assert notify_run_finished(settings.db_path, failed[0], settings) is False
        assert notify_run_finished(settings.db_path, completed[0], settings) is False
        assert notify_run_finished(settings.db_path, "no-such-run", settings) is False
        assert seen.failed() == {failed[0]: 1}
        # a watcher starting later still hooks the others, not that one (marks set first)
        conn = connect(settings.db_path)
        ensure_watch_schema(conn)
        conn.execute("INSERT INTO selfheal_state(key, value) VALUES (?, '0'), (?, '1')", (WATERMARK_KEY, FLOOR_KEY))
        conn.close()
        Watcher(settings).start().stop()
    assert seen.failed() == {r: 1 for r in failed}


def test_first_start_takes_the_existing_history_as_its_baseline(binks_home):
    db = binks_home / "conversations.db"
    generate_history(db, seed=3, runs=120, end=NOW)
    settings = load_settings(binks_home)
    with collecting() as seen:
        conn = connect(db)
        ensure_watch_schema(conn)
        first = check_history(conn, settings)
        assert first.initialized and not first.failed_runs
        assert check_history(conn, settings).failed_runs == []
        # runs still running at the first start are hooked when they fail later
        running = [r[0] for r in conn.execute("SELECT id FROM runs WHERE status = 'running'")]
        assert running
        conn.execute("UPDATE runs SET status = 'failed' WHERE id = ?", (running[0],))
        assert check_history(conn, settings).failed_runs == [running[0]]
        conn.close()
    assert seen.failed() == {running[0]: 1}


def test_a_claim_left_by_a_dead_process_is_fired_by_the_next_watcher(home):
    settings = load_settings(home)
    failed = sorted(failed_ids(write_runs(settings.db_path, "--runs", "2", "--kinds", "direct")))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    conn = connect(settings.db_path)
    ensure_watch_schema(conn)
    conn.execute("INSERT INTO selfheal_state(key, value) VALUES (?, '0'), (?, '3')", (WATERMARK_KEY, FLOOR_KEY))
    conn.execute("INSERT INTO selfheal_hooked_runs(run_id, hooked_at, claimed_by, fired_at) VALUES (?, 'x', ?, NULL)",
                 (failed[0], f"{socket.gethostname()}:{dead.pid}"))
    conn.execute("INSERT INTO selfheal_hooked_runs(run_id, hooked_at, claimed_by, fired_at) VALUES (?, 'x', 'x', 'y')",
                 (failed[1],))
    with collecting() as seen:
        Watcher(settings).start().stop()
        Watcher(settings).start().stop()
    assert seen.failed() == {failed[0]: 1}
    assert conn.execute("SELECT fired_at IS NOT NULL FROM selfheal_hooked_runs WHERE run_id = ?",
                        (failed[0],)).fetchone()[0] == 1
    conn.close()


def test_falls_back_to_polling_when_native_events_are_unavailable(home, monkeypatch):
    import watchdog.observers

    class NoInotify:
        def schedule(self, *a, **k):
            raise OSError(28, "inotify watch limit reached")

    monkeypatch.setattr(watchdog.observers, "Observer", NoInotify)
    settings = load_settings(home)
    with collecting() as seen:
        w = Watcher(settings, mode="native", poll_interval=0.05).start()
        try:
            assert w.mode == "poll"
            expected = failed_ids(write_runs(settings.db_path, "--runs", "8", "--journal", "wal"))
            assert wait_until(lambda: set(seen.failed()) >= expected)
        finally:
            w.stop()
    assert seen.failed() == {r: 1 for r in expected}


def test_watch_mode_from_the_environment(monkeypatch):
    monkeypatch.setenv("SELFHEAL_WATCH", "poll")
    assert resolve_mode() == "poll"
    assert resolve_mode("native") == "native"
    monkeypatch.setenv("SELFHEAL_WATCH", "inotify")
    with pytest.raises(UsageError, match="SELFHEAL_WATCH"):
        resolve_mode()


def test_a_failing_hook_does_not_stop_the_watcher(home):
    from selfheal_plugin import hookimpl
    from selfheal_plugin.plugins import manager as plugins

    class Broken:
        @hookimpl
        def run_failed(self, run, settings):
            raise RuntimeError("plugin bug")

    settings = load_settings(home)
    broken = Broken()
    with collecting() as seen:
        plugins.register(broken, "broken-test-plugin")
        try:
            w = Watcher(settings).start()
            try:
                expected = failed_ids(write_runs(settings.db_path, "--runs", "8"))
                assert wait_until(lambda: set(seen.failed()) >= expected)
            finally:
                w.stop()
        finally:
            plugins.unregister(broken)
        assert any(e.plugin == "broken-test-plugin" for e in plugins.errors())
    assert seen.failed() == {r: 1 for r in expected}


def test_a_locked_database_is_retried_not_fatal(home, monkeypatch):
    """While the runtime holds the write lock past our busy timeout, a look fails, is
    logged and counted, and changes nothing; the next look hooks the run once."""
    monkeypatch.setenv("SELFHEAL_BUSY_TIMEOUT_MS", "50")
    settings = load_settings(home)
    with collecting() as seen:
        w = Watcher(settings, mode="poll", poll_interval=3600).start()  # looks only when asked
        try:
            failed = failed_ids(write_runs(settings.db_path, "--runs", "1", "--kinds", "direct"))
            blocker = sqlite3.connect(settings.db_path, isolation_level=None)
            blocker.execute("BEGIN IMMEDIATE")
            assert w.check_now() is None
            assert w.errors == 1 and seen.failed() == {}
            blocker.execute("COMMIT")
            blocker.close()
            assert w.check_now().failed_runs == sorted(failed)
        finally:
            w.stop()
    assert seen.failed() == {r: 1 for r in failed}


def test_check_history_fires_nothing_without_changes(home):
    settings = load_settings(home)
    conn = connect(settings.db_path)
    ensure_watch_schema(conn)
    assert check_history(conn, settings).initialized
    with collecting() as seen:
        result = check_history(conn, settings)
    assert not result.changed and seen.calls == []
    conn.close()


def test_a_replaced_database_is_reopened(home, tmp_path):
    """The runtime deletes and recreates its file: the watcher follows the new file (the
    old connection would read the deleted one forever) and hooks its failed runs."""
    settings = load_settings(home)
    with collecting() as seen:
        w = Watcher(settings, mode="poll").start()
        try:
            new_history(tmp_path / "recreated.db").replace(settings.db_path)
            assert w.check_now() is not None  # reopened: the new file's baseline
            expected = failed_ids(write_runs(settings.db_path, "--runs", "6"))
            assert expected
            assert wait_until(lambda: set(seen.failed()) >= expected)
        finally:
            w.stop()
    assert seen.failed() == {r: 1 for r in expected}


def test_opening_the_history_keeps_the_locks_of_our_other_connections(binks_home):
    """Closing any descriptor of a file drops every POSIX lock the process holds on it.
    If ``connect`` read the file by itself, a WAL reader of ours would lose its shared
    lock, and the runtime's last connection, on closing, would take the database for
    unused and delete the WAL index under it (our next reads: "disk I/O error")."""
    db = new_history(binks_home / "conversations.db")
    write_runs(db, "--runs", "2", "--journal", "wal")
    ours = connect(db)
    ours.execute("SELECT count(*) FROM runs").fetchone()  # in WAL mode: holds a shared lock while open
    connect(db).close()  # a second connection of ours, as each hook makes
    # the runtime opens and closes; it would checkpoint and delete -wal and -shm if it were alone
    subprocess.run([sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                    "c.execute('SELECT 1 FROM runs').fetchall(); c.close()", str(db)], check=True, timeout=60)
    assert Path(f"{db}-shm").exists()
    assert ours.execute("SELECT count(*) FROM runs").fetchone()[0] == 2
    ours.close()
