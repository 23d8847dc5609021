"""Histories for the evidence and failure-kind tests: runs of tool calls with the
arguments, messages and runtime labels a test chooses, written in the runtime's format."""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from selfheal_plugin.history.connection import classify_error, connect

NOW = datetime(2026, 11, 20, 12, 0, 0, tzinfo=UTC)


@dataclass
class Call:
    tool: str
    args: dict[str, Any]
    ok: bool = True
    message: str = "ok"
    label: str | None = None  # the runtime's error_type; None: classify_error(message), as a runtime does
    ms: float = 50.0


@dataclass
class Run:
    start: datetime
    calls: list[Call] = field(default_factory=list)
    workflow: str = "files"


def write_history(db: Path, runs: list[Run]) -> Path:
    conn = connect(db, create=True)
    rows, events = [], []
    for spec in runs:
        rid = str(uuid.uuid4())
        t = spec.start
        evs: list[tuple[int, str, dict[str, Any], datetime]] = [(0, "processing_start", {"type": "processing_start"}, t)]
        failed = False
        for step, c in enumerate(spec.calls):
            t += timedelta(milliseconds=10)
            evs.append((step, "tool_start", {"type": "tool_start", "name": c.tool, "arguments": c.args}, t))
            t += timedelta(milliseconds=c.ms)
            data: dict[str, Any] = {"type": "tool_complete", "name": c.tool, "duration": int(c.ms),
                                    "is_error": not c.ok, "result": c.message}
            if not c.ok:
                data["error_type"] = c.label or classify_error(c.message)
                failed = True
            evs.append((step, "tool_complete", data, t))
        status = "failed" if failed else "completed"
        rows.append((rid, spec.workflow, "task", status, "qwen3:14b", spec.start.isoformat(), t.isoformat(),
                     int((t - spec.start).total_seconds() * 1000), None, "failed" if failed else None, None))
        events += [(rid, s, et, json.dumps(d), w.isoformat()) for s, et, d, w in evs]
    with conn:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        conn.executemany("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) "
                         "VALUES (?,?,?,?,?)", events)
        conn.execute("COMMIT")
    conn.close()
    return db


def spread(n: int, days: float = 5.0, end: datetime = NOW) -> list[datetime]:
    """``n`` run starts evenly over the ``days`` before ``end`` (one hour before it at the latest)."""
    first = end - timedelta(days=days)
    step = (days * 86400 - 3600) / max(1, n)
    return [first + timedelta(seconds=i * step) for i in range(n)]


def enoent_history(db: Path, missing_dir: Path, n_fail: int = 8, n_ok: int = 30) -> Path:
    """Filesystem-server reads of files that do not exist: the real server's message
    (``ENOENT: no such file or directory, open '…'``), which the runtime labels
    ``connection_refused``; the agent retries the same path in the run and it fails again.
    Reads of other files succeed."""
    runs = []
    tool = "mcp__filesystem__read_text_file"
    for i, start in enumerate(spread(n_fail + n_ok)):
        if i < n_fail:
            path = str(missing_dir / f"notes-{i % 3}.md")
            msg = f"ENOENT: no such file or directory, open '{path}'"
            calls = [Call(tool, {"path": path}, False, msg), Call(tool, {"path": path}, False, msg)]
        else:
            calls = [Call(tool, {"path": f"/srv/docs/readme-{i}.md"}, True, "# readme")]
        runs.append(Run(start, calls))
    return write_history(db, runs)
