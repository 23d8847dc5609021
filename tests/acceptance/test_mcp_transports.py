"""``self-healing-mcp`` as an MCP client sees it: the installed console script over real
stdio and over streamable HTTP on a loopback port, driven by the official ``mcp`` client.
Results are compared with the library functions called in-process on the same database."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from typing import Any, Awaitable, Callable

import anyio
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore

from ..mcp_helpers import (
    TOOLS, RuntimeWriter, days_ago, error_text, home, recent_history, reference, server_command, stable,
    start_http_server, stop, structured,
)  # home, recent_history: shared fixtures


def over_stdio(args: list[str], session: Callable[[Client], Awaitable[Any]], env: dict | None = None
               ) -> tuple[Any, str]:
    """Spawn the console script, run ``session`` against it, return its value and the server's stderr."""
    params = StdioServerParameters(command=server_command(), args=args, env={**os.environ, **(env or {})})
    with tempfile.TemporaryFile("w+") as errlog:
        async def go() -> Any:
            async with Client(stdio_client(params, errlog=errlog)) as client:
                return await session(client)
        value = anyio.run(go)
        errlog.seek(0)
        return value, errlog.read()


def over_http(url: str, session: Callable[[Client], Awaitable[Any]]) -> Any:
    async def go() -> Any:
        async with Client(url) as client:
            return await session(client)
    return anyio.run(go)


async def check_tool_list(client: Client) -> None:
    tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == set(TOOLS)
    for name, (read_only, destructive) in TOOLS.items():
        assert (tools[name].annotations.read_only_hint, tools[name].annotations.destructive_hint) == (
            read_only, destructive), name
        assert tools[name].input_schema["type"] == "object" and tools[name].output_schema
    assert tools["analyze_run_health"].input_schema["required"] == ["run_id"]
    assert tools["propose_improvement"].input_schema["required"] == ["pattern_id"]


async def call(client: Client, name: str, **args: Any) -> Any:
    return await client.call_tool(name, args)


def test_stdio_all_nine_tools_match_the_library(home):
    db = home / "conversations.db"
    run_id = connect(db).execute("SELECT id FROM runs WHERE status = 'failed' ORDER BY id LIMIT 1").fetchone()[0]
    five_days = days_ago(5)

    async def session(client: Client) -> dict[str, Any]:
        await check_tool_list(client)
        out: dict[str, Any] = {}
        out["detect"] = structured(await call(client, "detect_failure_patterns"))
        out["detect_iso"] = structured(await call(client, "detect_failure_patterns", since="2000-01-01",
                                                  min_occurrences=5, confidence_threshold=0.6))
        out["health"] = structured(await call(client, "analyze_run_health", run_id=run_id))
        out["agents"] = structured(await call(client, "compute_agent_metrics", since=five_days))
        out["tools"] = structured(await call(client, "compute_tool_reliability"))
        pattern_id = next(p["id"] for p in out["detect"]["patterns"] if p["error_type"] == "timeout")
        out["proposal"] = structured(await call(client, "propose_improvement", pattern_id=pattern_id))
        imp_id = out["proposal"]["improvement_id"]
        out["test"] = structured(await call(client, "test_improvement", improvement_id=imp_id, mode="simulation"))
        out["apply"] = structured(await call(client, "apply_improvement", improvement_id=imp_id,
                                             changes_made="timeout raised from an MCP client"))
        out["verify"] = structured(await call(client, "verify_improvement", improvement_id=imp_id,
                                              measurement_window_days=3))
        out["dashboard"] = structured(await call(client, "get_health_dashboard", detailed=True))
        return out

    # before the session proposes: a pattern's suggested fix becomes its proposal's description then
    expected_detect = reference("detect_failure_patterns", home)
    expected_iso = reference("detect_failure_patterns", home, since="2000-01-01", min_occurrences=5,
                             confidence_threshold=0.6)
    out, stderr = over_stdio(["--home", str(home)], session)
    assert stable(out["detect"]) == stable(expected_detect)
    assert stable(out["detect_iso"]) == stable(expected_iso)
    assert out["health"] == reference("analyze_run_health", home, run_id=run_id)
    assert stable(out["agents"]) == stable(reference("compute_agent_metrics", home, since=five_days))
    assert stable(out["tools"]) == stable(reference("compute_tool_reliability", home))
    assert stable(out["dashboard"]) == stable(reference("get_health_dashboard", home, detailed=True))
    imp_id = out["proposal"]["improvement_id"]
    assert out["dashboard"]["recent_improvements"][0]["id"] == imp_id
    again = reference("propose_improvement", home, pattern_id=out["proposal"]["pattern_id"])
    assert again["improvement_id"] == imp_id and again["created"] is False
    row = ImprovementStore(connect(db)).get(imp_id)
    assert out["test"] == {**row.test_result, "next_step": f'apply_improvement(improvement_id="{imp_id}")'}
    assert (out["apply"]["status"], out["apply"]["commit_sha"], out["apply"]["applied_at"]) == (
        "applied", row.commit_sha, row.applied_at)
    log = subprocess.run(["git", "-C", str(home), "log", "-1", "--format=%B"], capture_output=True, text=True)
    assert f"Self-Heal-Improvement: {imp_id}" in log.stdout
    assert stable(out["verify"]) == stable(reference("verify_improvement", home, improvement_id=imp_id,
                                                     measurement_window_days=3))
    assert "Traceback" not in stderr


def test_stdio_errors_are_tool_errors_and_the_server_keeps_serving(home):
    async def session(client: Client) -> list[Any]:
        results = [
            await call(client, "detect_failure_patterns", since="-7x"),
            await call(client, "analyze_run_health", run_id="no-such-run"),
            await call(client, "propose_improvement", pattern_id="timeout:nothing_like_it"),
            await call(client, "test_improvement", improvement_id="imp-nope", mode="sideways"),
            await call(client, "apply_improvement", improvement_id="imp-nope", changes_made="x"),
            await call(client, "verify_improvement", improvement_id="imp-nope"),
            await call(client, "compute_agent_metrics", since=12),
        ]
        results.append(await call(client, "compute_agent_metrics"))
        return results

    results, stderr = over_stdio(["--home", str(home)], session, env={"RUST_LOG": "info"})
    texts = [error_text(r) for r in results[:-1]]
    assert all("\n" not in t for t in texts)
    for text, fragment in zip(texts, ["invalid time window '-7x'", "no run 'no-such-run'",
                                      "no pattern timeout:nothing_like_it", "mode: Input should be",
                                      "imp-nope", "imp-nope", "since: Input should be a valid string"]):
        assert fragment in text, (fragment, text)
    assert structured(results[-1])["agents"]
    assert "Traceback" not in stderr
    assert "self-healing-mcp" in stderr  # RUST_LOG=info reaches our logger, on stderr


def test_stdio_reports_the_index_build_to_a_client_that_asks(home):
    """The first call on a history not indexed yet sends progress notifications over the
    wire (one per chunk of events: here one), ending at all of them."""
    top = connect(home / "conversations.db").execute("SELECT max(id) FROM run_events").fetchone()[0]
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async def session(client: Client) -> Any:
        return await client.call_tool("detect_failure_patterns", {}, progress_callback=on_progress)

    result, _ = over_stdio(["--home", str(home)], session)
    assert structured(result) and seen == [(top, top, "Indexing run history")]


def test_stdout_carries_only_the_protocol(home):
    """Raw JSON-RPC over the console script's pipes: every stdout line is a JSON-RPC message,
    even when a call logs a warning (the generated history has malformed rows)."""
    errlog = tempfile.TemporaryFile("w+")  # a file, not a pipe: debug logging must never block the server
    proc = subprocess.Popen([server_command(), "--db", str(home / "conversations.db")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog,
                            env={**os.environ, "SELFHEAL_LOG": "debug"}, text=True)
    try:
        def send(msg: dict) -> None:
            proc.stdin.write(json.dumps(msg) + "\n")
            proc.stdin.flush()

        send({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
        init = json.loads(proc.stdout.readline())
        assert init["id"] == 1 and init["result"]["serverInfo"]["name"] == "self-healing"
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        send({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
              "params": {"name": "detect_failure_patterns", "arguments": {}}})
        reply = json.loads(proc.stdout.readline())
        assert reply["id"] == 2 and reply["result"]["structuredContent"]["patterns"]
        send({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
              "params": {"name": "compute_tool_reliability", "arguments": {"since": "-1x"}}})
        reply = json.loads(proc.stdout.readline())
        assert reply["id"] == 3 and reply["result"]["isError"] is True
        rest, _ = proc.communicate(timeout=15)  # closes stdin: the server ends
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        errlog.seek(0)
        stderr = errlog.read()
        errlog.close()
    assert proc.returncode == 0
    for line in rest.splitlines():
        assert json.loads(line)["jsonrpc"] == "2.0"
    assert "malformed" in stderr and "DEBUG" in stderr  # the warning went to the log, on stderr


def test_streamable_http(home):
    db = home / "conversations.db"
    run_id = connect(db).execute("SELECT id FROM runs ORDER BY id LIMIT 1").fetchone()[0]
    # --db elsewhere than --home's default: the database is found by the flag
    other = home.parent / "elsewhere.db"
    shutil.copy(db, other)
    six_days = days_ago(6)

    async def session(client: Client) -> dict[str, Any]:
        await check_tool_list(client)
        return {
            "detect": structured(await call(client, "detect_failure_patterns", since=six_days)),
            "health": structured(await call(client, "analyze_run_health", run_id=run_id)),
            "unknown": await call(client, "analyze_run_health", run_id="zzz-unknown"),
            "bad_mode": await call(client, "test_improvement", improvement_id="imp-1", mode="live"),
            "tools": structured(await call(client, "compute_tool_reliability", since=six_days)),
            "agents": structured(await call(client, "compute_agent_metrics")),
            "proposal": structured(await call(client, "propose_improvement", pattern_id="tool_error:list_dir")),
        }

    async def lifecycle(client: Client, imp_id: str) -> dict[str, Any]:
        return {
            "test": structured(await call(client, "test_improvement", improvement_id=imp_id)),
            "apply": structured(await call(client, "apply_improvement", improvement_id=imp_id,
                                           changes_made="preflight check added over HTTP")),
            "verify": structured(await call(client, "verify_improvement", improvement_id=imp_id)),
            "dashboard": structured(await call(client, "get_health_dashboard")),
        }

    # before the proposal below: a run's recommendations cite the open improvement of their pattern
    want_health = reference("analyze_run_health", home, other, run_id=run_id)
    want_detect = reference("detect_failure_patterns", home, other, since=six_days)
    proc, url = start_http_server("--home", str(home), "--db", str(other))
    try:
        out = over_http(url, session)
        out.update(over_http(url, lambda client: lifecycle(client, out["proposal"]["improvement_id"])))
        assert proc.poll() is None
    finally:
        _, stderr = stop(proc)
    assert stable(out["detect"]) == stable(want_detect)
    assert out["health"] == want_health
    assert "no run 'zzz-unknown'" in error_text(out["unknown"])
    assert "mode: Input should be" in error_text(out["bad_mode"])
    assert stable(out["tools"]) == stable(reference("compute_tool_reliability", home, other, since=six_days))
    assert stable(out["agents"]) == stable(reference("compute_agent_metrics", home, other))
    imp_id = out["proposal"]["improvement_id"]
    assert reference("propose_improvement", home, other, pattern_id="tool_error:list_dir")["improvement_id"] == imp_id
    row = ImprovementStore(connect(other)).get(imp_id)
    assert {k: v for k, v in out["test"].items() if k != "next_step"} == row.test_result
    # a risky result never suggests apply as the next step
    assert (" apply " in out["test"]["next_step"]) == (row.test_result["recommendation"] == "safe_to_apply")
    assert (out["apply"]["status"], out["apply"]["commit_sha"]) == ("applied", row.commit_sha)
    assert "preflight" in (home / "config.toml").read_text()
    assert stable(out["verify"]) == stable(reference("verify_improvement", home, other, improvement_id=imp_id))
    assert stable(out["dashboard"]) == stable(reference("get_health_dashboard", home, other))
    assert not ImprovementStore(connect(db)).list()  # the default database was never touched
    assert b"Traceback" not in stderr


@pytest.mark.parametrize("transport", ["stdio", "streamable-http"])
def test_served_while_a_runtime_writes(home, transport):
    """A runtime inserting runs and events in short transactions meanwhile: no call fails and
    the runtime never meets a locked database."""
    db = home / "conversations.db"

    async def session(client: Client) -> list[tuple[str, Any]]:
        results = []
        for i in range(12):
            results.append(("detect", await call(client, "detect_failure_patterns", since="-1h",
                                                 min_occurrences=1, confidence_threshold=0.0)))
            results.append(("tools", await call(client, "compute_tool_reliability", since="-1h")))
            if i % 4 == 0:
                results.append(("dashboard", await call(client, "get_health_dashboard")))
        return results

    with RuntimeWriter(db) as writer:
        if transport == "stdio":
            results, _ = over_stdio(["--home", str(home)], session)
        else:
            proc, url = start_http_server("--home", str(home))
            try:
                results = over_http(url, session)
            finally:
                stop(proc)
    assert writer.errors == []
    assert writer.runs > 0, writer.runs
    for _, r in results:
        assert not r.is_error, r.content[0].text
    # the runs written meanwhile were seen: list_dir failures of the last hour
    last = structured([r for name, r in results if name == "detect"][-1])
    assert any(p["id"] == "tool_error:list_dir" for p in last["patterns"])


def test_an_oversized_fix_pack_over_http_is_the_tools_one_line_error(home):
    """5 MB is past the SDK's default 4 MiB body limit (HTTP 413, an opaque -32603 for the
    client): the server takes bodies up to its own limit, so import refuses the pack itself."""
    from selfheal_plugin.lifecycle.sharing import MAX_PACK_BYTES

    assert MAX_PACK_BYTES < 5_000_000

    async def session(client: Client) -> Any:
        big = await client.call_tool("import_fix_pack", {"pack": "x" * 5_000_000})
        return big, await client.call_tool("list_rules", {})

    proc, url = start_http_server("--home", str(home))
    try:
        big, after = over_http(url, session)
    finally:
        stop(proc)
    assert big.is_error and big.content[0].text == ("Error executing tool import_fix_pack: the pack is larger "
                                                    "than 4 MiB; refusing it")
    assert not after.is_error  # still serving


def test_log_level_from_selfheal_log_before_rust_log(home):
    async def session(client: Client) -> int:
        return len((await client.list_tools()).tools)

    count, stderr = over_stdio(["--home", str(home)], session, env={"SELFHEAL_LOG": "error", "RUST_LOG": "info"})
    assert count == len(TOOLS)
    assert "over stdio" not in stderr
    count, stderr = over_stdio(["--home", str(home)], session, env={"RUST_LOG": "debug"})
    assert f"over stdio: home {home}" in stderr


def test_command_line():
    help_ = subprocess.run([server_command(), "--help"], capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0
    for option in ("--transport", "--host", "--port", "--home", "--db", "streamable-http"):
        assert option in help_.stdout
    bad = subprocess.run([server_command(), "--transport", "carrier-pigeon"], capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "carrier-pigeon" in bad.stderr and bad.stdout == ""
