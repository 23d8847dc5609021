"""ToolPolicy: timeouts, retries with backoff, circuit breaker, preflight, server hooks and
reloading config.toml from disk — sync and async."""
from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from selfheal_plugin.history.clock import SimulatedClock
from selfheal_plugin.errors import ConfigError
from selfheal_plugin.runtime.policy import (CircuitOpen, PreflightFailed, ServerUnavailable, ToolPolicy, ToolTimeout,
                                    resolve_tool_settings, server_of)
from selfheal_plugin.runtime.recorder import RunRecorder

T0 = datetime(2026, 11, 10, 9, 0, tzinfo=timezone.utc)
TOOL = "mcp__kubernetes__pods_list"


def write_config(path, text: str) -> None:
    """Replace the file the way selfheal's apply does: temp file, then rename."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def config(tmp_path):
    return tmp_path / "config.toml"


def make_policy(config, text: str = "", **kw) -> ToolPolicy:
    if text:
        write_config(config, text)
    kw.setdefault("watch", False)
    kw.setdefault("clock", SimulatedClock(T0))
    return ToolPolicy(config, **kw)


class Flaky:
    """Fails ``failures`` times with ``message``, then returns "ok"."""

    def __init__(self, failures: int, message: str = "upstream said no") -> None:
        self.failures = failures
        self.message = message
        self.calls = 0

    def __call__(self, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(self.message)
        return "ok"

    async def acall(self, **kwargs):
        return self(**kwargs)


def completes(db):
    conn = sqlite3.connect(db)
    try:
        return [json.loads(r[0]) for r in conn.execute(
            "SELECT event_data FROM run_events WHERE event_type = 'tool_complete' ORDER BY id")]
    finally:
        conn.close()


def test_no_settings_calls_straight_through(config):
    policy = make_policy(config)
    assert policy.effective_settings(TOOL).plain
    assert policy.call(TOOL, lambda x: x * 2, {"x": 21}) == 42

    async def double(x):
        return x * 2
    assert asyncio.run(policy.acall(TOOL, double, {"x": 4})) == 8
    with pytest.raises(RuntimeError):
        policy.call(TOOL, Flaky(1))


def test_settings_layering(config):
    policy = make_policy(config, f'[tools."{TOOL}"]\ntimeout_ms = 90000\n[servers."kubernetes"]\nauto_restart = true\n',
                         defaults={"timeout_ms": 60000, "retry_attempts": 1})
    s = policy.effective_settings(TOOL)
    assert (s.timeout_ms, s.retry_attempts, s.auto_restart, s.server) == (90000, 1, True, "kubernetes")
    assert s.sources == ("defaults", f'tools."{TOOL}"', 'servers."kubernetes"')
    other = policy.effective_settings("read_file")
    assert (other.timeout_ms, other.server, other.auto_restart) == (60000, None, False)
    assert server_of("mcp__a__b") == "a" and server_of("read_file") is None
    assert resolve_tool_settings(policy.config, "x", server="kubernetes").auto_restart is True


def test_timeout_fires_async_and_sync(config, tmp_path):
    db = tmp_path / "h.db"
    clock = SimulatedClock(T0)
    rec = RunRecorder(db, clock=clock)
    # 50 simulated seconds at 1 ms per simulated second: a 50 ms real deadline
    policy = make_policy(config, f'[tools."{TOOL}"]\ntimeout_ms = 50000\n', recorder=rec, clock=clock,
                         time_scale=0.001)

    # Calls that end only after their deadline fired, however late a busy machine notices it.
    release = threading.Event()

    async def slow():
        await asyncio.Event().wait()  # never set

    def slow_sync():
        release.wait(10)

    with rec.run("w", "t"):
        with pytest.raises(ToolTimeout, match=f"Tool {TOOL} timed out after 50s"):
            asyncio.run(policy.acall(TOOL, slow))
        try:
            with pytest.raises(TimeoutError):
                policy.call(TOOL, slow_sync)
        finally:
            release.set()
    done = completes(db)
    assert [d["error_type"] for d in done] == ["timeout", "timeout"]
    assert all(d["duration"] >= 50000 for d in done)  # recorded in simulated ms
    assert clock() - T0 >= timedelta(seconds=100)  # the simulated clock moved by both calls


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_retries_with_backoff_then_success(config, tmp_path, mode):
    db = tmp_path / "h.db"
    clock = SimulatedClock(T0)
    rec = RunRecorder(db, clock=clock)
    policy = make_policy(config, f'[tools."{TOOL}"]\nretry_attempts = 3\nretry_backoff_ms = 1000\n',
                         recorder=rec, clock=clock, time_scale=0.001)
    tool = Flaky(2)
    with rec.run("w", "t"):
        if mode == "sync":
            assert policy.call(TOOL, tool, {"namespace": "prod"}) == "ok"
        else:
            assert asyncio.run(policy.acall(TOOL, tool.acall, {"namespace": "prod"})) == "ok"
    assert tool.calls == 3
    assert [d["is_error"] for d in completes(db)] == [True, True, False]
    # backoff 1 s then 2 s (doubling), on the simulated clock
    assert clock() - T0 >= timedelta(seconds=3)


def test_retries_exhausted_raise_the_last_error(config):
    policy = make_policy(config, f'[tools."{TOOL}"]\nretry_attempts = 2\n')
    tool = Flaky(5, "still broken")
    with pytest.raises(RuntimeError, match="still broken"):
        policy.call(TOOL, tool)
    assert tool.calls == 3


def test_circuit_breaker_opens_half_opens_and_closes(config):
    clock = SimulatedClock(T0)
    policy = make_policy(config, f'[tools."{TOOL}".circuit_breaker]\nfailure_threshold = 2\n'
                                 'timeout_duration_sec = 60\nhalf_open_requests = 1\n', clock=clock)
    tool = Flaky(3)
    for _ in range(2):
        with pytest.raises(RuntimeError):
            policy.call(TOOL, tool)
    assert policy.breaker_state(TOOL) == "open"
    with pytest.raises(CircuitOpen, match=f"Circuit breaker open for {TOOL}"):
        policy.call(TOOL, tool)
    assert tool.calls == 2  # failed fast, the tool was not called
    clock.advance(61)
    with pytest.raises(RuntimeError):  # the half-open trial fails: open again
        policy.call(TOOL, tool)
    assert policy.breaker_state(TOOL) == "open" and tool.calls == 3
    clock.advance(30)
    with pytest.raises(CircuitOpen):
        policy.call(TOOL, tool)
    clock.advance(31)
    assert policy.call(TOOL, tool) == "ok"  # a successful trial closes it
    assert policy.breaker_state(TOOL) == "closed"
    assert policy.call(TOOL, tool) == "ok"


def test_half_open_admits_only_the_configured_trials(config):
    clock = SimulatedClock(T0)
    policy = make_policy(config, f'[tools."{TOOL}".circuit_breaker]\nfailure_threshold = 1\n'
                                 'timeout_duration_sec = 10\nhalf_open_requests = 2\n', clock=clock)
    with pytest.raises(RuntimeError):
        policy.call(TOOL, Flaky(1))
    clock.advance(11)

    async def scenario():
        gate = asyncio.Event()

        async def trial():
            await gate.wait()
            return "ok"
        first = asyncio.create_task(policy.acall(TOOL, trial))
        second = asyncio.create_task(policy.acall(TOOL, trial))
        await asyncio.sleep(0)
        with pytest.raises(CircuitOpen, match="half-open"):
            await policy.acall(TOOL, trial)
        gate.set()
        return await first, await second
    assert asyncio.run(scenario()) == ("ok", "ok")
    assert policy.breaker_state(TOOL) == "closed"


def test_preflight_path_exists(config, tmp_path, ):
    db = tmp_path / "h.db"
    rec = RunRecorder(db, clock=SimulatedClock(T0))
    policy = make_policy(config, '[tools."list_dir"]\npreflight = ["path_exists"]\n', recorder=rec,
                         base_dir=tmp_path)
    (tmp_path / "here").mkdir()
    seen = []

    def list_dir(path):
        seen.append(path)
        return os.listdir(tmp_path / path)

    with rec.run("w", "t"):
        assert policy.call("list_dir", list_dir, {"path": "here"}) == []
        with pytest.raises(PreflightFailed, match="path_exists failed for list_dir: path not found: gone/away"):
            policy.call("list_dir", list_dir, {"path": "gone/away"})
        with pytest.raises(PreflightFailed):
            asyncio.run(policy.acall("list_dir", asyncio.sleep, {"file_path": str(tmp_path / "nope")}))
    assert seen == ["here"]  # the tool never saw the missing path
    failed = [d for d in completes(db) if d["is_error"]]
    assert len(failed) == 2 and failed[0]["duration"] == 0 and failed[0]["error_type"] == "tool_error"


def test_auto_restart_hook_restarts_then_retries(config):
    restarted = []
    policy = make_policy(config, '[servers."flaky"]\nauto_restart = true\n', restart_server=restarted.append)
    tool = Flaky(1, "MCP server flaky process exited unexpectedly")
    assert policy.call("mcp__flaky__query", tool) == "ok"
    assert restarted == ["flaky"] and tool.calls == 2
    # an ordinary tool error is not a reason to restart
    with pytest.raises(RuntimeError):
        policy.call("mcp__flaky__query", Flaky(1, "bad argument"))
    assert restarted == ["flaky"]

    async def arestart(server):
        restarted.append("async:" + server)
    policy2 = make_policy(config, restart_server=arestart)
    tool2 = Flaky(1, "connection refused")
    assert asyncio.run(policy2.acall("mcp__flaky__query", tool2.acall)) == "ok"
    assert restarted[-1] == "async:flaky"


def test_without_auto_restart_a_crash_fails_the_call(config):
    restarted = []
    policy = make_policy(config, '[servers."flaky"]\nauto_restart = false\n', restart_server=restarted.append)
    with pytest.raises(RuntimeError, match="process exited"):
        policy.call("mcp__flaky__query", Flaky(1, "MCP server flaky process exited unexpectedly"))
    assert restarted == []


def test_health_check_hook(config):
    restarted, healthy = [], {"flaky": False}
    policy = make_policy(config, '[servers."flaky"]\nhealth_check = true\n', restart_server=restarted.append,
                         health_check=lambda s: healthy[s])
    tool = Flaky(0)
    with pytest.raises(ServerUnavailable, match="flaky failed its health check"):
        policy.call("mcp__flaky__query", tool)
    assert tool.calls == 0
    write_config(config, '[servers."flaky"]\nhealth_check = true\nauto_restart = true\n')
    policy.reload()
    assert policy.call("mcp__flaky__query", tool) == "ok" and restarted == ["flaky"]


@pytest.mark.parametrize("text,message", [
    (f'[tools."{TOOL}"]\ntimeout_ms = "fast"\n', "timeout_ms must be an integer between 1 and 86400000, got 'fast'"),
    (f'[tools."{TOOL}"]\nretry_attempts = -1\n', "retry_attempts must be between 0 and 100, got -1"),
    (f'[tools."{TOOL}"]\npreflight = ["warp_drive"]\n', "unknown preflight check 'warp_drive'"),
    (f'[tools."{TOOL}".circuit_breaker]\nfailure_threshold = 3\n', "needs failure_threshold and timeout_duration_sec"),
    ('[servers."k"]\nauto_restart = "yes"\n', "auto_restart must be true or false"),
    ('tools = 3\n', "[tools] must be a table"),
    ('[tools\n', "is not valid TOML"),
])
def test_bad_config_is_one_clear_error(config, text, message):
    write_config(config, text)
    with pytest.raises(ConfigError) as exc:
        ToolPolicy(config, watch=False)
    assert message in str(exc.value) and len(str(exc.value).splitlines()) == 1


# Limits are real seconds here (no time scale): a minute or two, which no stall reaches.
def test_broken_edit_keeps_the_last_good_config(config):
    policy = make_policy(config, f'[tools."{TOOL}"]\ntimeout_ms = 60000\n', check_interval=0)
    write_config(config, f'[tools."{TOOL}"\ntimeout_ms = 5\n')
    assert policy.call(TOOL, lambda: "ok") == "ok"
    assert policy.effective_settings(TOOL).timeout_ms == 60000
    assert "not valid TOML" in policy.last_error
    write_config(config, f'[tools."{TOOL}"]\ntimeout_ms = 120000\n')
    policy.call(TOOL, lambda: "ok")
    assert policy.effective_settings(TOOL).timeout_ms == 120000 and policy.last_error is None


def test_fallback_check_reloads_without_watchdog(config):
    policy = make_policy(config, f'[tools."{TOOL}"]\ntimeout_ms = 60000\n', check_interval=0)
    config.write_text(f'[tools."{TOOL}"]\ntimeout_ms = 60000\nretry_attempts = 2\n')  # in place, size changes
    tool = Flaky(2)
    assert policy.call(TOOL, tool) == "ok" and tool.calls == 3


def wait_for(predicate, seconds: float = 120.0) -> bool:  # a hang detector: a busy machine may take seconds
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_watchdog_reloads_a_config_edited_on_disk(config):
    """No call and no fallback check in between: only the observer can see the edits."""
    with make_policy(config, f'[tools."{TOOL}"]\ntimeout_ms = 60000\n', watch=True, check_interval=3600) as policy:
        assert policy.effective_settings(TOOL).timeout_ms == 60000
        version = policy.config_version
        write_config(config, f'[tools."{TOOL}"]\ntimeout_ms = 90000\n')  # atomic replace (apply)
        assert wait_for(lambda: policy.config_version > version)
        assert policy.effective_settings(TOOL).timeout_ms == 90000
        version = policy.config_version
        with open(config, "a") as fh:  # an in-place edit (a user's editor)
            fh.write(f'[tools."{TOOL}".circuit_breaker]\nfailure_threshold = 2\ntimeout_duration_sec = 5\n')
        assert wait_for(lambda: policy.effective_settings(TOOL).circuit_breaker is not None)
        assert policy.config_version > version
        config.unlink()  # deleting the file drops every setting
        assert wait_for(lambda: policy.effective_settings(TOOL).plain)
