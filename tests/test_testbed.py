"""The testbed: real MCP servers over stdio, the scripted agent, and what it records."""
from __future__ import annotations

import json
import random
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from selfheal_plugin.history.connection import connect
from selfheal_plugin.analysis.patterns import detect_failure_patterns
from selfheal_plugin.testbed import TestbedConfig, run_workload, tool_name
from selfheal_plugin.testbed.agent import build_tree
from selfheal_plugin.testbed.servers import (
    latency_note, list_directory, parse_args, reported_latency_ms, search_latency_ms,
)

START = datetime(2026, 11, 1, tzinfo=timezone.utc)
SEARCH, FILES, FLAKY = tool_name("search"), tool_name("files"), tool_name("flaky")


def test_list_directory_is_real_and_says_path_not_found(tmp_path):
    root = build_tree(tmp_path / "tree")
    assert list_directory(root, str(root / "src" / "api")).splitlines()[1:] == ["file0.txt", "file1.txt",
                                                                               "file2.txt"]
    assert "api/" in list_directory(root, "src")
    with pytest.raises(LookupError, match="Path not found: src/legacy"):
        list_directory(root, "src/legacy")
    with pytest.raises(ValueError, match="outside"):
        list_directory(root, "../../etc")
    with pytest.raises(ValueError, match="Not a directory"):
        list_directory(root, "src/api/file0.txt")


def test_search_latency_is_seeded_lognormal():
    a = [search_latency_ms(random.Random("s:1"), 12000, 0.5) for _ in range(3)]
    b = [search_latency_ms(random.Random("s:1"), 12000, 0.5) for _ in range(3)]
    assert a == b
    draws = sorted(search_latency_ms(random.Random(f"s:{i}"), 12000, 0.5) for i in range(2001))
    assert 11000 < draws[1000] < 13000  # the median is the configured one


def test_a_search_answer_reports_its_latency():
    answer = f"3 results for 'x'\n1. x\n{latency_note(12345.6)}"
    assert reported_latency_ms(answer) == 12346
    assert reported_latency_ms("3 results for 'x'\n(answered after soon)") is None


def test_server_arguments_are_checked():
    with pytest.raises(SystemExit):
        parse_args(["flaky", "--crash-probability", "2"])
    with pytest.raises(SystemExit):
        parse_args(["search", "--time-scale", "0"])
    assert parse_args(["files", "--root", "/x"]).root == "/x"


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    """~20 runs against the real servers; crashes made likely so a short run shows them."""
    home = tmp_path_factory.mktemp("binks")
    # Only the search keeps the runtime's 20 s limit: a crash of the flaky server noticed late
    # on a busy machine is still a crash, not a timeout.
    (home / "config.toml").write_text("".join(f'[tools."{tool}"]\ntimeout_ms = 600000\n' for tool in (FILES, FLAKY)))
    # Time at 20 real ms a simulated second: a search that drew less than the limit has
    # hundreds of real ms to answer in, so some get through however busy the machine is.
    config = TestbedConfig(crash_probability=0.25, missing_path_rate=0.3, time_scale=0.02,
                           workflow_weights={"researcher": 0.35, "planner": 0.3, "ops": 0.35})
    summary = run_workload(home, runs=20, seed=3, start=START, days=7, config=config)
    return home, summary


def test_workload_records_real_failures(workload):
    home, summary = workload
    assert summary.runs == 20 and summary.completed + summary.failed == 20
    assert {SEARCH, FILES, FLAKY} <= set(summary.calls)
    assert summary.errors.get(f"timeout:{SEARCH}", 0) >= 1
    assert summary.errors.get(f"tool_error:{FILES}", 0) >= 1
    assert summary.errors.get(f"server_crashed:{FLAKY}", 0) >= 1
    assert summary.crashes >= 1 and summary.server_starts["flaky"] >= 2  # restarted after the crash
    assert START <= datetime.fromisoformat(summary.ended_at) <= START + timedelta(days=8)

    conn = sqlite3.connect(home / "conversations.db")
    events = [json.loads(r[0]) for r in conn.execute(
        "SELECT event_data FROM run_events WHERE event_type = 'tool_complete'")]
    runs = conn.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall()
    metrics = conn.execute("SELECT count(*), sum(total_tool_calls) FROM run_metrics").fetchone()
    conn.close()
    assert dict(runs) == {k: v for k, v in {"completed": summary.completed, "failed": summary.failed}.items() if v}
    assert metrics == (20, len(events)) and len(events) == sum(summary.calls.values())
    for e in events:  # the runtime's shape: error_type only on failures, with its labels
        if e["is_error"]:
            assert e["error_type"] in {"timeout", "tool_error", "server_crashed"}
        else:
            assert "error_type" not in e
    messages = {e["error_type"]: e["result"] for e in events if e["is_error"]}
    # every timeout names its own tool
    assert all(e["result"] == f"Tool {e['name']} timed out after 20s" for e in events
               if e.get("error_type") == "timeout")
    assert any(e["name"] == SEARCH for e in events if e.get("error_type") == "timeout")
    assert "Path not found: " in messages["tool_error"]
    assert "process exited" in messages["server_crashed"]
    timeouts = [e["duration"] for e in events if e.get("error_type") == "timeout"]
    assert min(timeouts) >= 20000  # recorded in simulated ms, at or past the deadline
    # a search answers with the latency it drew; one that got through drew less than the limit
    # (the client's deadline starts before the request is sent), whatever the machine's load
    answered = [reported_latency_ms(e["result"]) for e in events if e["name"] == SEARCH and not e["is_error"]]
    assert answered and all(latency is not None and latency <= 20000 for latency in answered)


def test_selfheal_detects_the_workload_patterns(workload):
    home, summary = workload
    conn = connect(home / "conversations.db")
    found = detect_failure_patterns(conn, since="-30d", min_occurrences=1, confidence_threshold=0.0,
                                    now=START + timedelta(days=8))
    conn.close()
    counts = {p.id: p.occurrences for p in found.patterns}
    assert counts == summary.errors


def test_an_applied_config_is_in_force_for_the_servers(tmp_path):
    """With the timeout raised and auto_restart on, the same tools stop failing that way."""
    home = tmp_path / "binks"
    home.mkdir()
    (home / "config.toml").write_text(f'[tools."{SEARCH}"]\ntimeout_ms = 600000\n\n'
                                      '[servers."flaky"]\nauto_restart = true\nhealth_check = true\n')
    # No limit a busy machine can reach: the flaky server's retry after a crash may take a while.
    config = TestbedConfig(crash_probability=0.3, search_sigma=1.0, default_timeout_ms=600_000,
                           workflow_weights={"researcher": 0.5, "ops": 0.5})
    summary = run_workload(home, runs=6, seed=4, start=START, days=1, config=config)
    assert f"timeout:{SEARCH}" not in summary.errors
    conn = sqlite3.connect(home / "conversations.db")
    rows = [(r[0], json.loads(r[1])) for r in conn.execute(
        "SELECT run_id, event_data FROM run_events WHERE event_type = 'tool_complete' ORDER BY id")]
    conn.close()
    flaky = [(run, e) for run, e in rows if e["name"] == FLAKY]
    crashes = [i for i, (_, e) in enumerate(flaky) if e["is_error"]]
    assert crashes, "the seed should make the flaky server crash at least once"
    # a crash is followed, in the same run, by the retry on a restarted server
    recovered = [i for i in crashes if i + 1 < len(flaky) and flaky[i + 1][0] == flaky[i][0]
                 and not flaky[i + 1][1]["is_error"]]
    assert recovered
    # restarted once per recovered crash at least; never more often than it crashed
    assert 1 + len(recovered) <= summary.server_starts["flaky"] <= 1 + summary.crashes


def test_a_server_spawned_directly_without_the_fork_server(tmp_path):
    """The plain path (used where fork is unavailable): one process per start, real stdio."""
    import asyncio

    from selfheal_plugin.testbed.agent import ServerConnection

    root = build_tree(tmp_path / "tree")

    async def scenario():
        conn = ServerConnection("files", ["--root", str(root)], tmp_path / "files.log")
        await conn.start()
        try:
            listed = await conn.call("list_dir", path=str(root / "docs"))
            with pytest.raises(RuntimeError, match="Path not found: "):
                await conn.call("list_dir", path=str(root / "nope"))
            return listed, await conn.healthy()
        finally:
            await conn.stop()

    listed, healthy = asyncio.run(scenario())
    assert listed.splitlines()[1:] == ["guide/", "reference/"] and healthy


def _calls_by_run(home) -> dict[str, list[list]]:
    """Each run's tool calls in order, by the run's task: [name, arguments as JSON (the home's
    path left out), its answer (None for a failure)]."""
    conn = sqlite3.connect(home / "conversations.db")
    rows = conn.execute("SELECT r.task, e.event_type, e.event_data FROM run_events e JOIN runs r ON r.id = e.run_id "
                        "WHERE e.event_type IN ('tool_start', 'tool_complete') ORDER BY e.id").fetchall()
    conn.close()
    out: dict[str, list[list]] = {}
    for task, kind, data in rows:
        d = json.loads(data)
        if kind == "tool_start":
            out.setdefault(task, []).append([d["name"], json.dumps(d["arguments"], sort_keys=True).replace(str(home), ""),
                                             None])
        elif not d["is_error"]:
            out[task][-1][2] = d["result"]
    return out


def test_a_call_that_times_out_changes_only_its_own_run(tmp_path):
    """What a busy machine can do to a closed loop: make a call time out that would not
    have. Here every search, or every directory listing, times out (a 1 ms limit), ending
    runs early: every run still makes the calls it would have made, with the same arguments,
    up to its failure (each run draws from its own stream), and every search both made
    answers the same, latency included, though the search server was asked fewer times (each
    call draws on its server from a stream of its own). So the week keeps its course."""
    # Nothing else times out, however busy the machine: a limit of 10 simulated minutes.
    config = TestbedConfig(workflow_weights={"researcher": 0.5, "planner": 0.25, "ops": 0.25}, crash_probability=0.0,
                           default_timeout_ms=600_000)
    runs = {}
    for name, tool in (("free", None), ("search cut", SEARCH), ("files cut", FILES)):
        home = tmp_path / name.replace(" ", "-")
        home.mkdir()
        (home / "config.toml").write_text(f'[tools."{tool}"]\ntimeout_ms = 1\n' if tool else "")
        run_workload(home, runs=16, seed=5, start=START, days=1, config=config)
        runs[name] = _calls_by_run(home)
    free = runs["free"]
    assert len(free) == 16
    for name in ("search cut", "files cut"):
        cut = runs[name]
        assert cut.keys() == free.keys()
        ended_early = same_answers = 0
        for task, calls in free.items():
            made = cut[task]
            assert [c[:2] for c in made] == [c[:2] for c in calls[:len(made)]], (name, task)
            ended_early += len(made) < len(calls)
            for mine, theirs in zip(made, calls):
                if mine[0] == SEARCH and mine[2] is not None:
                    assert mine[2] == theirs[2], (name, task)
                    same_answers += 1
        assert ended_early >= 2, name  # runs stopped at the calls that time out
        if name == "files cut":  # planner runs stopped before their search; the researchers' answered the same
            assert same_answers >= 3
