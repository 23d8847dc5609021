"""One question, one answer, wherever it is asked: the installed `agent` CLI and the MCP
server (in-process client over the same home) agree on suggested fixes, rejections,
superseded proposals and next steps, because both call the one service."""
import json

import anyio
import pytest
from mcp import Client

from selfheal_plugin.mcp.server import build_server

from ..conftest import run_agent

SINCE = "2026-11-13T12:00:00Z"
PATTERN = "timeout:mcp__kubernetes__pods_list"

TAKEOVER = '''
from selfheal_plugin import Change, Strategy, hookimpl


class Patient(Strategy):
    name = "patient-timeout"
    error_types = ("timeout",)
    summary = "Wait longer, always ten minutes"

    def suggest(self, pattern):
        return f"Wait ten minutes for {pattern.tool_name}"

    def propose(self, pattern, history):
        return self.make_proposal(
            pattern, description=f"Set the timeout of {pattern.tool_name} to 600 s",
            expected_impact="unknown", risk_level="medium",
            changes=[Change.config(["tools", pattern.tool_name, "timeout_ms"], 600000)])


@hookimpl
def register_strategies(register):
    register(Patient())
'''



@pytest.fixture(autouse=True)
def same_window(binks_home):
    """The window of the sample history for every entry point, from [self_heal] (the MCP
    tools take the lookback setting when a call gives no ``since``)."""
    (binks_home / "config.toml").write_text(f'[self_heal]\nlookback = "{SINCE}"\n')


def _mcp(home, tool: str, **args):
    async def go():
        async with Client(build_server(home)) as client:
            return await client.call_tool(tool, args)
    return anyio.run(go)


def _detect(home) -> dict:
    res = run_agent("self-heal", "detect", "--home", str(home), "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def test_a_read_only_detect_suggests_the_fix_a_proposing_detect_stores(history_copy, binks_home):
    """Before any proposal exists, the MCP tool (read-only) and `show` suggest for each
    pattern the fix its strategy proposes; the proposing `detect` then stores exactly that."""
    before = {p["id"]: p for p in _mcp(binks_home, "detect_failure_patterns").structured_content["patterns"]}
    assert len(before) > 3 and all(p["suggested_by"] == "strategy" and p["improvement_id"] is None
                                   for p in before.values())
    shown = json.loads(run_agent("self-heal", "show", PATTERN, "--home", str(binks_home), "--json").stdout)
    assert shown["suggested_fix"] == before[PATTERN]["suggested_fix"] and shown["suggested_by"] == "strategy"
    # a run's health recommends that same fix for each of its failed calls' patterns
    checked = 0
    for pid in (PATTERN, *sorted(before)[:3]):
        health = _mcp(binks_home, "analyze_run_health", run_id=before[pid]["affected_runs"][-1]).structured_content
        for issue in health["issues"]:
            if issue.get("pattern_id") in before:
                assert issue["recommendation"] == before[issue["pattern_id"]]["suggested_fix"], issue
                checked += 1
    assert checked >= 4
    stored = {o["pattern_id"]: o for o in _detect(binks_home)["proposals"]}
    assert all(o["created"] for o in stored.values())
    assert {pid: p["suggested_fix"] for pid, p in before.items()} == {
        pid: stored[pid]["description"].splitlines()[0] for pid in before}


def test_a_rejection_sticks_in_the_cli_and_over_mcp(history_copy, binks_home):
    first = _detect(binks_home)
    imp_id = next(p["improvement_id"] for p in first["proposals"] if p["pattern_id"] == PATTERN)
    res = run_agent("self-heal", "reject", imp_id, "--yes", "--home", str(binks_home), "--json")
    assert res.returncode == 0, res.stderr
    again = _detect(binks_home)
    outcome = next(p for p in again["proposals"] if p["pattern_id"] == PATTERN)
    assert outcome["created"] is False and outcome["improvement_id"] == imp_id
    assert "was rejected; 0 new failure(s) since" in outcome["skipped"]
    pattern = next(p for p in again["patterns"] if p["id"] == PATTERN)
    # while the rejection stands the rejected fix is no one's suggestion: none, and why
    withheld = {"suggested_fix": None, "suggested_by": None, "improvement_id": imp_id,
                "improvement_status": "rejected", "no_fix_reason": outcome["skipped"]}
    assert {k: pattern[k] for k in withheld} == withheld
    text = run_agent("self-heal", "detect", "--home", str(binks_home)).stdout
    assert f"  – No new proposal for pattern {PATTERN}: {imp_id} for {PATTERN} was rejected" in text
    block = text.split(f"Pattern {PATTERN}\n")[1].split("\n\n")[0]
    assert f"    Suggested fix: none — {imp_id} for {PATTERN} was rejected" in block
    shown = run_agent("self-heal", "show", PATTERN, "--home", str(binks_home), "--json").stdout
    assert {k: json.loads(shown)[k] for k in withheld} == withheld
    result = _mcp(binks_home, "propose_improvement", pattern_id=PATTERN)
    assert result.is_error and len(result.content) == 1
    assert f"{imp_id} for {PATTERN} was rejected" in result.content[0].text
    mcp_pattern = next(p for p in _mcp(binks_home, "detect_failure_patterns").structured_content[
        "patterns"] if p["id"] == PATTERN)
    assert {k: mcp_pattern[k] for k in withheld} == withheld
    # nor does a run's health recommend a fix by the runtime's label in its place
    health = _mcp(binks_home, "analyze_run_health", run_id=pattern["affected_runs"][-1]).structured_content
    (issue,) = [i for i in health["issues"] if i.get("pattern_id") == PATTERN]
    assert issue["recommendation"] == f"No fix suggested: {outcome['skipped']}"


def test_a_strategy_that_takes_over_supersedes_the_open_proposal(history_copy, binks_home):
    first = _detect(binks_home)
    old = next(p for p in first["proposals"] if p["pattern_id"] == PATTERN)
    assert old["strategy"] == "timeout"
    plugins_dir = binks_home / "selfheal" / "plugins"
    plugins_dir.mkdir(parents=True)
    (plugins_dir / "patient.py").write_text(TAKEOVER)
    second = _detect(binks_home)
    new = next(p for p in second["proposals"] if p["pattern_id"] == PATTERN)
    assert new["strategy"] == "patient-timeout" and new["created"] and new["improvement_id"] != old["improvement_id"]
    listing = json.loads(run_agent("self-heal", "improvements", "--home", str(binks_home), "--json",
                                   "--status", "superseded").stdout)
    assert [r["id"] for r in listing["improvements"]] == [old["improvement_id"]]  # kept in history
    # the suggested fix is the new open proposal's description, in the CLI and over MCP
    pattern = next(p for p in second["patterns"] if p["id"] == PATTERN)
    assert pattern["suggested_fix"] == new["description"] == "Set the timeout of mcp__kubernetes__pods_list to 600 s"
    shown = json.loads(run_agent("self-heal", "show", PATTERN, "--home", str(binks_home), "--json").stdout)
    assert shown["suggested_fix"] == new["description"] and shown["improvement_id"] == new["improvement_id"]
    over_mcp = next(p for p in _mcp(binks_home, "detect_failure_patterns").structured_content[
        "patterns"] if p["id"] == PATTERN)
    assert over_mcp["suggested_fix"] == new["description"]


def test_the_next_step_follows_the_tests_verdict(history_copy, binks_home):
    first = _detect(binks_home)
    for outcome in first["proposals"]:
        if outcome.get("error") or not any(c["kind"] == "config" for c in outcome["changes"]):
            continue
        imp_id = outcome["improvement_id"]
        res = run_agent("self-heal", "test", imp_id, "--home", str(binks_home), "--json")
        assert res.returncode == 0, res.stderr
        verdict = json.loads(res.stdout)
        # a risky change is tried as a canary first, where a canary can run it (config settings only)
        canary = verdict["recommendation"] == "risky" and all(c["kind"] == "config" for c in outcome["changes"])
        expected = {"safe_to_apply": f"agent self-heal apply {imp_id}",
                    "risky": f"agent self-heal test {imp_id} --mode canary" if canary else f"agent self-heal apply {imp_id}",
                    "reject": f"agent self-heal reject {imp_id}"}[verdict["recommendation"]]
        assert verdict["next_step"] == expected, outcome["changes"]
        over_mcp = _mcp(binks_home, "test_improvement", improvement_id=imp_id)
        # the same step, as the tool an agent calls (reject has none: the command stays)
        assert over_mcp.structured_content["next_step"] == {
            "safe_to_apply": f'apply_improvement(improvement_id="{imp_id}")',
            "risky": f'test_improvement(improvement_id="{imp_id}", mode="canary")' if canary
            else f'apply_improvement(improvement_id="{imp_id}")',
            "reject": expected}[verdict["recommendation"]]
