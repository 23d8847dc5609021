"""Latency from a failed run's commit (by another process) to the ``run_failed`` hook.

Another process writes runs the way the runtime does (plain sqlite3: insert ``running``,
then tool events and the ``failed`` status in one transaction), one every ``--gap``
seconds, and prints the wall-clock instant right after each failing commit. The watcher
in this process records the instant its ``run_failed`` hook was called. Prints median,
p95 and max over ``--failures`` failures for each journal mode (default rollback journal,
and WAL set by the writer) and each watch mode (native file events, polling).

    python benchmarks/bench_watch_latency.py [--failures 100] [--gap 0.05]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from selfheal_plugin import hookimpl

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.settings import load_settings
from selfheal_plugin.daemon.watcher import Watcher

WRITER = r"""
import json, sqlite3, sys, time, uuid
db, journal, n, gap = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
conn = sqlite3.connect(db, timeout=30, isolation_level=None)
conn.execute("PRAGMA busy_timeout = 30000")
conn.execute("PRAGMA foreign_keys = ON")
if journal == "wal":
    conn.execute("PRAGMA journal_mode = WAL")
def now():
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}000+00:00"
for i in range(n):
    rid = str(uuid.uuid4())
    conn.execute("INSERT INTO runs(id, workflow_name, task, status, model, started_at) VALUES (?,?,?,?,?,?)",
                 (rid, "bench", "task", "running", "m", now()))
    time.sleep(gap / 2)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) VALUES (?,?,?,?,?)",
                 (rid, 0, "tool_complete", json.dumps({"type": "tool_complete", "name": "t", "result": "boom",
                  "duration": 5, "is_error": True, "error_type": "tool_error"}), now()))
    conn.execute("UPDATE runs SET status = 'failed', completed_at = ?, duration_ms = 5 WHERE id = ?", (now(), rid))
    conn.execute("COMMIT")
    print(rid, repr(time.time()), flush=True)
    time.sleep(gap / 2)
"""


class Recorder:
    def __init__(self) -> None:
        self.at: dict[str, float] = {}
        self.lock = threading.Lock()

    @hookimpl
    def run_failed(self, run, settings):
        t = time.time()
        with self.lock:
            self.at.setdefault(run["id"], t)


def measure(journal: str, mode: str, failures: int, gap: float) -> list[float]:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        db = home / "conversations.db"
        connect(db, create=True).close()
        rec = Recorder()
        plugins.register(rec, f"bench-recorder-{journal}-{mode}")
        watcher = Watcher(load_settings(home), mode=mode).start()
        try:
            out = subprocess.run([sys.executable, "-c", WRITER, str(db), journal, str(failures), str(gap)],
                                 capture_output=True, text=True, check=True).stdout
            committed = {line.split()[0]: float(line.split()[1]) for line in out.splitlines() if line.strip()}
            deadline = time.monotonic() + 30
            while len(rec.at) < len(committed) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            watcher.stop()
            plugins.unregister(rec)
        missing = set(committed) - set(rec.at)
        if missing:
            raise SystemExit(f"{len(missing)} failure(s) were never hooked ({journal}, {mode})")
        return [rec.at[r] - committed[r] for r in committed]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--failures", type=int, default=100)
    ap.add_argument("--gap", type=float, default=0.05, help="seconds between failing runs")
    args = ap.parse_args()
    plugins.pm.set_blocked("selfheal.hooks.auto_analysis")  # measure the watcher, not the analysis
    print(f"{'journal':<9} {'watch':<7} {'n':>4} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
    for journal in ("delete", "wal"):
        for mode in ("native", "poll"):
            lat = sorted(measure(journal, mode, args.failures, args.gap))
            p95 = lat[min(len(lat) - 1, int(round(0.95 * len(lat))) - 1)]
            print(f"{journal:<9} {mode:<7} {len(lat):>4} {statistics.median(lat) * 1000:>10.1f} "
                  f"{p95 * 1000:>8.1f} {lat[-1] * 1000:>8.1f}")


if __name__ == "__main__":
    main()
