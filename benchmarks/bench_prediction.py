"""Coverage of `test`'s intervals over seeds: does the next window fall inside?

    python benchmarks/bench_prediction.py [--seeds 100] [--runs 200] [--process k8s|testbed] [--json]

Each seed writes a week of runs to a history in the runtime's format (``RunRecorder`` on a
``SimulatedClock``), replays it with a timeout change (``simulate_changes``, the model behind
``agent self-heal test``), then draws the *next* week, as many runs from the same process
with the new limit in force, and compares. Two processes (both by default):

* ``k8s``: every run makes two calls whose durations are log-normal (median 20 s, σ 0.6)
  under a 45 s timeout (a slower call times out and fails the run); the change is 55 s.
* ``testbed``: the closed loop's testbed (:mod:`selfheal_plugin.testbed.agent`) as a process
  with no servers and no real time: its three workflows and their weights, the search's
  log-normal latency under the runtime's 20 s timeout, missing paths and server crashes at
  the rates of ``TestbedConfig``; the change is the search timeout at 37 s (the closed
  loop's strategy chose 35–40 s). Failures the change does not touch (missing paths,
  crashes, the steps after a recovered search) are in it, so the continuation factor is too.

It separates the model from the loop: ``bench_calibration.py`` runs the real loop (real
servers, real time) for the same question, 20 times slower per seed. Printed per process:
how often the next week's success rate falls inside the 95% prediction interval
(``next_window_success_rate``) and inside the replay's own interval (``simulated_success_rate``,
not meant for it: narrower), the mean absolute error of the point prediction in points and
its bias (predicted − measured).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Callable

from selfheal_plugin.history.clock import SimulatedClock
from selfheal_plugin.history.connection import connect
from selfheal_plugin.lifecycle.simulation import simulate_changes
from selfheal_plugin.runtime.recorder import RunRecorder
from selfheal_plugin.testbed.agent import WORKFLOWS, TestbedConfig, tool_name

END = datetime(2026, 11, 20, 12, 0, tzinfo=timezone.utc)
DAY = 86400.0
# one call: (tool, error message or None, duration ms) from the rng and the tool's timeout
Step = Callable[[random.Random, int], tuple[str, str | None, float]]


def _timed(tool: str, median_ms: float, sigma: float) -> Step:
    def call(rng: random.Random, limit: int) -> tuple[str, str | None, float]:
        d = math.exp(rng.gauss(math.log(median_ms), sigma))
        return (tool, None, d) if d <= limit else (tool, f"Tool {tool} timed out after {limit // 1000}s", limit)
    return call


def _failing(tool: str, rate: float, message: str, ms: float) -> Step:
    def call(rng: random.Random, limit: int) -> tuple[str, str | None, float]:
        return tool, (message if rng.random() < rate else None), ms
    return call


class Process:
    """Runs of workflows (name → steps, weight); ``tool`` is the one whose timeout changes."""

    def __init__(self, workflows: dict[str, tuple[list[Step], float]], tool: str, old_ms: int, new_ms: int) -> None:
        self.workflows, self.tool, self.old_ms, self.new_ms = workflows, tool, old_ms, new_ms
        self.names = sorted(workflows)

    def runs(self, rng: random.Random, n: int, limit: int):
        """Yield (workflow, calls) of ``n`` runs; a run stops at its first failed call."""
        weights = [self.workflows[w][1] for w in self.names]
        for _ in range(n):
            wf = rng.choices(self.names, weights=weights)[0]
            calls = []
            for step in self.workflows[wf][0]:
                calls.append(step(rng, limit))
                if calls[-1][1]:
                    break
            yield wf, calls


def k8s() -> Process:
    tool = "mcp__k8s__pods_list"
    pods = _timed(tool, 20_000, 0.6)
    return Process({"k8s-ops": ([pods, pods], 1.0)}, tool, 45_000, 55_000)


def testbed() -> Process:
    cfg = TestbedConfig()
    search = tool_name("search")
    steps = {
        "search": _timed(search, cfg.search_median_ms, cfg.search_sigma),
        "files": _failing(tool_name("files"), cfg.missing_path_rate,
                          "Error executing tool list_dir: Path not found: /tree/reports/q3", 5),
        "flaky": _failing(tool_name("flaky"), cfg.crash_probability,
                          "MCP server flaky process exited unexpectedly during query_status (connection closed)",
                          cfg.flaky_work_ms / 2),
    }
    return Process({w: ([steps[s] for s in servers], cfg.workflow_weights[w]) for w, servers in WORKFLOWS.items()},
                   search, cfg.default_timeout_ms, 37_000)


PROCESSES = {"k8s": k8s, "testbed": testbed}


def write_week(db: Path, process: Process, rng: random.Random, runs: int) -> None:
    """The week before END as the runtime records it, under the old limit."""
    begin = END - timedelta(days=7)
    clock = SimulatedClock(begin)
    with RunRecorder(db, clock=clock) as recorder:
        for i, (wf, calls) in enumerate(process.runs(rng, runs, process.old_ms)):
            clock.set(begin + timedelta(seconds=(i + rng.random()) * 7 * DAY / runs))
            with recorder.run(wf, f"{wf} #{i}") as run:
                for step, (tool, error, ms) in enumerate(calls):
                    run.record_tool_call(tool, {"step": step}, error or "ok", ms, error is not None)
                    clock.advance(ms / 1000)
                    if error:
                        run.fail(f"Workflow failed at step {step}: {error}")


def one_seed(process: Process, seed: int, runs: int, folder: Path) -> dict:
    rng = random.Random(seed)
    db = folder / f"week-{seed}.db"
    write_week(db, process, rng, runs)
    conn = connect(db)
    try:
        change = {"kind": "config", "file": "config.toml", "path": ["tools", process.tool, "timeout_ms"],
                  "op": "set", "value": process.new_ms}
        sim = simulate_changes(conn, [change], "timeout", (END - timedelta(days=8)).timestamp(), END.timestamp(),
                               config={"tools": {process.tool: {"timeout_ms": process.old_ms}}}, seed=seed)
    finally:
        conn.close()
    # the next week, played with the new limit
    actual = statistics.fmean(not any(e for _, e, _ in calls) for _, calls in process.runs(rng, runs, process.new_ms))
    lo, hi = sim.prediction_interval
    clo, chi = sim.simulated_interval
    return {"seed": seed, "actual": actual, "predicted": sim.simulated_success_rate,
            "in_prediction": lo <= actual <= hi, "in_confidence": clo <= actual <= chi,
            "prediction_width": hi - lo, "confidence_width": chi - clo}


def coverage(seeds: range, runs: int, process: str = "k8s") -> dict:
    """Coverage, widths and errors of ``test``'s intervals for ``process`` over ``seeds``."""
    proc = PROCESSES[process]()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [one_seed(proc, s, runs, Path(tmp)) for s in seeds]
    n = len(rows)
    errors = [r["predicted"] - r["actual"] for r in rows]
    return {"process": process, "seeds": n, "runs": runs,
            "prediction_coverage": sum(r["in_prediction"] for r in rows) / n,
            "confidence_coverage": sum(r["in_confidence"] for r in rows) / n,
            "mean_prediction_width": statistics.fmean(r["prediction_width"] for r in rows),
            "mean_confidence_width": statistics.fmean(r["confidence_width"] for r in rows),
            "mean_abs_error_points": 100 * statistics.fmean(abs(e) for e in errors),
            "bias_points": 100 * statistics.fmean(errors),
            "mean_predicted": statistics.fmean(r["predicted"] for r in rows),
            "mean_actual": statistics.fmean(r["actual"] for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--process", choices=sorted(PROCESSES), action="append",
                    help="the process to draw weeks from (repeatable; default: all)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results = [coverage(range(args.seeds), args.runs, p) for p in args.process or sorted(PROCESSES)]
    if args.json:
        print(json.dumps(results, indent=2))
        return
    for c in results:
        print(f"{c['process']}: {c['seeds']} seeds, {c['runs']} runs per window, 95% intervals")
        print(f"  next window inside the prediction interval: {c['prediction_coverage']:.1%} "
              f"(mean width {c['mean_prediction_width'] * 100:.1f} points)")
        print(f"  next window inside the replay's interval:   {c['confidence_coverage']:.1%} "
              f"(mean width {c['mean_confidence_width'] * 100:.1f} points)")
        print(f"  mean absolute error {c['mean_abs_error_points']:.2f} points, bias {c['bias_points']:+.2f} points "
              f"(predicted {c['mean_predicted']:.1%}, measured {c['mean_actual']:.1%} on average)")


if __name__ == "__main__":
    main()
