"""The closed loop against the testbed: real MCP servers, the scripted agent through
``ToolPolicy``, real config commits — a fix selfheal applies is in force, and its effect is
measured on runs that really happened afterwards.

Select with ``pytest -m closed_loop``. One simulated week of history (seed 11) is shared;
each scenario copies it and runs its own week after the apply instant ``A``.

Nothing here depends on how fast the machine is. A call's recorded duration is its real time
over the time scale, so on a busy machine every call looks slower (tens of real milliseconds
of scheduling are thousands of simulated ones) and more calls time out. So the assertions use
what load cannot change: the latency the search server drew (it reports it in its answer),
the limit a timeout message names, and verdicts whose margins are set by the configuration
(the canary's scenario puts a third of the control's searches over the limit). One test
compares two things load moves a little, the simulation's prediction and the week after's
success rate: each run of the testbed's agent, and each of its calls on a server, draws
from its own stream, so a call that load makes time out changes its own run, not the course
of the week (docs/closed-loop.md has the figures, idle and loaded).
"""
from __future__ import annotations

import json
import math
import shutil
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from selfheal_plugin.service import SelfHeal

from selfheal_plugin import hookimpl

from selfheal_plugin.lifecycle import gitops

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.history.clock import SimulatedClock
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.lifecycle.apply import apply_improvement, rollback_improvement
from selfheal_plugin.lifecycle.proposals import propose_improvement
from selfheal_plugin.lifecycle.simulation import test_improvement
from selfheal_plugin.lifecycle.verification import verify_improvement
from selfheal_plugin.lifecycle.canary import drop_experiment, promote_experiment
from selfheal_plugin.history.settings import load_settings
from selfheal_plugin.plugins.strategy import Change, Strategy, tool_path
from selfheal_plugin.testbed import TestbedConfig, run_workload, tool_name
from selfheal_plugin.testbed.servers import reported_latency_ms

# The module's fixtures run three simulated weeks of real MCP calls; on a loaded machine the
# first test (which sets them up) takes minutes: the default 300 s is a hang detector, not this.
pytestmark = [pytest.mark.closed_loop, pytest.mark.timeout(1200)]

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
A = T0 + timedelta(days=7)  # the apply instant: a week of history before it, a week after
END = A + timedelta(days=7)
SEARCH = tool_name("search")
PATTERN = f"timeout:{SEARCH}"
RUNS = 200
# Few failures besides the search timeouts, so the success rate after the fix is mostly
# the timeout model's prediction (the rest is sampling noise of the other tools).
CONFIG = TestbedConfig(time_scale=0.01, missing_path_rate=0.05, crash_probability=0.02)
# For scenarios whose assertions hold however slow the calls are (see the module docs).
FAST = TestbedConfig(time_scale=0.004, missing_path_rate=0.05, crash_probability=0.02)
USER_CONFIG = "# the runtime's own config, written by its user\n[servers.\"files\"]\nhealth_check = false\n"


@pytest.fixture(scope="module")
def week_before(tmp_path_factory):
    home = tmp_path_factory.mktemp("before")
    summary = run_workload(home, runs=RUNS, seed=11, clock=SimulatedClock(T0), days=7, config=CONFIG)
    return home, summary


def _copy_home(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "conversations.db", dst / "conversations.db")
    return dst


def _open(home: Path):
    s = load_settings(home)
    return connect(s.db_path), s


def _search_calls(db: Path, since: datetime, until: datetime | None = None) -> list[dict]:
    """The search tool's finished calls in runs started in [since, until), each with its run's id
    (``run_id``)."""
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT e.run_id, e.event_data FROM run_events e JOIN runs r ON r.id = e.run_id "
        "WHERE e.event_type = 'tool_complete' "
        "AND julianday(r.started_at) >= julianday(?) AND julianday(r.started_at) < julianday(?) ORDER BY e.id",
        (since.isoformat(), (until or datetime(9999, 1, 1, tzinfo=timezone.utc)).isoformat())).fetchall()
    conn.close()
    return [{**d, "run_id": rid} for rid, d in ((rid, json.loads(raw)) for rid, raw in rows) if d["name"] == SEARCH]


def _latency(call: dict) -> int:
    """The latency the search server drew for a successful call (simulated ms). Unlike the
    recorded duration it does not grow with the machine's load."""
    latency = reported_latency_ms(call["result"])
    assert latency is not None, call["result"]
    return latency


def _slow_successes(calls: list[dict], limit: int = CONFIG.default_timeout_ms) -> list[dict]:
    """Successful calls whose server took longer than ``limit`` (the runtime's own timeout by
    default): impossible while that limit is in force, whatever the load, because the
    policy's deadline starts before the request is sent and the server answers only after
    sleeping its latency."""
    return [c for c in calls if not c["is_error"] and _latency(c) > limit]


@pytest.fixture(scope="module")
def healed(week_before, tmp_path_factory):
    """propose → test (simulation on the week before A only) → apply at A → a week of runs → verify."""
    src, before = week_before
    home = _copy_home(src, tmp_path_factory.mktemp("healed"))
    conn, s = _open(home)
    imp = propose_improvement(conn, s, PATTERN, now=A)
    tested = test_improvement(conn, s, imp.id, now=A)
    applied = apply_improvement(conn, s, imp.id, now=A)
    after = run_workload(home, runs=RUNS, seed=12, clock=SimulatedClock(A), days=7, config=CONFIG)
    verified = verify_improvement(conn, s, imp.id, now=END)
    conn.close()
    return {"home": home, "imp": imp, "tested": tested, "applied": applied, "before": before, "after": after,
            "verified": verified}


def test_a_timeout_fix_heals(healed):
    before, after, v = healed["before"], healed["after"], healed["verified"]
    assert healed["applied"]["applied_at"].startswith(A.strftime("%Y-%m-%dT%H:%M:%S"))
    new_limit = healed["imp"].changes[0]["value"]
    assert healed["imp"].changes[0]["path"] == ["tools", SEARCH, "timeout_ms"] and new_limit > CONFIG.default_timeout_ms
    # The fix is in force: successful searches slower than the old limit exist only after A.
    db = healed["home"] / "conversations.db"
    assert _slow_successes(_search_calls(db, A)) and not _slow_successes(_search_calls(db, T0, A))
    rate_before = before.error_rates[PATTERN]
    rate_after = after.error_rates.get(PATTERN, 0.0)
    assert rate_before > 0.1
    # At least halved. Idle, the fall is 80 % (docs/closed-loop.md); load only adds timeouts
    # after the apply (the new limit is 350-400 real ms, a call that drew 30 s is 50-100 ms
    # from it), so the bar leaves room for several: 3 of 140 calls time out, 7 may.
    assert rate_after <= 0.5 * rate_before, (rate_before, rate_after)
    assert v["recommendation"] == "keep" and v["verification_status"] == "verified" and v["status"] == "verified"
    assert v["pattern_p_value"] < 0.05
    pattern = v["metrics"]["pattern"]
    assert pattern["reduction"] >= 0.5
    assert v["metrics"]["runs_before"] == RUNS and v["metrics"]["runs_after"] == RUNS


def test_the_simulation_predicts_the_measured_success_rate(healed):
    t, after = healed["tested"], healed["after"]
    # the prediction used only the week before the apply
    assert t["window"]["until"].startswith(A.strftime("%Y-%m-%dT%H:%M:%S")) and t["runs_replayed"] == RUNS
    assert t["recommendation"] == "safe_to_apply"
    assert t["simulated_success_rate"] - t["baseline_success_rate"] > 0.05  # a real change to predict
    # The week after falls in the simulation's 95 % interval for a next window of as many runs
    # (idle: 87.0 % measured in 83.5–95.5 %, 89.9 % predicted), an interval narrow enough to say
    # something (± 6 points, with the window's own sampling noise).
    low, high = t["interval"]["next_window_success_rate"]
    assert t["interval"]["next_window_runs"] == RUNS and high - low <= 0.15, t["interval"]
    assert low <= after.success_rate <= high, (low, after.success_rate, high, t["simulated_success_rate"])


class LowerTimeout(Strategy):
    """Test-only: "fixes" timeouts by lowering the limit below the median latency."""
    name = "lower-timeout-test"
    error_types = ("timeout",)
    summary = "Lower the timeout (harmful; tests only)"

    def propose(self, pattern, history):
        return self.make_proposal(pattern, description=f"Lower the timeout of {pattern.tool_name} to 8 s",
                                  expected_impact="fail fast", risk_level="low",
                                  changes=[Change.config(tool_path(pattern.tool_name, "timeout_ms"), 8000)])

    def simulate(self, proposal, history):
        return None

    def suggest(self, pattern):
        return "lower the timeout"


class LowerTimeoutPlugin:
    @hookimpl
    def register_strategies(self, register):
        register(LowerTimeout())


def test_a_harmful_change_is_caught_and_reverted(week_before, tmp_path):
    src, _ = week_before
    home = _copy_home(src, tmp_path / "harm")
    (home / "config.toml").write_text(USER_CONFIG)
    conn, s = _open(home)
    plugins.strategies(s)  # built-ins first, so the test plugin replaces the timeout strategy
    plugin = LowerTimeoutPlugin()
    plugins.register(plugin, "lower-timeout-test")
    try:
        imp = propose_improvement(conn, s, PATTERN, now=A)
    finally:
        plugins.unregister(plugin)
    assert imp.strategy == "lower-timeout-test" and imp.changes[0]["value"] == 8000
    applied = apply_improvement(conn, s, imp.id, now=A)
    run_workload(home, runs=100, seed=13, clock=SimulatedClock(A), days=7, config=FAST)
    v = verify_improvement(conn, s, imp.id, now=END)
    assert v["recommendation"] == "rollback" and v["verification_status"] == "failed"
    assert v["p_value"] < 0.05 and v["metrics"]["after_success_rate"] < v["metrics"]["before_success_rate"]
    r = rollback_improvement(conn, s, imp.id, reason="verify: significantly worse", now=END)
    assert r["status"] == "rolled_back" and r["method"] == "revert"
    cr = gitops.locate(s.config_path, s.home)
    log = cr.git("log", "--format=%H %s").splitlines()
    assert log[0].startswith(r["rollback_sha"]) and f"roll back {imp.id}" in log[0]
    assert any(line.startswith(applied["commit_sha"]) for line in log)
    assert (home / "config.toml").read_text() == USER_CONFIG  # byte for byte as before the apply
    assert ImprovementStore(conn).get(imp.id).status == "rolled_back"
    conn.close()


# The canary's own scenario, as in tests/test_closed_loop_ab.py: the runtime's limit (15 s)
# sits close to the search server's median latency (12 s) and every run searches once, so
# about a third of the control's searches time out while the proposed limit (the fitted p99,
# about 40 s) lets nearly all finish. With ~100 searches per arm the pattern's p-value is
# around 1e-8, and at 0.02 real seconds per simulated second the proposed limit is about half
# a real second beyond a median search: a loaded machine that delays calls (and so adds
# timeouts to both arms) cannot erase that margin. With the module's own configuration (15 % of searches timing out,
# 0.75 searches a run) a canary arm of 100 runs missed significance on about 1 run in 4
# under load.
ONE_SEARCH = {"researcher": 0.5, "planner": 0.5}
CANARY_HISTORY = TestbedConfig(time_scale=0.004, default_timeout_ms=15_000, missing_path_rate=0.05,
                               crash_probability=0.02, workflow_weights=ONE_SEARCH)
CANARY_CONFIG = TestbedConfig(time_scale=0.02, default_timeout_ms=15_000, missing_path_rate=0.05,
                              crash_probability=0.02, workflow_weights=ONE_SEARCH)


def test_a_canary_splits_runs_finds_the_fix_better_and_is_promoted(tmp_path):
    home = tmp_path / "canary"
    run_workload(home, runs=80, seed=33, clock=SimulatedClock(T0), days=7, config=CANARY_HISTORY)
    (home / "config.toml").write_text(USER_CONFIG)
    conn, s = _open(home)
    imp = propose_improvement(conn, s, PATTERN, now=A)
    assert imp.changes[0]["path"] == ["tools", SEARCH, "timeout_ms"] and imp.changes[0]["value"] >= 30_000
    fraction = 0.5
    started = SelfHeal(settings=s, clock=lambda: A).test(imp.id, "canary", fraction=fraction)
    assert started["status"] == "canary" and started["started"] and started["commit_sha"]
    assert f'[canary.{imp.id}]' in (home / "config.toml").read_text()
    summary = run_workload(home, runs=RUNS, seed=34, clock=SimulatedClock(A), days=7, config=CANARY_CONFIG)

    db = sqlite3.connect(home / "conversations.db")
    arms = dict(db.execute("SELECT id, json_extract(metadata, '$.selfheal_arm') FROM runs "
                           "WHERE json_extract(metadata, '$.selfheal_improvement') = ?", (imp.id,)).fetchall())
    db.close()
    assert set(arms) == set(summary.run_ids)  # every run of the period recorded its arm
    k = sum(a == "canary" for a in arms.values())
    n = len(arms)
    # the arm is a hash of fresh random ids: 4 standard deviations leave a 1-in-16,000 false alarm
    assert abs(k - n * fraction) <= 4 * math.sqrt(n * fraction * (1 - fraction)), (k, n)
    # each arm had its own limit: a search slower than the runtime's 15 s succeeded only in the
    # canary arm (the server reports the latency it drew, whatever the load)
    slow_ok = {arms[c["run_id"]] for c in _search_calls(home / "conversations.db", A)
               if not c["is_error"] and reported_latency_ms(c["result"]) > 15_000}
    assert slow_ok == {"canary"}

    v = SelfHeal(settings=s, clock=lambda: END).verify(imp.id)
    m = v["metrics"]
    assert m["runs_canary"] == k and m["runs_control"] == n - k and m["split"]["p_value"] > 5e-5
    assert v["recommendation"] == "keep", (v["reason"], m["pattern"], k, n)
    assert m["pattern"]["canary_error_rate"] < m["pattern"]["control_error_rate"]
    assert v["status"] == "canary"  # a verdict, not yet a promotion

    promoted = promote_experiment(conn, s, imp.id, now=END)
    assert promoted["status"] == "applied" and promoted["ended"]["end_commit_sha"]
    text = (home / "config.toml").read_text()
    assert "canary" not in text and text.startswith(USER_CONFIG)
    assert f"timeout_ms = {imp.changes[0]['value']}" in text
    cr = gitops.locate(s.config_path, s.home)
    subjects = cr.git("log", "--format=%s").splitlines()
    assert subjects[0].startswith("selfheal: Increase the timeout")
    assert subjects[1] == f"selfheal: end canary {imp.id} (promoted)"
    assert subjects[2].startswith(f"selfheal: canary {imp.id} (on 50% of runs)")
    conn.close()


def test_a_shadow_observes_without_changing_outcomes(week_before, tmp_path):
    src, before = week_before
    home = _copy_home(src, tmp_path / "shadow")
    conn, s = _open(home)
    imp = propose_improvement(conn, s, PATTERN, now=A)
    started = SelfHeal(settings=s, clock=lambda: A).test(imp.id, "shadow")
    assert started["status"] == "shadow"
    summary = run_workload(home, runs=100, seed=15, clock=SimulatedClock(A), days=7, config=FAST)
    # outcomes unchanged: searches still time out at the runtime's limit
    calls = _search_calls(home / "conversations.db", A)
    timeouts = [c for c in calls if c["is_error"] and c.get("error_type") == "timeout"]
    assert timeouts and all(f"timed out after {CONFIG.default_timeout_ms // 1000}s" in c["result"] for c in timeouts)
    assert not _slow_successes(calls)
    v = SelfHeal(settings=s, clock=lambda: END).verify(imp.id)
    m = v["metrics"]
    assert m["calls_observed"] == len(calls)
    assert 0 < m["calls_would_succeed"] <= len(timeouts) and m["calls_would_fail"] == 0
    assert m["runs_would_recover"] >= 1 and m["runs_would_break"] == 0
    assert v["recommendation"] == "keep"
    failed = summary.failed
    assert m["runs_would_recover"] <= failed
    dropped = drop_experiment(conn, s, imp.id, now=END)
    assert dropped["status"] == "proposed" and not (home / "config.toml").read_text().strip()
    conn.close()


def test_tool_policy_reloads_an_apply_while_the_workload_runs(week_before, tmp_path):
    """Apply while a workload's ToolPolicy is alive: the next calls use the new timeout."""
    src, _ = week_before
    home = _copy_home(src, tmp_path / "live")
    conn, s = _open(home)
    imp = propose_improvement(conn, s, PATTERN, now=A)
    clock = SimulatedClock(A)
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(summary=run_workload(
        home, runs=150, seed=16, clock=clock, days=7, config=FAST)))
    worker.start()
    try:
        probe = sqlite3.connect(home / "conversations.db")
        deadline = time.monotonic() + 60
        while probe.execute("SELECT count(*) FROM runs WHERE julianday(started_at) >= julianday(?)",
                            (A.isoformat(),)).fetchone()[0] < 50:
            assert time.monotonic() < deadline and worker.is_alive(), "the workload did not get going"
            time.sleep(0.05)
        probe.close()
        applied_at = clock()  # the edit lands at or after this instant
        apply_improvement(conn, s, imp.id, now=applied_at)
    finally:
        worker.join(120)
    assert "summary" in box
    new_limit = imp.changes[0]["value"]
    old_text, new_text = (f"timed out after {ms / 1000:g}s" for ms in (CONFIG.default_timeout_ms, new_limit))
    db = home / "conversations.db"
    earlier = _search_calls(db, A, applied_at)
    assert earlier and not _slow_successes(earlier)  # before the apply: the old limit
    # The policy notices the edit (a watchdog event, or its mtime check at most a second
    # later) while the workload keeps going: how many runs pass meanwhile depends on the
    # machine's load, so the switch is found in the calls, not assumed at an instant.
    calls = _search_calls(db, A)
    switched = [i for i, c in enumerate(calls)  # what only the new limit lets happen
                if _slow_successes([c]) or (c["is_error"] and str(c["result"]).endswith(new_text))]
    assert switched, "the running policy never used the new limit"
    assert switched[0] >= len(earlier)  # runs are sequential: the earlier calls come first
    later = calls[switched[0]:]
    # from the switch on, without a restart: the new limit and only it (nothing slower got
    # through, every timeout names it, none names the old one)
    assert not _slow_successes(later, limit=new_limit)
    timeouts = [c["result"] for c in later if c["is_error"] and c.get("error_type") == "timeout"]
    assert not any(r.endswith(old_text) for r in timeouts), timeouts
    assert all(r.endswith(new_text) for r in timeouts), timeouts
    conn.close()
