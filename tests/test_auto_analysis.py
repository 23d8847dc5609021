"""The built-in auto-analysis hook: a burst of failures → one proposal, one notification."""
from __future__ import annotations

import pytest

from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.plugins.inbox import parse_inbox
from selfheal_plugin.history.settings import load_settings
from selfheal_plugin.daemon.watcher import Watcher
from selfheal_plugin.lifecycle.events import check_history, ensure_watch_schema

from .watchsupport import collecting, failed_ids, new_history, wait_until, write_runs

PATTERN = "timeout:mcp__kubernetes__pods_list"


@pytest.fixture
def home(binks_home):
    new_history(binks_home / "conversations.db")
    return binks_home


def watched(home):
    """A connection with the watch marks set (the history so far is the baseline)."""
    settings = load_settings(home)
    conn = connect(settings.db_path)
    ensure_watch_schema(conn)
    check_history(conn, settings)
    return settings, conn


def pattern_notifications(seen) -> list:
    return [n for n in seen.of("notify") if n.title == f"Recurring failure {PATTERN}"]


def inbox_entries(tmp_path) -> list:
    folder = tmp_path / "inbox"
    return [e for f in sorted(folder.glob("*.md")) for e in parse_inbox(f.read_text())] if folder.exists() else []


def test_a_burst_of_failures_proposes_and_notifies_once(home, tmp_path):
    settings = load_settings(home)
    with collecting(block_auto_analysis=False) as seen:
        w = Watcher(settings).start()
        try:
            written = write_runs(settings.db_path, "--runs", "16", "--kinds", "error,ok", "--journal", "wal")
            expected = failed_ids(written)
            assert len(expected) == 8
            assert wait_until(lambda: set(seen.failed()) >= expected)
        finally:
            w.stop()
    conn = connect(settings.db_path)
    rows = [i for i in ImprovementStore(conn).list(limit=None) if i.pattern_id == PATTERN]
    conn.close()
    assert len(rows) == 1 and rows[0].status == "proposed"
    notes = pattern_notifications(seen)
    assert len(notes) == 1
    assert rows[0].id in notes[0].body and notes[0].priority == "high"
    # one suggested fix: the proposal's description, not a second line from the strategy
    assert rows[0].description in notes[0].body and "Suggested fix:" not in notes[0].body
    inbox = [e for e in inbox_entries(tmp_path) if "auto-analysis" in e.tags]
    assert len(inbox) == 1


def test_below_the_thresholds_nothing_is_proposed_or_notified(home):
    settings, conn = watched(home)
    write_runs(settings.db_path, "--runs", "4", "--kinds", "error,ok")  # 2 failures < min_occurrences 3
    with collecting(block_auto_analysis=False) as seen:
        hooked = check_history(conn, settings).failed_runs
    assert len(hooked) == 2
    assert ImprovementStore(conn).list(limit=None) == []
    assert pattern_notifications(seen) == []
    conn.close()


def test_notifies_again_only_after_the_cooldown(home):
    (home / "config.toml").write_text("[self_heal]\ncooldown_minutes = 60\n")
    settings, conn = watched(home)
    with collecting(block_auto_analysis=False) as seen:
        write_runs(settings.db_path, "--runs", "8", "--kinds", "error,ok", "--start", "2026-11-20T10:00:00+00:00")
        check_history(conn, settings)
        assert len(pattern_notifications(seen)) == 1
        # 30 minutes later (run time): within the cooldown
        write_runs(settings.db_path, "--runs", "2", "--kinds", "error", "--start", "2026-11-20T10:30:00+00:00")
        check_history(conn, settings)
        assert len(pattern_notifications(seen)) == 1
        # two hours later: the pattern is news again; the open proposal is reused
        write_runs(settings.db_path, "--runs", "2", "--kinds", "error", "--start", "2026-11-20T12:30:00+00:00")
        check_history(conn, settings)
        notes = pattern_notifications(seen)
    assert len(notes) == 2
    rows = [i for i in ImprovementStore(conn).list(limit=None) if i.pattern_id == PATTERN]
    assert len(rows) == 1
    assert "Open proposal" in notes[1].body and rows[0].id in notes[1].body
    conn.close()


def test_a_notification_delivered_nowhere_is_told_at_the_next_failure(home, tmp_path, monkeypatch):
    """An inbox that cannot be written does not spend the pattern's cooldown."""
    (home / "config.toml").write_text("[self_heal]\ncooldown_minutes = 60\n")
    settings, conn = watched(home)
    working = tmp_path / "inbox"
    not_a_folder = tmp_path / "inbox-is-a-file"
    not_a_folder.write_text("")
    monkeypatch.setenv("INBOX_PATH", str(not_a_folder))
    with collecting(block_auto_analysis=False) as seen:
        write_runs(settings.db_path, "--runs", "8", "--kinds", "error,ok", "--start", "2026-11-20T10:00:00+00:00")
        check_history(conn, settings)
        tried = len(pattern_notifications(seen))
        assert tried >= 1 and not_a_folder.read_text() == ""  # tried (each failed run again), refused
        monkeypatch.setenv("INBOX_PATH", str(working))
        # 30 minutes later (run time), within the cooldown: told now, as nothing was told before
        write_runs(settings.db_path, "--runs", "2", "--kinds", "error", "--start", "2026-11-20T10:30:00+00:00")
        check_history(conn, settings)
        assert len(pattern_notifications(seen)) == tried + 1
    assert len([e for e in inbox_entries(tmp_path) if "auto-analysis" in e.tags]) == 1
    conn.close()


def test_failed_runs_without_tool_errors_are_left_alone(home):
    settings, conn = watched(home)
    write_runs(settings.db_path, "--runs", "6", "--kinds", "update,direct")
    with collecting(block_auto_analysis=False) as seen:
        assert len(check_history(conn, settings).failed_runs) == 6
    assert ImprovementStore(conn).list(limit=None) == []
    assert seen.of("notify") == []
    conn.close()


def test_a_run_is_judged_on_the_failures_up_to_its_end_not_on_later_runs(home):
    """Five failing runs seen at once (the daemon catching up): the first run's window ends at
    that run, so the pattern reaches min_occurrences (3) at the third run and says 3, not 5."""
    settings, conn = watched(home)
    write_runs(settings.db_path, "--runs", "5", "--kinds", "error", "--start", "2026-11-20T10:00:00+00:00")
    with collecting(block_auto_analysis=False) as seen:
        failed = check_history(conn, settings).failed_runs
        notes = pattern_notifications(seen)
    assert len(failed) == 5 and len(notes) == 1
    assert "3 occurrence(s) in 3 run(s)" in notes[0].body
    ends = dict(conn.execute("SELECT id, completed_at FROM runs"))
    third = sorted(failed, key=ends.get)[2]
    assert f"Run {third} " in notes[0].body
    conn.close()


def test_a_run_without_completed_at_ends_when_it_failed():
    from selfheal_plugin.hooks.auto_analysis import run_end

    failed = ["2026-11-20T10:00:05Z", "2026-11-20T10:00:09+00:00", "junk"]
    run = {"id": "r", "started_at": "2026-11-20T10:00:00Z"}
    assert run_end(run, failed).isoformat() == "2026-11-20T10:00:09+00:00"
    assert run_end({**run, "completed_at": "2026-11-20T10:00:10Z"}, failed).isoformat() == "2026-11-20T10:00:10+00:00"
    assert run_end(run).isoformat() == "2026-11-20T10:00:00+00:00"


def test_auto_analysis_says_a_fix_in_force_is_there_not_another_fix(binks_home):
    """Auto-analysis picks a pattern's fix by the service's one rule: a verified fix that
    stands is the answer (no new proposal), said as the inbox's summary says it."""
    from datetime import datetime, timedelta, timezone

    from selfheal_plugin.history.times import format_timestamp

    from .lifecycle_data import K8S, add_improvement, rate_runs, timeout_change, write_runs

    now = datetime.now(timezone.utc)
    db = binks_home / "conversations.db"
    write_runs(db, rate_runs(now - timedelta(days=6), now - timedelta(hours=1), 60, 0.3))
    fixed = add_improvement(db, [timeout_change(40_000)], status="verified", description="Raise the timeout to 40 s",
                            applied_at=format_timestamp(now - timedelta(minutes=30)))
    conn = connect(db)
    run = dict(conn.execute("SELECT * FROM runs WHERE status = 'failed' ORDER BY started_at DESC LIMIT 1").fetchone())
    conn.close()
    settings = load_settings(binks_home)
    from selfheal_plugin.plugins import manager as plugins

    plugins.load_plugins()
    analyse_failed_run = plugins.pm.get_plugin("selfheal.hooks.auto_analysis").analyse_failed_run
    with collecting() as seen:
        (outcome,) = analyse_failed_run(run, settings)
    assert (outcome["improvement_id"], outcome["created"]) == (fixed.id, False)
    (note,) = [n for n in seen.of("notify") if n.title == f"Recurring failure timeout:{K8S}"]
    assert f"Already fixed: {fixed.id} verified (Raise the timeout to 40 s)" in note.body, note.body
    assert "Suggested fix" not in note.body and "Next:" not in note.body
    assert [i.id for i in ImprovementStore(connect(db)).list(limit=None)] == [fixed.id]
    assert f"timeout:{K8S}" in note.body
