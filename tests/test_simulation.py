"""The simulation models on histories whose truth is known."""
from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import pytest

from selfheal_plugin.service import SelfHeal
from scipy import stats

from selfheal_plugin import hookimpl

from selfheal_plugin.plugins import manager as plugins

from selfheal_plugin.lifecycle import simulation
from selfheal_plugin.errors import NotFoundError, UsageError
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.plugins.strategy import Strategy

from .conftest import NOW
from .lifecycle_data import (
    K8S, RunSpec, add_improvement, settings_for, timeout_change, timeout_history, write_runs,
)

SINCE = (NOW - timedelta(days=7)).timestamp()
UNTIL = NOW.timestamp()


@pytest.fixture
def timeout_db(binks_home):
    db = binks_home / "conversations.db"
    truth = timeout_history(db, NOW, runs=300, seed=3, old_limit=45_000, median=20_000, sigma=0.6)
    return db, truth


def test_timeout_raise_predicts_the_true_success_rate(timeout_db):
    db, truth = timeout_db
    conn = connect(db)
    sim = simulation.simulate_changes(conn, [timeout_change(90_000)], "timeout", SINCE, UNTIL)
    observed = np.mean([all(d <= 45_000 for d in run) for run in truth])
    true_rate = np.mean([all(d <= 90_000 for d in run) for run in truth])
    assert sim.baseline_success_rate == pytest.approx(observed, abs=1e-4)
    assert sim.runs_replayed == 300
    assert abs(sim.simulated_success_rate - true_rate) < 0.03
    lo, hi = sim.simulated_interval
    assert lo <= true_rate <= hi
    assert sim.improvement_interval[0] > 0
    model = sim.models[0]
    # the conditional probability that a timed-out call finishes under the new limit
    z45, z90 = (math.log(45_003 / 20_000) / 0.6, math.log(90_000 / 20_000) / 0.6)
    p_true = (stats.norm.cdf(z90) - stats.norm.cdf(z45)) / stats.norm.sf(z45)
    assert abs(model["p_timed_out_call_finishes"] - p_true) < 0.1
    assert model["timed_out_calls"] == sum(d > 45_000 for run in truth for d in run)


def test_lowering_a_timeout_is_rejected(timeout_db):
    db, _ = timeout_db
    conn = connect(db)
    sim = simulation.simulate_changes(conn, [timeout_change(15_000)], "timeout", SINCE, UNTIL)
    assert sim.runs_broken > 0 and sim.simulated_success_rate < sim.baseline_success_rate
    rec, reason = simulation.recommend(sim, "low")
    assert rec == "reject" and "lowered the success rate" in reason


def test_test_improvement_stores_the_result_and_fires_the_hook(timeout_db, binks_home):
    db, truth = timeout_db
    imp = add_improvement(db, [timeout_change(90_000)])
    seen = []

    class Capture:
        @hookimpl
        def improvement_tested(self, improvement, result, settings):
            seen.append((improvement.id, improvement.status, result["recommendation"]))

    cap = Capture()
    plugins.register(cap, "capture-tested")
    try:
        conn = connect(db)
        r = simulation.test_improvement(connect(db), settings_for(binks_home), imp.id, now=NOW)
    finally:
        plugins.unregister(cap)
    assert r["improvement_id"] == imp.id and r["test_mode"] == "simulation"
    assert r["recommendation"] == "safe_to_apply"
    gain = r["simulated_success_rate"] - r["baseline_success_rate"]
    assert r["expected_improvement"] == f"+{gain * 100:.0f}%"
    assert r["runs_replayed"] == 300 and r["interval"]["confidence"] == 0.95
    lo, hi = r["interval"]["simulated_success_rate"]
    assert lo <= r["simulated_success_rate"] <= hi
    stored = ImprovementStore(conn).get(imp.id)
    assert stored.status == "tested" and stored.test_result["simulated_success_rate"] == r["simulated_success_rate"]
    assert seen == [(imp.id, "tested", "safe_to_apply")]


def retry_history(db, followups_ok: int, followups_failed: int, single_failures: int, clean: int):
    """Failed runs where a connection_refused call of X is followed by another call of X
    (ok or failing), failed runs with a lone failure, and clean runs."""
    specs = []
    t = NOW - timedelta(days=6)
    fail = ("mcp__gh__issue", False, 20.0, "connection_refused")
    ok = ("mcp__gh__issue", True, 300.0, None)
    for kind, n in (("followed_ok", followups_ok), ("followed_fail", followups_failed), ("single", single_failures),
                    ("clean", clean)):
        for _ in range(n):
            t += timedelta(minutes=30)
            calls = {"followed_ok": [fail, ok], "followed_fail": [fail, fail], "single": [fail],
                     "clean": [ok]}[kind]
            specs.append(RunSpec(t, "completed" if kind in ("clean", "followed_ok") else "failed", calls))
    write_runs(db, specs)


def test_retry_model_uses_observed_failure_independence(binks_home):
    db = binks_home / "conversations.db"
    retry_history(db, followups_ok=15, followups_failed=5, single_failures=10, clean=70)
    conn = connect(db)
    change = {"kind": "config", "path": ["tools", "mcp__gh__issue", "retry_attempts"], "value": 1}
    sim = simulation.simulate_changes(conn, [change], "connection_refused", SINCE, UNTIL)
    model = sim.models[0]
    # 20 failures were followed by another call in the same run; 15 of those succeeded:
    # the shrunk estimate (15 + 1) / (20 + 2), not the raw 15/20
    assert (model["followups_observed"], model["followups_succeeded"]) == (20, 15)
    p = 16 / 22
    assert model["p_retry_succeeds"] == pytest.approx(p, abs=1e-4)
    assert model["p_failure_fixed"] == pytest.approx(p, abs=1e-4)
    # failed runs: 5 with two fixable failures (p²), 10 with one (p)
    expected = (70 + 15 + 5 * p ** 2 + 10 * p) / 100
    assert sim.simulated_success_rate == pytest.approx(expected, abs=1e-4)
    assert sim.baseline_success_rate == pytest.approx(0.85)
    more = simulation.simulate_changes(conn, [dict(change, value=2)], "connection_refused", SINCE, UNTIL)
    assert more.models[0]["p_failure_fixed"] == pytest.approx(1 - (1 - p) ** 2, abs=1e-4)


def test_a_perfect_follow_up_record_is_not_certainty(binks_home):
    """6 of 6 follow-up calls succeeded: the estimate is 7/8, and the 2 failures with no
    follow-up call in history count at 7/8 too, not as certainly fixed."""
    db = binks_home / "conversations.db"
    retry_history(db, followups_ok=6, followups_failed=0, single_failures=2, clean=12)
    conn = connect(db)
    change = {"kind": "config", "path": ["tools", "mcp__gh__issue", "retry_attempts"], "value": 1}
    sim = simulation.simulate_changes(conn, [change], "connection_refused", SINCE, UNTIL)
    model = sim.models[0]
    assert (model["followups_observed"], model["followups_succeeded"]) == (6, 6)
    assert model["p_retry_succeeds"] == pytest.approx(7 / 8)
    assert sim.failures_targeted == 8 and sim.failures_fixed == pytest.approx(8 * 7 / 8, abs=0.01)
    assert sim.runs_recovered == pytest.approx(2 * 7 / 8, abs=0.01)
    assert sim.simulated_success_rate == pytest.approx((18 + 2 * 7 / 8) / 20, abs=1e-4)


def test_too_few_followups_is_no_model(binks_home):
    db = binks_home / "conversations.db"
    retry_history(db, followups_ok=1, followups_failed=1, single_failures=10, clean=20)
    conn = connect(db)
    change = {"kind": "config", "path": ["tools", "mcp__gh__issue", "retry_attempts"], "value": 1}
    sim = simulation.simulate_changes(conn, [change], "connection_refused", SINCE, UNTIL)
    assert sim.simulated_success_rate is None
    rec, reason = simulation.recommend(sim, "low")
    assert rec == "risky" and "no model" in reason and "only 2 failure(s)" in reason


def test_settings_without_a_model_say_so(timeout_db, binks_home):
    db, _ = timeout_db
    conn = connect(db)
    change = {"kind": "config", "path": ["tools", K8S, "preflight"], "value": ["path_exists"]}
    sim = simulation.simulate_changes(conn, [change], "timeout", SINCE, UNTIL)
    assert sim.simulated_success_rate is None and sim.baseline_success_rate is not None
    assert simulation.recommend(sim, "low") == (
        "risky", f"no model: tools.{K8S}.preflight: no simulation model for this setting")
    # a modelled change next to an unmodelled one: numbers, but not "safe"
    mixed = simulation.simulate_changes(conn, [timeout_change(90_000), change], "timeout", SINCE, UNTIL)
    assert mixed.simulated_success_rate is not None
    assert simulation.recommend(mixed, "low")[0] == "risky"

    manual = add_improvement(db, [{"kind": "manual", "text": "ask the k8s team"}])
    r = simulation.test_improvement(conn, settings_for(binks_home), manual.id, now=NOW)
    assert r["recommendation"] == "risky" and r["simulated_success_rate"] is None
    assert r["expected_improvement"] is None and r["reason"].startswith("no model")


def test_too_few_successful_calls_is_no_model(binks_home):
    db = binks_home / "conversations.db"
    write_runs(db, [RunSpec(NOW - timedelta(hours=h), "failed", [(K8S, False, 30_003, "timeout")]) for h in range(5)])
    sim = simulation.simulate_changes(connect(db), [timeout_change()], "timeout", SINCE, UNTIL)
    assert sim.simulated_success_rate is None
    assert "only 0 successful calls" in sim.unmodeled[0]["reason"]


def test_strategy_without_a_model_gives_no_number(timeout_db, binks_home):
    db, _ = timeout_db

    class Blind(Strategy):
        name = "blind"
        error_types = ("blind_error",)

        def propose(self, pattern, history):  # pragma: no cover - not used here
            raise NotImplementedError

    class Plugin:
        @hookimpl
        def register_strategies(self, register):
            register(Blind())

    plugin = Plugin()
    plugins.register(plugin, "blind-plugin")
    try:
        imp = add_improvement(db, [timeout_change(90_000)], pattern_id=f"blind_error:{K8S}", strategy="blind")
        r = simulation.test_improvement(connect(db), settings_for(binks_home), imp.id, now=NOW)
    finally:
        plugins.unregister(plugin)
    assert r["recommendation"] == "risky" and r["simulated_success_rate"] is None
    assert "strategy 'blind' has no simulation model" in r["reason"]


def _test_with_simulate(db, binks_home, simulate):
    """``test`` of a timeout change whose strategy (a third party's) simulates with ``simulate``."""

    class Claims(Strategy):
        name = "claims"
        error_types = ("claims_error",)

        def propose(self, pattern, history):  # pragma: no cover - not used here
            raise NotImplementedError

        def simulate(self, proposal, history):
            return simulate(history)

    class Plugin:
        @hookimpl
        def register_strategies(self, register):
            register(Claims())

    plugin = Plugin()
    plugins.register(plugin, "claims-plugin")
    try:
        imp = add_improvement(db, [timeout_change(90_000)], pattern_id=f"claims_error:{K8S}", strategy="claims",
                              risk_level="low")
        return imp, simulation.test_improvement(connect(db), settings_for(binks_home), imp.id, now=NOW)
    finally:
        plugins.unregister(plugin)


def _window_counts(db):
    runs = simulation.load_runs(connect(db), SINCE, UNTIL)
    return len(runs), sum(r.completed for r in runs)


def test_a_strategys_own_simulation_is_judged_on_the_historys_baseline(timeout_db, binks_home):
    """A made-up baseline (0.50 where the window's is ~0.8) is not taken: the gain, the
    improvement interval and the verdict are measured from the history's own rate."""
    db, _ = timeout_db
    n, completed = _window_counts(db)
    base = completed / n
    recovered = n - completed - 2  # all but two failed runs recovered
    rate = (completed + recovered) / n
    made_up = {"simulated_success_rate": rate, "baseline_success_rate": 0.50, "simulated_interval": [rate - 0.01, rate],
               "improvement_interval": [0.4, 0.5], "runs_replayed": 10, "runs_recovered": recovered, "runs_broken": 0,
               "failures_targeted": recovered + 2, "failures_fixed": recovered, "recommendation": "safe_to_apply",
               "models": [{"model": "duration"}], "notes": ["my own model"]}
    imp, r = _test_with_simulate(db, binks_home, lambda history: made_up)
    assert 0.6 < base < 0.95 and r["baseline_success_rate"] == round(base, 4) and r["runs_replayed"] == n
    assert r["interval"]["improvement"] == [round(rate - 0.01 - round(base, 4), 4), round(rate - round(base, 4), 4)]
    assert r["model_source"] == "strategy claims" and r["baseline_source"] == "history" and r["models"] == []
    assert r["notes"] == ["my own model", f"the strategy's own baseline (0.5) is not used: the history's is "
                                          f"{round(base, 4):.4g}"]
    assert r["recommendation"] == "safe_to_apply"  # its own model, on the true baseline
    # claiming the rate a 0.50 baseline would give is claiming more runs than failed
    lie = {**made_up, "simulated_success_rate": 0.99, "simulated_interval": [0.98, 1.0],
           "runs_recovered": 0.49 * n}
    _, r = _test_with_simulate(db, binks_home, lambda history: lie)
    assert r["recommendation"] == "risky" and r["simulated_success_rate"] is None
    assert r["baseline_success_rate"] == round(base, 4)  # the same baseline, rounded as everywhere
    assert f"strategy 'claims' returned an invalid simulation (runs_recovered must be a number between 0 and " \
           f"{n - completed}, got {0.49 * n!r})" in r["reason"]


@pytest.mark.parametrize("result, problem", [
    ({"simulated_success_rate": 0.99, "recommendation": "safe_to_apply"},
     "missing simulated_interval, runs_recovered, runs_broken, failures_targeted, failures_fixed (a simulation "
     "needs simulated_success_rate, simulated_interval, runs_recovered, runs_broken, failures_targeted, "
     "failures_fixed)"),
    ("safe", "returned str, not a Simulation or a dict"),
    ({"simulated_success_rate": 0.9, "simulated_interval": [0.95, 1.0], "runs_recovered": 0, "runs_broken": 0,
      "failures_targeted": 0, "failures_fixed": 0}, "simulated_success_rate 0.9 is not what its runs give"),
    ({"simulated_success_rate": float("nan"), "simulated_interval": [0, 1], "runs_recovered": 0, "runs_broken": 0,
      "failures_targeted": 0, "failures_fixed": 0}, "simulated_success_rate must be a number between 0 and 1, got nan"),
], ids=["missing", "text", "inconsistent", "nan"])
def test_a_malformed_simulation_is_a_plugin_error_naming_what_is_wrong(timeout_db, binks_home, result, problem):
    db, _ = timeout_db
    imp, r = _test_with_simulate(db, binks_home, lambda history: result)
    assert r["recommendation"] == "risky" and r["simulated_success_rate"] is None
    assert r["reason"].startswith(f"no model: all: strategy 'claims' returned an invalid simulation ({problem}")
    (err,) = [e for e in plugins.errors() if e.plugin == "claims-plugin" and imp.id in e.error]
    assert (err.phase, err.hook, err.strategy) == ("strategy", "simulate", "claims")
    assert err.error.startswith(f"invalid simulation for {imp.id}: {problem}") and "\n" not in err.error


def test_empty_window_and_bad_input(binks_home):
    db = binks_home / "conversations.db"
    connect(db, create=True).close()
    imp = add_improvement(db, [timeout_change()])
    conn, s = connect(db), settings_for(binks_home)
    r = simulation.test_improvement(conn, s, imp.id, now=NOW)
    assert r["runs_replayed"] == 0 and r["recommendation"] == "risky" and "no finished runs" in r["reason"]
    with pytest.raises(UsageError, match="unknown test mode 'bogus'"):
        SelfHeal(settings=s).test(imp.id, mode="bogus")
    with pytest.raises(NotFoundError):
        simulation.test_improvement(conn, s, "imp-missing")
    with pytest.raises(UsageError, match="invalid time window"):
        simulation.test_improvement(conn, s, imp.id, since="-7x")


def test_a_run_that_stopped_at_the_fixed_call_still_has_its_later_steps_to_pass(binks_home):
    """A runtime stops a run at its first failed call: a run whose k8s call timed out never
    ran its next step, which fails 30 % of the time where it did run. A longer timeout
    recovers such a run only if that step then passes too."""
    import random

    db = binks_home / "conversations.db"
    rng = random.Random(5)
    specs, truth = [], []
    for i in range(400):
        start = NOW - timedelta(days=6.5) + timedelta(seconds=i * 6.5 * 86400 / 400)
        d = math.exp(rng.gauss(math.log(20_000), 0.6))
        later_ok = rng.random() >= 0.3
        calls = [("read_file", True, 40.0, None)]
        if d <= 45_000:
            calls += [(K8S, True, d, None), ("mcp__files__list_dir", later_ok, 50.0, None if later_ok else "tool_error")]
            status = "completed" if later_ok else "failed"
        else:
            calls.append((K8S, False, 45_003.0, "timeout"))
            status = "failed"
        specs.append(RunSpec(start, status, calls))
        truth.append(d <= 90_000 and later_ok)
    write_runs(db, specs)
    sim = simulation.simulate_changes(connect(db), [timeout_change(90_000)], "timeout", SINCE, UNTIL)
    true_rate = float(np.mean(truth))
    assert abs(sim.simulated_success_rate - true_rate) < 0.03
    lo, hi = sim.prediction_interval
    assert lo <= true_rate <= hi
    # counted as certain completions, the recovered runs would overstate the rate by ~30 % of them
    naive = sim.baseline_success_rate + sim.failures_fixed / sim.runs_replayed
    assert naive - sim.simulated_success_rate > 0.25 * sim.failures_fixed / sim.runs_replayed


def test_the_continuation_is_estimated_again_from_each_replicates_runs():
    """The factor moves with the runs the bootstrap draws (a week whose later steps failed
    less also rescues more), not apart from them: each replicate's factor is the completed
    share of the runs past the call, as that replicate weighs them; replicate 0 is s / n."""
    Call, Run = simulation.Call, simulation.ReplayRun
    runs = [Run(f"r{i}", ok, [Call(2 * i, K8S, True, 10.0, None), Call(2 * i + 1, "later", ok, 5.0, None)], "wf")
            for i, ok in enumerate([True] * 6 + [False] * 4)]
    stopped = Run("x", False, [Call(99, K8S, False, 45_003.0, "timeout")], "wf")
    W = np.array([[1.0] * 10, [2.0] * 6 + [0.0] * 4, [0.0] * 6 + [1.0] * 3 + [0.0], [0.0] * 10])
    factor = simulation._Continuation(runs, W)(stopped, stopped.calls[0])
    assert factor.tolist() == [0.6, 1.0, 0.0, 0.6]  # a replicate with none of those runs keeps s / n
    # with fewer runs past the call than MIN_CONTINUATION, or all of them completed: 1
    assert simulation._Continuation(runs[:6], W[:, :6])(stopped, stopped.calls[0]) == 1.0


def test_a_reason_gives_the_point_and_both_ends_in_one_precision():
    """+0.8% expected with an interval to 0.0153 reads +1.5%, not +2%: one precision for all three."""
    sim = simulation.Simulation(simulated_success_rate=0.908, baseline_success_rate=0.9, simulated_interval=None,
                                improvement_interval=[0.003, 0.0153], runs_replayed=500, runs_recovered=4.0,
                                runs_broken=0, failures_targeted=10, failures_fixed=4.0)
    assert simulation.recommend(sim, "low") == (
        "safe_to_apply", "+0.8% expected (95% interval +0.3% to +1.5%) over 500 replayed runs")
    sim.improvement_interval = [-0.002, 0.12]
    assert simulation.recommend(sim, "low") == (
        "risky", "+0.8% expected, but the 95% interval (-0.2% to +12.0%) includes no improvement")
    sim.simulated_success_rate, sim.improvement_interval = 0.95, [0.02, 0.08]
    assert simulation.recommend(sim, "low")[1].startswith("+5% expected (95% interval +2% to +8%)")
