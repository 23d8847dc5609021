"""Where a detect's time goes: the first run, a warm run, and a run after 10,000 appended
events, each a fresh process timed by phase (what ``agent self-heal detect --json`` does, in
the same order, through the service):

* ``imports`` — the engine's imports (``selfheal_plugin.service``);
* ``open`` — settings, connection, crash recovery;
* ``index+grouping`` — the error index brought up to date and the window's failures grouped;
* ``evidence`` — each pattern's evidence (stored or read);
* ``proposals`` — the open proposal of each pattern checked, or a new one proposed;
* ``rest`` — suggested fixes, notifications, the typed result;
* ``json`` — the output text.

    python benchmarks/profile_detect.py                                 # failure-heavy, 1M events
    python benchmarks/profile_detect.py --profile default --events 250000
    python benchmarks/profile_detect.py --cprofile /tmp/detect          # also /tmp/detect-{first,warm,plus10k}.prof

Histories are the ones bench_detect.py generates (same ``--dir``). Not run by CI; no thresholds.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_detect import SINCE, append_events, history  # noqa: E402
from installed import compile_package  # noqa: E402

PHASES = ("imports", "open", "index+grouping", "evidence", "proposals", "rest", "json")


def child(home: str) -> None:
    marks = [("start", time.perf_counter())]

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter()))

    from selfheal_plugin.analysis import patterns
    from selfheal_plugin.service import SelfHeal
    mark("imports")
    sh = SelfHeal(home, None, lookback=SINCE.isoformat())
    mark("open")
    attach = patterns.attach_evidence_all

    def timed_evidence(*args, **kwargs):  # type: ignore[no-untyped-def]
        mark("index+grouping")
        attach(*args, **kwargs)
        mark("evidence")
    patterns.attach_evidence_all = timed_evidence
    propose = sh._propose_all

    def timed_proposals(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = propose(*args, **kwargs)
        mark("proposals")
        return out
    sh._propose_all = timed_proposals  # type: ignore[method-assign]
    result = sh.detect(propose=True, notify=True, runs_limit=20)
    mark("rest")
    json.dumps(result, default=str)  # as `detect --json` writes it to a pipe
    mark("json")
    sh.close()
    print(json.dumps({name: round(t - prev, 4) for (_, prev), (name, t) in zip(marks, marks[1:])}))


def run(home: Path, cprofile: str | None, label: str) -> dict[str, float]:
    cmd = [sys.executable]
    if cprofile:
        cmd += ["-m", "cProfile", "-o", f"{cprofile}-{label}.prof"]
    out = subprocess.run([*cmd, __file__, "--child", str(home)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="failure-heavy")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--dir", default="/tmp/selfheal-bench")
    ap.add_argument("--cprofile", metavar="PREFIX", help="also write a cProfile of each run to PREFIX-LABEL.prof")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    compile_package()
    workdir = Path(args.dir)
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["INBOX_PATH"] = str(workdir / "inbox")  # each detect's summary: here, not in the user's inbox
    src = history(args.profile, args.events, workdir)
    home = workdir / "profile-home"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir()
    shutil.copy(src, home / "conversations.db")
    rows = {"first": run(home, args.cprofile, "first"), "warm": run(home, args.cprofile, "warm")}
    append_events(home / "conversations.db", 10_000)
    rows["+10k"] = run(home, args.cprofile, "plus10k")
    print(f"{args.profile}, {args.events:,} events: seconds by phase (one fresh process each)")
    print(f"  {'phase':<16}" + "".join(f"{k:>10}" for k in rows))
    for phase in PHASES:
        print(f"  {phase:<16}" + "".join(f"{r.get(phase, 0.0):10.3f}" for r in rows.values()))
    print(f"  {'total':<16}" + "".join(f"{sum(r.values()):10.3f}" for r in rows.values()))


if __name__ == "__main__":
    main()
