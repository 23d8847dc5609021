"""Detect on a large history: selfheal's indexed path against the naive algorithm.

The naive path is the design document's algorithm done plainly: fetch every
``tool_complete`` row, ``json.loads`` each in Python, keep the errors inside the window,
group them in a dict by (error_type, tool_name), then score each group. Ours is
``detect_failure_patterns`` (incremental index in the file). Each measurement runs in a
fresh process so that peak memory (ru_maxrss) belongs to it alone.

    python benchmarks/bench_detect.py                 # 1,000,000 events (and 250,000 for memory growth)
    python benchmarks/bench_detect.py --events 200000 # quicker

Each figure is the median of --repeats runs, each in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

END = datetime(2026, 11, 20, 12, tzinfo=timezone.utc)
EVENTS_PER_RUN = 50.7  # what the generator writes with its defaults


def naive_detect(db: str, since: datetime, min_occurrences: int = 3) -> list[dict]:
    import sqlite3

    from selfheal_plugin.history.errorindex import message_template
    from selfheal_plugin.history.connection import normalize_error_type
    from selfheal_plugin.analysis.patterns import context_correlation, context_of
    from selfheal_plugin.history.times import parse_timestamp

    conn = sqlite3.connect(db)
    workflows = dict(conn.execute("SELECT id, workflow_name FROM runs"))
    groups: dict[tuple[str, str], list[dict]] = {}
    rows = conn.execute("SELECT run_id, step_index, event_data, timestamp FROM run_events "
                        "WHERE event_type = 'tool_complete'").fetchall()
    for run_id, step, data, ts in rows:
        try:
            event = json.loads(data)
            if not event.get("is_error") or parse_timestamp(ts) < since:
                continue
        except ValueError:
            continue
        key = (normalize_error_type(event.get("error_type")), event.get("name"))
        groups.setdefault(key, []).append({"template": message_template(str(event.get("result"))), "arg_keys": [],
                                           "workflow": workflows.get(run_id), "step_index": step, "run_id": run_id})
    out = []
    for (etype, tool), occ in groups.items():
        if len(occ) >= min_occurrences:
            out.append({"id": f"{etype}:{tool}", "occurrences": len(occ),
                        "correlation_score": context_correlation([context_of(o) for o in occ])})
    return sorted(out, key=lambda p: -p["occurrences"])


def measure(mode: str, db: str) -> None:
    """Runs in a child process: one detect, then prints seconds and peak RSS as JSON."""
    from datetime import timedelta

    import selfheal_plugin.history.errorindex  # noqa: F401  (imports are not what we time)
    from selfheal_plugin.history.connection import connect
    from selfheal_plugin.analysis.patterns import detect_failure_patterns
    since = END - timedelta(days=8)
    t0 = time.perf_counter()
    if mode == "naive":
        found = naive_detect(db, since)
        ids = [p["id"] for p in found]
    else:
        conn = connect(db)
        found = detect_failure_patterns(conn, since="-8d", now=END).patterns
        ids = [p.id for p in found]
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "patterns": len(ids)}))


def peak_rss_mb() -> float:
    """This process's own high-water mark (VmHWM resets at exec; ru_maxrss may carry the parent's)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, db: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, "--db", str(db)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(events: int, workdir: Path, repeats: int) -> dict:
    from selfheal_plugin.testbed.generator import generate_history

    src = workdir / f"history-{events}.db"
    if not src.exists():
        t0 = time.perf_counter()
        truth = generate_history(src, seed=1, runs=int(events / EVENTS_PER_RUN), end=END)
        print(f"  generated {truth['events']:,} events in {time.perf_counter() - t0:.1f}s", flush=True)
    ours_db = workdir / f"ours-{events}.db"
    runs: dict[str, list[dict]] = {"naive": [], "first": [], "second": []}
    for _ in range(repeats):  # interleaved, so a busy machine hurts every variant alike
        shutil.copy(src, ours_db)  # a runtime-shaped file with no index yet
        runs["naive"].append(child("naive", src))
        runs["first"].append(child("ours", ours_db))
        runs["second"].append(child("ours", ours_db))
    median = lambda xs: sorted(xs, key=lambda r: r["seconds"])[len(xs) // 2]
    return {"events": events, **{k: median(v) for k, v in runs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--dir", default="/tmp/selfheal-bench")
    ap.add_argument("--repeats", type=int, default=5, help="median of this many fresh-process runs")
    ap.add_argument("--child")
    ap.add_argument("--db")
    args = ap.parse_args()
    if args.child:
        measure(args.child, args.db)
        return
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    sizes = sorted({args.events // 4, args.events})
    results = []
    for n in sizes:
        print(f"history of {n:,} events:", flush=True)
        r = bench(n, workdir, args.repeats)
        results.append(r)
        nv, f, s = r["naive"], r["first"], r["second"]
        print(f"  naive (json.loads every tool_complete): {nv['seconds']:.3f}s  peak {nv['peak_rss_mb']:.0f} MB")
        print(f"  selfheal first run (builds index):      {f['seconds']:.3f}s  peak {f['peak_rss_mb']:.0f} MB  "
              f"ratio naive/first = {nv['seconds'] / f['seconds']:.1f}x")
        print(f"  selfheal warm run:                      {s['seconds']:.3f}s  peak {s['peak_rss_mb']:.0f} MB  "
              f"ratio naive/warm = {nv['seconds'] / s['seconds']:.1f}x")
        assert f["patterns"] == s["patterns"]
    if len(results) == 2:
        small, big = results
        print(f"peak memory growth from {small['events']:,} to {big['events']:,} events: "
              f"naive {big['naive']['peak_rss_mb'] - small['naive']['peak_rss_mb']:+.0f} MB, "
              f"selfheal first {big['first']['peak_rss_mb'] - small['first']['peak_rss_mb']:+.0f} MB, "
              f"warm {big['second']['peak_rss_mb'] - small['second']['peak_rss_mb']:+.0f} MB")


if __name__ == "__main__":
    main()
