"""Canary and shadow: the sections ToolPolicy honours, and the lifecycle that writes,
measures and ends them (without the testbed; see test_closed_loop for the real loop)."""
from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from selfheal_plugin.lifecycle.canary import drop_experiment, promote_experiment, test_experiment, verify_experiment
from selfheal_plugin.history.clock import SimulatedClock
from selfheal_plugin.errors import ConfigError, NotFoundError, SelfHealError, UsageError
from selfheal_plugin.runtime.experiments import arm_for
from selfheal_plugin.lifecycle.gitops import GitOpsError
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.lifecycle.apply import LifecycleError, apply_improvement
from selfheal_plugin.lifecycle.verification import verify_improvement
from selfheal_plugin.runtime.policy import PolicyConfig, ToolPolicy, ToolTimeout, resolve_tool_settings
from selfheal_plugin.runtime.recorder import RunRecorder

from .lifecycle_data import K8S, add_improvement, git, git_as_user, rate_runs, settings_for, timeout_change, write_runs

T0 = datetime(2026, 11, 10, 9, 0, tzinfo=timezone.utc)
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
IMP = "imp-20261110-00c0ffee"
USER = '# my runtime\nmodel = "qwen3:14b"\n\n[tools."other"]\ntimeout_ms = 5000\n'


# ------------------------------------------------------------------ the runtime side


def test_arms_are_deterministic_and_follow_the_fraction():
    ids = [str(uuid.UUID(int=i)) for i in range(4000)]
    for fraction in (0.1, 0.5, 0.8):
        k = sum(arm_for(IMP, r, fraction) == "canary" for r in ids)
        assert abs(k - 4000 * fraction) <= 3 * math.sqrt(4000 * fraction * (1 - fraction))
    assert [arm_for(IMP, r, 0.5) for r in ids[:50]] == [arm_for(IMP, r, 0.5) for r in ids[:50]]
    # another improvement draws its own split
    assert [arm_for(IMP, r, 0.5) for r in ids[:50]] != [arm_for("imp-other", r, 0.5) for r in ids[:50]]


class FakeRun:
    def __init__(self, rid):
        self.id = rid
        self.metadata = None


def test_the_canary_layer_applies_to_canary_runs_only(tmp_path):
    data = {"tools": {K8S: {"timeout_ms": 60000, "retry_attempts": 1}},
            "canary": {IMP: {"fraction": 0.5, "started_at": "2026-11-10T09:00:00Z",
                             "tools": {K8S: {"timeout_ms": 90000}}}}}
    cfg = PolicyConfig.from_dict(data, tmp_path / "config.toml")
    runs = [FakeRun(str(uuid.UUID(int=i))) for i in range(40)]
    arms = {r.id: arm_for(IMP, r.id, 0.5) for r in runs}
    for r in runs:
        s = resolve_tool_settings(cfg, K8S, run=r)
        assert s.timeout_ms == (90000 if arms[r.id] == "canary" else 60000) and s.retry_attempts == 1
        assert (f'canary."{IMP}".tools."{K8S}"' in s.sources) == (arms[r.id] == "canary")
    assert resolve_tool_settings(cfg, K8S).timeout_ms == 60000  # no run, no arm
    assert resolve_tool_settings(cfg, "other", run=runs[0]).timeout_ms is None


@pytest.mark.parametrize("text, message", [
    (f'[canary."{IMP}"]\nfraction = 1.5\n', "fraction must be a number between 0 and 1"),
    (f'[canary."{IMP}"]\nfraction = true\n', "fraction must be a number between 0 and 1"),
    (f'[canary."{IMP}".tools."x"]\ntimeout_ms = -1\n', "timeout_ms must be between 1 and 86400000, got -1"),
    (f'[shadow."{IMP}".tools."x"]\nretry_attempts = 2\n', "a shadow can only observe timeout_ms"),
    ('canary = 3\n', "[canary] must be a table"),
])
def test_a_broken_experiment_section_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="must|only") as err:
        ToolPolicy(path, watch=False)
    assert message in str(err.value) and "\n" not in str(err.value)


def _metadata(db):
    conn = sqlite3.connect(db)
    try:
        return {rid: json.loads(m) if m else None for rid, m in conn.execute("SELECT id, metadata FROM runs")}
    finally:
        conn.close()


def test_the_policy_records_each_runs_arm_and_enforces_it(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[canary."{IMP}"]\nfraction = 0.5\n[canary."{IMP}".tools."slow"]\ntimeout_ms = 20\n')
    db = tmp_path / "conversations.db"
    recorder = RunRecorder(db, clock=SimulatedClock(T0))
    policy = ToolPolicy(config, recorder=recorder, watch=False, clock=recorder.clock)
    outcomes = {}
    for i in range(16):
        with recorder.run("wf", f"task {i}", metadata={"source": "test"}) as run:
            # The 20 ms arm's call ends only when released, after its limit fired, so a busy
            # machine cannot let it finish in time; the other arms' calls take 0.1 s.
            release = threading.Event()
            limited = arm_for(IMP, run.id, 0.5) == "canary"
            tool = (lambda r=release: r.wait(10) and "done") if limited else (lambda: time.sleep(0.1) or "done")
            try:
                policy.call("slow", tool)
                outcomes[run.id] = "ok"
            except ToolTimeout:
                outcomes[run.id] = "timeout"
                run.fail("timed out")
            finally:
                release.set()
    recorder.close()
    meta = _metadata(db)
    for rid, outcome in outcomes.items():
        arm = arm_for(IMP, rid, 0.5)
        assert meta[rid] == {"source": "test", "selfheal_arm": arm, "selfheal_improvement": IMP}
        assert outcome == ("timeout" if arm == "canary" else "ok")
    assert set(outcomes.values()) == {"ok", "timeout"}


def _shadow_policy(tmp_path, text):
    config = tmp_path / "config.toml"
    config.write_text(text)
    recorder = RunRecorder(tmp_path / "conversations.db", clock=SimulatedClock(T0))
    return recorder, ToolPolicy(config, recorder=recorder, watch=False, clock=recorder.clock)


# Enforced 1 s, observed 3 s. Margins a busy machine cannot cross: a call that should end in
# time has a second to spare, one that should time out ends only when released after its limit
# fired, and one that should outlast the shadow limit sleeps a second past it.
SHADOW = f'[tools."slow"]\ntimeout_ms = 1000\n[shadow."{IMP}".tools."slow"]\ntimeout_ms = 3000\n'


def test_a_shadow_sees_a_timed_out_call_finish_without_changing_it(tmp_path):
    recorder, policy = _shadow_policy(tmp_path, SHADOW)
    results = {}
    release = threading.Event()
    tools = {"finishes": lambda: release.wait(10) and "done", "hangs": lambda: time.sleep(4.0) or "done",
             "fast": lambda: "done"}
    for name, tool in tools.items():
        with recorder.run("wf", name) as run:
            try:
                results[name] = policy.call("slow", tool)
            except ToolTimeout as exc:
                results[name] = str(exc)
                run.fail(str(exc))
            finally:
                release.set()
    policy.drain(10)
    recorder.close()
    # the agent saw the current settings' outcome every time
    assert results == {"finishes": "Tool slow timed out after 1s", "hangs": "Tool slow timed out after 1s",
                       "fast": "done"}
    by_task = {}
    conn = sqlite3.connect(tmp_path / "conversations.db")
    for task, status, m in conn.execute("SELECT task, status, metadata FROM runs"):
        by_task[task] = (status, json.loads(m)["selfheal_shadow"])
    conn.close()
    assert by_task["finishes"][0] == "failed" and by_task["finishes"][1]["would_succeed"] == 1
    assert by_task["finishes"][1]["changes"][0]["duration_ms"] >= 1000
    assert by_task["hangs"][1] == {**by_task["hangs"][1], "calls": 1, "would_change": 0}
    assert by_task["fast"] == ("completed", {**by_task["fast"][1], "calls": 1, "would_change": 0})


def test_a_shadow_with_a_lower_limit_counts_calls_it_would_break_async(tmp_path):
    recorder, policy = _shadow_policy(tmp_path, f'[shadow."{IMP}".tools."slow"]\ntimeout_ms = 30\n')

    async def slow():
        await asyncio.sleep(0.1)
        return "done"

    async def main():
        with recorder.run("wf", "a"):
            assert await policy.acall("slow", slow) == "done"
        await policy.adrain()

    asyncio.run(main())
    recorder.close()
    (meta,) = _metadata(tmp_path / "conversations.db").values()
    assert meta["selfheal_shadow"]["would_fail"] == 1 and meta["selfheal_shadow"]["changes"][0]["shadow"] == "failure"


def test_a_shadow_observes_a_timed_out_async_call_in_the_background(tmp_path):
    recorder, policy = _shadow_policy(tmp_path, SHADOW)

    async def slow():
        await asyncio.sleep(1.4)
        return "done"

    async def main():
        with recorder.run("wf", "a") as run:
            with pytest.raises(ToolTimeout):
                await policy.acall("slow", slow)
            run.fail("timed out")
        await policy.adrain()

    asyncio.run(main())
    recorder.close()
    (meta,) = _metadata(tmp_path / "conversations.db").values()
    assert meta["selfheal_shadow"]["would_succeed"] == 1


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_call_within_the_limit_succeeds_under_a_longer_shadow_however_late_it_is_measured(tmp_path, monkeypatch,
                                                                                              mode):
    """A busy machine can measure a call that ended before its deadline as longer than the
    shadow limit; it still ended in time, so the longer shadow limit lets it through."""
    recorder, policy = _shadow_policy(tmp_path, SHADOW)
    real = time.perf_counter
    stalled = []
    monkeypatch.setattr(time, "perf_counter", lambda: real() + (10.0 if stalled else 0.0))

    def tool():
        stalled.append(True)  # from here on the clock reads 10 s later: the machine stalled
        return "done"

    async def atool():
        return tool()

    with recorder.run("wf", "a"):
        result = policy.call("slow", tool) if mode == "sync" else asyncio.run(policy.acall("slow", atool))
    monkeypatch.undo()
    policy.drain(5)
    recorder.close()
    assert result == "done"
    (meta,) = _metadata(tmp_path / "conversations.db").values()
    assert meta["selfheal_shadow"]["calls"] == 1 and meta["selfheal_shadow"]["would_change"] == 0, meta


# ------------------------------------------------------------------ the lifecycle


@pytest.fixture
def home(binks_home):
    db = binks_home / "conversations.db"
    write_runs(db, rate_runs(NOW - timedelta(days=7), NOW - timedelta(days=1), 60, 0.3))
    (binks_home / "config.toml").write_text(USER)
    git(binks_home, "init", "-q")
    git(binks_home, "add", "config.toml")
    git_as_user(binks_home, "commit", "-q", "-m", "mine")
    return binks_home


def _lib(home):
    return connect(home / "conversations.db"), settings_for(home)


def test_promote_refuses_a_tool_value_the_runtime_refuses_before_it_ends_the_canary(home):
    imp = add_improvement(home / "conversations.db", [timeout_change(90_000)], status="tested")
    conn, s = _lib(home)
    test_experiment(conn, s, imp.id, "canary", fraction=0.5, now=NOW)
    cfg = home / "config.toml"
    cfg.write_text(cfg.read_text().replace("timeout_ms = 5000", 'timeout_ms = "5s"'))
    git_as_user(home, "commit", "-q", "-am", "mine, broken")
    head, before = git(home, "rev-parse", "HEAD"), cfg.read_bytes()
    with pytest.raises(ConfigError, match=r'\[tools."other"\] timeout_ms must be an integer .*got \'5s\'; fix it '
                                          r"first, nothing was changed"):
        promote_experiment(conn, s, imp.id, now=NOW + timedelta(days=1))
    assert ImprovementStore(conn).get(imp.id).status == "canary"  # still running: nothing was changed
    assert git(home, "rev-parse", "HEAD") == head and cfg.read_bytes() == before


BROKEN = 'timeout_ms = "5s"'  # a value of the person's the runtime's ToolPolicy refuses


def _break_other_tool(home):
    cfg = home / "config.toml"
    cfg.write_text(cfg.read_text().replace("timeout_ms = 5000", BROKEN))
    git_as_user(home, "commit", "-q", "-am", "mine, broken")
    return git(home, "rev-parse", "HEAD"), cfg.read_bytes()


@pytest.mark.parametrize("mode", ["canary", "shadow"])
def test_a_canary_or_shadow_does_not_start_on_a_tool_value_the_runtime_refuses(home, mode):
    """Starting one writes config.toml as apply does: the same refusal, before any write."""
    imp = add_improvement(home / "conversations.db", [timeout_change(90_000)], status="tested")
    conn, s = _lib(home)
    head, before = _break_other_tool(home)
    with pytest.raises(ConfigError, match=r'\[tools."other"\] timeout_ms must be an integer .*got \'5s\'; fix it '
                                          r"first, nothing was changed"):
        test_experiment(conn, s, imp.id, mode, now=NOW)
    stored = ImprovementStore(conn).get(imp.id)
    assert (stored.status, stored.experiment, stored.pending_op) == ("tested", None, None)
    assert git(home, "rev-parse", "HEAD") == head and (home / "config.toml").read_bytes() == before


def test_promote_refuses_a_change_that_would_write_a_refused_value_before_it_ends_the_canary(home):
    """The row changed under the running canary (the database is not trusted): what apply
    would write is checked before the section is removed, not after."""
    db = home / "conversations.db"
    imp = add_improvement(db, [timeout_change(90_000)], status="tested")
    conn, s = _lib(home)
    test_experiment(conn, s, imp.id, "canary", now=NOW)
    raw = sqlite3.connect(db)
    with raw:
        raw.execute("UPDATE improvements SET changes = ? WHERE id = ?", (json.dumps([timeout_change("90s")]), imp.id))
    raw.close()
    head, before = git(home, "rev-parse", "HEAD"), (home / "config.toml").read_bytes()
    with pytest.raises(SelfHealError, match=r"the change would write a value the runtime refuses: .*timeout_ms must "
                                             r"be an integer .*got '90s'; nothing was changed"):
        promote_experiment(conn, s, imp.id, now=NOW + timedelta(days=1))
    assert ImprovementStore(conn).get(imp.id).status == "canary"
    assert git(home, "rev-parse", "HEAD") == head and (home / "config.toml").read_bytes() == before


def test_drop_removes_our_section_whatever_else_the_file_holds(home):
    """Like a rollback, a drop undoes our own change: a wrong value of the person's does not
    keep the canary running."""
    imp = add_improvement(home / "conversations.db", [timeout_change(90_000)], status="tested")
    conn, s = _lib(home)
    test_experiment(conn, s, imp.id, "canary", now=NOW)
    _break_other_tool(home)
    drop_experiment(conn, s, imp.id, now=NOW + timedelta(days=1))
    assert ImprovementStore(conn).get(imp.id).status == "tested"
    assert (home / "config.toml").read_text() == USER.replace("timeout_ms = 5000", BROKEN)


def test_a_canary_is_a_committed_section_and_drop_restores_the_config(home):
    imp = add_improvement(home / "conversations.db", [timeout_change(90_000)], status="tested")
    conn, s = _lib(home)
    r = test_experiment(conn, s, imp.id, "canary", fraction=0.25, now=NOW)
    assert r["started"] and r["status"] == "canary" and r["fraction"] == 0.25 and r["recommendation"] == "pending"
    text = (home / "config.toml").read_text()
    assert text.startswith(USER)  # the user's bytes untouched
    assert f"[canary.{imp.id}]\nfraction = 0.25\n" in text and "timeout_ms = 90000" in text
    msg = git(home, "log", "-1", "--format=%B")
    assert f"Self-Heal-Improvement: {imp.id}" in msg and "Self-Heal-Action: canary" in msg
    stored = ImprovementStore(conn).get(imp.id)
    assert stored.status == "canary" and stored.experiment["commit_sha"] == git(home, "rev-parse", "HEAD").strip()
    # asking again reports the running canary instead of starting another
    again = test_experiment(conn, s, imp.id, "canary", now=NOW + timedelta(hours=1))
    assert not again["started"] and again["report"]["metrics"]["runs_analyzed"] == 0

    d = drop_experiment(conn, s, imp.id, now=NOW + timedelta(days=1))
    assert d["status"] == "tested" and (home / "config.toml").read_text() == USER
    assert "Self-Heal-Action: canary-end" in git(home, "log", "-1", "--format=%B")
    assert ImprovementStore(conn).get(imp.id).experiment["outcome"] == "dropped"
    assert not git(home, "status", "--porcelain", "--", "config.toml").strip()


def _tag(db, run_ids, arm, imp_id):
    conn = sqlite3.connect(db)
    with conn:
        for rid in run_ids:
            conn.execute("UPDATE runs SET metadata = ? WHERE id = ?",
                         (json.dumps({"selfheal_arm": arm, "selfheal_improvement": imp_id}), rid))
    conn.close()


def _new_runs(db, specs):
    conn = sqlite3.connect(db)
    before = {r[0] for r in conn.execute("SELECT id FROM runs")}
    conn.close()
    write_runs(db, specs)
    conn = sqlite3.connect(db)
    ids = [r[0] for r in conn.execute("SELECT id FROM runs") if r[0] not in before]
    conn.close()
    return ids


@pytest.mark.parametrize("canary_fail, expected", [(0.02, "keep"), (0.6, "rollback"), (0.3, "extend")])
def test_verify_compares_the_arms_of_the_same_period(home, canary_fail, expected):
    db = home / "conversations.db"
    imp = add_improvement(db, [timeout_change(90_000)])
    conn, s = _lib(home)
    start = NOW
    test_experiment(conn, s, imp.id, "canary", fraction=0.5, now=start)
    control = _new_runs(db, rate_runs(start + timedelta(hours=1), start + timedelta(days=6), 80, 0.3, seed=5))
    canary = _new_runs(db, rate_runs(start + timedelta(hours=1), start + timedelta(days=6), 80, canary_fail, seed=6))
    _tag(db, control, "control", imp.id)
    _tag(db, canary, "canary", imp.id)
    v = verify_experiment(conn, s, ImprovementStore(conn).get(imp.id), now=start + timedelta(days=7))
    assert v["mode"] == "canary" and v["recommendation"] == expected
    m = v["metrics"]
    assert m["runs_control"] == 80 and m["runs_canary"] == 80 and m["runs_without_arm"] == 0
    assert m["control_success_rate"] == 0.7 and m["split"]["canary_share"] == 0.5
    assert ImprovementStore(conn).get(imp.id).status == "canary"  # verify does not end the canary
    if expected == "keep":
        r = promote_experiment(conn, s, imp.id, now=start + timedelta(days=7))
        assert r["status"] == "applied" and r["applied_at"].startswith("2026-11-27T12:00:00")
        text = (home / "config.toml").read_text()
        assert "canary" not in text and text.startswith(USER) and "timeout_ms = 90000" in text
        assert git(home, "log", "--format=%s", "-3").splitlines()[1] == f"selfheal: end canary {imp.id} (promoted)"


def test_user_errors_are_clear_and_change_nothing(home):
    db = home / "conversations.db"
    conn, s = _lib(home)
    imp = add_improvement(db, [timeout_change(90_000)])
    retry = add_improvement(db, [{"kind": "config", "file": "config.toml", "path": ["tools", K8S, "retry_attempts"],
                                  "op": "set", "value": 2}], pattern_id="timeout:other_tool")
    manual = add_improvement(db, [{"kind": "manual", "text": "tell the planner"}], pattern_id="tool_error:x")
    head = git(home, "rev-parse", "HEAD")
    with pytest.raises(NotFoundError):
        test_experiment(conn, s, "imp-nope", "canary")
    for bad in (0, 1, 1.5, -0.1, True):
        with pytest.raises(UsageError, match="--fraction must be between 0 and 1"):
            test_experiment(conn, s, imp.id, "canary", fraction=bad)
    with pytest.raises(UsageError, match="--fraction is for canary mode only"):
        test_experiment(conn, s, imp.id, "shadow", fraction=0.5)
    with pytest.raises(LifecycleError, match="shadow mode can only observe timeout_ms"):
        test_experiment(conn, s, retry.id, "shadow")
    with pytest.raises(LifecycleError, match="has manual steps"):
        test_experiment(conn, s, manual.id, "canary")
    with pytest.raises(LifecycleError, match="only an improvement running as a canary or shadow") as refused:
        drop_experiment(conn, s, imp.id)
    assert f"(start one: agent self-heal test {imp.id} --mode canary)" in str(refused.value)
    with pytest.raises(LifecycleError, match="only an improvement running as a canary or shadow"):
        promote_experiment(conn, s, imp.id)
    with pytest.raises(LifecycleError, match="only an improvement running as a canary or shadow") as refused:
        drop_experiment(conn, s, manual.id)
    assert "start one" not in str(refused.value)  # a canary would refuse its manual steps: not suggested
    assert git(home, "rev-parse", "HEAD") == head and (home / "config.toml").read_text() == USER

    (home / "config.toml").write_text(USER + "# my uncommitted note\n")
    with pytest.raises(GitOpsError, match="uncommitted changes"):
        test_experiment(conn, s, imp.id, "canary")
    assert ImprovementStore(conn).get(imp.id).status == "proposed"
    git(home, "checkout", "config.toml")

    test_experiment(conn, s, imp.id, "canary")
    with pytest.raises(LifecycleError, match="already running as a canary"):
        test_experiment(conn, s, retry.id, "canary")
    with pytest.raises(LifecycleError, match="already in canary mode"):
        test_experiment(conn, s, imp.id, "shadow")
    with pytest.raises(LifecycleError, match="already runs as a canary on 50% of runs"):
        test_experiment(conn, s, imp.id, "canary", fraction=0.2)
    with pytest.raises(LifecycleError, match="only proposed or tested improvements can be applied"):
        apply_improvement(conn, s, imp.id)


def test_a_failed_commit_of_a_canary_start_or_drop_is_undone_at_once(home):
    db = home / "conversations.db"
    imp = add_improvement(db, [timeout_change(90_000)], status="tested")
    conn, s = _lib(home)
    head = git(home, "rev-parse", "HEAD")
    lock = home / ".git" / "index.lock"  # another git process at work
    lock.write_text("")
    with pytest.raises(LifecycleError, match=r"start of the canary of .* failed: git add failed .*index\.lock': "
                                             r"File exists; .*nothing was changed"):
        test_experiment(conn, s, imp.id, "canary", now=NOW)
    row = ImprovementStore(conn).get(imp.id)
    assert (row.status, row.pending_op) == ("tested", None)
    assert (home / "config.toml").read_text() == USER and git(home, "rev-parse", "HEAD") == head
    lock.unlink()
    test_experiment(conn, s, imp.id, "canary", now=NOW)
    started = (home / "config.toml").read_bytes()
    head = git(home, "rev-parse", "HEAD")
    lock.write_text("")
    with pytest.raises(LifecycleError, match=r"end of the canary of .* failed: git add failed .*File exists"):
        drop_experiment(conn, s, imp.id, now=NOW + timedelta(days=1))
    row = ImprovementStore(conn).get(imp.id)
    assert (row.status, row.pending_op) == ("canary", None)
    assert (home / "config.toml").read_bytes() == started and git(home, "rev-parse", "HEAD") == head
    lock.unlink()
    assert drop_experiment(conn, s, imp.id, now=NOW + timedelta(days=1))["status"] == "tested"


def test_dropping_a_canary_clears_its_measured_impact(home):
    """Issue 15: after a drop the improvement said "0 of 0 observed call(s) would have changed outcome"."""
    imp = add_improvement(home / "conversations.db", [timeout_change(90_000)], status="tested")
    conn, s = _lib(home)
    test_experiment(conn, s, imp.id, "shadow", now=NOW)
    verify_experiment(conn, s, ImprovementStore(conn).get(imp.id), None, now=NOW + timedelta(hours=1))
    measured = ImprovementStore(conn).get(imp.id)
    assert measured.actual_impact and measured.metrics
    drop_experiment(conn, s, imp.id, now=NOW + timedelta(days=1))
    dropped = ImprovementStore(conn).get(imp.id)
    assert dropped.status == "tested" and dropped.actual_impact is None and not dropped.metrics
    assert dropped.experiment["last_verification"]["actual_impact"] == measured.actual_impact  # kept as history


def test_runs_without_an_arm_are_named_in_the_reason(home):
    """Runs came after the start but none carries an arm (the runtime does not use ToolPolicy,
    or the generator wrote them): the verdict says so rather than "0 runs"."""
    db = home / "conversations.db"
    imp = add_improvement(db, [timeout_change(90_000)])
    conn, s = _lib(home)
    test_experiment(conn, s, imp.id, "canary", fraction=0.5, now=NOW)
    _new_runs(db, rate_runs(NOW + timedelta(hours=1), NOW + timedelta(days=2), 40, 0.3, seed=5))
    v = verify_experiment(conn, s, ImprovementStore(conn).get(imp.id), now=NOW + timedelta(days=3))
    assert v["recommendation"] == "extend" and v["metrics"]["runs_without_arm"] == 40
    assert "40 run(s) since the start have no arm: is the runtime's ToolPolicy reading this config.toml?" \
        in v["reason"]


def test_the_step_after_a_risky_test_is_a_canary_only_where_a_canary_can_run(home):
    """A risky change of config settings is tried as a canary first; one a canary refuses
    (manual steps) is applied knowingly, saying what was done; over MCP the same steps are tools."""
    from selfheal_plugin.service import SelfHeal
    from selfheal_plugin.steps import for_agent

    db = home / "conversations.db"
    manual = add_improvement(db, [{"kind": "manual", "text": "tell the planner"}])
    mixed = add_improvement(db, [timeout_change(90_000), {"kind": "manual", "text": "tell the planner"}],
                            pattern_id="timeout:other_tool")
    with SelfHeal(home) as sh:
        results = {imp.id: sh.test(imp.id) for imp in (manual, mixed)}
        with for_agent():
            agent = sh._after_test(manual.id, "risky")
    assert {r["recommendation"] for r in results.values()} == {"risky"}
    assert results[manual.id]["next_step"] == f"agent self-heal apply {manual.id} --changes-made TEXT"
    assert results[mixed.id]["next_step"] == f"agent self-heal apply {mixed.id}"
    assert agent == f'apply_improvement(improvement_id="{manual.id}", changes_made="TEXT")'
    with SelfHeal(home) as sh:
        assert sh._after_test(add_improvement(db, [timeout_change(60_000)], pattern_id="timeout:t3").id,
                              "risky").endswith("--mode canary")
