"""Inbox notifications: inbox-mcp's exact file format, the lifecycle hooks that write them,
and appends from several processes at once."""
from __future__ import annotations

import multiprocessing
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.history.improvements import Improvement
from selfheal_plugin.plugins.inbox import append_notification, format_entry, parse_inbox
from selfheal_plugin.analysis.patterns import Pattern
from selfheal_plugin.plugins.manager import Notification
from selfheal_plugin.history.settings import load_settings

WHEN = datetime(2026, 1, 30, 2, 9, 3).astimezone()  # a local time


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugins.reset()
    yield
    plugins.reset()


def test_entry_header_and_priorities():
    cases = {"urgent": " **[URGENT]**", "high": " *[HIGH]*", "normal": "", "low": " [LOW]"}
    for priority, mark in cases.items():
        n = Notification(title="t", body="Detected 4 failure pattern(s).", tags=["self-heal", "patterns"],
                         priority=priority)
        assert format_entry(n, WHEN) == (f"## 2026-01-30 02:09:03 [self-heal] #self-heal #patterns{mark}\n\n"
                                         "Detected 4 failure pattern(s).")


def test_day_file_is_byte_compatible_with_inbox_mcp(tmp_path):
    first = Notification(title="a", body="Detected 4 failure pattern(s). View details: agent self-heal improvements",
                         tags=["self-heal", "patterns"], priority="high")
    second = Notification(title="b", body="Applied improvement imp-123:\nDescription: d\n\nMonitoring for 7 days.",
                          tags=["improvement", "applied"])
    inbox = tmp_path / "inbox"
    path = append_notification(first, inbox, WHEN)
    assert append_notification(second, inbox, WHEN + timedelta(seconds=5)) == path
    assert path == inbox / "2026-01-30.md"
    assert list(inbox.iterdir()) == [path]  # the lock lives under BINKS_HOME, not in the inbox
    assert (tmp_path / "binks" / "selfheal" / "locks" / "inbox.lock").exists()
    assert path.read_bytes() == (
        b"# Inbox - 2026-01-30\n\n"
        b"## 2026-01-30 02:09:03 [self-heal] #self-heal #patterns *[HIGH]*\n\n"
        b"Detected 4 failure pattern(s). View details: agent self-heal improvements\n"
        b"\n---\n\n"
        b"## 2026-01-30 02:09:08 [self-heal] #improvement #applied\n\n"
        b"Applied improvement imp-123:\nDescription: d\n\nMonitoring for 7 days.\n")
    entries = parse_inbox(path.read_text())
    assert [(e.timestamp, e.source, e.tags, e.priority) for e in entries] == [
        ("2026-01-30 02:09:03", "self-heal", ["self-heal", "patterns"], "high"),
        ("2026-01-30 02:09:08", "self-heal", ["improvement", "applied"], "normal")]
    assert entries[1].body == second.body


def test_day_follows_local_time(tmp_path, monkeypatch):
    monkeypatch.setenv("TZ", "Pacific/Auckland")
    import time
    time.tzset()
    try:
        utc = datetime(2026, 1, 30, 20, 0, 0, tzinfo=timezone.utc)  # already Jan 31 in Auckland
        path = append_notification(Notification(title="t", body="b"), tmp_path, utc)
        assert path.name == "2026-01-31.md"
        assert path.read_text().startswith("# Inbox - 2026-01-31\n\n## 2026-01-31 09:00:00 [self-heal]")
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_appends_after_other_programs_entries(tmp_path):
    day = tmp_path / "2026-01-30.md"
    day.write_text("# Inbox - 2026-01-30\n\n## 2026-01-30 01:00:00 [monitor] #disk [LOW]\n\nDisk at 80%\n")
    append_notification(Notification(title="t", body="mine", tags=["x"]), tmp_path, WHEN)
    entries = parse_inbox(day.read_text())
    assert [(e.source, e.priority, e.body) for e in entries] == [("monitor", "low", "Disk at 80%"),
                                                                 ("self-heal", "normal", "mine")]


def test_a_separator_line_in_a_body_cannot_split_the_entry(tmp_path):
    append_notification(Notification(title="t", body="above\n---\nbelow"), tmp_path, WHEN)
    append_notification(Notification(title="t", body="next"), tmp_path, WHEN)
    entries = parse_inbox((tmp_path / "2026-01-30.md").read_text())
    assert [e.body for e in entries] == ["above\n- - -\nbelow", "next"]


def _writer(inbox: str, home: str, worker: int, count: int) -> None:
    os.environ["INBOX_PATH"] = inbox
    settings = load_settings(home)
    for i in range(count):
        body = f"worker {worker} entry {i}\n" + "x" * 2000 + f"\nend {worker}-{i}"
        plugins.fire("notify", notification=Notification(title=f"{worker}-{i}", body=body, tags=["load"],
                                                          priority="low"), settings=settings)


def test_concurrent_appends_from_processes_lose_nothing(tmp_path):
    inbox = tmp_path / "inbox"
    plugins.load_plugins()  # forked workers inherit the loaded plugins (and each appends on its own)
    ctx = multiprocessing.get_context("fork")
    home = tmp_path / "binks"
    procs = [ctx.Process(target=_writer, args=(str(inbox), str(home), w, 25)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    files = list(inbox.glob("*.md"))
    assert sorted(inbox.iterdir()) == sorted(files)  # only the day files: no lock files among the notes
    texts = "".join(f.read_text() for f in files)
    assert texts.count("# Inbox - ") == len(files)
    entries = [e for f in files for e in parse_inbox(f.read_text())]
    assert len(entries) == 100
    seen = set()
    for e in entries:
        first, filler, last = e.body.split("\n")
        w, i = first.removeprefix("worker ").split(" entry ")
        assert filler == "x" * 2000 and last == f"end {w}-{i}"  # not interleaved
        assert e.tags == ["load"] and e.priority == "low"
        seen.add((int(w), int(i)))
    assert seen == {(w, i) for w in range(4) for i in range(25)}
    assert sorted(p.name for p in (home / "selfheal" / "locks").iterdir()) == [".gitignore", "inbox.lock"]


# ---------------------------------------------------------------- lifecycle → notifications


def _pattern() -> Pattern:
    return Pattern(id="timeout:mcp__k8s__pods", error_type="timeout", tool_name="mcp__k8s__pods", occurrences=5,
                   correlation_score=0.8, confidence=0.9, affected_runs=["r1", "r2"], first_seen="a",
                   last_seen="b", failure_rate=0.1, suggested_fix="Increase the timeout")


def _improvement(**kw) -> Improvement:
    base = dict(id="imp-123", status="applied", description="Increase timeout for kubernetes tools",
                pattern_id="timeout:mcp__k8s__pods", expected_impact="40% reduction in timeout errors",
                changes=[{"kind": "config", "file": "config.toml", "path": ["tools", "mcp__k8s__pods", "timeout_ms"],
                          "op": "set", "value": 90000}], commit_sha="1a2b3c4d5e6f")
    base.update(kw)
    return Improvement(**base)


def _entries(settings) -> list:
    return [e for f in sorted(Path(settings.inbox_dir).glob("*.md")) for e in parse_inbox(f.read_text())]


def test_lifecycle_events_become_inbox_entries(binks_home):
    s = load_settings(binks_home)
    plugins.fire("patterns_detected", patterns=[_pattern()], found=1, settings=s)
    plugins.fire("improvement_applied", improvement=_improvement(), settings=s)
    plugins.fire("improvement_verified", improvement=_improvement(status="verified"), settings=s,
                 verification={"expected_impact": "40% reduction in timeout errors",
                               "actual_impact": "45% reduction (better than expected!)", "recommendation": "keep",
                               "metrics": {"before_success_rate": 0.82, "after_success_rate": 0.94,
                                           "runs_analyzed": 127}})
    plugins.fire("improvement_rolled_back", improvement=_improvement(status="rolled_back", rollback_sha="9f8e7d6"),
                 settings=s)
    pat, applied, verified, rolled = _entries(s)
    assert (pat.tags, pat.priority) == (["self-heal", "patterns"], "high")
    assert pat.body.startswith("Detected 1 failure pattern(s). View details: agent self-heal show PATTERN\n\n"
                               "- timeout:mcp__k8s__pods: 5 occurrence(s)")
    assert (applied.tags, applied.priority) == (["improvement", "applied"], "normal")
    assert applied.body == (
        "Applied improvement imp-123:\nDescription: Increase timeout for kubernetes tools\n"
        f"Changes: Updated {binks_home / 'config.toml'} tools.mcp__k8s__pods.timeout_ms = 90000\n"
        "Commit: 1a2b3c4\n\nMonitoring for 7 days to verify impact.")
    assert verified.body == (
        "Verified improvement imp-123:\nExpected: 40% reduction in timeout errors\n"
        "Actual: 45% reduction (better than expected!)\nRecommendation: Keep\n\nMetrics:\n"
        "- Success rate before: 82%\n- Success rate after: 94%\n- Runs analyzed: 127")
    assert (rolled.tags, rolled.priority) == (["improvement", "rolled-back"], "high")
    assert rolled.body.startswith("Rolled back improvement imp-123:") and "Revert commit: 9f8e7d6" in rolled.body


def test_changes_of_several_lines_keep_their_line_breaks(binks_home):
    """A note and the keys updated (``apply NOTE``, a forced promote) are lines of their own,
    each escaped, not one line with a literal ``\\n``."""
    s = load_settings(binks_home)
    made = "applied by <b>agent</b> self-heal demo\nUpdated /h/config.toml tools.t.timeout_ms: (absent) → 90000"
    plugins.fire("improvement_applied", improvement=_improvement(changes_made=made), settings=s)
    (entry,) = _entries(s)
    assert ("Changes:\n- applied by &lt;b&gt;agent&lt;/b&gt; self-heal demo\n"
            "- Updated /h/config.toml tools.t.timeout_ms: (absent) → 90000\nCommit: 1a2b3c4") in entry.body
    assert "\\n" not in entry.body


def test_a_detected_pattern_whose_fix_is_applied_is_said_fixed_not_suggested(binks_home):
    from selfheal_plugin.service import SelfHeal

    from .lifecycle_data import add_improvement, rate_runs, timeout_change, write_runs

    now = datetime.now(timezone.utc)
    db = binks_home / "conversations.db"
    write_runs(db, rate_runs(now - timedelta(days=6), now - timedelta(hours=1), 60, 0.3))
    fixed = add_improvement(db, [timeout_change(90_000)], status="applied", description="Raise the <b>timeout</b>")
    with SelfHeal(binks_home) as sh:
        found = sh.detect(notify=True)
    (p,) = found["patterns"]
    assert (p["improvement_id"], p["improvement_status"]) == (fixed.id, "applied")
    (entry,) = _entries(sh.settings)
    assert f"Already fixed: {fixed.id} applied (Raise the &lt;b&gt;timeout&lt;/b&gt;)" in entry.body, entry.body
    assert "Fix:" not in entry.body


def test_a_detected_pattern_whose_fix_is_withheld_says_why(binks_home):
    """A rejection that stands withholds the fix: the summary says so, as detect does, not
    nothing; the reason quotes the pattern id (the history's text), escaped."""
    from selfheal_plugin.service import SelfHeal

    from .lifecycle_data import add_improvement, rate_runs, timeout_change, write_runs

    tool = "pods<b>*x*</b>"
    now = datetime.now(timezone.utc)
    db = binks_home / "conversations.db"
    write_runs(db, rate_runs(now - timedelta(days=6), now - timedelta(hours=1), 60, 0.3, tool=tool))
    rejected = add_improvement(db, [timeout_change(90_000, tool)], pattern_id=f"timeout:{tool}", status="rejected")
    with SelfHeal(binks_home) as sh:
        found = sh.detect(notify=True)
    (p,) = found["patterns"]
    assert p["suggested_fix"] is None and p["no_fix_reason"].startswith(f"{rejected.id} for timeout:{tool} was rejected")
    (entry,) = _entries(sh.settings)
    escaped = "timeout:pods&lt;b&gt;\\*x\\*&lt;/b&gt;"
    assert (f". Fix: none — {rejected.id} for {escaped} was rejected; 0 new failure(s) since, 3 needed before "
            "proposing again") in entry.body, entry.body
    assert "<b>" not in entry.body


def test_rollback_recommendation_is_urgent(binks_home):
    s = load_settings(binks_home)
    plugins.fire("improvement_verified", improvement=_improvement(), settings=s,
                 verification={"recommendation": "rollback", "metrics": {}})
    (entry,) = _entries(s)
    assert entry.priority == "urgent" and "Recommendation: Rollback" in entry.body
    # a verdict of rollback is a verification's result, not a verified improvement
    assert entry.body.startswith("Verification of imp-123:\n") and "Verified" not in entry.body
    assert entry.tags == ["improvement", "verification"]


def test_an_automatic_rollback_is_one_urgent_entry(binks_home):
    """The daemon's verification says rollback and it rolls back at once: the verification
    leaves the inbox to the rollback, whose one entry says what happened and why."""
    s = load_settings(binks_home)
    metrics = {"before_success_rate": 0.85, "after_success_rate": 0.2, "p_value": 0.0, "recommendation": "rollback"}
    plugins.fire("improvement_verified", improvement=_improvement(), settings=s,
                 verification={"recommendation": "rollback", "metrics": metrics, "rollback_follows": True})
    rolled = _improvement(status="rolled_back", rollback_sha="9f8e7d6", metrics={**metrics,
                          "rolled_back_automatically": True},
                          actual_impact="657% increase in timeout errors (the opposite of the expected improvement)")
    plugins.fire("improvement_rolled_back", improvement=rolled, settings=s)
    (entry,) = _entries(s)
    assert entry.priority == "urgent" and entry.tags == ["improvement", "rolled-back", "automatic"]
    assert entry.body.startswith("Improvement imp-123 made things significantly worse and was rolled back "
                                 "automatically.\n")
    assert "Success rate before: 85%, after: 20% (p < 0.001)" in entry.body and "p = 0.0" not in entry.body
    assert "Revert commit: 9f8e7d6" in entry.body


def test_notify_flags_switch_notifications_off(binks_home):
    (binks_home / "config.toml").write_text(
        "[self_heal]\nnotify_patterns = false\nnotify_applied = false\nnotify_verified = false\n"
        "notify_rolled_back = false\n")
    s = load_settings(binks_home)
    plugins.fire("patterns_detected", patterns=[_pattern()], found=1, settings=s)
    plugins.fire("improvement_applied", improvement=_improvement(), settings=s)
    plugins.fire("improvement_verified", improvement=_improvement(), verification={}, settings=s)
    plugins.fire("improvement_rolled_back", improvement=_improvement(), settings=s)
    assert _entries(s) == []


def test_another_plugin_adds_a_sink(binks_home):
    s = load_settings(binks_home)

    class Sink:
        def __init__(self):
            self.got = []

        @plugins.hookspecs.hookimpl
        def notify(self, notification, settings):
            self.got.append((notification.priority, notification.tags))

    sink = Sink()
    plugins.load_plugins()
    plugins.register(sink, "sink")
    try:
        plugins.fire("improvement_applied", improvement=_improvement(), settings=s)
    finally:
        plugins.unregister(sink)
    assert sink.got == [("normal", ["improvement", "applied"])]
    assert len(_entries(s)) == 1  # the inbox got it too
