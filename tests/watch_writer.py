"""A second process writing runs the way the runtime does (plain sqlite3, its schema).

Used by the watcher tests: ``python tests/watch_writer.py DB --runs 40 --journal wal``.
Prints one line per run, ``<run id> <final status>``, after the run's last commit.

Run kinds, cycling with the run number (``--kinds`` picks a subset):
  ``error``   insert ``running``; then a tool error and status ``failed`` in one transaction
  ``ok``      insert ``running``; then a successful call and status ``completed``
  ``update``  insert ``running``; then status ``failed`` by an UPDATE alone (no event)
  ``direct``  inserted already ``failed``, no events
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import time
import uuid
from datetime import datetime, timedelta, timezone

KINDS = ("error", "ok", "update", "direct")


def stamp(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000+00:00"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("db")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--journal", choices=("delete", "wal"), default="delete")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--start", default="2026-11-20T11:00:00+00:00", help="first run's start instant")
    ap.add_argument("--step-seconds", type=float, default=10.0, help="time between runs' starts")
    ap.add_argument("--tool", default="mcp__kubernetes__pods_list")
    ap.add_argument("--delay", type=float, default=0.0, help="real seconds to sleep between runs")
    args = ap.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    conn = sqlite3.connect(args.db, timeout=30, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA foreign_keys = ON")
    if args.journal == "wal":
        conn.execute("PRAGMA journal_mode = WAL")
    start = datetime.fromisoformat(args.start)

    def event(run_id: str, at: datetime, kind: str, data: dict) -> None:
        conn.execute("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) "
                     "VALUES (?, 0, ?, ?, ?)", (run_id, kind, json.dumps({"type": kind, **data}), stamp(at)))

    for i in range(args.runs):
        kind = kinds[i % len(kinds)]
        run_id = str(uuid.uuid4())
        began = start + timedelta(seconds=i * args.step_seconds)
        ended = began + timedelta(seconds=1)
        conn.execute("INSERT INTO runs(id, workflow_name, task, status, model, started_at, completed_at, error) "
                     "VALUES (?, 'k8s-ops', 'list the pods', ?, 'qwen3:14b', ?, ?, ?)",
                     (run_id, "failed" if kind == "direct" else "running", stamp(began),
                      stamp(ended) if kind == "direct" else None, "crashed" if kind == "direct" else None))
        if kind in ("error", "ok"):
            conn.execute("BEGIN IMMEDIATE")
            event(run_id, began, "tool_start", {"name": args.tool, "arguments": {"namespace": "default"}})
            if kind == "error":
                event(run_id, ended, "tool_complete", {"name": args.tool, "is_error": True, "duration": 60003,
                                                       "error_type": "timeout",
                                                       "result": f"Tool {args.tool} timed out after 60s"})
            else:
                event(run_id, ended, "tool_complete", {"name": args.tool, "is_error": False, "duration": 800,
                                                       "result": "3 pods"})
            conn.execute("UPDATE runs SET status = ?, completed_at = ?, duration_ms = 1000, error = ? WHERE id = ?",
                         ("failed" if kind == "error" else "completed", stamp(ended),
                          "timed out" if kind == "error" else None, run_id))
            conn.execute("COMMIT")
        elif kind == "update":
            conn.execute("UPDATE runs SET status = 'failed', completed_at = ?, duration_ms = 1000, error = 'boom' "
                         "WHERE id = ?", (stamp(ended), run_id))
        print(run_id, "completed" if kind == "ok" else "failed", flush=True)
        if args.delay:
            time.sleep(args.delay)


if __name__ == "__main__":
    main()
