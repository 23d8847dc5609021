"""Coverage of `test`'s intervals over seeds: does the next window fall inside?

    python benchmarks/bench_prediction.py [--seeds 100] [--runs 200]

For each seed: a week of runs whose tool calls take log-normal time (median 20 s,
σ 0.6, two calls per run) under a 45 s timeout (slower calls time out and fail the run);
``simulate_changes`` replays it with ``timeout_ms = 55000``. Then the *next* week, as many
runs drawn from the same distribution, is played with the new limit for real (a run
succeeds when all its calls finish within 55 s). Printed: how often that next week's
success rate falls inside the 95% prediction interval (``next_window_success_rate``) and
inside the 95% interval of the replayed window's rate (``simulated_success_rate``), which
is not meant for it and covers less.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from selfheal_plugin.history.connection import connect
from selfheal_plugin.lifecycle.simulation import simulate_changes

TOOL = "mcp__k8s__pods_list"
OLD_MS, NEW_MS, MEDIAN_MS, SIGMA, CALLS = 45_000, 55_000, 20_000, 0.6, 2
END = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)


def durations(rng: random.Random, runs: int) -> list[list[float]]:
    return [[math.exp(rng.gauss(math.log(MEDIAN_MS), SIGMA)) for _ in range(CALLS)] for _ in range(runs)]


def write_week(db: Path, truth: list[list[float]]) -> None:
    """The week before END as the runtime records it under the old limit."""
    conn = connect(db, create=True)
    rows, events = [], []
    for i, calls in enumerate(truth):
        rid, t = str(uuid.uuid4()), END - timedelta(days=7) + timedelta(seconds=i * 7 * 86400 / len(truth))
        start, evs, failed = t, [], False
        for d in calls:
            t += timedelta(milliseconds=10)
            evs.append(("tool_start", {"type": "tool_start", "name": TOOL, "arguments": {"ns": "x"}}, t))
            ok = d <= OLD_MS
            t += timedelta(milliseconds=d if ok else OLD_MS + 3)
            data = {"type": "tool_complete", "name": TOOL, "duration": int(d if ok else OLD_MS + 3), "is_error": not ok,
                    "result": "ok" if ok else f"Tool {TOOL} timed out after 45s"}
            if not ok:
                data["error_type"] = "timeout"
                failed = True
            evs.append(("tool_complete", data, t))
        rows.append((rid, "k8s-ops", "task", "failed" if failed else "completed", "m", start.isoformat(),
                     t.isoformat(), int((t - start).total_seconds() * 1000), None, None, None))
        events += [(rid, 0, et, json.dumps(d), w.isoformat()) for et, d, w in evs]
    with conn:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        conn.executemany("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) "
                         "VALUES (?,?,?,?,?)", events)
        conn.execute("COMMIT")
    conn.close()


def one_seed(seed: int, runs: int, folder: Path) -> dict:
    rng = random.Random(seed)
    db = folder / f"week-{seed}.db"
    write_week(db, durations(rng, runs))
    conn = connect(db)
    try:
        change = {"kind": "config", "file": "config.toml", "path": ["tools", TOOL, "timeout_ms"], "op": "set",
                  "value": NEW_MS}
        sim = simulate_changes(conn, [change], "timeout", (END - timedelta(days=8)).timestamp(), END.timestamp(),
                               config={"tools": {TOOL: {"timeout_ms": OLD_MS}}}, seed=seed)
    finally:
        conn.close()
    nxt = durations(rng, runs)  # the next week, played with the new limit
    actual = sum(all(d <= NEW_MS for d in calls) for calls in nxt) / runs
    lo, hi = sim.prediction_interval
    clo, chi = sim.simulated_interval
    return {"seed": seed, "actual": actual, "predicted": sim.simulated_success_rate,
            "in_prediction": lo <= actual <= hi, "in_confidence": clo <= actual <= chi,
            "prediction_width": hi - lo, "confidence_width": chi - clo}


def coverage(seeds: range, runs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one_seed(s, runs, Path(tmp)) for s in seeds]
    n = len(rows)
    return {"seeds": n, "runs": runs,
            "prediction_coverage": sum(r["in_prediction"] for r in rows) / n,
            "confidence_coverage": sum(r["in_confidence"] for r in rows) / n,
            "mean_prediction_width": sum(r["prediction_width"] for r in rows) / n,
            "mean_confidence_width": sum(r["confidence_width"] for r in rows) / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args()
    c = coverage(range(args.seeds), args.runs)
    print(f"{c['seeds']} seeds, {c['runs']} runs per window, 95% intervals")
    print(f"  next window inside the prediction interval: {c['prediction_coverage']:.0%} "
          f"(mean width {c['mean_prediction_width'] * 100:.1f} points)")
    print(f"  next window inside the replay's interval:   {c['confidence_coverage']:.0%} "
          f"(mean width {c['mean_confidence_width'] * 100:.1f} points)")


if __name__ == "__main__":
    main()
