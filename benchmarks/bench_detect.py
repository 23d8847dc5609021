"""What a user waits for: whole ``agent self-heal detect --json`` processes against the naive scan.

Every figure is a whole process, started fresh, timed from outside (wall seconds) with its
peak RSS from the operating system (GNU ``/usr/bin/time``), the median of ``--repeats`` runs. Each
figure is printed with its baseline, measured in the same run and interleaved with it:

* naive  — ``python bench_detect.py --naive DB SINCE``: the design's algorithm done plainly in
           a fresh interpreter: fetch every ``tool_complete`` row, ``json.loads`` each, keep
           the failures in the window, group them in a dict by (error_type, tool_name), score
           each group;
* first  — ``agent self-heal detect --json`` on a copy of the runtime's file with no index
           (it builds the index);
* warm   — the same command again (nothing new since the last run);
* +10k   — on a warm copy after 10,000 new events were appended (it ingests them), against
           the warm run with nothing new.

Profiles: ``default`` (the generator's default mix, about 1 % failing calls) and
``failure-heavy`` (10 % of tool calls fail over 40 tools x 5 error types). Sizes: 250k and 1M
events; ``--big`` adds 5M (generating a 5M history takes several minutes and a few GB).

    python benchmarks/bench_detect.py                        # both profiles, 250k and 1M
    python benchmarks/bench_detect.py --profiles failure-heavy --sizes 250000 --repeats 3
    python benchmarks/bench_detect.py --big                  # adds 5M events

Histories are cached in ``--dir`` (same seed, same file). selfheal's bytecode is written first,
as an install leaves it (:mod:`installed`). Not run by CI; no thresholds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from installed import compile_package  # benchmarks/installed.py

END = datetime(2026, 11, 20, 12, tzinfo=timezone.utc)
SINCE = END - timedelta(days=7)
EVENTS_PER_RUN = 50.7  # what the generator writes per run (both profiles)
BIN = Path(sys.executable).parent


def naive_detect(db: str, since: datetime, min_occurrences: int = 3) -> list[dict]:
    """The baseline, run in its own process (``--naive``)."""
    from selfheal_plugin.analysis.patterns import context_correlation, context_of
    from selfheal_plugin.history.connection import normalize_error_type
    from selfheal_plugin.history.errorindex import message_template
    from selfheal_plugin.history.times import parse_timestamp

    conn = sqlite3.connect(db)
    workflows = dict(conn.execute("SELECT id, workflow_name FROM runs"))
    groups: dict[tuple[str, str], list[dict]] = {}
    for run_id, step, data, ts in conn.execute("SELECT run_id, step_index, event_data, timestamp FROM run_events "
                                               "WHERE event_type = 'tool_complete'"):
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


TIME = "/usr/bin/time"  # GNU time: the child's own peak RSS


def run(cmd: list[str]) -> dict:
    """One whole process: wall seconds, peak RSS (MB) and stdout size.

    The peak comes from GNU time started in between: a child forked straight from this
    (large) process would inherit its high-water mark in ``ru_maxrss``."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        wrapped = [TIME, "-f", "%M", "-o", rss.name, *cmd] if os.path.exists(TIME) else cmd
        t0 = time.perf_counter()
        proc = subprocess.run(wrapped, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}")
        kb = rss.read().strip().splitlines()
    return {"seconds": seconds, "rss_mb": int(kb[-1]) / 1024 if kb else float("nan"), "bytes": len(proc.stdout),
            "out": proc.stdout}


def detect_cmd(home: Path) -> list[str]:
    return [str(BIN / "agent"), "self-heal", "detect", "--json", "--home", str(home), "--since", SINCE.isoformat()]


def naive_cmd(db: Path) -> list[str]:
    return [sys.executable, __file__, "--naive", str(db)]


def history(profile: str, events: int, workdir: Path) -> Path:
    from selfheal_plugin.testbed.generator import generate_history, profile_config

    src = workdir / f"{profile}-{events}.db"
    if not src.exists():
        t0 = time.perf_counter()
        truth = generate_history(src, profile_config(profile, seed=1, runs=int(events / EVENTS_PER_RUN), end=END))
        print(f"  generated {truth['events']:,} events in {time.perf_counter() - t0:.0f}s", flush=True)
    return src


def append_events(db: Path, count: int) -> None:
    """Append ``count`` events in the runtime's format: copies of the newest runs' events
    under new run ids, at the history's end (what a busy runtime writes between two detects)."""
    conn = sqlite3.connect(db)
    with conn:
        rows = conn.execute("SELECT run_id, step_index, event_type, event_data, timestamp FROM run_events "
                            "ORDER BY id DESC LIMIT ?", (count,)).fetchall()
        runs = {r[0] for r in rows}
        for rid in runs:
            conn.execute("INSERT INTO runs SELECT ?||substr(id, 5), workflow_name, task, status, model, started_at, "
                         "completed_at, duration_ms, context, error, metadata FROM runs WHERE id = ?", ("new-", rid))
        conn.executemany("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) "
                         "VALUES ('new-'||substr(?, 5),?,?,?,?)", reversed(rows))
    conn.close()


def warm_calls(home: Path, calls: int) -> dict[str, float]:
    """Median seconds per call of the MCP tools ``detect_failure_patterns`` and
    ``get_health_dashboard`` over stdio (the installed ``self-healing-mcp``, one warm server),
    and of a whole ``agent self-heal dashboard --json`` process, on an indexed home."""
    import anyio
    from mcp import Client, StdioServerParameters

    (home / "config.toml").write_text(f'[self_heal]\nlookback = "{SINCE.isoformat()}"\n')
    params = StdioServerParameters(command=str(BIN / "self-healing-mcp"), args=["--home", str(home)],
                                   env=dict(os.environ))
    out: dict[str, float] = {}

    async def measure() -> None:
        async with Client(params) as client:
            for tool in ("detect_failure_patterns", "get_health_dashboard"):
                samples = []
                for k in range(calls + 1):  # the first call warms the server
                    t0 = time.perf_counter()
                    r = await client.call_tool(tool, {})
                    assert not r.is_error, r.content[0].text
                    if k:
                        samples.append(time.perf_counter() - t0)
                out[f"mcp {tool}"] = statistics.median(samples)

    anyio.run(measure)
    cmd = [str(BIN / "agent"), "self-heal", "dashboard", "--json", "--home", str(home)]
    run(cmd)
    out["agent self-heal dashboard --json"] = statistics.median(run(cmd)["seconds"] for _ in range(calls))
    return out


def med(xs: list[dict], key: str = "seconds") -> float:
    return statistics.median(x[key] for x in xs)


def bench(profile: str, events: int, workdir: Path, repeats: int, incremental: bool, mcp: bool) -> dict:
    src = history(profile, events, workdir)
    home, warm_home = workdir / "home", workdir / "warm-home"
    res: dict[str, list[dict]] = {"naive": [], "first": [], "warm": [], "plus10k": [], "warm2": []}
    for _ in range(repeats):  # interleaved, so a busy machine hurts every variant alike
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        shutil.copy(src, home / "conversations.db")  # a runtime-shaped file with no index yet
        res["naive"].append(run(naive_cmd(src)))
        res["first"].append(run(detect_cmd(home)))
        res["warm"].append(run(detect_cmd(home)))
    first_ids = [p["id"] for p in json.loads(res["first"][0]["out"])["patterns"]]
    warm_ids = [p["id"] for p in json.loads(res["warm"][0]["out"])["patterns"]]
    assert first_ids == warm_ids, "first and warm runs found different patterns"
    if incremental:
        for _ in range(repeats):
            shutil.rmtree(warm_home, ignore_errors=True)
            shutil.copytree(home, warm_home)  # warm (indexed) copy
            append_events(warm_home / "conversations.db", 10_000)
            res["plus10k"].append(run(detect_cmd(warm_home)))
            res["warm2"].append(run(detect_cmd(warm_home)))
    calls = warm_calls(home, repeats) if incremental and mcp else {}
    return {"profile": profile, "events": events, "patterns": len(warm_ids), "calls": calls, **res}


def report(r: dict) -> None:
    nv = med(r["naive"])
    print(f"{r['profile']}, {r['events']:,} events ({r['patterns']} patterns):")
    print(f"  naive scan            {nv:7.3f}s  peak {med(r['naive'], 'rss_mb'):5.0f} MB")
    for key, label in (("first", "detect, first run"), ("warm", "detect, warm")):
        s = med(r[key])
        print(f"  {label:<21} {s:7.3f}s  peak {med(r[key], 'rss_mb'):5.0f} MB  naive/this = {nv / s:5.2f}x  "
              f"RSS this/naive = {med(r[key], 'rss_mb') / med(r['naive'], 'rss_mb'):.2f}x  "
              f"--json {med(r[key], 'bytes') / 1024:.0f} KB")
    if r["plus10k"]:
        p, w = med(r["plus10k"]), med(r["warm2"])
        print(f"  detect after +10k     {p:7.3f}s  against warm {w:.3f}s: {p / w:.2f}x")
    for name, seconds in r.get("calls", {}).items():
        print(f"  warm {name:<34} {seconds:7.3f}s per call  naive/this = {nv / seconds:5.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", default="default,failure-heavy")
    ap.add_argument("--sizes", default="250000,1000000", help="events, comma-separated")
    ap.add_argument("--big", action="store_true", help="add 5,000,000 events (slow to generate)")
    ap.add_argument("--repeats", type=int, default=5, help="median of this many fresh-process runs")
    ap.add_argument("--dir", default="/tmp/selfheal-bench")
    ap.add_argument("--no-mcp", action="store_true", help="skip the warm MCP and dashboard calls on 1M events")
    ap.add_argument("--naive", metavar="DB", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive:
        found = naive_detect(args.naive, SINCE)
        print(json.dumps({"patterns": len(found)}))
        return
    compile_package()
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["INBOX_PATH"] = str(workdir / "inbox")  # each detect's summary: here, not in the user's inbox
    sizes = sorted({int(s) for s in args.sizes.split(",")} | ({5_000_000} if args.big else set()))
    for profile in args.profiles.split(","):
        results = []
        for n in sizes:
            r = bench(profile, n, workdir, args.repeats, incremental=n == 1_000_000, mcp=not args.no_mcp)
            report(r)
            results.append(r)
        if len(results) > 1:
            lo, hi = results[0], results[-1]
            print(f"  peak RSS from {lo['events']:,} to {hi['events']:,} events: "
                  f"naive {med(lo['naive'], 'rss_mb'):.0f} -> {med(hi['naive'], 'rss_mb'):.0f} MB, "
                  f"first {med(lo['first'], 'rss_mb'):.0f} -> {med(hi['first'], 'rss_mb'):.0f} MB, "
                  f"warm {med(lo['warm'], 'rss_mb'):.0f} -> {med(hi['warm'], 'rss_mb'):.0f} MB", flush=True)


if __name__ == "__main__":
    main()
