"""Learning from success, closed loop: real MCP servers through ``ToolPolicy``, a person's own
commit to config.toml, and ``learn`` finding what it fixed and where the fix could go next.

A week of runs in which the search tool times out (the runtime's 20 s default against a
lognormal latency of median 14 s) and so does the flaky server's status query (its work has a
median of 12 s against a configured 15 s limit). At ``A`` a person raises the search timeout
to 5 minutes by hand and commits it; a second week runs with it in force. ``learn`` must find
the fall of the search timeouts, credit the person's commit, keep it as a rule, point at the
flaky tool, which times out the same way, and the proposal for that tool must carry the rule as
its prior.

The assertions rest on margins load cannot erase. Time runs at ``time_scale=0.01``, so a
simulated second is 10 ms of real time, and a call times out when its real time passes the
limit. After the commit the limit is 3 s of real time against a drawn latency whose median is
140 ms and whose largest draws in a week stay under 1 s: no stall of a busy machine makes one
time out. A timeout there would move the fall past the commit, and the commit would not be
credited (a 60 s limit, 600 ms real, left drawn 45 s calls a margin of 150 ms, and under a
loaded CI run they timed out). Before the commit a busy machine only adds timeouts, as it does
for the flaky tool (a 15 s limit against a 12 s median).
"""
from __future__ import annotations

import os
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from selfheal_plugin.history.clock import SimulatedClock
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.service import SelfHeal
from selfheal_plugin.testbed import TestbedConfig, run_workload, tool_name

pytestmark = [pytest.mark.closed_loop, pytest.mark.timeout(1200)]

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
A = T0 + timedelta(days=7)
END = A + timedelta(days=7)
SEARCH = tool_name("search")
FLAKY = tool_name("flaky")
CONFIG = TestbedConfig(time_scale=0.01, missing_path_rate=0.05, crash_probability=0.02, flaky_work_ms=12_000.0,
                       search_median_ms=14_000.0,
                       workflow_weights={"researcher": 0.4, "planner": 0.2, "ops": 0.4})
USER_CONFIG = f'# the runtime\'s own config, written by its user\n[tools."{FLAKY}"]\ntimeout_ms = 15000\n'
RAISED = USER_CONFIG + f'\n[tools."{SEARCH}"]\ntimeout_ms = 300000\n'


def git_at(home: Path, when: datetime, *args: str) -> None:
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S+0000")
    subprocess.run(["git", "-c", "user.name=Dot Files", "-c", "user.email=dot@example.com", *args], cwd=home,
                   env={**os.environ, "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}, check=True,
                   capture_output=True)


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    home = tmp_path_factory.mktemp("learn")
    (home / "config.toml").write_text(USER_CONFIG)
    (home / ".gitignore").write_text("/*\n!/.gitignore\n!/config.toml\n")
    git_at(home, T0 - timedelta(days=30), "init", "-q")
    git_at(home, T0 - timedelta(days=30), "add", ".gitignore", "config.toml")
    git_at(home, T0 - timedelta(days=30), "commit", "-q", "-m", "my runtime config")
    before = run_workload(home, runs=200, seed=21, clock=SimulatedClock(T0), days=7, config=CONFIG)
    # a person's own fix, by hand, between the weeks
    (home / "config.toml").write_text(RAISED)
    git_at(home, A + timedelta(minutes=5), "commit", "-q", "-am", "search is slow: give it five minutes")
    after = run_workload(home, runs=200, seed=22, clock=SimulatedClock(A), days=7, config=CONFIG)
    plugins.reset()
    with SelfHeal(home=home, clock=lambda: END) as sh:
        result = sh.learn(since=A.isoformat())
        found = sh.detect(propose=True, since=A.isoformat())
        rules = sh.rules()["rules"]
    plugins.reset()
    return {"home": home, "before": before, "after": after, "learn": result, "detect": found, "rules": rules}


def test_learn_finds_the_persons_timeout_raise_and_keeps_it_as_a_rule(learned):
    before, after, r = learned["before"], learned["after"], learned["learn"]
    pid = f"timeout:{SEARCH}"
    assert before.error_rates[pid] > 0.05 and after.error_rates.get(pid, 0.0) < before.error_rates[pid] / 5
    sig = next(e for e in r["improved"] if e["subject"] == pid)
    assert sig["attributed"] and sig["p_value"] < 0.05, (sig["explanation"], sig["fell_between"])
    assert sig["commit"]["author"] == "Dot Files" and sig["commit"]["changes"] == [
        {"kind": "config", "file": "config.toml", "path": ["tools", SEARCH, "timeout_ms"], "op": "set", "value": 300000}]
    (lr,) = [x for x in r["learned_rules"] if x["tool"] == SEARCH]
    rule = next(x for x in learned["rules"] if x["id"] == lr["rule"]["id"])
    assert rule["template"] == [{"path": ["tools", "{tool}", "timeout_ms"], "op": "set", "value": 300000}]
    assert rule["failure_kind"] in ("slow_tail", "hang") and rule["sources"] == ["learned"]
    (ev,) = rule["evidence"].values()
    assert ev["reduction"] >= 0.8 and ev["before"] > ev["after"]
    # the flaky tool, not fixed, times out the same way: learn points at it
    assert any(a["tool"] == FLAKY and a["rule_id"] == rule["id"] for a in r["applicable"]), r["applicable"]
    assert any(FLAKY in s and SEARCH in s for s in r["suggestions"]), r["suggestions"]


def test_the_rule_is_the_prior_of_the_proposal_for_the_other_tool(learned):
    r = learned["learn"]
    rule_id = next(x["rule"]["id"] for x in r["learned_rules"] if x["tool"] == SEARCH)
    patterns = {p["id"]: p for p in learned["detect"]["patterns"]}
    flaky = patterns[f"timeout:{FLAKY}"]
    search_rule = next(x for x in learned["rules"] if x["id"] == rule_id)
    assert flaky["failure_kind"] == search_rule["failure_kind"], (flaky["failure_kind"], search_rule["failure_kind"])
    proposal = next(p for p in learned["detect"]["proposals"] if p["pattern_id"] == f"timeout:{FLAKY}")
    assert proposal["changes"][0]["path"] == ["tools", FLAKY, "timeout_ms"]
    assert "a learned rule worked in 1 of 1 place" in proposal["expected_impact"]
    with SelfHeal(home=learned["home"], clock=lambda: END) as sh:
        row = next(i for i in sh.improvements(limit=None) if i["id"] == proposal["improvement_id"])
        assert row["status"] == "proposed"  # a prior never applies anything by itself
        stored = ImprovementStore(sh.conn).get(proposal["improvement_id"])
    assert stored.evidence["prior"]["rules"] == [rule_id] and stored.evidence["prior"]["worked"] == 1
