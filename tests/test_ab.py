"""A/B experiments of fix strategies: the section ToolPolicy honours, the judge, and the
lifecycle that starts, judges and ends them (without the testbed; see test_closed_loop)."""
from __future__ import annotations

import json
import math
import sqlite3
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from selfheal_plugin.errors import ConfigError, NotFoundError, SelfHealError, UsageError
from selfheal_plugin.history.abstore import AbStore
from selfheal_plugin.history.clock import SimulatedClock
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.lifecycle import ab
from selfheal_plugin.lifecycle.apply import LifecycleError
from selfheal_plugin.lifecycle.gitops import GitOpsError
from selfheal_plugin.runtime.experiments import ab_arm_for, parse_ab_sections
from selfheal_plugin.runtime.policy import PolicyConfig, ToolPolicy, ToolTimeout, resolve_tool_settings
from selfheal_plugin.runtime.recorder import RunRecorder
from selfheal_plugin import hookimpl
from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.plugins.strategy import Change, Strategy, tool_path
from selfheal_plugin.service import SelfHeal

from .lifecycle_data import (
    K8S, add_improvement, git, git_as_user, rate_runs, settings_for, timeout_change, timeout_history, write_runs,
)

T0 = datetime(2026, 11, 10, 9, 0, tzinfo=timezone.utc)
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
AB_ID = "ab-20261120-0000abcd"
A1, A2 = "imp-20261120-aaaaaaaa", "imp-20261120-bbbbbbbb"
USER = '# my runtime\nmodel = "qwen3:14b"\n\n[tools."other"]\ntimeout_ms = 5000\n'
PATTERN = f"timeout:{K8S}"


def retry_change(n: int = 2, tool: str = K8S) -> dict:
    return {"kind": "config", "file": "config.toml", "path": ["tools", tool, "retry_attempts"], "op": "set",
            "value": n}


def _section(fractions: tuple[float | None, ...] = (None, None)) -> dict:
    arms = {}
    for imp_id, f, value in zip((A1, A2), fractions, (90000, 20)):
        arm = {"tools": {K8S: {"timeout_ms": value}}}
        if f is not None:
            arm["fraction"] = f
        arms[imp_id] = arm
    return {"ab": {AB_ID: {"started_at": "2026-11-20T12:00:00Z", "pattern": PATTERN, "arms": arms}}}


# ------------------------------------------------------------------ the runtime side


def test_runs_split_into_equal_shares_by_default_and_follow_given_fractions(tmp_path):
    ids = [str(uuid.UUID(int=i)) for i in range(6000)]
    (sec,) = parse_ab_sections(_section(), tmp_path / "config.toml")
    assert [a.fraction for a in sec.arms] == [1 / 3, 1 / 3]
    counts = {g: sum(ab_arm_for(sec, r) == g for r in ids) for g in (A1, A2, "control")}
    for g in counts:  # 4 standard deviations
        assert abs(counts[g] - 2000) <= 4 * math.sqrt(6000 * 1 / 3 * 2 / 3), counts
    (sec,) = parse_ab_sections(_section((0.1, 0.2)), tmp_path / "config.toml")
    counts = {g: sum(ab_arm_for(sec, r) == g for r in ids) for g in (A1, A2, "control")}
    for g, share in ((A1, 0.1), (A2, 0.2), ("control", 0.7)):
        assert abs(counts[g] - 6000 * share) <= 4 * math.sqrt(6000 * share * (1 - share)), counts
    assert [ab_arm_for(sec, r) for r in ids[:100]] == [ab_arm_for(sec, r) for r in ids[:100]]  # stable


class FakeRun:
    def __init__(self, rid):
        self.id = rid
        self.metadata = None


def test_each_arm_gets_its_own_overlay_and_the_control_none(tmp_path):
    data = {"tools": {K8S: {"timeout_ms": 60000, "retry_attempts": 1}}, **_section()}
    cfg = PolicyConfig.from_dict(data, tmp_path / "config.toml")
    (sec,) = cfg.experiments.abs
    seen = set()
    for i in range(60):
        run = FakeRun(str(uuid.UUID(int=i)))
        arm = ab_arm_for(sec, run.id)
        seen.add(arm)
        s = resolve_tool_settings(cfg, K8S, run=run)
        assert s.timeout_ms == {A1: 90000, A2: 20, "control": 60000}[arm] and s.retry_attempts == 1
    assert seen == {A1, A2, "control"}
    assert resolve_tool_settings(cfg, K8S).timeout_ms == 60000  # no run, no arm


@pytest.mark.parametrize("section, message", [
    ({"ab": {AB_ID: {"arms": {A1: {}}}}}, "needs at least two arms"),
    ({"ab": {AB_ID: {"arms": {A1: {"fraction": 0.6}, A2: {"fraction": 0.5}}}}}, "must leave the control a share"),
    ({"ab": {AB_ID: {"arms": {A1: {"fraction": 1.5}, A2: {}}}}}, "fraction must be a number between 0 and 1"),
    ({"ab": {AB_ID: {"arms": {A1: {"tools": {K8S: {"timeout_ms": -1}}}, A2: {}}}}}, "timeout_ms must be"),
    ({"ab": 3}, "[ab] must be a table"),
])
def test_a_broken_ab_section_is_one_clear_error(tmp_path, section, message):
    with pytest.raises(ConfigError) as err:
        PolicyConfig.from_dict(section, tmp_path / "config.toml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_policy_records_each_runs_arm_and_enforces_it(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[ab."{AB_ID}"]\npattern = "timeout:slow"\n[ab."{AB_ID}".arms."{A1}".tools."slow"]\n'
                      f'timeout_ms = 20\n[ab."{AB_ID}".arms."{A2}".tools."slow"]\ntimeout_ms = 60000\n')
    db = tmp_path / "conversations.db"
    recorder = RunRecorder(db, clock=SimulatedClock(T0))
    policy = ToolPolicy(config, recorder=recorder, watch=False, clock=recorder.clock)
    (sec,) = policy.config.experiments.abs
    outcomes = {}
    for i in range(24):
        with recorder.run("wf", f"task {i}", metadata={"source": "test"}) as run:
            # The 20 ms arm's call ends only when released, after its limit fired, so a busy
            # machine cannot let it finish in time; the other arms' calls take 0.1 s.
            release = threading.Event()
            limited = ab_arm_for(sec, run.id) == A1
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
    conn = sqlite3.connect(db)
    meta = {rid: json.loads(m) for rid, m in conn.execute("SELECT id, metadata FROM runs")}
    conn.close()
    for rid, outcome in outcomes.items():
        arm = ab_arm_for(sec, rid)
        assert meta[rid] == {"source": "test", "selfheal_experiment": AB_ID, "selfheal_arm": arm,
                             "selfheal_ab_arms": {AB_ID: arm}}
        assert outcome == ("timeout" if arm == A1 else "ok")
    assert set(outcomes.values()) == {"ok", "timeout"}


# ------------------------------------------------------------------ the judge


def _g(runs, ok, calls, errors):
    return {"runs": runs, "runs_completed": ok, "calls": calls, "errors": errors}


def test_holm_adjusts_stepwise_and_keeps_order():
    assert ab.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert ab.holm([0.5, None]) == [0.5, None]
    assert ab.holm([0.2, 0.01, 0.9]) == pytest.approx([0.4, 0.03, 0.9])


def test_a_planted_winner_is_found_and_compared_with_the_runner_up():
    groups = {"control": _g(100, 70, 200, 30), A1: _g(100, 97, 200, 2), A2: _g(100, 80, 200, 20)}
    v = ab.judge_counts(groups, alpha=0.05, min_sample=30)
    assert v["verdict"] == "winner" and v["winner"] == A1 and v["beats_runner_up"] is True
    assert v["p_omnibus"] < 0.05
    arms = {a["improvement_id"]: a for a in v["arms"]}
    assert arms[A1]["better"] and not arms[A2]["better"]
    assert arms[A1]["p_error_holm"] >= arms[A1]["p_error"]


def test_equal_arms_give_no_winner_yet():
    groups = {"control": _g(100, 70, 200, 30), A1: _g(100, 71, 200, 29), A2: _g(100, 69, 200, 31)}
    v = ab.judge_counts(groups, alpha=0.05, min_sample=30)
    assert v["verdict"] == "extend" and v["winner"] is None and "no winner yet" in v["reason"]


def test_holm_can_take_away_a_win_a_single_test_would_give():
    # the arm beats control at p≈0.03 alone; with three arms Holm's factor lifts it above 0.05
    groups = {"control": _g(200, 150, 200, 24), A1: _g(200, 160, 200, 11), A2: _g(200, 150, 200, 24),
              "imp-c": _g(200, 150, 200, 25)}
    v = ab.judge_counts(groups, alpha=0.05, min_sample=30)
    a1 = next(a for a in v["arms"] if a["improvement_id"] == A1)
    assert a1["p_error"] < 0.05 <= a1["p_error_holm"]
    assert v["verdict"] == "extend"


def test_the_minimum_sample_per_arm_holds_back_a_verdict():
    groups = {"control": _g(100, 70, 200, 30), A1: _g(20, 20, 40, 0), A2: _g(100, 80, 200, 20)}
    v = ab.judge_counts(groups, alpha=0.05, min_sample=30)
    assert v["verdict"] == "extend" and A1 in v["reason"] and "min_sample_size" in v["reason"]


def test_every_arm_worse_says_drop():
    groups = {"control": _g(100, 95, 200, 3), A1: _g(100, 60, 200, 40), A2: _g(100, 55, 200, 45)}
    assert ab.judge_counts(groups, alpha=0.05, min_sample=30)["verdict"] == "drop"


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


def _tag(db, run_ids, arm):
    conn = sqlite3.connect(db)
    with conn:
        for rid in run_ids:
            conn.execute("UPDATE runs SET metadata = ? WHERE id = ?",
                         (json.dumps({"selfheal_experiment": "x", "selfheal_ab_arms": {arm[0]: arm[1]}}), rid))
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


def _two_arms(home):
    db = home / "conversations.db"
    a = add_improvement(db, [timeout_change(90_000)], status="tested")
    b = add_improvement(db, [retry_change(2)], status="candidate", description="Retry twice")
    return a, b


def test_start_judge_and_promote_the_winner(home):
    db = home / "conversations.db"
    a, b = _two_arms(home)
    conn, s = _lib(home)
    r = ab.start_ab(conn, s, PATTERN, [a.id, b.id], now=NOW)
    ab_id = r["experiment_id"]
    assert r["started"] and r["status"] == "running" and [x["improvement_id"] for x in r["arms"]] == [a.id, b.id]
    text = (home / "config.toml").read_text()
    assert text.startswith(USER) and f'[ab.{ab_id}.arms.{a.id}.tools.{K8S}]' in text
    assert "timeout_ms = 90000" in text and "retry_attempts = 2" in text
    msg = git(home, "log", "-1", "--format=%B")
    assert f"Self-Heal-Improvement: {ab_id}" in msg and "Self-Heal-Action: ab" in msg
    assert {ImprovementStore(conn).get(i).status for i in (a.id, b.id)} == {"ab"}
    assert ImprovementStore(conn).open_for_pattern(PATTERN) is not None  # no second proposal meanwhile

    start = NOW
    runs = {g: _new_runs(db, rate_runs(start + timedelta(hours=1), start + timedelta(days=6), 80, fail, seed=i))
            for i, (g, fail) in enumerate((("control", 0.3), (a.id, 0.02), (b.id, 0.25)))}
    for g, ids in runs.items():
        _tag(db, ids, (ab_id, g))
    st = ab.status_of(conn, s, AbStore(conn).get(ab_id), now=start + timedelta(days=7))
    v = st["verdict"]
    assert v["verdict"] == "winner" and v["winner"] == a.id and v["groups"]["control"]["runs"] == 80

    out = ab.end_ab(conn, s, ab_id, "promoted", now=start + timedelta(days=7))
    assert out["status"] == "promoted" and out["winner"] == a.id and out["applied"]["status"] == "applied"
    text = (home / "config.toml").read_text()
    assert "[ab" not in text and text.startswith(USER) and "timeout_ms = 90000" in text and "retry" not in text
    subjects = git(home, "log", "--format=%s", "-3").splitlines()
    # whole subjects: the pattern id (75 characters with it) is in the start's body and trailer
    assert subjects[1:] == [f"selfheal: end A/B {ab_id} (promoted)", f"selfheal: start A/B {ab_id} (2 arms)"]
    start = git(home, "log", "-1", "--format=%B", "HEAD~2")
    assert f"2 fixes for {PATTERN}, each on 33% of runs" in start and f"Self-Heal-Pattern: {PATTERN}" in start
    assert ImprovementStore(conn).get(a.id).status == "applied"
    assert ImprovementStore(conn).get(b.id).status == "ab_lost"  # kept in history
    assert not git(home, "status", "--porcelain", "--", "config.toml").strip()


def test_promote_needs_a_winner_unless_forced_and_drop_restores_everything(home):
    a, b = _two_arms(home)
    conn, s = _lib(home)
    ab_id = ab.start_ab(conn, s, PATTERN, [a.id, b.id], fraction=0.2, now=NOW)["experiment_id"]
    assert AbStore(conn).get(ab_id).arms[0]["fraction"] == 0.2
    head = git(home, "rev-parse", "HEAD")
    with pytest.raises(LifecycleError, match="no significant winner .* --force"):
        ab.end_ab(conn, s, ab_id, "promoted", now=NOW + timedelta(days=1))
    assert git(home, "rev-parse", "HEAD") == head and AbStore(conn).get(ab_id).status == "running"
    d = ab.end_ab(conn, s, ab_id, "dropped", now=NOW + timedelta(days=1))
    assert d["status"] == "dropped" and d["winner"] is None and (home / "config.toml").read_text() == USER
    assert ImprovementStore(conn).get(a.id).status == "tested" and ImprovementStore(conn).get(b.id).status == "candidate"

    ab_id = ab.start_ab(conn, s, PATTERN, [a.id, b.id], now=NOW + timedelta(days=2))["experiment_id"]
    f = ab.end_ab(conn, s, ab_id, "promoted", force=True, now=NOW + timedelta(days=3))
    assert f["forced"] == 1 and f["winner"] in (a.id, b.id) and f["applied"]["status"] == "applied"


def test_bad_input_is_one_line_and_changes_nothing(home):
    db = home / "conversations.db"
    a, b = _two_arms(home)
    other = add_improvement(db, [timeout_change(5000, "x")], pattern_id="timeout:x")
    undone = add_improvement(db, [retry_change(3)], status="rolled_back")  # (an applied one: see below)
    in_canary = add_improvement(db, [retry_change(4)], status="canary")
    conn, s = _lib(home)
    head = git(home, "rev-parse", "HEAD")

    def unchanged():
        assert git(home, "rev-parse", "HEAD") == head and (home / "config.toml").read_text() == USER
        assert ImprovementStore(conn).get(a.id).status == "tested"
        assert not AbStore(conn).list()

    cases = [
        ([a.id], UsageError, "at least two arms"),
        ([a.id, a.id], UsageError, "at least two arms"),
        ([a.id, "imp-nope"], NotFoundError, "no improvement 'imp-nope'"),
        ([a.id, other.id], LifecycleError, "is a fix for timeout:x"),
        ([a.id, undone.id], LifecycleError, "is rolled_back"),
        ([a.id, in_canary.id], LifecycleError, "is canary"),
    ]
    for arms, exc, message in cases:
        with pytest.raises(exc, match=message):
            ab.start_ab(conn, s, PATTERN, arms, now=NOW)
        unchanged()
    with pytest.raises(UsageError, match="not a pattern id"):
        ab.start_ab(conn, s, "nocolon", [a.id, b.id], now=NOW)
    for bad in (0, 0.5, 1, True):
        with pytest.raises(UsageError, match="--fraction is each arm's share"):
            ab.start_ab(conn, s, PATTERN, [a.id, b.id], fraction=bad, now=NOW)
    unchanged()
    with pytest.raises(NotFoundError):
        SelfHeal(settings=s).ab_status("ab-nope")
    with pytest.raises(NotFoundError):
        SelfHeal(settings=s).ab_drop("ab-nope")
    (home / "config.toml").write_text(USER + "# my uncommitted note\n")
    with pytest.raises(GitOpsError, match="uncommitted changes"):
        ab.start_ab(conn, s, PATTERN, [a.id, b.id], now=NOW)
    git(home, "checkout", "config.toml")
    unchanged()

    ab_id = ab.start_ab(conn, s, PATTERN, [a.id, b.id], now=NOW)["experiment_id"]
    with pytest.raises(LifecycleError, match="already runs an A/B experiment"):
        ab.start_ab(conn, s, PATTERN, [a.id, b.id], now=NOW)
    ab.end_ab(conn, s, ab_id, "dropped", now=NOW)
    with pytest.raises(LifecycleError, match="only a running experiment"):
        ab.end_ab(conn, s, ab_id, "dropped", now=NOW)


BROKEN = 'timeout_ms = "5s"'  # a value of the person's the runtime's ToolPolicy refuses
REFUSED = r'\[tools."other"\] timeout_ms must be an integer .*got \'5s\'; fix it first, nothing was changed'


def _break_other_tool(home):
    cfg = home / "config.toml"
    cfg.write_text(cfg.read_text().replace("timeout_ms = 5000", BROKEN))
    git_as_user(home, "commit", "-q", "-am", "mine, broken")
    return git(home, "rev-parse", "HEAD"), cfg.read_bytes()


@pytest.mark.parametrize("given", [True, False], ids=["arms", "candidates"])
def test_ab_start_refuses_a_tool_value_the_runtime_refuses_and_stores_nothing(home, given):
    a, b = _two_arms(home)
    conn, s = _lib(home)
    head, before = _break_other_tool(home)
    rows = {i.id for i in ImprovementStore(conn).list(limit=None)}
    with pytest.raises(ConfigError, match=REFUSED):
        ab.start_ab(conn, s, PATTERN, [a.id, b.id] if given else None, now=NOW)
    assert git(home, "rev-parse", "HEAD") == head and (home / "config.toml").read_bytes() == before
    assert not AbStore(conn).list() and {i.id for i in ImprovementStore(conn).list(limit=None)} == rows
    assert (ImprovementStore(conn).get(a.id).status, ImprovementStore(conn).get(b.id).status) == ("tested", "candidate")


def test_ab_promote_refuses_before_it_ends_the_experiment_and_drop_still_ends_it(home):
    """A promotion applies the winner after the section is gone: apply's refusal comes first,
    the experiment still running. A drop undoes our own section, like a rollback."""
    a, b = _two_arms(home)
    conn, s = _lib(home)
    ab_id = ab.start_ab(conn, s, PATTERN, [a.id, b.id], now=NOW)["experiment_id"]
    head, before = _break_other_tool(home)
    with pytest.raises(ConfigError, match=REFUSED):
        ab.end_ab(conn, s, ab_id, "promoted", force=True, now=NOW + timedelta(days=1))
    assert AbStore(conn).get(ab_id).status == "running"
    assert {ImprovementStore(conn).get(i).status for i in (a.id, b.id)} == {"ab"}
    assert git(home, "rev-parse", "HEAD") == head and (home / "config.toml").read_bytes() == before
    ab.end_ab(conn, s, ab_id, "dropped", now=NOW + timedelta(days=1))
    assert AbStore(conn).get(ab_id).status == "dropped"
    assert (home / "config.toml").read_text() == USER.replace("timeout_ms = 5000", BROKEN)


def test_ab_promote_refuses_a_winner_that_would_write_a_refused_value(home):
    """The arms' rows changed under the running experiment (the database is not trusted)."""
    db = home / "conversations.db"
    a, b = _two_arms(home)
    conn, s = _lib(home)
    ab_id = ab.start_ab(conn, s, PATTERN, [a.id, b.id], now=NOW)["experiment_id"]
    raw = sqlite3.connect(db)
    with raw:
        raw.execute("UPDATE improvements SET changes = ? WHERE id IN (?, ?)",
                    (json.dumps([timeout_change("90s")]), a.id, b.id))
    raw.close()
    head = git(home, "rev-parse", "HEAD")
    with pytest.raises(SelfHealError, match=r"the change would write a value the runtime refuses: .*got '90s'; "
                                             r"nothing was changed"):
        ab.end_ab(conn, s, ab_id, "promoted", force=True, now=NOW + timedelta(days=1))
    assert AbStore(conn).get(ab_id).status == "running" and git(home, "rev-parse", "HEAD") == head


@pytest.mark.parametrize("status", ["applied", "verified"])
@pytest.mark.parametrize("given", [True, False], ids=["arms", "candidates"])
def test_ab_start_refuses_a_pattern_whose_fix_is_in_force(home, status, given):
    """Every group would run the fix in force (it is the base config): no control without a
    fix, arms stacked on it. One line naming it and the way out, nothing changed."""
    db = home / "conversations.db"
    fixed = add_improvement(db, [timeout_change(120_000)], status=status)
    a, b = _two_arms(home)
    conn, s = _lib(home)
    head = git(home, "rev-parse", "HEAD")
    rows = {i.id for i in ImprovementStore(conn).list(limit=None)}
    with pytest.raises(LifecycleError) as err:
        ab.start_ab(conn, s, PATTERN, [a.id, b.id] if given else None, now=NOW)
    assert str(err.value) == (
        f"{PATTERN} has {fixed.id} in force ({status}); an A/B experiment compares fixes not in force against a "
        f"control without one: roll it back first (agent self-heal rollback {fixed.id}), then start the "
        "experiment (its change, proposed again, can be one of the arms)")
    assert git(home, "rev-parse", "HEAD") == head and (home / "config.toml").read_text() == USER
    assert not AbStore(conn).list() and {i.id for i in ImprovementStore(conn).list(limit=None)} == rows
    assert ImprovementStore(conn).get(fixed.id).status == status


def test_a_failed_commit_is_undone_at_once(home):
    a, b = _two_arms(home)
    conn, s = _lib(home)
    head = git(home, "rev-parse", "HEAD")
    lock = home / ".git" / "index.lock"
    lock.write_text("")
    with pytest.raises(LifecycleError, match="failed: git add failed .*nothing was changed"):
        ab.start_ab(conn, s, PATTERN, [a.id, b.id], now=NOW)
    lock.unlink()
    assert (home / "config.toml").read_text() == USER and git(home, "rev-parse", "HEAD") == head
    assert not AbStore(conn).list() and ImprovementStore(conn).get(a.id).status == "tested"


def test_without_arms_the_strategies_offer_candidates(home):
    db = home / "conversations.db"
    # a history the timeout strategy can fit: slow tails over a 45 s limit
    timeout_history(db, NOW, runs=200)
    conn, s = _lib(home)
    sh = SelfHeal(settings=s, clock=lambda: NOW)
    proposed = sh.propose(PATTERN)
    r = sh.ab_start(PATTERN)
    ids = [x["improvement_id"] for x in r["arms"]]
    assert len(ids) >= 2 and proposed["improvement_id"] in ids
    rows = [ImprovementStore(conn).get(i) for i in ids]
    keys = {tuple(c["path"][-1] for c in row.changes) for row in rows}
    assert ("timeout_ms",) in keys and ("retry_attempts", "retry_backoff_ms") in keys
    assert all(row.status == "ab" for row in rows)
    listed = sh.ab_list()["experiments"]
    assert [e["experiment_id"] for e in listed] == [r["experiment_id"]]
    sh.ab_drop(r["experiment_id"])
    statuses = {ImprovementStore(conn).get(i).status for i in ids}
    assert statuses == {"proposed", "candidate"}
    assert ImprovementStore(conn).open_for_pattern(PATTERN).id == proposed["improvement_id"]  # still the suggested fix


def test_default_arms_set_different_keys_and_a_near_copy_stays_a_candidate(home):
    db = home / "conversations.db"
    timeout_history(db, NOW, runs=200)
    conn, s = _lib(home)
    sh = SelfHeal(settings=s, clock=lambda: NOW)
    proposed = sh.propose(PATTERN)  # raises the timeout
    raised = next(c["value"] for c in proposed["changes"] if c["path"][-1] == "timeout_ms")
    near = add_improvement(db, [timeout_change(raised + 10_000)], status="candidate",
                           description="Increase the timeout a little more")
    r = sh.ab_start(PATTERN)
    ids = [x["improvement_id"] for x in r["arms"]]
    keys = [tuple(sorted(c["path"][-1] for c in ImprovementStore(conn).get(i).changes)) for i in ids]
    assert ids[0] == proposed["improvement_id"] and near.id not in ids
    assert keys == [("timeout_ms",), ("retry_attempts", "retry_backoff_ms")]  # one arm per kind of fix
    assert ImprovementStore(conn).get(near.id).status == "candidate"  # compare it with --arms


def test_without_two_distinct_fixes_the_refusal_says_what_there_is(home):
    db = home / "conversations.db"
    timeout_history(db, NOW, runs=200)
    conn, s = _lib(home)
    manual = {"kind": "manual", "text": "Ask the cluster's owner for a faster pods_list"}
    tested = add_improvement(db, [timeout_change(90_000), manual], status="tested")
    plugins.strategies(s)
    plugin = _OnlyProposalPlugin()
    plugins.register(plugin, "only-proposal-test")
    try:
        head = git(home, "rev-parse", "HEAD")
        with pytest.raises(LifecycleError) as err:
            SelfHeal(settings=s, clock=lambda: NOW).ab_start(PATTERN)
    finally:
        plugins.unregister(plugin)
    message = str(err.value)
    assert "0 fix" not in message and "\n" not in message
    assert f"none can be an arm ({tested.id} has manual steps" in message, message
    assert git(home, "rev-parse", "HEAD") == head and ImprovementStore(conn).get(tested.id).status == "tested"


class _OnlyProposal(Strategy):
    name = "only-proposal"
    error_types = ["timeout"]

    def propose(self, pattern, history):
        return self.make_proposal(pattern, description="Ask for a faster tool", expected_impact="unknown",
                                  risk_level="low", changes=[Change.manual("Ask the owner for a faster tool")])


class _OnlyProposalPlugin:
    strategy = _OnlyProposal

    @hookimpl
    def register_strategies(self, register):
        register(self.strategy())


LONG_MANUAL = "Look up the resources pods_list was asked for before calling it: they were not found when called"


class _LongManual(_OnlyProposal):
    name = "long-manual"

    def propose(self, pattern, history):
        return self.make_proposal(pattern, description=LONG_MANUAL + "\nA second line.", expected_impact="unknown",
                                  risk_level="low", changes=[Change.manual("Look the pods up first")])


class _LongManualPlugin(_OnlyProposalPlugin):
    strategy = _LongManual


def _ab_refusal(home, s, plugin) -> str:
    plugins.strategies(s)
    plugins.register(plugin, "ab-refusal-test")
    try:
        with pytest.raises(LifecycleError) as err:
            SelfHeal(settings=s, clock=lambda: NOW).ab_start(PATTERN)
    finally:
        plugins.unregister(plugin)
    return str(err.value)


def test_when_every_fix_has_a_manual_step_the_refusal_does_not_offer_arms(home):
    """A candidate is named by its first line cut at a word (not mid-word), and --arms, which
    takes stored fixes that only set config values, is not offered when there are none."""
    db = home / "conversations.db"
    timeout_history(db, NOW, runs=200)
    conn, s = _lib(home)
    add_improvement(db, [timeout_change(90_000), {"kind": "manual", "text": "Ask the owner"}], status="tested")
    message = _ab_refusal(home, s, _LongManualPlugin())
    named = message.split("the long-manual strategy's '", 1)[1].split("' has manual steps", 1)[0]
    assert LONG_MANUAL[:80].endswith("not f")  # 80 characters would cut a word
    assert len(named) <= 80 and named.endswith("…"), named
    assert LONG_MANUAL.startswith(named[:-1] + " "), named  # whole words, then the ellipsis
    assert "--arms imp-a" not in message and "every fix found for" in message
    assert message.endswith("there is nothing to compare by run, with --arms IDS or without"), message


def test_with_one_config_fix_the_refusal_says_arms_needs_two(home):
    db = home / "conversations.db"
    timeout_history(db, NOW, runs=200)
    conn, s = _lib(home)
    only = add_improvement(db, [timeout_change(90_000)], status="tested")
    message = _ab_refusal(home, s, _LongManualPlugin())
    assert f"{only.id} (timeout_ms) can be an arm" in message, message
    assert message.endswith(f"--arms IDS takes two stored fixes of {PATTERN} that only set config values, and there is "
                            f"only {only.id}"), message


def test_ab_status_text_wraps_under_its_indent_at_80_columns(home, monkeypatch):
    from click.testing import CliRunner

    from selfheal_plugin.cli.main import agent

    db = home / "conversations.db"
    long = "Increase the timeout of the pods list so the slow tail of a busy cluster fits, then watch it"
    a = add_improvement(db, [timeout_change(90_000)], status="tested", description=long)
    b = add_improvement(db, [retry_change(2)], status="candidate", description="Retry twice " + "[b]x[/b] " * 9)
    conn, s = _lib(home)
    ab_id = ab.start_ab(conn, s, PATTERN, [a.id, b.id], now=NOW)["experiment_id"]
    monkeypatch.setenv("COLUMNS", "80")
    res = CliRunner().invoke(agent, ["self-heal", "ab", "status", ab_id, "--home", str(home)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert all(len(line) <= 80 for line in lines), res.output
    at = next(i for i, line in enumerate(lines) if line.startswith(f"  {a.id}: Increase"))
    assert lines[at + 1].startswith("      ") and lines[at + 1].strip() in long  # under the arm, not at column 0
    assert "[b]x[/b]" in res.output  # text from the history stays text
    verdict = next(i for i, line in enumerate(lines) if "Verdict: extend" in line)
    assert lines[verdict + 1].startswith("   ") and lines[verdict + 1].strip()  # the reason wraps past the icon


def _inbox(tmp_path) -> str:
    folder = tmp_path / "inbox"
    return "".join(p.read_text() for p in sorted(folder.glob("*.md"))) if folder.exists() else ""


def test_the_daemon_judges_notifies_a_verdict_once_and_the_end_is_one_escaped_inbox_entry(home, tmp_path):
    db = home / "conversations.db"
    tool = "mcp__k8s__<b>pods</b>"
    pattern = f"timeout:{tool}"
    write_runs(db, rate_runs(NOW - timedelta(days=7), NOW - timedelta(days=1), 60, 0.3, tool=tool, seed=9))
    a = add_improvement(db, [timeout_change(90_000, tool)], pattern_id=pattern, status="tested",
                        risk_level="medium")
    b = add_improvement(db, [retry_change(2, tool)], pattern_id=pattern, status="candidate")
    conn, s = _lib(home)
    sh = SelfHeal(settings=s, clock=lambda: NOW + timedelta(days=7))
    ab_id = ab.start_ab(conn, s, pattern, [a.id, b.id], now=NOW)["experiment_id"]
    start = NOW
    for i, (g, fail) in enumerate((("control", 0.3), (a.id, 0.02), (b.id, 0.3))):
        ids = _new_runs(db, rate_runs(start + timedelta(hours=1), start + timedelta(days=6), 80, fail, tool=tool,
                                      seed=20 + i))
        _tag(db, ids, (ab_id, g))
    first = sh.ab_judge_due()
    assert first["ab_judged"] == [{"experiment_id": ab_id, "verdict": "winner", "winner": a.id}]
    assert "ab_promoted" not in first  # auto-apply is off (and the winner is medium risk)
    sh.ab_judge_due()
    text = _inbox(tmp_path)
    assert text.count("reached a verdict") == 1  # notified once, judged twice
    assert AbStore(conn).get(ab_id).verdict["winner"] == a.id  # the stored verdict the dashboard shows
    dash = sh.dashboard()
    (running,) = dash["experiments"]
    assert running["experiment_id"] == ab_id and [x["improvement_id"] for x in running["arms"]] == [a.id, b.id]
    sh.ab_promote(ab_id)
    text = _inbox(tmp_path)
    assert text.count(f"A/B experiment {ab_id} of") == 2 and "promoted" in text
    assert "<b>" not in text and "&lt;b&gt;" in text  # the tool name from the history is escaped
    assert sh.dashboard()["experiments"] == []


def test_the_daemon_promotes_a_low_risk_winner_only_with_auto_apply(home):
    db = home / "conversations.db"
    a = add_improvement(db, [timeout_change(90_000)], status="tested", confidence=0.99)
    b = add_improvement(db, [retry_change(2)], status="candidate", confidence=0.99)
    conn = connect(db)
    s = settings_for(home, auto_apply_enabled=True, auto_apply_confidence_threshold=0.9)
    ab_id = ab.start_ab(conn, s, PATTERN, [a.id, b.id], now=NOW)["experiment_id"]
    for i, (g, fail) in enumerate((("control", 0.3), (a.id, 0.02), (b.id, 0.3))):
        _tag(db, _new_runs(db, rate_runs(NOW + timedelta(hours=1), NOW + timedelta(days=6), 80, fail, seed=30 + i)),
             (ab_id, g))
    done = SelfHeal(settings=s, clock=lambda: NOW + timedelta(days=7)).ab_judge_due()
    assert done["ab_promoted"][0]["winner"] == a.id and done["ab_promoted"][0]["commit_sha"]
    assert AbStore(conn).get(ab_id).status == "promoted" and ImprovementStore(conn).get(a.id).status == "applied"


def test_auto_apply_leaves_a_pattern_under_experiment_alone(home):
    db = home / "conversations.db"
    a, b = _two_arms(home)
    c = add_improvement(db, [timeout_change(120_000)], status="candidate", confidence=0.99)
    conn = connect(db)
    ab.start_ab(conn, settings_for(home), PATTERN, [b.id, c.id], now=NOW)  # a (tested) is not an arm
    s = settings_for(home, auto_apply_enabled=True, auto_apply_confidence_threshold=0.5)
    ImprovementStore(conn).update(a.id, confidence=0.99)
    done = SelfHeal(settings=s, clock=lambda: NOW).auto_apply()
    assert "applied" not in done and any(x["improvement_id"] == a.id and "A/B experiment" in x["reason"]
                                         for x in done["skipped"])
    assert ImprovementStore(conn).get(a.id).status == "tested"


class _BadCandidates(Strategy):
    """Test-only: proposes a timeout raise, but its candidates() raises."""
    name = "bad-candidates-test"
    error_types = ("timeout",)
    summary = "tests only"

    def propose(self, pattern, history):
        return self.make_proposal(pattern, description="Raise it", expected_impact="some", risk_level="low",
                                  changes=[Change.config(tool_path(pattern.tool_name, "timeout_ms"), 99_000)])

    def candidates(self, pattern, history):
        raise RuntimeError("boom")


class _BadCandidatesPlugin:
    @hookimpl
    def register_strategies(self, register):
        register(_BadCandidates())


def test_a_strategy_whose_candidates_fail_is_contained(home):
    timeout_history(home / "conversations.db", NOW, runs=200)
    conn, s = _lib(home)
    plugins.strategies(s)  # built-ins first, so the test plugin replaces the timeout strategy
    plugin = _BadCandidatesPlugin()
    plugins.register(plugin, "bad-candidates-test")
    try:
        sh = SelfHeal(settings=s, clock=lambda: NOW)
        sh.propose(PATTERN)
        head = git(home, "rev-parse", "HEAD")
        with pytest.raises(LifecycleError, match=r"needs two fixes that set different config keys; imp-\S+ "
                                                 r"\(timeout_ms\) can be an arm; --arms IDS takes two stored fixes"):
            sh.ab_start(PATTERN)
        assert git(home, "rev-parse", "HEAD") == head
        assert any(e.hook == "candidates" and "boom" in e.error for e in plugins.errors())
    finally:
        plugins.unregister(plugin)


def test_with_a_canary_running_too_each_keeps_its_own_record(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[canary."imp-c"]\nfraction = 0.5\n[canary."imp-c".tools."other"]\ntimeout_ms = 5000\n'
                      f'[ab."{AB_ID}"]\npattern = "timeout:slow"\n[ab."{AB_ID}".arms."{A1}".tools."slow"]\n'
                      f'timeout_ms = 20\n[ab."{AB_ID}".arms."{A2}".tools."slow"]\ntimeout_ms = 60000\n')
    db = tmp_path / "conversations.db"
    recorder = RunRecorder(db, clock=SimulatedClock(T0))
    policy = ToolPolicy(config, recorder=recorder, watch=False, clock=recorder.clock)
    (sec,) = policy.config.experiments.abs
    for i in range(8):
        with recorder.run("wf", f"task {i}"):
            policy.call("fast", lambda: "done")
    recorder.close()
    conn = sqlite3.connect(db)
    meta = {rid: json.loads(m) for rid, m in conn.execute("SELECT id, metadata FROM runs")}
    conn.close()
    for rid, m in meta.items():
        assert m["selfheal_improvement"] == "imp-c" and m["selfheal_arm"] in ("canary", "control")
        assert m["selfheal_ab_arms"] == {AB_ID: ab_arm_for(sec, rid)}  # what the judge reads
