"""``agent self-heal ab start|status|promote|drop`` through the installed command: text and
JSON, bad input as one line with nothing changed, a crash in the middle of a section edit,
80-column tables, and the MCP tools (read-only mode keeps only ab_status)."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import anyio
import pytest
from mcp import Client

from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.mcp.access import restrict_to_read_only
from selfheal_plugin.mcp.server import build_server

from ..conftest import run_agent
from ..lifecycle_data import K8S, add_improvement, git, git_as_user, rate_runs, timeout_change, write_runs

NOW = datetime.now(timezone.utc)
PATTERN = f"timeout:{K8S}"
USER = "# mine\n"


@pytest.fixture
def home(binks_home):
    write_runs(binks_home / "conversations.db", rate_runs(NOW - timedelta(days=6), NOW - timedelta(hours=1), 60, 0.3))
    (binks_home / "config.toml").write_text(USER)
    git(binks_home, "init", "-q")
    git(binks_home, "add", "config.toml")
    git_as_user(binks_home, "commit", "-q", "-m", "mine")
    return binks_home


def _arms(home):
    db = home / "conversations.db"
    a = add_improvement(db, [timeout_change(90_000)], status="tested")
    b = add_improvement(db, [{"kind": "config", "file": "config.toml", "path": ["tools", K8S, "retry_attempts"],
                              "op": "set", "value": 2}], status="candidate",
                        description="Retry twice: the timeouts of pods_list look transient, so two retries with "
                                    "backoff should clear most of them before a run fails")
    return a, b


def _status(home, imp_id):
    return ImprovementStore(connect(home / "conversations.db")).get(imp_id).status


def test_start_status_and_drop_in_text_and_json(home):
    a, b = _arms(home)
    r = run_agent("self-heal", "ab", "start", PATTERN, "--arms", f"{a.id},{b.id}", "--fraction", "0.25",
                  env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert "Started A/B ab-" in r.stdout and f"{a.id} on 25% of runs" in r.stdout and "+timeout_ms = 90000" in r.stdout
    arms = [line for line in r.stdout.splitlines() if not line.startswith(("+", "-", "@"))]
    assert all(len(line) <= 80 for line in arms), r.stdout  # an arm's long description wraps under its indent
    assert f"  {b.id} on 25% of runs: Retry twice" in r.stdout and any(line.startswith("    ") for line in arms)
    ab_id = r.stdout.split("Started A/B ", 1)[1].split()[0]
    r = run_agent("self-heal", "ab", "status", ab_id, env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert "Verdict: extend" in r.stdout and "control" in r.stdout
    text = " ".join(r.stdout.split())  # lines wrapped at 80 columns, read as one text
    assert f"Next: agent self-heal ab status {ab_id} (when more runs have been measured)" in text  # not drop
    assert all(len(line) <= 80 for line in r.stdout.splitlines()), r.stdout
    r = run_agent("self-heal", "ab", "status", "--json")
    d = json.loads(r.stdout)
    assert [e["experiment_id"] for e in d["experiments"]] == [ab_id] and d["experiments"][0]["status"] == "running"
    r = run_agent("self-heal", "ab", "status", env={"COLUMNS": "80"})
    assert ab_id in r.stdout and all(len(line) <= 80 for line in r.stdout.splitlines())
    r = run_agent("self-heal", "ab", "promote", ab_id, "--yes")
    assert r.returncode == 1 and r.stderr.strip().startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "no significant winner" in r.stderr
    r = run_agent("self-heal", "ab", "drop", ab_id, "--yes", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "dropped"
    assert (home / "config.toml").read_text() == USER
    assert (_status(home, a.id), _status(home, b.id)) == ("tested", "candidate")


@pytest.mark.parametrize("args, code, message", [
    (["start", PATTERN, "--arms", "ARM_A"], 2, "at least two arms"),
    (["start", PATTERN, "--arms", "ARM_A,imp-nope"], 1, "no improvement 'imp-nope'"),
    (["start", PATTERN, "--arms", "ARM_A,ARM_B", "--fraction", "0.6"], 2, "--fraction is each arm's share"),
    (["start", PATTERN, "--arms", "ARM_A,ARM_B", "--fraction", "x"], 2, "is not a valid float"),
    (["start", "nocolon", "--arms", "ARM_A,ARM_B"], 2, "not a pattern id"),
    (["start", "timeout:other", "--arms", "ARM_A,ARM_B"], 1, "is a fix for"),
    (["start", "timeout:nope"], 1, "no pattern timeout:nope"),
    (["status", "ab-nope"], 1, "no A/B experiment 'ab-nope'"),
    (["promote", "ab-nope", "--yes"], 1, "no A/B experiment 'ab-nope'"),
    (["drop", "ab-nope", "--yes"], 1, "no A/B experiment 'ab-nope'"),
    (["drop", "ab-nope", "--json"], 1, "no A/B experiment 'ab-nope'"),
])
def test_bad_input_is_one_line_and_changes_nothing(home, args, code, message):
    a, b = _arms(home)
    args = [x.replace("ARM_A", a.id).replace("ARM_B", b.id) for x in args]
    head = git(home, "rev-parse", "HEAD")
    r = run_agent("self-heal", "ab", *args)
    assert r.returncode == code, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr
    assert git(home, "rev-parse", "HEAD") == head and (home / "config.toml").read_text() == USER
    assert (_status(home, a.id), _status(home, b.id)) == ("tested", "candidate")
    conn = connect(home / "conversations.db")
    assert not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'selfheal_ab'").fetchone()  # not even a table


def test_a_dirty_config_is_refused(home):
    a, b = _arms(home)
    (home / "config.toml").write_text(USER + "# my uncommitted note\n")
    r = run_agent("self-heal", "ab", "start", PATTERN, "--arms", f"{a.id},{b.id}")
    assert r.returncode == 1 and "uncommitted changes" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (home / "config.toml").read_text() == USER + "# my uncommitted note\n"
    assert _status(home, a.id) == "tested"


@pytest.mark.parametrize("step, expect_status, section", [
    ("ab-start-after-write", None, False),  # no commit yet: undone
    ("ab-start-after-commit", "running", True),  # committed: finished
])
def test_a_crash_during_the_start_is_recovered(home, step, expect_status, section):
    a, b = _arms(home)
    r = run_agent("self-heal", "ab", "start", PATTERN, "--arms", f"{a.id},{b.id}", env={"SELFHEAL_CRASH_AT": step})
    assert r.returncode == 99
    r = run_agent("self-heal", "ab", "status", "--json")  # every command recovers first
    assert r.returncode == 0, r.stderr
    assert "recovered interrupted ab-start" in r.stderr
    experiments = json.loads(r.stdout)["experiments"]
    assert [e["status"] for e in experiments] == ([expect_status] if expect_status else [])
    assert ("[ab." in (home / "config.toml").read_text()) == section
    assert _status(home, a.id) == ("ab" if section else "tested")
    assert not git(home, "status", "--porcelain", "--", "config.toml").strip()


def test_a_crash_during_the_end_is_recovered(home):
    a, b = _arms(home)
    r = run_agent("self-heal", "ab", "start", PATTERN, "--arms", f"{a.id},{b.id}", "--json")
    ab_id = json.loads(r.stdout)["experiment_id"]
    r = run_agent("self-heal", "ab", "drop", ab_id, "--yes", env={"SELFHEAL_CRASH_AT": "ab-end-after-commit"})
    assert r.returncode == 99
    r = run_agent("self-heal", "ab", "status", ab_id, "--json")
    assert "recovered interrupted ab-end" in r.stderr and json.loads(r.stdout)["experiments"][0]["status"] == "dropped"
    assert (home / "config.toml").read_text() == USER
    assert (_status(home, a.id), _status(home, b.id)) == ("tested", "candidate")


def _tools(server):
    async def go():
        async with Client(server) as client:
            return {t.name: t for t in (await client.list_tools()).tools}
    return anyio.run(go)


def _call(server, name, args):
    async def go():
        async with Client(server) as client:
            return await client.call_tool(name, args)
    return anyio.run(go)


def test_the_mcp_tools(home):
    a, b = _arms(home)
    server = build_server(home)
    tools = _tools(server)
    assert tools["ab_status"].annotations.read_only_hint
    for name in ("ab_start", "ab_promote", "ab_drop"):
        assert tools[name].annotations.destructive_hint and not tools[name].annotations.read_only_hint
    started = _call(server, "ab_start", {"pattern_id": PATTERN, "arms": [a.id, b.id]})
    assert not started.is_error, started
    ab_id = started.structured_content["experiment_id"]
    listed = _call(server, "ab_status", {})
    assert [e["experiment_id"] for e in listed.structured_content["experiments"]] == [ab_id]
    # one question, one answer: the MCP tool and `ab status ID --json` give the same JSON
    one = _call(server, "ab_status", {"experiment_id": ab_id}).structured_content
    r = run_agent("self-heal", "ab", "status", ab_id, "--json")
    assert r.returncode == 0, r.stderr
    cli = json.loads(r.stdout)
    for d in (one, cli):  # judged at its own instant
        for e in d["experiments"]:
            for volatile in ("checked_at", "until"):
                e["verdict"].pop(volatile)
    assert cli == one and [e["experiment_id"] for e in cli["experiments"]] == [ab_id]
    bad = _call(server, "ab_promote", {"experiment_id": ab_id})
    assert bad.is_error and "no significant winner" in bad.content[0].text and "\n" not in bad.content[0].text
    assert not _call(server, "ab_drop", {"experiment_id": ab_id}).is_error
    restrict_to_read_only(server)
    kept = set(_tools(server))
    assert "ab_status" in kept and not {"ab_start", "ab_promote", "ab_drop"} & kept


def test_a_promotion_killed_before_the_apply_is_finished_by_promote_again(home):
    a, b = _arms(home)
    r = run_agent("self-heal", "ab", "start", PATTERN, "--arms", f"{a.id},{b.id}", "--json")
    ab_id = json.loads(r.stdout)["experiment_id"]
    r = run_agent("self-heal", "ab", "promote", ab_id, "--yes", "--force", env={"SELFHEAL_CRASH_AT": "after-intent"})
    assert r.returncode == 99  # the end is committed, the winner's apply was killed
    r = run_agent("self-heal", "ab", "status", ab_id, "--json")
    (d,) = json.loads(r.stdout)["experiments"]
    assert d["status"] == "promoted" and d["forced"] == 1 and "[ab." not in (home / "config.toml").read_text()
    winner = d["winner"]
    assert _status(home, winner) in ("proposed", "tested")
    r = run_agent("self-heal", "ab", "promote", ab_id, "--yes", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["applied"]["status"] == "applied" and _status(home, winner) == "applied"


def test_the_dashboard_lists_running_experiments_with_their_arms(home):
    a, b = _arms(home)
    r = run_agent("self-heal", "ab", "start", PATTERN, "--arms", f"{a.id},{b.id}", "--json")
    ab_id = json.loads(r.stdout)["experiment_id"]
    r = run_agent("self-heal", "dashboard", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    assert f"A/B {ab_id}: {PATTERN}" in r.stdout and a.id in r.stdout and b.id in r.stdout
    assert all(len(line) <= 80 for line in r.stdout.splitlines())
    d = json.loads(run_agent("self-heal", "dashboard", "--json").stdout)
    assert [e["experiment_id"] for e in d["experiments"]] == [ab_id]


def test_the_list_keeps_each_id_whole_at_80_columns(home):
    """The winner's id was folded into three lines (`imp-2026` / `1128-9ab` / `79b4f`) in a
    narrow verdict column: each id is whole on a line of its own now."""
    from selfheal_plugin.history.abstore import AbStore

    a, b = _arms(home)
    r = run_agent("self-heal", "ab", "start", PATTERN, "--arms", f"{a.id},{b.id}", "--json")
    assert r.returncode == 0, r.stderr
    ab_id = json.loads(r.stdout)["experiment_id"]
    AbStore(connect(home / "conversations.db")).update(ab_id, "running", winner=a.id)
    for columns in ("80", "120"):
        r = run_agent("self-heal", "ab", "status", env={"COLUMNS": columns})
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert all(len(line) <= int(columns) for line in lines), r.stdout
        for whole in (ab_id, PATTERN, a.id):
            assert any(whole in line.split() for line in lines), (whole, r.stdout)
