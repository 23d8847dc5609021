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

With ``second_act`` two more weeks follow (the timeline starts two weeks earlier, so it
still ends about now):

5. the fix verified in act 1 is kept as a rule (learning from success);
6. week 3: the ``flaky`` status service slows down (a median of 17 s against the runtime's
   20 s limit) and the ops workflow runs more; detect finds its timeouts, and the timeout
   strategy's proposal carries the rule as its prior ("a learned rule worked in 1 of 1 place");
7. an A/B experiment of the strategy's two candidates for it (a raised limit, retries)
   beside a control (a git commit of an ``[ab."ID"]`` section);
8. week 4 under the experiment (ToolPolicy assigns each run to an arm), then the judge
   (chi-square across the groups, each arm against the control by Fisher's exact test,
   Holm-corrected) and the winner promoted as a normal applied improvement.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from selfheal_plugin.errors import SelfHealError, UsageError
from selfheal_plugin.history.clock import SimulatedClock
from selfheal_plugin.lifecycle import gitops
from selfheal_plugin.service import SelfHeal
from selfheal_plugin.testbed.agent import TestbedConfig, run_workload, tool_name

DEMO_RUNS = 200
DEMO_DAYS = 7
# The second act's weeks: the flaky status service slows to a median of 17 s against the
# runtime's 20 s limit (about 29 % of its calls time out) and the ops workflow, which calls it
# twice, is 60 % of the runs, so each group of the experiment (some 65 runs) sees about 80 of
# its calls. The experiment's week runs at 0.01 real seconds per simulated second: a raised
# limit is then about 0.2 real seconds beyond a median call, a margin a busy machine's delays
# do not erase (at the default 0.004 it is under 0.1 s).
ACT2_FLAKY_WORK_MS = 17_000.0
ACT2_WORKFLOWS = {"researcher": 0.2, "planner": 0.2, "ops": 0.6}
ACT2_TIME_SCALE = 0.01


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
             seed: int = 1, second_act: bool = False) -> DemoResult:
    """Run the demo; ``on_start(name, title)`` is called as each step begins (the CLI shows a
    live status line there) and ``on_step`` after it (the CLI prints its findings).

    ``seed`` picks the two weeks' workloads (seeds ``2*seed - 1`` and ``2*seed``; the
    default is the demo everyone sees, other seeds are other weeks for the calibration
    benchmark).

    The home is a new temporary directory unless ``directory`` (new or empty) is given;
    it is removed at the end unless ``keep``. Returns every step's findings. ``second_act``
    adds the rule, A/B experiment and promotion of weeks 3 and 4 (module docs).
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
                 on_start or (lambda name, title: None), seed, second_act)
    except BaseException:
        if not kept:
            shutil.rmtree(home, ignore_errors=True)
        raise
    if not kept:
        shutil.rmtree(home, ignore_errors=True)
    return DemoResult(str(home), kept, steps, time.perf_counter() - t_start)


def _run(home: Path, runs: int, steps: list[DemoStep], on_step: Callable[[DemoStep], None],
         testbed_config: Any, now: datetime | None, on_start: Callable[[str, str], None], seed: int = 1,
         second_act: bool = False) -> None:

    def step(name: str, title: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        on_start(name, title)
        t0 = time.perf_counter()
        data = fn()
        s = DemoStep(name, title, data, time.perf_counter() - t0)
        steps.append(s)
        on_step(s)
        return data

    real_now = (now or datetime.now(timezone.utc)).replace(second=0, microsecond=0)
    applied_at = real_now - timedelta(days=DEMO_DAYS * (3 if second_act else 1))
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
        if second_act:
            _second_act(sh, at, home, runs, clock, config, verify_at, seed, step)
        step("dashboard", "Health dashboard (the last 7 days)", lambda: sh.dashboard(since="-7d"))


def _second_act(sh: SelfHeal, at: list[datetime], home: Path, runs: int, clock: SimulatedClock, config: Any,
                week3: datetime, seed: int, step: Callable[..., dict[str, Any]]) -> None:
    """Weeks 3 and 4: a rule from act 1's verified fix, its prior on a new pattern, and an A/B
    experiment of that pattern's candidate fixes (module docs)."""
    week4 = week3 + timedelta(days=DEMO_DAYS)
    end = week4 + timedelta(days=DEMO_DAYS)
    slow = replace(config, flaky_work_ms=ACT2_FLAKY_WORK_MS, workflow_weights=dict(ACT2_WORKFLOWS))
    measured = replace(slow, time_scale=max(config.time_scale, ACT2_TIME_SCALE))
    flaky = f"timeout:{tool_name('flaky')}"

    step("rules", "Learning from success: the verified fix is kept as a rule", lambda: sh.rules())
    step("workload_week3", "Week 3: the status service slows down (median 17 s against the 20 s limit)",
         lambda: _workload_data(run_workload(home, runs=runs, seed=2 * seed + 101, clock=clock, start=week3,
                                             days=DEMO_DAYS, config=slow)))
    at[0] = week4

    def detect() -> dict[str, Any]:
        found = sh.detect(propose=True, until=week4)
        mine = [p for p in found["proposals"] if p.get("pattern_id") == flaky]
        if not mine:
            raise DemoError(f"week 3 showed no recurring {flaky} pattern to experiment on")
        return {"pattern_id": flaky, "proposal": mine[0]}

    step("detect_week3", "Detect and propose: the rule is the new pattern's prior", detect)
    started = step("ab_start", "A/B experiment of the strategy's candidate fixes beside a control (a git commit)",
                   lambda: sh.ab_start(flaky))
    step("workload_week4", "Week 4 under the experiment (ToolPolicy puts each run in an arm or the control)",
         lambda: _workload_data(run_workload(home, runs=runs, seed=2 * seed + 102, clock=clock, start=week4,
                                             days=DEMO_DAYS, config=measured)))
    at[0] = end
    judged = step("ab_status", "Judge the experiment (chi-square, Fisher per arm, Holm)",
                  lambda: sh.ab_status(started["experiment_id"]))
    if (judged.get("verdict") or {}).get("verdict") == "winner":
        step("ab_promote", "Promote the winner (a normal applied improvement, a git commit)",
             lambda: sh.ab_promote(started["experiment_id"]))
    else:
        step("ab_drop", "No significant winner this time: drop the experiment (a git commit)",
             lambda: sh.ab_drop(started["experiment_id"]))


class DemoError(SelfHealError):
    """The demo could not complete a step (it says which); exit 1 with one line."""
