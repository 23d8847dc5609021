"""An A/B experiment against the testbed: real MCP servers, the scripted agent through
``ToolPolicy``, real config commits. The timeout strategy offers two fixes for the search
tool's timeouts (a raised limit, and retries); both run as arms beside a control, the judge
finds the better one and promote applies it.

Why it is not flaky: the runtime's own limit (15 s) sits close to the search server's median
latency (12 s), so about a third of the control's searches time out, while the raised limit
(the fitted p99, about 40 s) lets nearly all finish; retries record every attempt, so their
per-call error rate stays the control's. With ~60 searches per group the raise arm's
p-value against the control is around 1e-6, far below 0.05 after Holm's correction, on any
assignment of runs to arms. The week under the experiment runs at 0.02 real seconds per
simulated second, so the raised limit is about half a real second beyond a median search: a
busy machine (which adds timeouts to every group) would have to stall calls that long to
erase the margin (at 0.01 one full-suite run under heavy load saw no significant arm). The
other assertions use what load cannot change (which arm a run was in, the latency the
server drew, the limit in force).
"""
from __future__ import annotations

import json
import math
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from selfheal_plugin.history.clock import SimulatedClock
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.history.settings import load_settings
from selfheal_plugin.lifecycle import gitops
from selfheal_plugin.service import SelfHeal
from selfheal_plugin.testbed import TestbedConfig, run_workload, tool_name
from selfheal_plugin.testbed.servers import reported_latency_ms

pytestmark = [pytest.mark.closed_loop, pytest.mark.timeout(600)]

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
A = T0 + timedelta(days=7)
END = A + timedelta(days=7)
SEARCH = tool_name("search")
PATTERN = f"timeout:{SEARCH}"
WORKFLOWS = {"researcher": 0.5, "planner": 0.5}  # one search each
HISTORY = TestbedConfig(time_scale=0.004, default_timeout_ms=15_000, missing_path_rate=0.05, crash_probability=0.02,
                        workflow_weights=WORKFLOWS)
CONFIG = TestbedConfig(time_scale=0.02, default_timeout_ms=15_000, missing_path_rate=0.05, crash_probability=0.02,
                       workflow_weights=WORKFLOWS)
RUNS = 180
USER_CONFIG = "# the runtime's own config, written by its user\n[servers.\"files\"]\nhealth_check = false\n"


def test_an_ab_experiment_finds_the_better_fix_and_promotes_it(tmp_path):
    home = tmp_path / "ab"
    run_workload(home, runs=80, seed=31, clock=SimulatedClock(T0), days=7, config=HISTORY)
    (home / "config.toml").write_text(USER_CONFIG)
    s = load_settings(home)
    sh = SelfHeal(settings=s, clock=lambda: A)
    proposal = sh.propose(PATTERN)
    started = sh.ab_start(PATTERN)
    ab_id = started["experiment_id"]
    arms = [a["improvement_id"] for a in started["arms"]]
    store = ImprovementStore(sh.conn)
    by_key = {store.get(i).changes[0]["path"][-1]: i for i in arms}
    assert set(by_key) == {"timeout_ms", "retry_attempts"} and len(arms) == 2
    raise_arm, retry_arm = by_key["timeout_ms"], by_key["retry_attempts"]
    assert proposal["improvement_id"] == raise_arm  # the open proposal is one arm, the other a candidate
    assert started["status"] == "running" and f"[ab.{ab_id}]" in (home / "config.toml").read_text()

    summary = run_workload(home, runs=RUNS, seed=32, clock=SimulatedClock(A), days=7, config=CONFIG)

    db = sqlite3.connect(home / "conversations.db")
    meta = {rid: json.loads(m) for rid, m in db.execute(
        "SELECT id, metadata FROM runs WHERE julianday(started_at) >= julianday(?)", (A.isoformat(),))}
    events = db.execute("SELECT e.run_id, e.event_data FROM run_events e JOIN runs r ON r.id = e.run_id "
                        "WHERE e.event_type = 'tool_complete' AND julianday(r.started_at) >= julianday(?)",
                        (A.isoformat(),)).fetchall()
    db.close()
    assert set(meta) == set(summary.run_ids)
    arm_of = {rid: m["selfheal_ab_arms"][ab_id] for rid, m in meta.items()}  # every run recorded its arm
    assert all(m["selfheal_experiment"] == ab_id and m["selfheal_arm"] == arm_of[rid] for rid, m in meta.items())
    n = len(arm_of)
    for g in (raise_arm, retry_arm, "control"):  # equal thirds; 4 standard deviations
        k = sum(a == g for a in arm_of.values())
        assert abs(k - n / 3) <= 4 * math.sqrt(n * 2 / 9), (g, k, n)
    # each arm's own limit was in force: searches slower than the runtime's 15 s succeeded only
    # in the raise arm (the server reports the latency it drew, whatever the load)
    slow_ok = {arm_of[rid] for rid, raw in events for d in [json.loads(raw)]
               if d["name"] == SEARCH and not d["is_error"] and reported_latency_ms(d["result"]) > 15_000}
    assert slow_ok == {raise_arm}

    status = SelfHeal(settings=s, clock=lambda: END).ab_status(ab_id)
    v = status["verdict"]
    rates = {g["improvement_id"]: (g["errors"], g["calls"], g["runs"]) for g in v["arms"]}
    control = v["groups"]["control"]
    assert v["verdict"] == "winner" and v["winner"] == raise_arm, (
        v["reason"], rates, (control["errors"], control["calls"], control["runs"]), raise_arm)
    assert v["p_omnibus"] < 0.05 and v["beats_runner_up"]
    measured = {a["improvement_id"]: a for a in v["arms"]}
    assert measured[raise_arm]["error_rate"] < v["groups"]["control"]["error_rate"]
    assert measured[raise_arm]["p_error_holm"] >= measured[raise_arm]["p_error"]

    promoted = SelfHeal(settings=s, clock=lambda: END).ab_promote(ab_id)
    assert promoted["status"] == "promoted" and promoted["applied"]["status"] == "applied"
    text = (home / "config.toml").read_text()
    assert "[ab" not in text and text.startswith(USER_CONFIG)
    assert f"timeout_ms = {store.get(raise_arm).changes[0]['value']}" in text and "retry_attempts" not in text
    cr = gitops.locate(s.config_path, s.home)
    subjects = cr.git("log", "--format=%s").splitlines()
    assert subjects[0].startswith("selfheal: Increase the timeout")
    assert subjects[1] == f"selfheal: end A/B {ab_id} (promoted)"
    assert subjects[2] == f"selfheal: start A/B {ab_id} (2 arms)"
    assert store.get(raise_arm).status == "applied" and store.get(retry_arm).status == "ab_lost"
    sh.close()
