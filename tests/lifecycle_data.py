"""Histories with a known truth and improvement rows, for the lifecycle tests.

Runs are written straight into a runtime-format database (schema from ``history``), with
the offsets chosen per run so that string order and instant order disagree.
"""
from __future__ import annotations

import json
import math
import random
import subprocess
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import Improvement, ImprovementStore, new_improvement_id
from selfheal_plugin.history.settings import Settings, load_settings

K8S = "mcp__k8s__pods_list"


@dataclass
class RunSpec:
    start: datetime
    status: str  # completed | failed | cancelled | running
    calls: list[tuple[str, bool, float, str | None]] = field(default_factory=list)  # tool, ok, ms, error_type
    offset_hours: int = 0


def stamp(dt: datetime, offset_hours: int = 0) -> str:
    local = dt.astimezone(timezone(timedelta(hours=offset_hours)))
    return local.isoformat(timespec="microseconds")


def write_runs(db: Path, runs: list[RunSpec]) -> None:
    conn = connect(db, create=True)
    rows, events = [], []
    for spec in runs:
        rid = str(uuid.uuid4())
        t = spec.start
        evs = [(0, "processing_start", {"type": "processing_start"}, t)]
        for tool, ok, ms, etype in spec.calls:
            t += timedelta(milliseconds=10)
            evs.append((0, "tool_start", {"type": "tool_start", "name": tool, "arguments": {"q": "x"}}, t))
            t += timedelta(milliseconds=ms)
            data: dict[str, Any] = {"type": "tool_complete", "name": tool, "duration": int(ms), "is_error": not ok,
                                    "result": "ok" if ok else f"Tool {tool} failed: {etype}"}
            if not ok and etype:
                data["error_type"] = etype
            evs.append((0, "tool_complete", data, t))
        done = spec.status != "running"
        rows.append((rid, "k8s-ops", "task", spec.status, "qwen3:14b", stamp(spec.start, spec.offset_hours),
                     stamp(t, spec.offset_hours) if done else None,
                     int((t - spec.start).total_seconds() * 1000) if done else None, None,
                     "failed" if spec.status == "failed" else None, None))
        events += [(rid, s, et, json.dumps(d), stamp(w, spec.offset_hours)) for s, et, d, w in evs]
    with conn:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        conn.executemany("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) "
                         "VALUES (?,?,?,?,?)", events)
        conn.execute("COMMIT")
    conn.close()


def timeout_history(db: Path, end: datetime, runs: int = 300, seed: int = 3, old_limit: float = 45_000,
                    median: float = 20_000, sigma: float = 0.6, calls_per_run: int = 2) -> list[list[float]]:
    """Runs whose k8s calls take lognormal time; a call over ``old_limit`` times out (cut
    off at the limit) and fails the run. Returns each run's true durations."""
    rng = random.Random(seed)
    specs, truth = [], []
    for i in range(runs):
        start = end - timedelta(days=6.5) + timedelta(seconds=i * 6.5 * 86400 / runs)
        durations = [math.exp(rng.gauss(math.log(median), sigma)) for _ in range(calls_per_run)]
        calls = [("read_file", True, 40.0, None)]
        for d in durations:
            calls.append((K8S, True, d, None) if d <= old_limit else (K8S, False, old_limit + 3, "timeout"))
        failed = any(d > old_limit for d in durations)
        specs.append(RunSpec(start, "failed" if failed else "completed", calls, offset_hours=rng.choice((0, 2, -5))))
        truth.append(durations)
    write_runs(db, specs)
    return truth


def rate_runs(start: datetime, end: datetime, n: int, fail_rate: float, tool: str = K8S,
              error_type: str = "timeout", seed: int = 0, offset_hours: int | None = None) -> list[RunSpec]:
    """``n`` runs spread over [start, end); a share ``fail_rate`` fails with one
    ``error_type`` failure of ``tool`` (deterministic count, shuffled)."""
    rng = random.Random(seed)
    failing = set(rng.sample(range(n), round(n * fail_rate)))
    out = []
    for i in range(n):
        t = start + (end - start) * (i + 0.5) / n
        calls = [("read_file", True, 40.0, None), (tool, True, 900.0, None)]
        if i in failing:
            calls.append((tool, False, 60_003.0, error_type))
        out.append(RunSpec(t, "failed" if i in failing else "completed", calls,
                           offset_hours=rng.choice((0, 2, -5)) if offset_hours is None else offset_hours))
    return out


def settings_for(home: Path, db: Path | None = None, **overrides: Any) -> Settings:
    return load_settings(home, db or home / "conversations.db", **overrides)


def add_improvement(db: Path, changes: list[dict[str, Any]], *, pattern_id: str = f"timeout:{K8S}",
                    status: str = "proposed", **fields_: Any) -> Improvement:
    conn = connect(db, create=True)
    etype, _, tool = pattern_id.partition(":")
    imp = Improvement(id=new_improvement_id(), status=status, description=fields_.pop("description",
                      f"Increase the timeout of {tool}"), pattern_id=pattern_id, error_type=etype, tool_name=tool,
                      changes=changes, risk_level=fields_.pop("risk_level", "low"),
                      expected_impact=fields_.pop("expected_impact", "40% reduction in timeout errors"), **fields_)
    ImprovementStore(conn).insert(imp)
    conn.close()
    return imp


def timeout_change(value: int = 90_000, tool: str = K8S) -> dict[str, Any]:
    return {"kind": "config", "file": "config.toml", "path": ["tools", tool, "timeout_ms"], "op": "set",
            "value": value}


def git(cwd: Path, *args: str, check: bool = True) -> str:
    """Plain git for test set-up and inspection (with an identity only where a test sets one)."""
    return subprocess.run(["git", *args], cwd=cwd, check=check, capture_output=True, text=True).stdout


def git_as_user(cwd: Path, *args: str) -> str:
    return git(cwd, "-c", "user.name=Dot Files", "-c", "user.email=dot@example.com", *args)
