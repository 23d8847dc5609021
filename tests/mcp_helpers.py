"""Shared by the MCP tests: a history the tools' relative windows see, the library's own
answer for each tool (called in-process the way the CLI calls it), and process plumbing."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from selfheal_plugin.testbed.generator import generate_history
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.settings import load_settings
from selfheal_plugin.history.times import format_timestamp, utcnow

TOOLS = {  # name -> (readOnlyHint, destructiveHint)
    "detect_failure_patterns": (True, False),
    "analyze_run_health": (True, False),
    "compute_agent_metrics": (True, False),
    "compute_tool_reliability": (True, False),
    "get_health_dashboard": (True, False),
    "propose_improvement": (False, False),
    "test_improvement": (False, True),  # canary and shadow modes commit a config.toml section
    "apply_improvement": (False, True),
    "verify_improvement": (False, False),
    "canary_promote": (False, True),
    "canary_drop": (False, True),
    "export_fix_pack": (True, False),
    "import_fix_pack": (False, False),  # merges rules only; never applies anything
    "sync_fix_packs": (False, False),
    "ab_start": (False, True),
    "ab_status": (True, False),
    "ab_promote": (False, True),
    "ab_drop": (False, True),
    "learn_from_success": (True, False),
    "list_rules": (True, False),
    "set_rule_enabled": (False, False),
}

# Fields that carry the instant of the call (window ends at "now", time of the test run; a
# detection's window start), or what the calls before it said (a verification's previous
# recommendation).
VOLATILE = {"window", "since", "trend_detail", "tested_at", "checked_at", "previous_recommendation"}


def make_history(path: Path, seed: int = 11, runs: int = 300) -> dict:
    """Six days ending ten minutes ago: everything lies inside the tools' default -7d window
    for the whole test run. No runs left running (their score would depend on the clock)."""
    return generate_history(path, seed=seed, runs=runs, days=6, end=utcnow() - timedelta(minutes=10),
                            running_runs=0)


def days_ago(days: float) -> str:
    """An instant ``days`` before now, written out: a window's start that stays put between
    a tool's call and the reference computed for it. A relative ``-Nd`` is read at each
    call, and the history's events lie at every minute of its six days, so on a loaded
    machine an event could fall out of the later of two reads of the same window."""
    return format_timestamp(utcnow() - timedelta(days=days))


# Fixtures shared by the in-process and transport tests (imported by name there).
@pytest.fixture(scope="module")
def recent_history(tmp_path_factory) -> Path:
    """A history generated once per module, inside the tools' default window."""
    path = tmp_path_factory.mktemp("mcp-hist") / "conversations.db"
    make_history(path)
    return path


@pytest.fixture
def home(recent_history, binks_home) -> Path:
    """A BINKS_HOME holding a writable copy of ``recent_history``."""
    shutil.copy(recent_history, binks_home / "conversations.db")
    return binks_home


def plain(value: Any) -> Any:
    """As JSON would carry it."""
    return json.loads(json.dumps(value, default=str))


def stable(value: Any) -> Any:
    """``value`` without the fields that depend on the instant of the call."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def reference(tool: str, home: Path | str | None, db: Path | str | None = None, **args: Any) -> Any:
    """The service's result for ``tool`` (what `agent self-heal` also calls), its next steps
    named as tools (as the MCP server asks for them)."""
    from selfheal_plugin.service import SelfHeal
    from selfheal_plugin.steps import for_agent

    overrides = {"lookback": args.get("since"), "min_occurrences": args.get("min_occurrences"),
                 "confidence_threshold": args.get("confidence_threshold")}
    with for_agent(), SelfHeal(home, db, **{k: v for k, v in overrides.items() if v is not None}) as sh:
        if tool == "detect_failure_patterns":
            return plain(sh.detect(**({"runs_limit": args["limit"]} if "limit" in args else {})))
        if tool == "analyze_run_health":
            return plain(sh.run_health(args["run_id"]))
        if tool == "compute_agent_metrics":
            return plain(sh.agent_metrics())
        if tool == "compute_tool_reliability":
            return plain(sh.tool_reliability())
        if tool == "get_health_dashboard":
            return plain(sh.dashboard(detailed=args.get("detailed", False)))
        if tool == "propose_improvement":
            return plain(sh.propose(args["pattern_id"]))
        if tool == "test_improvement":
            return plain(sh.test(args["improvement_id"], args.get("mode", "simulation"), since=args.get("since")))
        if tool == "verify_improvement":
            return plain(sh.verify(args["improvement_id"], args.get("measurement_window_days")))
    raise ValueError(f"no in-process reference for {tool}")


def structured(result: Any) -> Any:
    """A tool result's structured content (a list result comes wrapped as {"result": [...]})."""
    assert not result.is_error, result.content[0].text if result.content else result
    data = result.structured_content
    return data["result"] if set(data) == {"result"} else data


def error_text(result: Any) -> str:
    assert result.is_error, f"expected a tool error, got {result.structured_content!r}"
    assert len(result.content) == 1
    return result.content[0].text


def server_command() -> str:
    """The installed console script next to this interpreter."""
    exe = Path(sys.executable).parent / "self-healing-mcp"
    if not exe.exists():
        raise RuntimeError("the self-healing-mcp console script is not installed (pip install -e .)")
    return str(exe)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_http_server(*args: str, env: dict | None = None, stderr: Any = None) -> tuple[subprocess.Popen, str]:
    """Start ``self-healing-mcp --transport streamable-http`` on a free loopback port and wait
    until it accepts connections; returns the process and the endpoint URL."""
    port = free_port()
    proc = subprocess.Popen([server_command(), "--transport", "streamable-http", "--port", str(port), *args],
                            env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=stderr if stderr is not None else subprocess.PIPE)
    deadline = time.monotonic() + 120  # a deadline, not a speed check: a loaded machine starts slowly
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise RuntimeError(f"self-healing-mcp exited with {proc.returncode}: {err!r}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}/mcp"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("self-healing-mcp did not start listening within 120 s")


def stop(proc: subprocess.Popen) -> tuple[bytes, bytes]:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


class RuntimeWriter:
    """Writes runs and tool events the way a runtime does (its own connection, short
    transactions) from a background thread until stopped; records any error it meets."""

    def __init__(self, db: Path):
        import threading

        self.db = db
        self.runs = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> "RuntimeWriter":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        import uuid

        conn = sqlite3.connect(self.db, timeout=10, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 10000")
        try:
            i = 0
            while not self._stop.is_set():
                i += 1
                run_id = str(uuid.uuid4())
                now = utcnow().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
                failed = i % 3 == 0
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    conn.execute("INSERT INTO runs (id, workflow_name, task, status, model, started_at, "
                                 "completed_at, duration_ms, error) "
                                 "VALUES (?, 'planner', 'concurrent', ?, 'test-model', ?, ?, 1200, ?)",
                                 (run_id, "failed" if failed else "completed", now, now,
                                  "tool failed" if failed else None))
                    for step in range(3):
                        err = failed and step == 2
                        data = {"type": "tool_complete", "name": "list_dir",
                                "result": "No such file or directory: /tmp/x" if err else "ok",
                                "duration": 15, "is_error": err}
                        if err:
                            data["error_type"] = "tool_error"
                        conn.execute("INSERT INTO run_events (run_id, step_index, event_type, event_data, timestamp) "
                                     "VALUES (?, ?, 'tool_complete', ?, ?)", (run_id, step, json.dumps(data), now))
                    conn.execute("COMMIT")
                    self.runs += 1
                except sqlite3.Error as exc:  # the test asserts there were none
                    self.errors.append(str(exc))
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                time.sleep(0.005)
        finally:
            conn.close()
