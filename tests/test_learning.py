"""Learning from success (lifecycle.learning): a fall in errors found between two windows,
credited to a person's own config commit when the timing fits, turned into a fix rule, and
the rule used as a prior or a proposal for other tools of the same failure kind."""
from __future__ import annotations

import json
import os
import re
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio
import click
import pytest
from click.testing import CliRunner
from mcp import Client

from selfheal_plugin import hookimpl
from selfheal_plugin.cli.main import agent
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import Improvement, ImprovementStore
from selfheal_plugin.history.rules import Rule, RuleStore
from selfheal_plugin.lifecycle import learning
from selfheal_plugin.lifecycle.apply import apply_improvement
from selfheal_plugin.lifecycle.proposals import history_window, make_proposal, propose_detailed
from selfheal_plugin.lifecycle.verification import verify_improvement
from selfheal_plugin.mcp.server import build_server
from selfheal_plugin.analysis.patterns import get_pattern
from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.plugins.strategy import Change, Strategy
from selfheal_plugin.service import SelfHeal

from .lifecycle_data import K8S, rate_runs, settings_for, write_runs

END = datetime(2026, 11, 20, tzinfo=timezone.utc)
SPLIT = END - timedelta(days=7)
LO = END - timedelta(days=14)
OTHER = "mcp__search__web_search"
CONFIG = f'# the runtime\'s config\n[tools."{K8S}"]\ntimeout_ms = 60000\n'
RAISED = f'# the runtime\'s config\n[tools."{K8S}"]\ntimeout_ms = 120000\n'


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugins.reset()
    yield
    plugins.reset()


def git_at(home: Path, when: datetime, *args: str) -> str:
    stamp = when.strftime("%Y-%m-%dT%H:%M:%S+0000")
    env = {**os.environ, "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp}
    return subprocess.run(["git", "-c", "user.name=Dot Files", "-c", "user.email=dot@example.com", *args],
                          cwd=home, env=env, check=True, capture_output=True, text=True).stdout


def person_commit(home: Path, when: datetime, text: str, message: str = "raise the k8s timeout") -> None:
    (home / "config.toml").write_text(text)
    git_at(home, when, "commit", "-q", "-am", message)


def make_home(home: Path, *, k8s_after: float = 0.02, other: float = 0.3) -> Path:
    """Two weeks: K8S fails 30% of runs before SPLIT and ``k8s_after`` after; OTHER fails
    ``other`` throughout. config.toml is in git since before the windows."""
    runs = rate_runs(LO, SPLIT, 300, 0.3, K8S, seed=1) + rate_runs(SPLIT, END, 300, k8s_after, K8S, seed=2)
    runs += rate_runs(LO, END, 400, other, OTHER, seed=3)
    write_runs(home / "conversations.db", runs)
    (home / "config.toml").write_text(CONFIG)
    git_at(home, LO, "init", "-q")
    git_at(home, LO - timedelta(days=3), "add", "config.toml")
    git_at(home, LO - timedelta(days=3), "commit", "-q", "-m", "my config")
    return home


def open_home(home: Path):
    s = settings_for(home)
    return connect(s.db_path), s


def test_a_planted_fall_is_credited_to_a_persons_commit_and_becomes_a_rule(binks_home):
    home = make_home(binks_home)
    person_commit(home, SPLIT + timedelta(minutes=10), RAISED)
    conn, s = open_home(home)
    r = learning.learn(conn, s, since=SPLIT.isoformat(), until=END, now=END)
    sig = next(e for e in r["improved"] if e["subject"] == f"timeout:{K8S}")
    assert sig["before_rate"] > 0.1 and sig["after_rate"] < 0.03 and sig["p_value"] < 0.05
    assert sig["attributed"] and sig["commit"]["changes"] == [
        {"kind": "config", "file": "config.toml", "path": ["tools", K8S, "timeout_ms"], "op": "set", "value": 120000}]
    assert "a person's change" in sig["explanation"] and sig["commit"]["author"] == "Dot Files"
    assert not any(e["subject"] in (f"timeout:{OTHER}", OTHER) for e in r["improved"])  # no fall there
    rule = RuleStore(conn).get(sig["rule_id"])
    assert rule.template == [{"path": ["tools", "{tool}", "timeout_ms"], "op": "set", "value": 120000}]
    (origin, ev), = rule.evidence.items()
    assert origin.endswith(f":{K8S}") and ev["source"] == "learned" and ev["worked"]
    assert ev["before"] > 0.1 and ev["after"] < 0.03 and ev["reduction"] > 0.8 and ev["p_value"] < 0.05
    assert ev["n_before"] > 100 and ev["n_after"] > 100
    assert rule.failure_kind == get_pattern(conn, f"timeout:{K8S}", since=LO.isoformat(), now=END,
                                            until=SPLIT).failure_kind
    # where it could apply now: the other tool that still times out the same way
    assert [a["tool"] for a in r["applicable"] if a["rule_id"] == rule.id] == [OTHER]
    assert r["suggestions"] and OTHER in r["suggestions"][0] and K8S in r["suggestions"][0]
    # learning twice counts the same place once
    learning.learn(conn, s, since=SPLIT.isoformat(), until=END, now=END)
    assert RuleStore(conn).get(rule.id).places == 1


@pytest.mark.parametrize("status", ["applied", "verified"])
def test_a_rule_is_not_suggested_for_a_pattern_whose_fix_is_in_force(binks_home, status):
    home = make_home(binks_home)
    person_commit(home, SPLIT + timedelta(minutes=10), RAISED)
    conn, s = open_home(home)
    fixed = ImprovementStore(conn).insert(Improvement(
        id="imp-20261119-0000f1ed", status=status, pattern_id=f"timeout:{OTHER}", error_type="timeout",
        tool_name=OTHER, description=f"Increase the timeout of {OTHER}", changes=[], applied_at=SPLIT.isoformat()))
    r = learning.learn(conn, s, since=SPLIT.isoformat(), until=END, now=END)
    assert r["learned_rules"] and r["applicable"] == [] and r["suggestions"] == []
    ImprovementStore(conn).update(fixed.id, status="rolled_back")  # not in force any more: suggested again
    r = learning.learn(conn, s, since=SPLIT.isoformat(), until=END, now=END)
    assert [a["tool"] for a in r["applicable"]] == [OTHER] and OTHER in r["suggestions"][0]


def test_a_fall_without_a_commit_is_said_so(binks_home):
    home = make_home(binks_home)
    conn, s = open_home(home)
    r = learning.learn(conn, s, since=SPLIT.isoformat(), until=END, now=END)
    sig = next(e for e in r["improved"] if e["subject"] == f"timeout:{K8S}")
    assert not sig["attributed"] and sig["explanation"].startswith(learning.NO_CHANGE)
    assert r["commits"] == [] and r["learned_rules"] == [] and RuleStore(conn).list() == []


def test_a_fall_selfheal_made_is_named_as_ours_and_not_learned_as_a_persons(binks_home):
    home = make_home(binks_home)
    # selfheal's own commit (with its trailers) is not a person's change: named, not learned
    person_commit(home, SPLIT + timedelta(minutes=10), RAISED,
                  "selfheal: raise\n\nSelf-Heal-Improvement: imp-x\nSelf-Heal-Action: apply")
    conn, s = open_home(home)
    r = learning.learn(conn, s, since=SPLIT.isoformat(), until=END, now=END)
    sig = next(e for e in r["improved"] if e["subject"] == f"timeout:{K8S}")
    assert not sig["attributed"] and sig["by_selfheal"] == "imp-x"
    assert sig["explanation"].startswith("selfheal's own improvement imp-x (commit ")
    assert [c["improvement"] for c in r["commits"]] == ["imp-x"]
    assert r["learned_rules"] == [] and RuleStore(conn).list() == []


def test_selfheals_own_commit_is_dated_by_its_clock_and_named_as_ours(binks_home):
    # a simulated clock (the demo's) stamps applied_at; the commit is dated by the same clock,
    # so learn finds the fall at selfheal's commit instead of a commit days after it
    home = make_home(binks_home)
    conn, s = open_home(home)
    imp = ImprovementStore(conn).insert(Improvement(
        id="imp-20261113-0000a11e", status="tested", pattern_id=f"timeout:{K8S}", error_type="timeout", tool_name=K8S,
        description="Raise the k8s timeout", changes=[
            {"kind": "config", "file": "config.toml", "path": ["tools", K8S, "timeout_ms"], "op": "set",
             "value": 120000}]))
    at = SPLIT + timedelta(minutes=10)
    apply_improvement(conn, s, imp.id, now=at)
    assert git_at(home, END, "log", "-1", "--format=%at %ct").split() == [str(int(at.timestamp()))] * 2
    r = learning.learn(conn, s, since=SPLIT.isoformat(), until=END, now=END)
    sig = next(e for e in r["improved"] if e["subject"] == f"timeout:{K8S}")
    assert sig["by_selfheal"] == imp.id and not sig["attributed"], sig["explanation"]
    assert sig["explanation"].startswith(f"selfheal's own improvement {imp.id} (commit ")
    assert r["learned_rules"] == []


def test_a_fall_at_selfheals_own_ab_experiment_is_named_as_ours(binks_home, monkeypatch):
    # an A/B experiment's commit sets the tool's settings in its arms ([ab."ID".arms."IMP"
    # .tools."X"]), not in [tools]: learn credits the fall to the experiment, not to nobody
    from selfheal_plugin.lifecycle import ab

    home = make_home(binks_home)
    conn, s = open_home(home)
    store = ImprovementStore(conn)
    arms = [store.insert(Improvement(
        id=f"imp-20261113-0000ab0{i}", status=status, pattern_id=f"timeout:{K8S}", error_type="timeout",
        tool_name=K8S, description=f"Arm {i}", changes=[
            {"kind": "config", "file": "config.toml", "path": ["tools", K8S, key], "op": "set", "value": value}]))
        for i, (status, key, value) in enumerate((("tested", "timeout_ms", 120000), ("candidate", "retry_attempts", 2)))]
    ab_id = ab.start_ab(conn, s, f"timeout:{K8S}", [a.id for a in arms], now=SPLIT + timedelta(minutes=10))[
        "experiment_id"]
    r = learning.learn(conn, s, since=SPLIT.isoformat(), until=END, now=END)
    sig = next(e for e in r["improved"] if e["subject"] == f"timeout:{K8S}")
    assert sig["by_selfheal"] == ab_id and not sig["attributed"], sig["explanation"]
    assert sig["explanation"].startswith(f"selfheal's own A/B experiment {ab_id} (commit ")
    assert sig["explanation"].endswith("not learned again")
    (commit,) = r["commits"]
    assert commit["improvement"] == ab_id and commit["action"] == "ab"
    assert {tuple(c["path"]) for c in commit["changes"]} == {
        ("ab", ab_id, "arms", arms[0].id, "tools", K8S, "timeout_ms"),
        ("ab", ab_id, "arms", arms[1].id, "tools", K8S, "retry_attempts")}
    assert r["learned_rules"] == [] and RuleStore(conn).list() == []
    monkeypatch.setenv("COLUMNS", "80")
    res = _cli("learn", "--home", str(home), "--since", SPLIT.isoformat(), "--until", END.isoformat())
    assert res.exit_code == 0, res.output
    assert all(len(line) <= 80 for line in res.output.splitlines()), res.output
    assert "(A/B arm" in res.output and all(a.id in res.output for a in arms), res.output
    assert "no tool/server key" not in res.output and learning.NO_CHANGE not in res.output


def _experiment_history(home: Path, mode: str) -> tuple[Improvement, str]:
    """The k8s timeout run as a canary or shadow from SPLIT (through the service, so its
    commits are the real ones), promoted two days before END; the improvement and the
    start commit."""
    conn, _ = open_home(home)
    imp = ImprovementStore(conn).insert(Improvement(
        id="imp-20261113-0000ca0a", status="tested", pattern_id=f"timeout:{K8S}", error_type="timeout",
        tool_name=K8S, description="Raise the k8s timeout", changes=[
            {"kind": "config", "file": "config.toml", "path": ["tools", K8S, "timeout_ms"], "op": "set",
             "value": 120000}]))
    with SelfHeal(home=home, clock=lambda: SPLIT + timedelta(minutes=10)) as sh:
        start = sh.canary_start(imp.id, mode=mode)["commit_sha"]
    with SelfHeal(home=home, clock=lambda: END - timedelta(days=2)) as sh:
        sh.canary_promote(imp.id, force=True)  # the runs carry no arm: no verdict, so forced
    return imp, start


def test_a_fall_at_selfheals_own_canary_is_named_as_ours(binks_home, monkeypatch):
    # a canary's commit sets the tool's settings in its section ([canary."ID".tools."X"]) for
    # its share of runs, not in [tools]: learn credits the fall to the canary, not to nobody
    home = make_home(binks_home)
    imp, start = _experiment_history(home, "canary")
    conn, s = open_home(home)
    r = learning.learn(conn, s, since=SPLIT.isoformat(), until=END, now=END)
    for subject in (f"timeout:{K8S}", K8S):
        sig = next(e for e in r["improved"] if e["subject"] == subject)
        assert sig.get("by_selfheal") == imp.id and not sig["attributed"], sig["explanation"]
        assert sig["explanation"].startswith(f"selfheal's own canary {imp.id} (commit {start[:12]} ")
        assert sig["explanation"].endswith("not learned again")
    assert not any(e["attributed"] for e in r["improved"])
    key = ("canary", imp.id, "tools", K8S, "timeout_ms")
    assert [(c["improvement"], c["action"], [(tuple(ch["path"]), ch["op"]) for ch in c["changes"]])
            for c in r["commits"] if c["action"] != "apply"] == [
        (imp.id, "canary", [(key, "set")]), (imp.id, "canary-end", [(key, "delete")])]
    assert r["commits"][0]["sha"] == start
    assert r["learned_rules"] == [] and RuleStore(conn).list() == []
    monkeypatch.setenv("COLUMNS", "80")
    res = _cli("learn", "--home", str(home), "--since", SPLIT.isoformat(), "--until", END.isoformat())
    assert res.exit_code == 0, res.output
    assert all(len(line) <= 80 for line in res.output.splitlines()), res.output
    assert "(canary)" in res.output and "selfheal's own canary" in res.output
    assert "no tool/server key" not in res.output and "no config change" not in res.output


def test_a_fall_at_selfheals_own_shadow_is_not_credited_to_it(binks_home):
    # a shadow only observes (every call keeps its outcome): a fall at its start is not its
    # doing, so it is not credited to it (nor learned); its commits are still named as ours
    home = make_home(binks_home)
    imp, start = _experiment_history(home, "shadow")
    conn, s = open_home(home)
    r = learning.learn(conn, s, since=SPLIT.isoformat(), until=END, now=END)
    sig = next(e for e in r["improved"] if e["subject"] == f"timeout:{K8S}")
    assert not sig["attributed"] and not sig.get("by_selfheal"), sig["explanation"]
    assert sig["explanation"].startswith(learning.NO_CHANGE) and start[:12] not in sig["explanation"]
    assert [(c["improvement"], c["action"], c["changes"]) for c in r["commits"] if c["action"] != "apply"] == [
        (imp.id, "shadow", []), (imp.id, "shadow-end", [])]
    assert r["learned_rules"] == [] and RuleStore(conn).list() == []


def test_a_commit_with_no_call_after_it_says_so(binks_home):
    home = make_home(binks_home)
    person_commit(home, END + timedelta(hours=1), RAISED)  # after the last call of the window
    conn, s = open_home(home)
    r = learning.learn(conn, s, since=SPLIT.isoformat(), until=END + timedelta(hours=2), now=END + timedelta(hours=2))
    sig = next(e for e in r["improved"] if e["subject"] == f"timeout:{K8S}")
    (rejected,) = sig["rejected"]
    assert rejected["n_after"] == 0 and rejected["reason"] == "no call of the tool came after it in the window"
    assert "did not fall significantly" not in sig["explanation"]


def test_a_commit_whose_timing_does_not_fit_is_not_credited(binks_home):
    home = make_home(binks_home)
    person_commit(home, LO + timedelta(days=3), RAISED)  # four days before the errors fell
    conn, s = open_home(home)
    r = learning.learn(conn, s, since=SPLIT.isoformat(), until=END, now=END)
    sig = next(e for e in r["improved"] if e["subject"] == f"timeout:{K8S}")
    assert not sig["attributed"] and "timing does not fit" in sig["explanation"]
    assert sig["rejected"][0]["reason"].startswith("the errors fell between")
    assert RuleStore(conn).list() == []


def test_no_fall_gives_nothing(binks_home):
    home = make_home(binks_home, k8s_after=0.3)
    person_commit(home, SPLIT + timedelta(minutes=10), RAISED)
    conn, s = open_home(home)
    r = learning.learn(conn, s, since=SPLIT.isoformat(), until=END, now=END)
    assert r["improved"] == [] and r["learned_rules"] == [] and r["tested"] > 0
    assert len(r["commits"]) == 1  # the commit is seen, but credited with nothing


def test_a_config_diff_names_only_tool_and_server_settings():
    old = '[self_heal]\nlookback = "-7d"\n[tools."a"]\ntimeout_ms = 1\n[tools."a".circuit_breaker]\nfailure_threshold = 3\n'
    new = ('[self_heal]\nlookback = "-3d"\n[tools."a"]\ntimeout_ms = 2\n[servers."s"]\nhealth_check = true\n')
    assert learning.config_diff(old, new) == [
        {"kind": "config", "file": "config.toml", "path": ["servers", "s", "health_check"], "op": "set", "value": True},
        {"kind": "config", "file": "config.toml", "path": ["tools", "a", "circuit_breaker", "failure_threshold"],
         "op": "delete"},
        {"kind": "config", "file": "config.toml", "path": ["tools", "a", "timeout_ms"], "op": "set", "value": 2}]


def _learned_home(binks_home):
    home = make_home(binks_home)
    person_commit(home, SPLIT + timedelta(minutes=10), RAISED)
    conn, s = open_home(home)
    r = learning.learn(conn, s, since=SPLIT.isoformat(), until=END, now=END)
    return conn, s, r["learned_rules"][0]["rule"]["id"]


def test_a_rule_is_a_prior_for_the_same_keys_and_a_disabled_rule_is_not(binks_home):
    conn, s, rid = _learned_home(binks_home)
    plugins.load_plugins()
    pattern = get_pattern(conn, f"timeout:{OTHER}", since="-7d", now=END)
    proposal = make_proposal(pattern, history_window(conn, s, "-7d", now=END))
    assert proposal.strategy == "timeout" and proposal.changes[0].path == ["tools", OTHER, "timeout_ms"]
    prior = proposal.evidence["prior"]
    assert prior["rules"] == [rid] and prior["places"] == 1 and prior["worked"] == 1
    assert "a learned rule worked in 1 of 1 place (median -" in proposal.expected_impact
    RuleStore(conn).set_enabled(rid, False)
    again = make_proposal(pattern, history_window(conn, s, "-7d", now=END))
    assert "prior" not in again.evidence and "learned rule" not in again.expected_impact
    # the tool the rule was learned on gets no prior from its own measurement
    own = get_pattern(conn, f"timeout:{K8S}", since=LO.isoformat(), now=END, until=SPLIT)
    RuleStore(conn).set_enabled(rid, True)
    assert "prior" not in make_proposal(own, history_window(conn, s, LO.isoformat(), now=END, until=SPLIT)).evidence


class ManualOnly(Strategy):
    """Test-only: answers timeouts with a step for a person, no config change."""
    name = "manual-timeout-test"
    error_types = ("timeout",)
    kinds = ("hang", "slow_tail")
    summary = "Ask a person (tests only)"

    def propose(self, pattern, history):
        return self.make_proposal(pattern, description="Ask the server's owner", expected_impact="unknown",
                                  risk_level="low", changes=[Change.manual("ask the owner why it hangs")])


class ManualPlugin:
    @hookimpl
    def register_strategies(self, register):
        register(ManualOnly())


def test_a_rule_gives_a_proposal_when_the_strategy_has_no_config_change_and_stops_when_disabled(binks_home):
    conn, s, rid = _learned_home(binks_home)
    plugins.strategies(s)
    plugin = ManualPlugin()
    plugins.register(plugin, "manual-timeout-test")
    try:
        first = propose_detailed(conn, s, f"timeout:{OTHER}", since="-7d", now=END)
        imp = first.improvement
        assert first.created and imp.strategy == f"rule:{rid}" and imp.risk_level == "medium"
        assert imp.changes[0] == {"kind": "config", "file": "config.toml", "path": ["tools", OTHER, "timeout_ms"],
                                  "op": "set", "value": 120000}
        assert imp.changes[1]["kind"] == "manual" and imp.evidence["rule"]["id"] == rid
        # one open proposal per pattern: asking again returns it
        assert propose_detailed(conn, s, f"timeout:{OTHER}", since="-7d", now=END).improvement.id == imp.id
        RuleStore(conn).set_enabled(rid, False)
        after = propose_detailed(conn, s, f"timeout:{OTHER}", since="-7d", now=END).improvement
    finally:
        plugins.unregister(plugin)
    assert ImprovementStore(conn).get(imp.id).status == "superseded"
    assert after.id != imp.id and after.strategy == "manual-timeout-test"


def test_a_verified_keep_becomes_a_verified_rule(binks_home):
    home = binks_home
    write_runs(home / "conversations.db", rate_runs(LO, SPLIT, 300, 0.3, K8S, seed=1)
               + rate_runs(SPLIT, END, 300, 0.0, K8S, seed=2))
    conn, s = open_home(home)
    plugins.load_plugins()
    imp = propose_detailed(conn, s, f"timeout:{K8S}", since=LO.isoformat(), now=SPLIT).improvement
    apply_improvement(conn, s, imp.id, now=SPLIT)
    v = verify_improvement(conn, s, imp.id, now=END)
    assert v["recommendation"] == "keep" and v["rule_id"]
    rule = RuleStore(conn).get(v["rule_id"])
    (ev,) = rule.evidence.values()
    assert ev["source"] == "verified" and ev["worked"] and ev["note"] == f"improvement {imp.id}"
    assert rule.template[0]["path"] == ["tools", "{tool}", "timeout_ms"]
    assert rule.failure_kind == imp.evidence["failure_kind"]


# ------------------------------------------------------------------ CLI and service


def _cli(*args: str):
    return CliRunner().invoke(agent, ["self-heal", *args], catch_exceptions=False)


def test_cli_learn_lists_improvements_rules_and_turns_rules_off(binks_home, monkeypatch):
    home = make_home(binks_home)
    person_commit(home, SPLIT + timedelta(minutes=10), RAISED)
    with SelfHeal(home=home, clock=lambda: END) as sh:
        rid = sh.learn(since=SPLIT.isoformat())["learned_rules"][0]["rule"]["id"]
    res = _cli("learn", "--home", str(home), "--rules", "--json")
    assert res.exit_code == 0, res.output
    assert [r["id"] for r in json.loads(res.output)["rules"]] == [rid]
    res = _cli("learn", "--home", str(home), "--rules")
    assert res.exit_code == 0 and rid in res.output
    assert all(len(line) <= 80 for line in res.output.splitlines())
    res = _cli("learn", "--home", str(home), "--disable", rid)
    assert res.exit_code == 0 and res.output.startswith(f"{rid} disabled: ")
    conn, _ = open_home(home)
    off = RuleStore(conn).get(rid)
    assert not off.enabled
    # again: a no-op that says so, the rule untouched (updated_at included)
    res = _cli("learn", "--home", str(home), "--disable", rid)
    assert res.exit_code == 0 and res.output.startswith(f"{rid} was already disabled: ")
    assert RuleStore(conn).get(rid) == off
    res = _cli("learn", "--home", str(home), "--enable", rid, "--json")
    assert res.exit_code == 0 and json.loads(res.output)["rule"]["enabled"] is True
    assert json.loads(res.output)["changed"] is True
    on = RuleStore(conn).get(rid)
    res = _cli("learn", "--home", str(home), "--enable", rid, "--json")
    assert res.exit_code == 0 and json.loads(res.output)["changed"] is False and RuleStore(conn).get(rid) == on
    res = _cli("learn", "--home", str(home), "--enable", rid)
    assert res.exit_code == 0 and res.output.startswith(f"{rid} was already enabled: ")


def test_cli_learn_text_fits_80_columns_and_escapes_history_text(binks_home, monkeypatch):
    home = make_home(binks_home)
    person_commit(home, SPLIT + timedelta(minutes=10), RAISED, "raise \x1b[31mred\x1b[0m timeout")
    monkeypatch.setenv("COLUMNS", "80")
    res = _cli("learn", "--home", str(home), "--since", SPLIT.isoformat(), "--until", END.isoformat())
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output
    assert all(len(line) <= 80 for line in res.output.splitlines()), res.output
    assert K8S in res.output and "person" in res.output and OTHER in res.output
    # ids whole in their cells: the subject, selfheal's improvement, the tool a rule could apply to
    ours = "imp-20261116-0000a11e"
    person_commit(home, SPLIT + timedelta(days=3), CONFIG + "# a note\n",
                  f"selfheal: note\n\nSelf-Heal-Improvement: {ours}\nSelf-Heal-Action: apply")
    person_commit(home, SPLIT + timedelta(days=3, hours=1), CONFIG + f'[tools."{OTHER}"]\ntimeout_ms = 5000\n',
                  f"selfheal: other\n\nSelf-Heal-Improvement: {ours}\nSelf-Heal-Action: apply")
    res = _cli("learn", "--home", str(home), "--since", SPLIT.isoformat(), "--until", END.isoformat())
    assert res.exit_code == 0, res.output
    assert all(len(line) <= 80 for line in res.output.splitlines()), res.output
    for whole in (f"timeout:{K8S}", ours, f"{OTHER}:"):
        assert any(whole in line for line in res.output.splitlines()), (whole, res.output)
    assert any(line.startswith("rule-") and f"  {OTHER}  " in line for line in res.output.splitlines()), res.output


def test_cli_learn_tells_a_command_that_exists_to_propose_where_a_rule_applies(binks_home, monkeypatch):
    home = make_home(binks_home)
    person_commit(home, SPLIT + timedelta(minutes=10), RAISED)
    monkeypatch.setenv("COLUMNS", "80")
    res = _cli("learn", "--home", str(home), "--since", SPLIT.isoformat(), "--until", END.isoformat())
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "Where enabled rules could apply now" in text
    hint = text[text.index("Propose one with:"):]
    # every alternative the hint names before its explanation is a command that exists
    told = re.split(r",? or ", hint.removeprefix("Propose one with:").split("(")[0].strip())
    commands = agent.commands["self-heal"].commands
    for command in told:
        assert command.startswith("agent self-heal "), (command, hint)
        words = command.removeprefix("agent self-heal ").split()
        assert words[0] in commands, (words, hint)  # no `propose`: detect is what proposes
        sub = commands[words[0]]
        if isinstance(sub, click.Group) and len(words) > 1:
            assert words[1] in sub.commands, (words, hint)


@pytest.mark.parametrize("args, message", [
    (["--since", "-7x"], "invalid time window"),
    (["--disable", "rule-000000000000"], "no rule"),
    (["--enable", "rule-000000000000"], "no rule"),
    (["--enable", "a", "--disable", "b"], "one of"),
    (["--until", "soon"], "invalid time window"),
    (["--since", "-1d", "--until", "-3d"], "nothing to compare"),
    (["--rules", "--since", "-7d"], "--since set the windows learn compares; --rules has none"),
    # the instant written with its 4-digit year, and a hint that fits (not "use -30m, ...")
    (["--since", "0001-01-01"], "the window before 0001-01-01T00:00:00.000000Z, as long as the one since it, "
                                "would start before year 1; give a later --since"),
])
def test_cli_learn_bad_input_is_one_line_and_changes_nothing(binks_home, args, message):
    home = make_home(binks_home)
    db = home / "conversations.db"
    before = db.read_bytes()
    res = _cli("learn", "--home", str(home), *args)
    assert res.exit_code in (1, 2) and message in res.output and "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], res.output
    assert db.read_bytes() == before


# ------------------------------------------------------------------ MCP


def test_mcp_learn_is_read_only_and_rules_turn_off_through_it(binks_home):
    home = make_home(binks_home)
    person_commit(home, SPLIT + timedelta(minutes=10), RAISED)
    with SelfHeal(home=home, clock=lambda: END) as sh:
        rid = sh.learn(since=SPLIT.isoformat())["learned_rules"][0]["rule"]["id"]

    async def go():
        async with Client(build_server(home)) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            learned = await client.call_tool("learn_from_success", {"since": SPLIT.isoformat(),
                                                                     "until": END.isoformat()})
            off = await client.call_tool("set_rule_enabled", {"rule_id": rid, "enabled": False})
            bad = await client.call_tool("set_rule_enabled", {"rule_id": "rule-nope", "enabled": True})
            listed = await client.call_tool("list_rules", {})
            return tools, learned, off, bad, listed

    tools, learned, off, bad, listed = anyio.run(go)
    assert tools["learn_from_success"].annotations.read_only_hint
    assert not tools["set_rule_enabled"].annotations.read_only_hint
    data = learned.structured_content
    assert data["recorded"] is False and any(e["subject"] == f"timeout:{K8S}" and e["attributed"]
                                             for e in data["improved"])
    assert off.structured_content["rule"]["enabled"] is False and off.structured_content["changed"] is True
    assert bad.is_error and "no rule" in bad.content[0].text and "Traceback" not in bad.content[0].text
    assert [r["enabled"] for r in listed.structured_content["rules"]] == [False]


def test_evidence_imported_from_other_homes_is_a_prior_too(binks_home):
    home = make_home(binks_home)  # no person's commit: nothing learned here
    conn, s = open_home(home)
    plugins.load_plugins()
    pattern = get_pattern(conn, f"timeout:{OTHER}", since="-7d", now=END)
    template = [{"path": ["tools", "{tool}", "timeout_ms"], "op": "set", "value": 90000}]
    entry = {"source": "imported", "worked": True, "reduction": 0.9, "before": 0.3, "after": 0.03,
             "n_before": 400, "n_after": 380, "measured_at": "2026-11-01T00:00:00.000000Z"}
    RuleStore(conn).merge(Rule.build(pattern.failure_kind, template, "set timeout_ms = 90000",
                                     {"a" * 16 + ":mcp__k8s__logs": entry,
                                      "b" * 16 + ":mcp__db__query": {**entry, "worked": False, "reduction": 0.0}}))
    RuleStore(conn).merge(Rule.build("rate_limited", template, "other kind", {"c" * 16 + ":x": entry}))
    proposal = make_proposal(pattern, history_window(conn, s, "-7d", now=END))
    prior = proposal.evidence["prior"]
    assert (prior["places"], prior["worked"], prior["sources"]) == (2, 1, ["imported"])
    assert "worked in 1 of 2 places (median -90% errors)" in proposal.expected_impact
    assert proposal.strategy == "timeout"  # a prior never replaces the strategy's own config change


def test_an_open_manual_only_proposal_gives_way_to_a_rule_learned_later(binks_home):
    home = make_home(binks_home)
    person_commit(home, SPLIT + timedelta(minutes=10), RAISED)
    conn, s = open_home(home)
    plugins.strategies(s)
    plugin = ManualPlugin()
    plugins.register(plugin, "manual-timeout-test")
    try:
        manual = propose_detailed(conn, s, f"timeout:{OTHER}", since="-7d", now=END).improvement
        assert manual.strategy == "manual-timeout-test"  # no rule yet: the strategy's steps
        rid = learning.learn(conn, s, since=SPLIT.isoformat(), until=END, now=END)["learned_rules"][0]["rule"]["id"]
        ruled = propose_detailed(conn, s, f"timeout:{OTHER}", since="-7d", now=END).improvement
    finally:
        plugins.unregister(plugin)
    assert ruled.strategy == f"rule:{rid}" and ruled.id != manual.id
    old = ImprovementStore(conn).get(manual.id)
    assert old.status == "superseded" and old.evidence["superseded_by_strategy"] == f"rule:{rid}"
    open_rows = conn.execute("SELECT count(*) FROM improvements WHERE pattern_id = ? AND status IN "
                             "('proposed', 'tested')", (f"timeout:{OTHER}",)).fetchone()[0]
    assert open_rows == 1
