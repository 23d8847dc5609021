"""The daemon's periodic work with a simulated clock: verification when the window ends,
automatic rollback of a harmful change (a revert commit), auto-apply rules, the lock."""
from __future__ import annotations

import subprocess
from datetime import timedelta

import pytest

from selfheal_plugin.history.clock import SimulatedClock
from selfheal_plugin.daemon.loop import Daemon, DaemonBusyError, lock_path, parse_interval
from selfheal_plugin.errors import UsageError
from selfheal_plugin.testbed.generator import generate_history
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.lifecycle.apply import apply_improvement
from selfheal_plugin.lifecycle.proposals import propose_improvement
from selfheal_plugin.runtime.recorder import RunRecorder
from selfheal_plugin.history.settings import load_settings
from selfheal_plugin.history.times import parse_timestamp

from .conftest import NOW
from .watchsupport import collecting

T0 = NOW
PATTERN = "timeout:mcp__kubernetes__pods_list"
TOOL = "mcp__kubernetes__pods_list"


def git(home, *args) -> str:
    return subprocess.run(["git", "-C", str(home), *args], capture_output=True, text=True, check=True).stdout


def write_week_after(db, start, runs: int, fail_every: int | None, fail_tool: str = TOOL) -> None:
    """``runs`` runs over the six days after ``start`` (the runtime's format, simulated
    clock). With ``fail_every`` set, all runs but every ``fail_every``-th fail with a
    timeout of the tool (a harmful change; ``fail_tool``: an error of that tool after a
    successful call of the pods tool instead); with None, every run completes."""
    clock = SimulatedClock(start + timedelta(minutes=1))
    gap = timedelta(days=6) / runs
    with RunRecorder(db, clock=clock, model="qwen3:14b") as rec:
        for i in range(runs):
            run = rec.start_run("k8s-ops", "list the pods")
            fails = fail_every is not None and i % fail_every != 0
            clock.advance(2)
            if fails and fail_tool != TOOL:
                run.record_tool_call(TOOL, {"namespace": "default"}, "3 pods", 18000)
                run.record_tool_call(fail_tool, {"path": "/srv/x"}, "Permission denied: /srv/x", 12, is_error=True)
                run.finish("failed", "permission denied")
            elif fails:
                run.record_tool_call(TOOL, {"namespace": "default"}, f"Tool {TOOL} timed out after 100s", 100003,
                                     is_error=True)
                run.finish("failed", "timed out")
            else:
                run.record_tool_call(TOOL, {"namespace": "default"}, "3 pods", 18000)
                run.finish("completed")
            clock.advance(gap - timedelta(seconds=2))


@pytest.fixture
def applied(binks_home):
    """A week of history before T0, and the timeout fix proposed and applied at T0."""
    db = binks_home / "conversations.db"
    generate_history(db, seed=7, runs=300, end=T0)
    settings = load_settings(binks_home)
    conn = connect(db)
    with collecting():
        imp = propose_improvement(conn, settings, PATTERN, now=T0)
        result = apply_improvement(conn, settings, imp.id, now=T0)
    conn.close()
    assert result["commit_sha"]
    return settings, imp.id, result["commit_sha"]


def test_a_harmful_change_is_verified_when_its_window_ends_and_rolled_back(applied):
    settings, imp_id, commit = applied
    write_week_after(settings.db_path, T0, 120, fail_every=5)  # 80% of runs fail after the apply
    clock = SimulatedClock(T0 + timedelta(days=3))
    daemon = Daemon(settings, clock=clock)
    try:
        with collecting() as seen:
            early = daemon.tick()
            assert early.verified == [] and early.rolled_back == []
            assert ImprovementStore(daemon.conn).get(imp_id).status == "applied"
            clock.set(T0 + timedelta(days=7, hours=1))  # the measurement window has ended
            report = daemon.tick()
        imp = ImprovementStore(daemon.conn).get(imp_id)
    finally:
        daemon.close()
    assert report.verified == [{"improvement_id": imp_id, "recommendation": "rollback",
                                "actual_impact": report.verified[0]["actual_impact"]}]
    assert report.rolled_back[0]["improvement_id"] == imp_id and report.rolled_back[0]["method"] == "revert"
    assert "1 verification(s) (1 rollback), 1 rolled back" in report.summary() and "verified" not in report.summary()
    assert imp.status == "rolled_back" and imp.rollback_sha == report.rolled_back[0]["rollback_sha"]
    assert parse_timestamp(imp.rolled_back_at) == T0 + timedelta(days=7, hours=1)
    head = git(settings.home, "log", "-1", "--format=%H%n%B")
    assert head.startswith(imp.rollback_sha)
    assert f"roll back {imp_id}" in head and f"Self-Heal-Improvement: {imp_id}" in head
    assert "Automatic rollback by the self-heal daemon" in head
    assert git(settings.home, "status", "--porcelain") == ""
    assert "timeout_ms" not in (settings.config_path.read_text() if settings.config_path.exists() else "")
    # one entry for the verdict and the rollback, not a "Verified" one, a rolled-back one and an urgent one
    (note,) = [n for n in seen.of("notify") if "improvement" in n.tags]
    assert (note.title, note.priority) == (f"Automatically rolled back {imp_id}", "urgent")
    assert imp.rollback_sha[:7] in note.body and "(p < 0.001)" in note.body and "Verified" not in note.body


def test_an_automatic_rollback_finished_by_crash_recovery_is_still_automatic(applied, monkeypatch):
    """Killed after its revert commit, the daemon's rollback is finished by the next opener:
    the row still says automatic, so the inbox still gets the one urgent entry."""
    from selfheal_plugin.lifecycle import apply as apply_mod
    from selfheal_plugin.lifecycle.apply import rollback_improvement
    from selfheal_plugin.lifecycle.recovery import recover

    class Killed(BaseException):
        pass

    def crash_at(step):
        if step == "rollback-after-commit":
            raise Killed(step)

    settings, imp_id, _ = applied
    conn = connect(settings.db_path)
    try:
        monkeypatch.setattr(apply_mod, "crash_point", crash_at)
        with pytest.raises(Killed):
            rollback_improvement(conn, settings, imp_id, reason="automatic", automatic=True)
        monkeypatch.undo()
        with collecting() as seen:
            recover(conn, settings, warn=lambda line: None)
        imp = ImprovementStore(conn).get(imp_id)
    finally:
        conn.close()
    assert imp.status == "rolled_back" and imp.metrics["rolled_back_automatically"] is True
    (note,) = [n for n in seen.of("notify") if "improvement" in n.tags]
    assert (note.title, note.priority) == (f"Automatically rolled back {imp_id}", "urgent")


def test_a_helpful_change_is_kept(applied):
    settings, imp_id, commit = applied
    write_week_after(settings.db_path, T0, 120, fail_every=None)
    daemon = Daemon(settings, clock=SimulatedClock(T0 + timedelta(days=7, minutes=5)))
    try:
        with collecting():
            report = daemon.tick()
        imp = ImprovementStore(daemon.conn).get(imp_id)
    finally:
        daemon.close()
    assert [v["recommendation"] for v in report.verified] == ["keep"]
    assert report.rolled_back == []
    assert imp.status == "verified"
    assert git(settings.home, "log", "-1", "--format=%H").strip() == commit


def test_too_few_runs_extends_monitoring_by_a_window(applied):
    settings, imp_id, _ = applied
    write_week_after(settings.db_path, T0, 10, fail_every=None)  # under min_sample_size
    now = T0 + timedelta(days=7, minutes=5)
    daemon = Daemon(settings, clock=SimulatedClock(now))
    try:
        with collecting():
            report = daemon.tick()
            again = daemon.tick()
        imp = ImprovementStore(daemon.conn).get(imp_id)
    finally:
        daemon.close()
    assert [v["recommendation"] for v in report.verified] == ["extend"]
    # the tick's line counts a verification by its verdict: an extend is not "verified"
    assert report.summary().endswith(" pattern(s), 1 verification(s) (1 extend)"), report.summary()
    assert again.verified == []  # not due again until the next window ends
    assert imp.status == "applied"
    assert parse_timestamp(imp.verification_scheduled) == now + timedelta(days=settings.measurement_window_days)


@pytest.fixture
def fresh(binks_home):
    generate_history(binks_home / "conversations.db", seed=7, runs=300, end=T0)
    return binks_home


def applied_rows(settings) -> list:
    conn = connect(settings.db_path)
    try:
        return [i for i in ImprovementStore(conn).list(limit=None) if i.status == "applied"]
    finally:
        conn.close()


def test_auto_apply_applies_only_low_risk_confident_safe_proposals(fresh):
    (fresh / "config.toml").write_text("[self_heal]\nauto_apply_enabled = true\n")
    settings = load_settings(fresh)
    daemon = Daemon(settings, auto_detect=True, clock=SimulatedClock(T0))
    try:
        with collecting():
            report = daemon.tick()
        rows = ImprovementStore(daemon.conn).list(limit=None)
    finally:
        daemon.close()
    assert len(report.proposed) == len(report.patterns) >= 3
    applied = {a["improvement_id"] for a in report.applied}
    assert applied
    by_id = {r.id: r for r in rows}
    for imp_id in applied:
        imp = by_id[imp_id]
        assert imp.status == "applied" and imp.commit_sha
        assert imp.risk_level == "low" and imp.confidence >= settings.auto_apply_confidence_threshold
        assert imp.test_result["recommendation"] == "safe_to_apply"
    for imp in rows:
        if imp.id not in applied:
            assert imp.status in ("proposed", "tested")
            assert (imp.risk_level != "low" or imp.confidence < settings.auto_apply_confidence_threshold
                    or (imp.test_result or {}).get("recommendation") != "safe_to_apply")
    assert any(r.risk_level != "low" for r in rows)  # there was something to refuse
    trailers = git(fresh, "log", "--format=%(trailers:key=Self-Heal-Improvement,valueonly)").split()
    assert sorted(trailers) == sorted(applied)  # one commit per applied improvement, nothing else


@pytest.mark.parametrize("config, auto_apply", [
    ("[self_heal]\nauto_apply_enabled = true\n", False),  # --no-auto-apply
    ("", True),  # auto_apply_enabled defaults to false
])
def test_no_auto_apply_without_the_setting_or_with_the_flag(fresh, config, auto_apply):
    (fresh / "config.toml").write_text(config)
    settings = load_settings(fresh)
    daemon = Daemon(settings, auto_detect=True, auto_apply=auto_apply, clock=SimulatedClock(T0))
    try:
        with collecting():
            report = daemon.tick()
    finally:
        daemon.close()
    assert report.proposed and report.applied == [] and report.tested == []
    assert applied_rows(settings) == []


def test_periodic_detection_notifies_each_pattern_once_per_cooldown(fresh):
    settings = load_settings(fresh)
    clock = SimulatedClock(T0)
    daemon = Daemon(settings, clock=clock)
    try:
        with collecting() as seen:
            first = daemon.tick()
            clock.advance(timedelta(minutes=30))
            second = daemon.tick()
            clock.advance(timedelta(minutes=31))
            third = daemon.tick()
            detected = seen.of("notify")
    finally:
        daemon.close()
    assert first.notified_patterns == first.patterns and first.patterns
    assert second.notified_patterns == []
    assert third.notified_patterns == third.patterns
    assert sum(1 for n in detected if n.title.startswith("Detected")) == 2


def test_one_daemon_per_home(fresh):
    settings = load_settings(fresh)
    first, second = Daemon(settings), Daemon(settings)
    first.acquire()
    try:
        with pytest.raises(DaemonBusyError, match="already running"):
            second.acquire()
    finally:
        first.release()
    second.acquire()
    second.release()
    assert not lock_path(settings).with_suffix(".pid").exists()


@pytest.mark.parametrize("text, seconds", [("1h", 3600), ("30m", 1800), ("90s", 90), ("90", 90), ("1.5h", 5400),
                                           ("1d", 86400), (2, 2.0)])
def test_parse_interval(text, seconds):
    assert parse_interval(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "-1h", "1x", "h", "0m"])
def test_parse_interval_rejects(text):
    with pytest.raises(UsageError, match="invalid interval"):
        parse_interval(text)


def test_config_edits_reach_a_running_daemon_and_a_broken_config_keeps_the_old(fresh, caplog):
    settings = load_settings(fresh)
    daemon = Daemon(settings, auto_detect=True, clock=SimulatedClock(T0), reload_config=True)
    try:
        with collecting():
            assert daemon.tick().applied == []
            (fresh / "config.toml").write_text("[self_heal]\nauto_apply_enabled = true\n")
            assert daemon.tick().applied
            (fresh / "config.toml").write_text("[self_heal\nbroken")
            report = daemon.tick()
    finally:
        daemon.close()
    assert daemon.settings.auto_apply_enabled is True and report.errors == []
    assert "keeping the current settings" in caplog.text


# ------------------------------------------------------------------ no apply/rollback cycle


def test_auto_apply_tests_again_a_stored_verdict_without_the_historys_baseline(fresh):
    """A "safe_to_apply" stored before the baseline came from the history alone (a strategy's
    own simulate could give baseline 0.50 where the window's is higher) is not taken: the
    change is tested again, and a change the history says would hurt is not applied."""
    from selfheal_plugin.history.improvements import Improvement
    from selfheal_plugin.lifecycle.autopilot import AutopilotReport, auto_apply

    (fresh / "config.toml").write_text("[self_heal]\nauto_apply_enabled = true\n")
    settings = load_settings(fresh)
    conn = connect(settings.db_path)
    made_up = {"recommendation": "safe_to_apply", "baseline_success_rate": 0.5, "simulated_success_rate": 0.99,
               "model_source": "strategy claims"}
    imp = Improvement(id="imp-claimed", status="tested", description=f"Lower the timeout of {TOOL}",
                      pattern_id=PATTERN, error_type="timeout", tool_name=TOOL, strategy="timeout", risk_level="low",
                      confidence=0.99, changes=[{"kind": "config", "file": "config.toml", "op": "set",
                                                 "path": ["tools", TOOL, "timeout_ms"], "value": 1000}],
                      test_result=made_up)
    ImprovementStore(conn).insert(imp)
    report = AutopilotReport()
    try:
        with collecting():
            auto_apply(conn, settings, T0, report)
        row = ImprovementStore(conn).get(imp.id)
    finally:
        conn.close()
    assert report.tested == [{"improvement_id": imp.id, "recommendation": "reject"}] and report.applied == []
    assert row.status == "tested" and row.test_result["baseline_source"] == "history"
    assert row.test_result["baseline_success_rate"] > 0.5
    assert applied_rows(settings) == []


def test_a_rolled_back_change_is_not_auto_applied_again(fresh):
    # a lookback that still holds the week before the apply: after the rollback, detection
    # finds the same pattern in the same history and proposes the same fix again
    (fresh / "config.toml").write_text('[self_heal]\nauto_apply_enabled = true\nlookback = "-21d"\n')
    settings = load_settings(fresh)
    clock = SimulatedClock(T0)
    daemon = Daemon(settings, auto_detect=True, clock=clock)
    try:
        with collecting() as seen:
            first = daemon.tick()
            store = ImprovementStore(daemon.conn)
            timeout_fix = next(a["improvement_id"] for a in first.applied
                               if store.get(a["improvement_id"]).pattern_id == PATTERN)
            write_week_after(settings.db_path, T0, 120, fail_every=5, fail_tool="read_file")  # things got worse
            clock.set(T0 + timedelta(days=7, hours=1))
            second = daemon.tick()
            assert timeout_fix in [r["improvement_id"] for r in second.rolled_back]
            for hours in (2, 3, 4):  # the following ticks: the pattern is back, and so is a proposal
                clock.set(T0 + timedelta(days=7, hours=hours))
                later = daemon.tick()
                assert later.applied == [] and later.rolled_back == [], later
            rows = [i for i in store.list(limit=None) if i.pattern_id == PATTERN and i.id != timeout_fix]
    finally:
        daemon.close()
    assert len(rows) == 1 and rows[0].status in ("proposed", "tested")
    again = rows[0]
    assert [c["path"] for c in again.changes] == [["tools", TOOL, "timeout_ms"]]  # the same fix, proposed again
    assert again.evidence["same_change_undone"]["improvement_id"] == timeout_fix
    assert "was rolled back on" in again.evidence["same_change_undone"]["note"]
    assert any(s["improvement_id"] == again.id and timeout_fix in s["reason"] for s in later.skipped)
    trailers = git(fresh, "log", "--format=%(trailers:key=Self-Heal-Improvement,valueonly)").split()
    assert trailers.count(timeout_fix) == 2 and again.id not in trailers  # applied and rolled back, nothing more
    assert sum(1 for n in seen.of("notify") if n.title == f"Automatically rolled back {timeout_fix}") == 1


def test_the_reapply_cooldown_ends_after_30_days(fresh):
    from selfheal_plugin.lifecycle.cooldown import REAPPLY_COOLDOWN_DAYS, undone_same_change
    from selfheal_plugin.lifecycle.apply import rollback_improvement

    settings = load_settings(fresh)
    conn = connect(settings.db_path)
    try:
        with collecting():
            imp = propose_improvement(conn, settings, PATTERN, now=T0)
            apply_improvement(conn, settings, imp.id, now=T0)
            rollback_improvement(conn, settings, imp.id, now=T0 + timedelta(days=1))
        other_value = [dict(imp.changes[0], value=imp.changes[0]["value"] + 5000)]
        assert REAPPLY_COOLDOWN_DAYS == 30
        assert undone_same_change(conn, PATTERN, other_value, T0 + timedelta(days=30, hours=23)).id == imp.id
        assert undone_same_change(conn, PATTERN, other_value, T0 + timedelta(days=31, minutes=1)) is None
        other_key = [dict(imp.changes[0], path=["tools", TOOL, "retry_attempts"], value=2)]
        assert undone_same_change(conn, PATTERN, other_key, T0 + timedelta(days=2)) is None
        assert undone_same_change(conn, "timeout:other", imp.changes, T0 + timedelta(days=2)) is None
    finally:
        conn.close()


# ------------------------------------------------------------------ a rollback that fails


def test_a_failed_automatic_rollback_is_notified_once_and_retried(applied):
    settings, imp_id, _ = applied
    write_week_after(settings.db_path, T0, 120, fail_every=5)
    cfg = settings.config_path
    git(settings.home, "-c", "user.name=U", "-c", "user.email=u@x", "commit", "-q", "--allow-empty", "-m", "x")
    cfg.write_text(cfg.read_text().replace("timeout_ms = ", "timeout_ms = 1"))  # the user's own later value
    git(settings.home, "-c", "user.name=U", "-c", "user.email=u@x", "commit", "-q", "-am", "mine")
    clock = SimulatedClock(T0 + timedelta(days=7, hours=1))
    daemon = Daemon(settings, clock=clock, interval=3600)
    try:
        with collecting() as seen:
            reports = []
            for _ in range(3):
                reports.append(daemon.tick())
                clock.advance(timedelta(hours=1))
            failed = [n for n in seen.of("notify") if n.title == f"Automatic rollback of {imp_id} failed"]
            assert len(failed) == 1 and failed[0].priority == "urgent"
            assert all(r.rolled_back == [] and any(imp_id in e for e in r.errors) for r in reports)
            imp = ImprovementStore(daemon.conn).get(imp_id)
            assert imp.status == "applied"
            assert parse_timestamp(imp.verification_scheduled) == clock() - timedelta(hours=1) + timedelta(hours=1)
            # the user puts selfheal's value back: the next tick's rollback goes through
            cfg.write_text(cfg.read_text().replace("timeout_ms = 1", "timeout_ms = "))
            git(settings.home, "-c", "user.name=U", "-c", "user.email=u@x", "commit", "-q", "-am", "undo mine")
            done = daemon.tick()
            again = daemon.tick()
    finally:
        daemon.close()
    assert [r["improvement_id"] for r in done.rolled_back] == [imp_id] and again.verified == []
    assert sum(1 for n in seen.of("notify") if n.title == f"Automatic rollback of {imp_id} failed") == 1


# ------------------------------------------------------------------ extensions are capped


def test_monitoring_is_extended_at_most_three_times_then_concluded(applied):
    from selfheal_plugin.lifecycle.autopilot import MAX_EXTENSIONS

    settings, imp_id, commit = applied
    write_week_after(settings.db_path, T0, 10, fail_every=None)  # never enough runs for a verdict
    clock = SimulatedClock(T0)
    daemon = Daemon(settings, clock=clock)
    try:
        with collecting() as seen:
            verdicts = []
            for week in range(1, MAX_EXTENSIONS + 3):
                clock.set(T0 + timedelta(days=7 * week, minutes=5 * week))
                report = daemon.tick()
                verdicts.append(([v["recommendation"] for v in report.verified], len(report.concluded)))
            imp = ImprovementStore(daemon.conn).get(imp_id)
    finally:
        daemon.close()
    assert MAX_EXTENSIONS == 3
    assert verdicts == [(["extend"], 0)] * 3 + [(["extend"], 1), ([], 0)]  # then nothing is due any more
    assert (imp.status, imp.verification_scheduled) == ("applied", None)
    assert git(settings.home, "log", "-1", "--format=%H").strip() == commit  # still applied
    notes = [n for n in seen.of("notify") if n.title == f"No clear effect of {imp_id} after 3 extensions"]
    assert len(notes) == 1 and f"agent self-heal rollback {imp_id}" in notes[0].body


def test_the_daemons_own_notifications_escape_the_verdict_that_quotes_the_history(applied, monkeypatch):
    """The inconclusive and rollback-failed notes quote ``actual_impact``, whose error type
    is the history's text: a newline in it must not forge a heading, HTML stays text."""
    from selfheal_plugin.errors import LifecycleError
    from selfheal_plugin.history.connection import set_state, write_transaction
    from selfheal_plugin.lifecycle import autopilot

    settings, imp_id, _ = applied
    hostile = "timeout\n# Forged heading <img src=x>"
    verdict = {"actual_impact": f"{hostile} error rate 40% -> 41%", "recommendation": "extend"}

    def refuse(*args, **kwargs):
        raise LifecycleError("rollback failed on tool\n# Also forged <b>")

    monkeypatch.setattr(autopilot, "rollback_improvement", refuse)
    conn = connect(settings.db_path)
    try:
        with collecting() as seen:
            with write_transaction(conn):
                set_state(conn, autopilot.EXTENSIONS_KEY + imp_id, str(autopilot.MAX_EXTENSIONS))
            autopilot._extend_or_conclude(conn, settings, imp_id, verdict, T0, autopilot.AutopilotReport())
            autopilot._auto_rollback(conn, settings, imp_id, dict(verdict, recommendation="rollback"), T0,
                                     autopilot.AutopilotReport(), 60)
    finally:
        conn.close()
    notes = seen.of("notify")
    assert [n.title for n in notes] == [f"No clear effect of {imp_id} after 3 extensions",
                                        f"Automatic rollback of {imp_id} failed"]
    for note in notes:
        assert not any(line.lstrip().startswith("#") for line in note.body.splitlines()), note.body
        assert "<img" not in note.body and "&lt;img src=x&gt;" in note.body
    assert "<b>" not in notes[1].body and "&lt;b&gt;" in notes[1].body


# ------------------------------------------------------------------ stopping mid-tick


def test_a_stop_during_the_index_build_ends_the_tick_after_that_chunk(fresh, monkeypatch):
    from selfheal_plugin.history import errorindex
    from selfheal_plugin.history.connection import get_state

    settings = load_settings(fresh)
    daemon = Daemon(settings, auto_detect=True, clock=SimulatedClock(T0))
    monkeypatch.setattr(errorindex, "CHUNK_IDS", 500)
    real_read = errorindex._read_errors
    chunks = []

    def read_and_stop(conn, failed):
        chunks.append(sorted(failed))
        daemon.stop()  # e.g. SIGTERM arrives while the first chunk is read
        return real_read(conn, failed)

    monkeypatch.setattr(errorindex, "_read_errors", read_and_stop)
    try:
        with collecting():
            report = daemon.tick()
        top = daemon.conn.execute("SELECT max(id) FROM run_events").fetchone()[0]
        mark = int(get_state(daemon.conn, "errors_watermark", "0"))
    finally:
        daemon.close()
    assert report.stopped and report.patterns == [] and report.proposed == [] and report.errors == []
    assert len(chunks) == 1 and mark == 500 < top  # the chunk read is kept; the rest waits for the next start


def test_a_stop_between_patterns_ends_the_tick(fresh):
    from selfheal_plugin import hookimpl
    from selfheal_plugin.plugins import manager as plugins

    settings = load_settings(fresh)
    daemon = Daemon(settings, auto_detect=True, clock=SimulatedClock(T0))

    class StopAfterFirst:
        @hookimpl
        def improvement_proposed(self, improvement, settings):
            daemon.stop()

    stopper = StopAfterFirst()
    try:
        with collecting():
            plugins.register(stopper, "stop-after-first")
            try:
                report = daemon.tick()
            finally:
                plugins.unregister(stopper)
    finally:
        daemon.close()
    assert report.stopped and len(report.patterns) >= 3
    assert len(report.proposed) == 1 and report.verified == []


def test_a_replaced_database_is_reopened(fresh, tmp_path):
    """The runtime recreates its file (another inode): the daemon's next round reads the new
    file, not the deleted one it had open."""
    settings = load_settings(fresh)
    daemon = Daemon(settings, clock=SimulatedClock(T0))
    try:
        assert daemon.tick().patterns
        replacement = tmp_path / "recreated.db"
        connect(replacement, create=True).close()  # the runtime starts over: no runs at all
        replacement.replace(settings.db_path)
        report = daemon.tick()
        assert report.patterns == [] and not report.errors
        assert daemon.conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 0
    finally:
        daemon.close()


def test_the_inbox_counts_every_pattern_and_points_at_a_command_that_shows_them(fresh):
    """A daemon round without --auto-detect proposes nothing, so `improvements` would list
    nothing: the summary's hint is `show PATTERN`, which shows each listed pattern. The
    patterns auto-analysis told within the shared cooldown are counted, not listed."""
    from click.testing import CliRunner

    from selfheal_plugin.cli.main import agent
    from selfheal_plugin.lifecycle.cooldown import claim_notification

    settings = load_settings(fresh)
    daemon = Daemon(settings, clock=SimulatedClock(T0))
    try:
        told = daemon.service.detect()["patterns"][0]["id"]
        assert claim_notification(daemon.conn, told, T0, settings.cooldown_minutes)  # as auto-analysis does
        with collecting() as seen:
            report = daemon.tick()
        (summary,) = [n for n in seen.of("notify") if n.title.startswith("Detected")]
    finally:
        daemon.close()
    found, new = len(report.patterns), len(report.notified_patterns)
    assert found == new + 1 and told not in report.notified_patterns
    assert summary.title == f"Detected {found} failure pattern(s), {new} new to the inbox"
    assert summary.body.startswith(
        f"Detected {found} failure pattern(s), {new} new to the inbox (1 told within the last 60 minutes). "
        "View details: agent self-heal show PATTERN\n")
    assert summary.body.count("\n- ") == new
    shown = CliRunner().invoke(agent, ["self-heal", "show", report.notified_patterns[0], "--home", str(fresh),
                                       "--since", "2000-01-01"], env={"COLUMNS": "200"}, catch_exceptions=False)
    assert shown.exit_code == 0 and f"Pattern {report.notified_patterns[0]}" in shown.output


def test_a_ticks_line_counts_verifications_by_verdict():
    from selfheal_plugin.daemon.loop import TickReport

    report = TickReport(at="2026-11-20T00:00:00Z", patterns=["p"] * 5, rolled_back=[{"improvement_id": "imp-3"}],
                        verified=[{"improvement_id": f"imp-{i}", "recommendation": r}
                                  for i, r in enumerate(["extend", "keep", "rollback", "keep"])])
    assert report.summary() == "5 pattern(s), 4 verification(s) (2 keep, 1 extend, 1 rollback), 1 rolled back"
    assert "\n" not in report.summary()
