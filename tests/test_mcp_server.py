"""The MCP facade in-process (``mcp.Client(server)``): tool list, schemas and annotations,
each tool against the library function the CLI calls, settings resolution, and errors as
one-line tool errors after which the server keeps serving."""
from __future__ import annotations

import shutil
from typing import Any

import anyio
import pytest
from mcp import Client

from selfheal_plugin.history import schema
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.mcp.server import build_server
from selfheal_plugin.history.settings import load_settings

from .mcp_helpers import (  # home, recent_history: shared fixtures
    TOOLS, days_ago, error_text, home, plain, recent_history, reference, stable, structured,
)


def call_all(server: Any, calls: list[tuple[str, dict]]) -> list[Any]:
    """Run the calls in order over one in-process client session."""
    async def go() -> list[Any]:
        async with Client(server) as client:
            return [await client.call_tool(name, args) for name, args in calls]
    return anyio.run(go)


def list_tools(server: Any) -> list[Any]:
    async def go() -> list[Any]:
        async with Client(server) as client:
            return (await client.list_tools()).tools
    return anyio.run(go)


def test_nine_tools_with_schemas_and_annotations(home):
    tools = {t.name: t for t in list_tools(build_server(home))}
    assert set(tools) == set(TOOLS)
    for name, (read_only, destructive) in TOOLS.items():
        t = tools[name]
        assert t.annotations.read_only_hint is read_only, name
        assert t.annotations.destructive_hint is destructive, name
        assert t.description and t.title
        assert t.output_schema is not None, f"{name} has no structured output"
        for prop in t.input_schema.get("properties", {}).values():
            assert prop.get("description"), f"{name}: a parameter without a description"
    # an omitted setting means the [self_heal] value: the schema publishes no hard default, and
    # its description and range come from the settings schema, as the CLI's help does
    props = tools["detect_failure_patterns"].input_schema["properties"]
    assert {k: v.get("default") for k, v in props.items()} == {
        "since": None, "min_occurrences": None, "confidence_threshold": None, "limit": None}
    assert "default: 20" in props["limit"]["description"]  # the CLI's --limit default, from the schema
    for name, key in (("since", "lookback"), ("min_occurrences", "min_occurrences"),
                      ("confidence_threshold", "confidence_threshold")):
        assert props[name]["description"] == schema.help_text(key)
    assert props["min_occurrences"]["anyOf"][0]["minimum"] == schema.bounds("min_occurrences")[0]
    mode = tools["test_improvement"].input_schema["properties"]["mode"]
    assert mode["enum"] == ["simulation", "canary", "shadow"] and mode["default"] == "simulation"
    assert "else 7 days" in tools["verify_improvement"].input_schema["properties"]["measurement_window_days"][
        "description"]
    assert tools["get_health_dashboard"].input_schema["properties"]["detailed"]["default"] is False
    # changes_made is optional, as the CLI's --changes-made is; the dashboard takes since like the CLI
    assert set(tools["apply_improvement"].input_schema["required"]) == {"improvement_id"}
    assert "since" in tools["get_health_dashboard"].input_schema["properties"]
    for t in tools.values():  # a client shows the description as written: no docstring indentation
        assert not any(line.startswith(" ") for line in t.description.splitlines()), t.name
    pattern_fields = tools["detect_failure_patterns"].output_schema["$defs"]["FailurePattern"]["properties"]
    assert {"id", "error_type", "tool_name", "occurrences", "correlation_score", "affected_runs",
            "suggested_fix"} <= set(pattern_fields)


def test_analysis_tools_match_the_library(home):
    run_id = connect(home / "conversations.db").execute(
        "SELECT id FROM runs WHERE status = 'failed' ORDER BY id LIMIT 1").fetchone()[0]
    calls = [
        ("detect_failure_patterns", {}),
        ("detect_failure_patterns", {"since": days_ago(3), "min_occurrences": 2, "confidence_threshold": 0.5}),
        ("analyze_run_health", {"run_id": run_id}),
        ("analyze_run_health", {"run_id": run_id[:8]}),
        ("compute_agent_metrics", {}),
        ("compute_tool_reliability", {"since": days_ago(2)}),
        ("get_health_dashboard", {}),
        ("get_health_dashboard", {"detailed": True}),
        ("detect_failure_patterns", {"limit": 1}),
    ]
    results = call_all(build_server(home), calls)
    for (name, args), result in zip(calls, results):
        want = reference(name, home, None, **({**args, "run_id": run_id} if name == "analyze_run_health" else args))
        assert stable(structured(result)) == stable(want), name
    patterns = structured(results[0])["patterns"]
    assert patterns and all(p["suggested_fix"] for p in patterns)
    assert len(structured(results[1])["patterns"]) >= len(patterns)
    dashboard = structured(results[7])
    assert "agents" in dashboard and "agents" not in structured(results[6])
    # limit keeps each pattern's latest affected runs, as detect --json --limit does; the count stays whole
    (one,) = [p for p in structured(results[8])["patterns"] if p["id"] == patterns[0]["id"]]
    assert one["affected_runs"] == patterns[0]["affected_runs"][-1:]
    assert one["affected_run_count"] == patterns[0]["affected_run_count"] > 1


def test_api_cli_and_mcp_list_the_same_affected_runs_by_default(home):
    """One default for how many affected runs a pattern lists: the `limit` flag's (20), from
    SelfHeal.detect() in Python as from `detect --json` and the MCP tool."""
    from selfheal_plugin.service import SelfHeal

    over_mcp = structured(call_all(build_server(home), [("detect_failure_patterns", {})])[0])["patterns"]
    with SelfHeal(home) as sh:
        api = sh.detect()["patterns"]
        every = sh.detect(runs_limit=None)["patterns"]
    assert stable(over_mcp) == stable(plain(api))
    assert max(p["affected_run_count"] for p in api) > schema.default("limit") == 20
    assert max(len(p["affected_runs"]) for p in api) == 20 < max(len(p["affected_runs"]) for p in every)


def test_lifecycle_tools_match_the_library(home):
    server = build_server(home)
    detected = structured(call_all(server, [("detect_failure_patterns", {})])[0])["patterns"]
    pattern_id = next(p["id"] for p in detected if p["error_type"] == "timeout")
    proposed = structured(call_all(server, [("propose_improvement", {"pattern_id": pattern_id})])[0])
    imp_id = proposed["improvement_id"]
    assert proposed["pattern_id"] == pattern_id and proposed["created"] is True
    # the library now returns the same open proposal, and so does a second call
    again = reference("propose_improvement", home, pattern_id=pattern_id)
    assert again["created"] is False and again["improvement_id"] == imp_id
    assert {k: v for k, v in again.items() if k != "created"} == {k: v for k, v in proposed.items() if k != "created"}

    tested = structured(call_all(server, [("test_improvement", {"improvement_id": imp_id})])[0])
    assert tested["test_mode"] == "simulation" and tested["recommendation"] in ("safe_to_apply", "risky", "reject")
    assert stable(tested) == stable(reference("test_improvement", home, improvement_id=imp_id))
    assert ImprovementStore(connect(home / "conversations.db")).get(imp_id).status == "tested"

    applied = structured(call_all(server, [("apply_improvement",
                                            {"improvement_id": imp_id, "changes_made": "raised via MCP"})])[0])
    row = ImprovementStore(connect(home / "conversations.db")).get(imp_id)
    assert applied["status"] == row.status == "applied"
    assert (applied["applied_at"], applied["verification_scheduled"], applied["commit_sha"]) == (
        row.applied_at, row.verification_scheduled, row.commit_sha)
    assert row.commit_sha and "raised via MCP" in row.changes_made
    assert "timeout_ms" in (home / "config.toml").read_text()

    verified = structured(call_all(server, [("verify_improvement", {"improvement_id": imp_id})])[0])
    assert verified["recommendation"] == "extend"  # no runs since the apply yet
    measured_again = reference("verify_improvement", home, improvement_id=imp_id)
    assert (verified["previous_recommendation"], measured_again["previous_recommendation"]) == (None, "extend")
    assert stable(verified) == stable(measured_again)
    short = structured(call_all(server, [("verify_improvement",
                                          {"improvement_id": imp_id, "measurement_window_days": 2})])[0])
    assert short["metrics"]["runs_before"] < verified["metrics"]["runs_before"]


def test_settings_come_from_config_toml_unless_the_call_says_otherwise(home):
    (home / "config.toml").write_text("[self_heal]\nmin_occurrences = 100000\n")
    r_default, r_explicit = call_all(build_server(home), [
        ("detect_failure_patterns", {}), ("detect_failure_patterns", {"min_occurrences": 3})])
    # no pattern, and the result says why, as `detect --json` (the same object) does
    default = structured(r_default)
    assert default["patterns"] == [] and default["failing_signatures"] > 0 and default["candidates"] == 0
    assert set(default) == set(reference("detect_failure_patterns", home))
    explicit = structured(r_explicit)
    assert stable(explicit) == stable(reference("detect_failure_patterns", home, min_occurrences=3))
    assert explicit["patterns"] != [] and explicit["proposals"] == [] and explicit["notified"] == []


def test_errors_are_one_line_tool_errors_and_the_server_keeps_serving(home):
    calls = [
        ("detect_failure_patterns", {"since": "-7x"}),
        ("detect_failure_patterns", {"min_occurrences": "many"}),
        ("detect_failure_patterns", {"confidence_threshold": 1.5}),
        ("analyze_run_health", {"run_id": "no-such-run"}),
        ("analyze_run_health", {}),
        ("propose_improvement", {"pattern_id": "timeout:no_such_tool"}),
        ("propose_improvement", {"pattern_id": "not-a-pattern-id"}),
        ("test_improvement", {"improvement_id": "imp-missing"}),
        ("test_improvement", {"improvement_id": "imp-missing", "mode": "bogus"}),
        ("apply_improvement", {"improvement_id": "imp-missing", "changes_made": "x"}),
        ("verify_improvement", {"improvement_id": "imp-missing"}),
        ("verify_improvement", {"improvement_id": "imp-missing", "measurement_window_days": 0}),
        ("compute_agent_metrics", {"since": "+1d"}),
        ("no_such_tool", {}),
        ("compute_tool_reliability", {}),
    ]
    results = call_all(build_server(home), calls)
    texts = [error_text(r) for r in results[:-1]]
    for text in texts:
        assert "\n" not in text and "Traceback" not in text, text
    expected = ["invalid time window '-7x'", "min_occurrences", "confidence_threshold", "no run 'no-such-run'",
                "run_id: Field required", "no pattern timeout:no_such_tool", "invalid pattern id", "imp-missing",
                "mode: Input should be 'simulation', 'canary' or 'shadow'", "imp-missing", "imp-missing",
                "measurement_window_days", "a window reaches back", "no_such_tool"]
    for text, fragment in zip(texts, expected):
        assert fragment in text, (fragment, text)
    assert "since: invalid time window" in texts[0]  # the argument's name, not the setting's (lookback)
    # the two one-line forms docs/mcp.md shows: a user error, and an argument the schema refuses
    assert texts[3] == "Error executing tool analyze_run_health: no run 'no-such-run' in the history"
    assert texts[8] == ("invalid arguments for test_improvement: mode: Input should be 'simulation', 'canary' "
                        "or 'shadow'")
    assert structured(results[-1])["tools"]  # still serving


def test_modes_the_library_does_not_offer_are_its_error(home):
    server = build_server(home)
    detected = structured(call_all(server, [("detect_failure_patterns", {})])[0])["patterns"]
    imp_id = structured(call_all(server, [("propose_improvement", {"pattern_id": detected[0]["id"]})])[0])[
        "improvement_id"]
    from selfheal_plugin.service import TEST_MODES

    for mode in ("canary", "shadow"):
        result = call_all(server, [("test_improvement", {"improvement_id": imp_id, "mode": mode})])[0]
        if mode in TEST_MODES:
            if result.is_error:  # a change a shadow cannot observe is refused with its reason
                assert mode == "shadow" and "shadow mode can only observe" in error_text(result)
            else:
                assert structured(result)["test_mode"] == mode
            if mode == "canary":  # end it, so the improvement can be tested again
                from selfheal_plugin.lifecycle.canary import drop_experiment

                drop_experiment(connect(home / "conversations.db"), load_settings(home), imp_id)
        else:
            assert f"unknown test mode '{mode}'" in error_text(result)
            assert ImprovementStore(connect(home / "conversations.db")).get(imp_id).status == "proposed"


def test_test_improvement_takes_since_as_the_cli_does(home):
    """`since` is `agent self-heal test --since`: the simulation's baseline window starts there."""
    from selfheal_plugin.history.times import parse_timestamp

    server = build_server(home)
    detected = structured(call_all(server, [("detect_failure_patterns", {})])[0])["patterns"]
    timeout_id = next(p["id"] for p in detected if p["error_type"] == "timeout")
    imp_id = structured(call_all(server, [("propose_improvement", {"pattern_id": timeout_id})])[0])["improvement_id"]
    assert "since" in {t.name: t for t in list_tools(server)}["test_improvement"].input_schema["properties"]
    since = days_ago(2)
    whole, relative, recent = (structured(r) for r in call_all(server, [
        ("test_improvement", {"improvement_id": imp_id}),
        ("test_improvement", {"improvement_id": imp_id, "since": "-2d"}),
        ("test_improvement", {"improvement_id": imp_id, "since": since})]))
    span = {k: (parse_timestamp(r["window"]["until"]) - parse_timestamp(r["window"]["since"])).total_seconds() / 86400
            for k, r in (("whole", whole), ("relative", relative))}
    assert round(span["whole"], 3) == 7 and round(span["relative"], 3) == 2
    assert recent["window"]["since"] == since
    assert stable(recent) == stable(reference("test_improvement", home, improvement_id=imp_id, since=since))


def test_missing_database_then_created(tmp_path, recent_history):
    db = tmp_path / "later" / "conversations.db"
    server = build_server(tmp_path / "home", db)
    first = call_all(server, [("get_health_dashboard", {})])[0]
    assert f"no run history at {db}" in error_text(first)
    db.parent.mkdir()
    shutil.copy(recent_history, db)
    assert structured(call_all(server, [("get_health_dashboard", {})])[0])["success_rate"] is not None


def test_broken_config_is_a_tool_error(home):
    (home / "config.toml").write_text("[self_heal\nmin_occurrences = 3\n")
    text = error_text(call_all(build_server(home), [("compute_agent_metrics", {})])[0])
    assert "config.toml is not valid TOML" in text and "\n" not in text


def test_canary_fraction_and_its_bounds(home):
    server = build_server(home)
    detected = structured(call_all(server, [("detect_failure_patterns", {})])[0])["patterns"]
    timeout_id = next(p["id"] for p in detected if p["error_type"] == "timeout")
    imp_id = structured(call_all(server, [("propose_improvement", {"pattern_id": timeout_id})])[0])["improvement_id"]
    bad = call_all(server, [("test_improvement", {"improvement_id": imp_id, "mode": "canary", "fraction": 1.5}),
                            ("test_improvement", {"improvement_id": imp_id, "fraction": 0.3})])
    assert bad[0].is_error and "fraction" in error_text(bad[0])
    assert bad[1].is_error and "canary mode only" in error_text(bad[1])
    assert ImprovementStore(connect(home / "conversations.db")).get(imp_id).status == "proposed"
    ok = call_all(server, [("test_improvement", {"improvement_id": imp_id, "mode": "canary", "fraction": 0.3})])[0]
    assert not ok.is_error, error_text(ok)
    stored = ImprovementStore(connect(home / "conversations.db")).get(imp_id)
    assert stored.status == "canary" and stored.experiment["fraction"] == 0.3


def test_an_unknown_argument_is_a_tool_error_not_ignored(home):
    (result,) = call_all(build_server(home), [("detect_failure_patterns", {"sinse": "-3d"})])
    assert error_text(result) == "invalid arguments for detect_failure_patterns: unknown argument(s) sinse"


@pytest.mark.parametrize("tool", ["detect_failure_patterns", "get_health_dashboard", "compute_tool_reliability",
                                  "analyze_run_health"])
def test_a_first_call_reports_the_index_build_as_progress(home, monkeypatch, tool):
    """A client that asks for progress sees the index build chunk by chunk, up to all of
    the history's events; the answer is the one it gets without asking; a call with
    nothing new to index reports nothing."""
    from selfheal_plugin.history import errorindex

    monkeypatch.setattr(errorindex, "CHUNK_IDS", 1000)
    conn = connect(home / "conversations.db")
    top = conn.execute("SELECT max(id) FROM run_events").fetchone()[0]
    run_id = conn.execute("SELECT id FROM runs WHERE status = 'failed' ORDER BY id LIMIT 1").fetchone()[0]
    conn.close()
    args = {"run_id": run_id} if tool == "analyze_run_health" else {}
    seen: list[list[tuple[float, float | None, str | None]]] = [[], []]

    async def go() -> list[Any]:
        async with Client(build_server(home)) as client:
            out = []
            for k in (0, 1):
                async def on_progress(progress: float, total: float | None, message: str | None, k: int = k) -> None:
                    seen[k].append((progress, total, message))
                out.append(await client.call_tool(tool, args, progress_callback=on_progress))
            out.append(await client.call_tool(tool, args))
            return out
    first, again, unasked = anyio.run(go)
    assert top > 3000 and len(seen[0]) == -(-top // 1000)
    assert [p for p, _, _ in seen[0]] == [min(1000 * (i + 1), top) for i in range(len(seen[0]))]
    assert {(t, m) for _, t, m in seen[0]} == {(top, "Indexing run history")}
    assert seen[1] == []
    assert stable(structured(first)) == stable(structured(again)) == stable(structured(unasked))


def test_a_progress_notification_that_cannot_be_sent_does_not_stop_the_call(home, monkeypatch):
    from mcp.server.mcpserver import Context

    async def gone(self: Any, *args: Any, **kwargs: Any) -> None:
        raise anyio.BrokenResourceError("the client went away")
    monkeypatch.setattr(Context, "report_progress", gone)

    async def go() -> Any:
        async with Client(build_server(home)) as client:
            async def on_progress(progress: float, total: float | None, message: str | None) -> None:
                raise AssertionError("no notification could be sent")
            return await client.call_tool("detect_failure_patterns", {}, progress_callback=on_progress)
    result = anyio.run(go)
    assert stable(structured(result)) == stable(reference("detect_failure_patterns", home))


def test_verify_accepts_a_keep_early_over_mcp_as_the_cli_does(binks_home):
    """Five days after an apply after which the failing runs fell from 30 % to 2 %, the keep is
    provisional (extend) unless the caller accepts it early: `early` is the CLI's --early."""
    from datetime import timedelta

    from selfheal_plugin.history.times import format_timestamp, utcnow

    from .lifecycle_data import add_improvement, rate_runs, timeout_change, write_runs

    db = binks_home / "conversations.db"
    applied_at = utcnow() - timedelta(days=5)
    write_runs(db, rate_runs(applied_at - timedelta(days=7), applied_at, 60, 0.3, seed=1)
               + rate_runs(applied_at, utcnow() - timedelta(minutes=5), 60, 0.02, seed=2))
    imp = add_improvement(db, [timeout_change()], status="applied", applied_at=format_timestamp(applied_at),
                          commit_sha="0" * 40)
    provisional, accepted = (structured(r) for r in call_all(build_server(binks_home), [
        ("verify_improvement", {"improvement_id": imp.id}),
        ("verify_improvement", {"improvement_id": imp.id, "early": True})]))
    assert (provisional["recommendation"], provisional["provisional_recommendation"]) == ("extend", "keep")
    assert (accepted["recommendation"], accepted["status"]) == ("keep", "verified")


def test_a_canary_started_over_mcp_is_ended_over_mcp(home):
    """test_improvement in canary mode starts one (a commit); canary_promote is refused while
    its verdict is extend, and canary_drop ends it (a commit) with the improvement back to proposed.
    What each says to do next names the tools, not the CLI."""
    from .lifecycle_data import add_improvement, git, timeout_change

    imp = add_improvement(home / "conversations.db", [timeout_change()])
    server = build_server(home)
    started, promote, dropped, again = call_all(server, [
        ("test_improvement", {"improvement_id": imp.id, "mode": "canary"}),
        ("canary_promote", {"improvement_id": imp.id}),
        ("canary_drop", {"improvement_id": imp.id}),
        ("canary_drop", {"improvement_id": imp.id})])
    assert structured(started)["test_mode"] == "canary"
    assert structured(started)["next_step"] == f'verify_improvement(improvement_id="{imp.id}")'
    assert (f'end with canary_promote(improvement_id="{imp.id}") or canary_drop(improvement_id="{imp.id}")'
            in structured(started)["reason"])
    assert "the canary's verdict is extend" in error_text(promote)
    assert error_text(promote).endswith("promote anyway with force=true")
    assert structured(dropped)["status"] == "proposed"
    assert "only an improvement running as a canary or shadow can be dropped" in error_text(again)
    assert f'(start one: test_improvement(improvement_id="{imp.id}", mode="canary"))' in error_text(again)
    assert "agent self-heal" not in str([structured(started), error_text(promote), error_text(again)])
    assert ImprovementStore(connect(home / "conversations.db")).get(imp.id).status == "proposed"
    assert "canary" not in (home / "config.toml").read_text()
    assert len(git(home, "log", "--format=%H").split()) >= 3  # versioning, the canary, its end


def test_apply_tells_an_agent_what_the_cli_warns_about(home):
    """An agent applying an untested fix whose same change was rolled back hears both, as
    the CLI's prompt and --json say them, the next step named as a tool."""
    from .lifecycle_data import add_improvement, timeout_change

    undone = {"improvement_id": "imp-20261101-0000aaaa", "status": "rolled_back",
              "note": "a fix with the same changes (imp-20261101-0000aaaa) was rolled back on 2026-11-01"}
    imp = add_improvement(home / "conversations.db", [timeout_change(90000)],
                          evidence={"same_change_undone": undone})
    applied = structured(call_all(build_server(home), [("apply_improvement", {"improvement_id": imp.id})])[0])
    assert applied["test"] is None and applied["same_change_undone"] == undone
    assert applied["warnings"] == [
        f'Not tested: test_improvement(improvement_id="{imp.id}") predicts its effect from history',
        f"Note: {undone['note']}"]


# agent self-heal command -> the tools that do what it does (docs/mcp.md lists the rest as CLI-only)
CLI_TOOLS = {
    "detect": {"detect_failure_patterns"}, "health": {"analyze_run_health"},
    "dashboard": {"get_health_dashboard", "compute_agent_metrics", "compute_tool_reliability"},
    "test": {"test_improvement"}, "apply": {"apply_improvement"}, "verify": {"verify_improvement"},
    "canary": {"canary_promote", "canary_drop"}, "ab": {"ab_start", "ab_status", "ab_promote", "ab_drop"},
    "learn": {"learn_from_success", "list_rules", "set_rule_enabled"}, "export": {"export_fix_pack"},
    "import": {"import_fix_pack"}, "sync": {"sync_fix_packs"},
}


def test_docs_name_exactly_the_cli_commands_without_a_tool(home):
    """docs/mcp.md's CLI-only paragraph names every `agent self-heal` command no tool does, and
    no other; each command it leaves out has its tools on the server."""
    import re
    from pathlib import Path

    from selfheal_plugin.cli.main import self_heal

    commands = set(self_heal.list_commands(None))
    served = {t.name for t in list_tools(build_server(home))}
    assert set(CLI_TOOLS) <= commands and set().union(*CLI_TOOLS.values()) <= served
    text = (Path(__file__).parents[1] / "docs" / "mcp.md").read_text()
    paragraph = text.split("<!-- cli-only:", 1)[1].split("-->", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"`([a-z-]+)`", " ".join(paragraph.split()).split(" as well as ", 1)[0]))
    assert named == commands - set(CLI_TOOLS)
    assert "`agent self-heal-daemon`" in paragraph and "`sync --remote`" in paragraph
