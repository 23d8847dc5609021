"""The closed loop against code nobody here wrote: ``mcp-server-git`` from PyPI.

A scripted agent drives the real server over stdio through ``ToolPolicy`` and
``RunRecorder`` (as :mod:`selfheal_plugin.testbed.agent` drives the testbed's servers), on
one :class:`SimulatedClock`. Each run asks ``git_status`` of a repository, then ``git_log``.
Half of the runs name a repository path that is gone (``work/app-v1``, the folder before a
rename); the server answers with its own terse error, only the path (``Error executing tool
git_status: /…/work/app-v1``), so the agent cannot tell what went wrong and the run fails.

The loop: a week of such runs → detect (the failure kind read from the evidence: the message
names a ``repo_path`` argument that does not exist → ``missing_resource``, whatever the
runtime's label ``tool_error`` says) → propose (``preflight = ["path_exists"]``) → test (no
model for a preflight: an honest unknown, no numbers) → apply (a real git commit) → another
week in which ``ToolPolicy`` reads the new config.toml → verify. With the preflight in force
a gone path is refused before the call with a message that says so ("path not found: …"),
and the agent, like a model reading that line, falls back to the repository it has.

Where the server comes from: ``SELFHEAL_THIRD_PARTY_SERVERS`` names a folder with the
servers' executables (``.ci/run`` and the README's test command install ``mcp-server-git``
into ``.venv-servers`` and set it to ``.venv-servers/bin``); without it ``.venv-servers/bin``
of the checkout is tried. Missing there: the test is skipped on a developer's machine, and
fails when CI expected it (the variable is set, or ``CI=true``).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from selfheal_plugin.history.clock import SimulatedClock
from selfheal_plugin.lifecycle import gitops
from selfheal_plugin.runtime.policy import ToolPolicy
from selfheal_plugin.runtime.recorder import RunRecorder
from selfheal_plugin.service import SelfHeal

pytestmark = [pytest.mark.closed_loop, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
ENV = "SELFHEAL_THIRD_PARTY_SERVERS"
SERVER = "mcp-server-git"
STATUS, LOG = "mcp__git__git_status", "mcp__git__git_log"
PATTERN = f"tool_error:{STATUS}"
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)
A = T0 + timedelta(days=7)
END = A + timedelta(days=7)
RUNS = 60
GONE_SHARE = 0.5


def server_executable() -> Path:
    """The installed ``mcp-server-git``; skip, or fail when CI expected it (module docs)."""
    folder = os.environ.get(ENV)
    base = Path(folder) if folder else ROOT / ".venv-servers" / "bin"
    exe = (base if base.is_absolute() else ROOT / base) / SERVER
    if exe.is_file() and os.access(exe, os.X_OK):
        return exe
    why = (f"{exe} not found: install it with `python3 -m venv .venv-servers && "
           f".venv-servers/bin/pip install -q {SERVER}==2026.10.19` (as .ci/run does)")
    if folder or os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI expected the third-party MCP server: {why}")
    pytest.skip(why)


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=dev", "-c", "user.email=dev@example.invalid", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout


def make_workspace(home: Path) -> tuple[Path, Path]:
    """``work/app``: a real repository with two commits; ``work/app-v1``: gone (not created)."""
    repo = home / "work" / "app"
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    for i in range(2):
        (repo / "notes.md").write_text(f"release {i}\n")
        _git(repo, "add", "notes.md")
        _git(repo, "commit", "-q", "-m", f"release {i}")
    return repo, home / "work" / "app-v1"


async def _week(home: Path, exe: Path, repo: Path, gone: Path, clock: SimulatedClock, start: datetime,
                seed: int) -> dict:
    """``RUNS`` runs spread over 7 simulated days, one server process (a runtime session)."""
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client

    rng = random.Random(f"third-party:{seed}")
    recorder = RunRecorder(home / "conversations.db", clock=clock, model="qwen3:14b")
    # check_interval 0: the policy looks at config.toml before every call, so the commit the
    # apply makes is in force for the next call (no watcher thread, nothing timed)
    policy = ToolPolicy(home / "config.toml", recorder=recorder, clock=clock, watch=False, check_interval=0,
                        defaults={"timeout_ms": 600_000})
    params = StdioServerParameters(command=str(exe), args=[])
    outcome = {"completed": 0, "failed": 0, "server_errors": [], "preflight_errors": [], "fell_back": 0}
    errlog = open(home / "mcp-server-git.log", "a", encoding="utf-8")  # noqa: SIM115 - closed below
    try:
        async with Client(stdio_client(params, errlog=errlog), cache=None) as client:
            async def tool(name: str):
                async def call(**arguments):
                    result = await client.call_tool(name, arguments)
                    text = "\n".join(getattr(c, "text", "") for c in result.content)
                    if result.is_error:
                        raise RuntimeError(text or f"{name} failed")
                    return text
                return call

            status, log = await tool("git_status"), await tool("git_log")
            for i in range(RUNS):
                clock.set(start + timedelta(seconds=(i + rng.random()) * 7 * 86400 / RUNS))
                path = gone if rng.random() < GONE_SHARE else repo
                with recorder.run("release-notes", f"release notes #{i}", metadata={"source": "third-party"}) as run:
                    with run.step(0):
                        try:
                            await policy.acall(STATUS, status, {"repo_path": str(path)})
                        except Exception as exc:  # noqa: BLE001 - what the agent reads
                            message = str(exc)
                            if "path not found" not in message:  # the server's bare path: nothing to act on
                                outcome["server_errors"].append(message)
                                run.fail(f"Workflow failed at step 0: {message}")
                                outcome["failed"] += 1
                                continue
                            outcome["preflight_errors"].append(message)
                            outcome["fell_back"] += 1
                            path = repo  # a clear "path not found": use the repository it has
                            await policy.acall(STATUS, status, {"repo_path": str(path)})
                    clock.advance(rng.uniform(0.2, 2.0))
                    with run.step(1):
                        await policy.acall(LOG, log, {"repo_path": str(path), "max_count": 3})
                    run.response_complete("release notes drafted")
                    outcome["completed"] += 1
    finally:
        policy.close()
        recorder.close()
        errlog.close()
    return outcome


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    exe = server_executable()
    home = tmp_path_factory.mktemp("third-party-home")
    repo, gone = make_workspace(home)
    clock = SimulatedClock(T0)
    before = asyncio.run(_week(home, exe, repo, gone, clock, T0, seed=1))
    at = [A]
    with SelfHeal(home, clock=lambda: at[0]) as sh:
        detected = sh.detect(until=A)
        shown = sh.show(PATTERN)
        proposals = sh.detect(propose=True, until=A)["proposals"]
        imp_id = next(p["improvement_id"] for p in proposals if p.get("pattern_id") == PATTERN)
        tested = sh.test(imp_id)
        applied = sh.apply(imp_id, "applied by the third-party closed-loop test")
        config_after_apply = sh.settings.config_path.read_text(encoding="utf-8")
        git_log = gitops.locate(sh.settings.config_path, sh.settings.home).git("log", "--format=%s%n%b")
        after = asyncio.run(_week(home, exe, repo, gone, clock, A, seed=2))
        at[0] = END
        verified = sh.verify(imp_id)
    return {"home": home, "gone": gone, "before": before, "after": after, "detected": detected, "shown": shown,
            "proposals": proposals, "imp_id": imp_id, "tested": tested, "applied": applied,
            "config": config_after_apply, "git_log": git_log, "verified": verified}


def _messages(db: Path, tool: str, since: datetime, until: datetime) -> list[str]:
    """The failed calls' recorded results of ``tool``, in runs started in [since, until)."""
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT e.event_data FROM run_events e JOIN runs r ON r.id = e.run_id WHERE e.event_type = 'tool_complete' "
        "AND julianday(r.started_at) >= julianday(?) AND julianday(r.started_at) < julianday(?)",
        (since.isoformat(), until.isoformat())).fetchall()
    conn.close()
    calls = [json.loads(r[0]) for r in rows]
    return [str(c.get("result")) for c in calls if c["name"] == tool and c.get("is_error")]


def test_the_real_servers_own_error_is_in_the_history_and_read_as_a_missing_resource(loop):
    before, gone = loop["before"], loop["gone"]
    # what mcp-server-git itself answers for a repository path that does not exist
    assert before["server_errors"] and set(before["server_errors"]) == {f"Error executing tool git_status: {gone}"}
    assert before["failed"] == len(before["server_errors"]) and before["completed"] + before["failed"] == RUNS
    recorded = _messages(loop["home"] / "conversations.db", STATUS, T0, A)
    assert recorded and set(recorded) == {f"Error executing tool git_status: {gone}"}
    pattern = next(p for p in loop["detected"]["patterns"] if p["id"] == PATTERN)
    # the runtime labels it tool_error; the evidence (a repo_path that does not exist now) says what it is
    assert pattern["failure_kind"] == "missing_resource"
    ev = loop["shown"]["evidence"]
    assert ev["runtime_label"] == "tool_error"
    assert ev["paths"][0]["path"] == str(gone) and ev["paths"][0]["argument"] == "repo_path"
    assert ev["paths"][0]["exists_now"] is False


def test_the_fix_is_a_preflight_an_honest_unknown_in_test_and_a_real_commit(loop):
    proposal = next(p for p in loop["proposals"] if p["improvement_id"] == loop["imp_id"])
    config_changes = [c for c in proposal["changes"] if c["kind"] == "config"]
    assert config_changes == [{"kind": "config", "file": "config.toml", "path": ["tools", STATUS, "preflight"],
                               "op": "set", "value": ["path_exists"]}]
    t = loop["tested"]
    # no model for a preflight's effect: no invented numbers
    assert t["simulated_success_rate"] is None and t["interval"] is None and t["recommendation"] == "risky"
    assert t["failure_kind"] == "missing_resource"
    assert tomllib.loads(loop["config"])["tools"][STATUS] == {"preflight": ["path_exists"]}
    assert f"Self-Heal-Improvement: {loop['imp_id']}" in loop["git_log"]
    assert f"Self-Heal-Pattern: {PATTERN}" in loop["git_log"]


def test_with_the_fix_in_force_the_server_is_not_asked_about_gone_paths_and_verify_keeps_it(loop):
    after, gone = loop["after"], loop["gone"]
    # after the apply the server never saw a gone path: its error is gone from the history,
    # the policy's clear refusal stands in its place, and the agent acted on it
    recorded = _messages(loop["home"] / "conversations.db", STATUS, A, END)
    assert after["server_errors"] == []
    assert recorded and all(m.startswith(f"Preflight check path_exists failed for {STATUS}: path not found: {gone}")
                            for m in recorded)
    assert after["preflight_errors"] and all(str(gone) in m for m in after["preflight_errors"])
    assert after["fell_back"] == len(after["preflight_errors"]) and after["completed"] == RUNS
    v = loop["verified"]
    m = v["metrics"]
    assert (m["runs_before"], m["runs_after"]) == (RUNS, RUNS)
    assert m["before_success_rate"] == pytest.approx(loop["before"]["completed"] / RUNS, abs=1e-4)
    assert m["after_success_rate"] == 1.0
    assert v["recommendation"] == "keep" and v["status"] == "verified" and v["p_value"] < 0.001
    # the policy's refusals are still failed calls of the tool (the runtime labels them
    # tool_error too): the pattern's count after the apply is exactly those
    pattern = m["pattern"]
    assert pattern["after_errors"] == len(after["preflight_errors"])
    assert pattern["before_errors"] == len(loop["before"]["server_errors"])
    # ... and verify counts them apart: none reached the server, as the proposal claimed
    assert (pattern["before_refused"], pattern["after_refused"]) == (0, len(after["preflight_errors"]))
    assert pattern["reached_reduction"] == 1.0
    assert "refused before the call (100% fewer reached the tool)" in v["actual_impact"]
    assert v["comparison"] == "as expected"


def test_a_missing_server_fails_where_ci_expects_it_and_is_skipped_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)  # a checkout without .venv-servers
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv(ENV, str(tmp_path / "bin"))
    with pytest.raises(pytest.fail.Exception, match="CI expected the third-party MCP server"):
        server_executable()
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI expected"):
        server_executable()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="pip install -q mcp-server-git=="):
        server_executable()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / SERVER).write_text("#!/bin/sh\n")
    (tmp_path / "bin" / SERVER).chmod(0o755)
    monkeypatch.setenv(ENV, "bin")  # relative to the checkout, as .ci/run sets it
    assert server_executable() == tmp_path / "bin" / SERVER
