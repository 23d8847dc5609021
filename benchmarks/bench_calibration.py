"""Calibration of the closed loop: does `test`'s prediction hold for the week after the apply?

    python benchmarks/bench_calibration.py [--seeds 20] [--runs 600] [--first 1] [--time-scale 0.01] [--json]

For each seed the demo's loop runs for real (``run_demo(seed=...)``): a week of testbed runs
(real MCP servers over stdio, the scripted agent through ``ToolPolicy``, ``RunRecorder``,
one ``SimulatedClock``), detect → propose → test (simulation on that week only) → apply the
best safe proposal (a git commit) → another week with the fix in force → verify. Compared
per seed: the 95% prediction interval ``interval.next_window_success_rate`` of the chosen
proposal's ``test`` and its point estimate ``simulated_success_rate`` against the success
rate verify measured on the week after the apply.

Printed: per seed the prediction, the interval, the measured rate, whether it is covered, the
pattern's error rate against its prediction interval and verify's comparison; then the
coverage (goal 90–98 % of seeds), the mean absolute error in points (goal at most 3) and the
bias (mean predicted − measured). Seeds whose simulation found nothing safe to apply are
counted apart (no prediction to check).

The defaults are 600 runs a week at 0.01 real seconds per simulated second, not the demo's 200
at 0.004: with 200-run weeks the binomial noise of the week tested and of the week measured
alone puts the mean absolute error near 3.9 points (``bench_prediction.py --process testbed``
measures it without servers), so the goal cannot be told from noise; and the slower clock
makes each call's real overhead (about 5 ms) a smaller part of the search's 20 s timeout.
Not run by CI: 20 seeds take about 45 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from selfheal_plugin.testbed.agent import TestbedConfig
from selfheal_plugin.testbed.demo import DemoError, run_demo


def one_seed(seed: int, runs: int, time_scale: float | None = None) -> dict:
    t0 = time.perf_counter()
    config = None if time_scale is None else TestbedConfig(time_scale=time_scale)
    try:
        demo = run_demo(runs=runs, seed=seed, testbed_config=config)
    except DemoError as exc:
        return {"seed": seed, "skipped": str(exc), "seconds": round(time.perf_counter() - t0, 1)}
    tested = demo.step("test").data
    chosen = tested["chosen"]
    t = next(r for r in tested["tests"] if r["improvement_id"] == chosen)
    v = demo.step("verify").data
    lo, hi = t["interval"]["next_window_success_rate"]
    measured = v["metrics"]["after_success_rate"]
    predicted = t["simulated_success_rate"]
    pattern = v["metrics"]["pattern"] or {}
    p_band = t["interval"].get("next_window_pattern_error_rate")
    p_measured = pattern.get("after_error_rate")
    return {"seed": seed, "pattern": next((p.get("pattern_id") for p in demo.step("propose").data["proposals"]
                                       if p.get("improvement_id") == chosen), None),
            "predicted": predicted, "interval": [lo, hi], "measured": measured,
            "baseline": t["baseline_success_rate"], "before": v["metrics"]["before_success_rate"],
            "covered": lo <= measured <= hi, "error_points": round(abs(measured - predicted) * 100, 2),
            "pattern_predicted": t["interval"].get("pattern_error_rate"), "pattern_interval": p_band,
            "pattern_measured": p_measured,
            "pattern_covered": None if not p_band or p_measured is None else p_band[0] <= p_measured <= p_band[1],
            "runs_after": v["metrics"]["runs_after"], "comparison": v["comparison"],
            "recommendation": v["recommendation"], "seconds": round(time.perf_counter() - t0, 1)}


def summarise(rows: list[dict]) -> dict:
    done = [r for r in rows if "skipped" not in r]
    covered = sum(r["covered"] for r in done)
    return {"seeds": len(rows), "checked": len(done), "skipped": len(rows) - len(done),
            "covered": covered, "coverage": round(covered / len(done), 3) if done else None,
            "mean_abs_error_points": round(statistics.fmean(r["error_points"] for r in done), 2) if done else None,
            "bias_points": round(100 * statistics.fmean(r["predicted"] - r["measured"] for r in done), 2) if done else None,
            "max_abs_error_points": max((r["error_points"] for r in done), default=None),
            "mean_interval_width_points": round(statistics.fmean((r["interval"][1] - r["interval"][0]) * 100
                                                                 for r in done), 2) if done else None,
            "pattern_covered": sum(bool(r["pattern_covered"]) for r in done),
            "pattern_checked": sum(r["pattern_covered"] is not None for r in done),
            "as_expected": sum(r["comparison"] == "as expected" for r in done)}


def _pattern_text(r: dict) -> str:
    if r["pattern_covered"] is None:
        return "-"
    lo, hi = r["pattern_interval"]
    return f"{r['pattern_measured']:.1%} in [{lo:.1%}, {hi:.1%}]: {'yes' if r['pattern_covered'] else 'NO'}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--first", type=int, default=1, help="first seed (seed 1 is the demo everyone sees)")
    ap.add_argument("--runs", type=int, default=600, help="runs per week (the demo has 200)")
    ap.add_argument("--time-scale", type=float, default=0.01,
                    help="real seconds per simulated second (the demo has 0.004); a larger one makes the "
                         "recorded durations less sensitive to the machine's load, and each seed slower")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for seed in range(args.first, args.first + args.seeds):
        r = one_seed(seed, args.runs, args.time_scale)
        rows.append(r)
        if not args.json:
            if "skipped" in r:
                print(f"seed {seed:3d}: skipped ({r['skipped']})", flush=True)
            else:
                print(f"seed {seed:3d} {r['pattern']}: predicted {r['predicted']:.1%} [{r['interval'][0]:.1%}, {r['interval'][1]:.1%}]"
                      f"  measured {r['measured']:.1%}  {'covered' if r['covered'] else 'MISSED '}"
                      f"  |err| {r['error_points']:.1f} pt  pattern {_pattern_text(r)}"
                      f"  verify: {r['comparison']}, {r['recommendation']}"
                      f"  ({r['seconds']:.0f} s)", flush=True)
    s = summarise(rows)
    if args.json:
        print(json.dumps({"summary": s, "seeds": rows}, indent=2))
    else:
        print(f"\ncoverage of the 95% prediction interval: {s['covered']}/{s['checked']} seeds"
              f" ({(s['coverage'] or 0):.0%}; goal 90-98%), mean absolute error {s['mean_abs_error_points']} points"
              f" (goal <= 3; max {s['max_abs_error_points']}), bias {s['bias_points']:+} points, mean interval width {s['mean_interval_width_points']}"
              f" points, skipped {s['skipped']}; the pattern's error rate inside its prediction interval:"
              f" {s['pattern_covered']}/{s['pattern_checked']}; verify said 'as expected' on {s['as_expected']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
