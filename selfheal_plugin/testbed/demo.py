"""``agent self-heal demo``: the whole loop in a throwaway home, in about a minute.

Two simulated weeks on one :class:`~selfheal_plugin.history.clock.SimulatedClock`:

1. a week of testbed runs (real MCP servers over stdio, the scripted agent through
   ``ToolPolicy``, recorded by ``RunRecorder``), ending at the apply instant ``A``;
2. detect → propose → test (simulation, on that week only) → apply the best proposal the
   simulation calls safe (a real git commit in the demo home, ``applied_at = A``);
3. a second week of runs from ``A`` with the fix in force (the policy re-reads config.toml);
4. verify at ``A + 7 days`` (before vs after, Fisher's exact test) and the dashboard.

``A`` is a week before the real now, so the second week ends about now and the
dashboard's "last 7 days" is the week after the fix. Notifications go to an inbox inside
the demo home, never to the user's.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from selfheal_plugin.errors import SelfHealError, UsageError
from selfheal_plugin.history.clock import SimulatedClock
from selfheal_plugin.lifecycle import gitops
from selfheal_plugin.service import SelfHeal
from selfheal_plugin.testbed.agent import TestbedConfig, run_workload

DEMO_RUNS = 200
DEMO_DAYS = 7


@dataclass
class DemoStep:
    name: str
    title: str
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class DemoResult:
    home: str
    kept: bool
    steps: list[DemoStep]
    seconds: float

    def step(self, name: str) -> DemoStep:
        return next(s for s in self.steps if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {"home": self.home, "kept": self.kept, "seconds": round(self.seconds, 2),
                "steps": [{"name": s.name, "title": s.title, "seconds": round(s.seconds, 2), **s.data}
                          for s in self.steps]}


def _prepare_home(directory: str | Path | None) -> Path:
    if directory is None:
        return Path(tempfile.mkdtemp(prefix="selfheal-demo-"))
    home = Path(directory).expanduser()
    if home.exists() and (not home.is_dir() or any(home.iterdir())):
        raise UsageError(f"--dir {home} must be a new or empty directory (the demo writes a whole home there)")
    home.mkdir(parents=True, exist_ok=True)
    return home


@contextmanager
def _demo_environment(home: Path) -> Iterator[None]:
    """Point BINKS_HOME and INBOX_PATH into the demo home for the duration."""
    saved = {k: os.environ.get(k) for k in ("BINKS_HOME", "INBOX_PATH")}
    os.environ["BINKS_HOME"] = str(home)
    os.environ["INBOX_PATH"] = str(home / "inbox")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _workload_data(summary: Any) -> dict[str, Any]:
    d = summary.to_dict()
    d.pop("run_ids", None)
    return d


def run_demo(directory: str | Path | None = None, *, keep: bool = False, runs: int = DEMO_RUNS,
             on_step: Callable[[DemoStep], None] | None = None, testbed_config: Any = None,
             now: datetime | None = None, on_start: Callable[[str, str], None] | None = None,
             seed: int = 1) -> DemoResult:
    """Run the demo; ``on_start(name, title)`` is called as each step begins (the CLI shows a
    live status line there) and ``on_step`` after it (the CLI prints its findings).

    ``seed`` picks the two weeks' workloads (seeds ``2*seed - 1`` and ``2*seed``; the
    default is the demo everyone sees, other seeds are other weeks for the calibration
    benchmark).

    The home is a new temporary directory unless ``directory`` (new or empty) is given;
    it is removed at the end unless ``keep``. Returns every step's findings.
    """
    if runs < 40:
        raise UsageError(f"the demo needs at least 40 runs per week to verify anything, got {runs}")
    home = _prepare_home(directory)
    t_start = time.perf_counter()
    steps: list[DemoStep] = []
    kept = keep or directory is not None  # a directory the user named is theirs
    try:
        with _demo_environment(home):
            _run(home, runs, steps, on_step or (lambda s: None), testbed_config, now,
                 on_start or (lambda name, title: None), seed)
    except BaseException:
        if not kept:
            shutil.rmtree(home, ignore_errors=True)
        raise
    if not kept:
        shutil.rmtree(home, ignore_errors=True)
    return DemoResult(str(home), kept, steps, time.perf_counter() - t_start)


def _run(home: Path, runs: int, steps: list[DemoStep], on_step: Callable[[DemoStep], None],
         testbed_config: Any, now: datetime | None, on_start: Callable[[str, str], None], seed: int = 1) -> None:

    def step(name: str, title: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        on_start(name, title)
        t0 = time.perf_counter()
        data = fn()
        s = DemoStep(name, title, data, time.perf_counter() - t0)
        steps.append(s)
        on_step(s)
        return data

    real_now = (now or datetime.now(timezone.utc)).replace(second=0, microsecond=0)
    applied_at = real_now - timedelta(days=DEMO_DAYS)
    week_start = applied_at - timedelta(days=DEMO_DAYS)
    verify_at = applied_at + timedelta(days=DEMO_DAYS)
    clock = SimulatedClock(week_start)
    config = testbed_config or TestbedConfig()

    step("home", "Throwaway home", lambda: {"home": str(home), "timeline": {
        "before": [week_start.isoformat(), applied_at.isoformat()],
        "apply": applied_at.isoformat(), "after": [applied_at.isoformat(), verify_at.isoformat()]}})

    step("workload_before", "A week of runs (real MCP servers over stdio, simulated clock)",
         lambda: _workload_data(run_workload(home, runs=runs, seed=2 * seed - 1, clock=clock, days=DEMO_DAYS, config=config)))

    at = [applied_at]  # the service's clock: the instant of the step in progress
    with SelfHeal(home, clock=lambda: at[0]) as sh:
        def detect() -> dict[str, Any]:
            found = sh.detect(until=applied_at)
            return {"since": found["since"], "patterns": found["patterns"]}

        detected = step("detect", "Detect recurring failures", detect)
        if not detected["patterns"]:
            raise DemoError("the workload produced no recurring failure pattern to heal")

        proposals = step("propose", "Propose a fix per pattern (strategy plugins)",
                         lambda: {"proposals": sh.detect(propose=True, until=applied_at)["proposals"]})

        def test() -> dict[str, Any]:
            results = []
            for p in proposals["proposals"]:
                if "error" in p or not any(c.get("kind") == "config" for c in p.get("changes") or []):
                    continue
                results.append(sh.test(p["improvement_id"]))
            safe = [r for r in results if r["recommendation"] == "safe_to_apply"]
            best = max(safe, key=lambda r: r["simulated_success_rate"] - r["baseline_success_rate"], default=None)
            return {"tests": results, "chosen": best["improvement_id"] if best else None}

        tested = step("test", "Test each proposal against the week's history (simulation)", test)
        chosen = tested["chosen"]
        if chosen is None:
            raise DemoError("no proposal was safe to apply according to the simulation")

        def apply() -> dict[str, Any]:
            result = sh.apply(chosen, "applied by agent self-heal demo")
            cr = gitops.locate(sh.settings.config_path, sh.settings.home)
            return {**result, "git_log": cr.git("log", "--format=%h %s").splitlines(),
                    "config_toml": sh.settings.config_path.read_text(encoding="utf-8")}

        step("apply", "Apply the best safe proposal (a real git commit)", apply)

        step("workload_after", "Another week of runs with the fix in force (ToolPolicy re-reads config.toml)",
             lambda: _workload_data(run_workload(home, runs=runs, seed=2 * seed, clock=clock, start=applied_at,
                                                 days=DEMO_DAYS, config=config)))
        at[0] = verify_at
        step("verify", "Verify: the week before vs the week after the apply", lambda: sh.verify(chosen))
        step("dashboard", "Health dashboard (the last 7 days)", lambda: sh.dashboard(since="-7d"))


class DemoError(SelfHealError):
    """The demo could not complete a step (it says which); exit 1 with one line."""
