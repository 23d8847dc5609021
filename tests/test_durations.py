"""The one duration model (analysis/durations): recovery of known parameters from censored
data, honest "no model", and the timeout strategy and the simulation agreeing on it."""
from __future__ import annotations

import math
from datetime import timedelta
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from selfheal_plugin.analysis import durations
from selfheal_plugin.cli.main import agent
from selfheal_plugin.history.connection import connect
from selfheal_plugin.lifecycle import simulation
from selfheal_plugin.lifecycle.proposals import propose_improvement
from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.plugins.strategy import HistoryWindow

from .conftest import NOW
from .lifecycle_data import K8S, RunSpec, settings_for, timeout_change, timeout_history, write_runs

MU, SIGMA = math.log(20_000), 0.6
SINCE = "2026-11-13"  # an absolute start: the CLI below runs on the real clock, after NOW


def censored_sample(rng: np.random.Generator, n: int, limit: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` log-normal durations; those over ``limit`` are cut off there (as a timeout
    records them). Returns (observed, censored, truth)."""
    x = np.exp(rng.normal(MU, SIGMA, n))
    return x[x <= limit], np.full(int((x > limit).sum()), limit), x


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugins.reset()
    yield
    plugins.reset()


def test_recovers_known_parameters_from_heavily_censored_data():
    rng = np.random.default_rng(7)
    obs, cens, _ = censored_sample(rng, 4000, 25_000)  # ~35% of calls time out
    assert 0.25 < len(cens) / 4000 < 0.45
    m = durations.fit_durations(obs, cens)
    assert isinstance(m, durations.DurationModel)
    se_mu, se_log_sigma = math.sqrt(m.cov[0][0]), math.sqrt(m.cov[1][1])
    assert abs(m.mu - MU) < 4 * se_mu and abs(math.log(m.sigma / SIGMA)) < 4 * se_log_sigma
    assert (m.observed, m.censored, m.n) == (len(obs), len(cens), 4000)
    assert m.describe() == f"censored log-normal (n=4000, censored={len(cens)})"
    # ignoring the censoring (successful calls only) would badly underestimate the tail
    naive = stats.norm.fit(np.log(obs))
    assert naive[0] < MU - 10 * se_mu
    # the p99 and P(T <= 60 s | T > 25 s) are near the truth (within 4 of the intervals'
    # standard errors; how often the intervals cover the truth is the next test's)
    true_p99 = math.exp(MU + SIGMA * stats.norm.ppf(0.99))
    lo, hi = m.quantile_interval_ms(0.99)
    assert lo < m.quantile_ms(0.99) < hi
    assert abs(math.log(m.quantile_ms(0.99) / true_p99)) < 4 * math.log(hi / lo) / (2 * 1.96)
    z25, z60 = (math.log(25_000) - MU) / SIGMA, (math.log(60_000) - MU) / SIGMA
    true_p = 1 - stats.norm.sf(z60) / stats.norm.sf(z25)
    p, lo, hi = m.finish_estimate(60_000, cens)
    assert lo < p < hi and abs(p - true_p) < 4 * (hi - lo) / (2 * 1.96)
    # the same MLE as scipy's own log-normal fit on the censored durations
    s, _, scale = stats.lognorm.fit(stats.CensoredData(uncensored=obs, right=cens), floc=0)
    assert m.mu == pytest.approx(math.log(scale), abs=1e-3) and m.sigma == pytest.approx(s, abs=1e-3)


def test_delta_method_intervals_cover_the_truth_about_95_percent():
    rng = np.random.default_rng(11)
    z30, z60 = (math.log(30_000) - MU) / SIGMA, (math.log(60_000) - MU) / SIGMA
    true_p = 1 - stats.norm.sf(z60) / stats.norm.sf(z30)
    true_p99 = math.exp(MU + SIGMA * stats.norm.ppf(0.99))
    covered_p = covered_q = 0
    for _ in range(200):
        obs, cens, _ = censored_sample(rng, 150, 30_000)
        m = durations.fit_durations(obs, cens)
        _, lo, hi = m.finish_estimate(60_000, 30_000)
        covered_p += lo <= true_p <= hi
        lo, hi = m.quantile_interval_ms(0.99)
        covered_q += lo <= true_p99 <= hi
    assert 0.88 <= covered_p / 200 <= 0.99 and 0.88 <= covered_q / 200 <= 0.99


def test_information_is_the_curvature_of_the_censored_log_likelihood():
    rng = np.random.default_rng(3)
    obs, cens, _ = censored_sample(rng, 500, 30_000)
    m = durations.fit_durations(obs, cens)
    x, c = np.log(obs), np.log(cens)

    def ll(mu: float, s: float) -> float:
        return float(stats.norm.logpdf(x, mu, s).sum() + stats.norm.logsf(c, mu, s).sum())

    h = 1e-4
    num = np.zeros((2, 2))
    for i in range(2):
        for j in range(2):
            ei, ej = np.eye(2)[i] * h, np.eye(2)[j] * h
            th = np.array([m.mu, m.sigma])
            num[i, j] = -(ll(*(th + ei + ej)) - ll(*(th + ei - ej)) - ll(*(th - ei + ej))
                          + ll(*(th - ei - ej))) / (4 * h * h)
    assert np.allclose(durations.information(m.mu, m.sigma, x, c), num, rtol=1e-3)


def test_finishing_probability_conditional_and_unconditional():
    m = durations.DurationModel(MU, SIGMA, ((1e-4, 0.0), (0.0, 1e-4)), 100, 10, 50_000.0)
    z = (math.log(45_000) - MU) / SIGMA
    assert float(m.p_finish(45_000)) == pytest.approx(stats.norm.cdf(z))
    # a call already past the new limit cannot finish under it
    assert m.p_finish(40_000, [45_000, 30_000])[0] == 0.0
    p, lo, hi = m.finish_estimate(90_000, [45_000])
    z90 = (math.log(90_000) - MU) / SIGMA
    assert p == pytest.approx(1 - stats.norm.sf(z90) / stats.norm.sf(z))
    assert lo < p < hi


def test_too_few_uncensored_durations_is_no_model():
    few = durations.fit_durations([1000.0] * 3 + [1500.0] * 4, [30_000.0] * 50)
    assert isinstance(few, str)
    assert few.startswith("only 7 successful calls with a duration (need 8)") and "50 timed out" in few
    flat = durations.fit_durations([1200.0] * 20, [30_000.0])
    assert isinstance(flat, str) and "no spread" in flat
    # zero or missing durations are not observations
    assert isinstance(durations.fit_durations([0.0] * 20 + [5.0] * 7), str)


def test_sample_takes_successes_as_observed_and_timeouts_as_censored():
    def call(ok, ms, etype=None):
        return SimpleNamespace(ok=ok, duration_ms=ms, error_type=etype)

    calls = [call(True, 900), call(True, None), call(False, 30_003, "timeout"), call(False, None, "timeout"),
             call(False, 12, "tool_error"), call(True, 0)]
    assert durations.sample_from_calls(calls, 30_000) == durations.DurationSample((900.0,), (30_003.0, 30_000.0))
    # a timed-out call with no duration and no known limit says nothing
    assert durations.sample_from_calls(calls).censored == (30_003.0,)


def test_one_tool_s_calls_are_the_history_window_s(binks_home):
    """The per-tool read the strategy and the simulation fit from returns what
    HistoryWindow.tool_calls does, also for names JSON escapes and at the window's edges."""
    db = binks_home / "conversations.db"
    odd = ['srv:tool "quoted"', "serveur__requête", "a/b\\c"]
    runs = [RunSpec(NOW - timedelta(hours=h, minutes=7 * h), "failed" if h % 3 else "completed",
                    [(K8S, h % 4 != 0, 900.0 + h, None if h % 4 else "timeout"), (odd[h % 3], True, 50.0, None),
                     ("read_file", h % 5 != 0, 10.0, None if h % 5 else "tool_error")], offset_hours=(0, 2, -5)[h % 3])
            for h in range(60)]
    write_runs(db, runs)
    conn = connect(db)
    since, until = NOW - timedelta(hours=40), NOW - timedelta(hours=3)
    window = HistoryWindow(conn=conn, since=since, until=until)
    for tool in [K8S, "read_file", "absent", *odd]:
        assert durations.load_tool_calls(conn, tool, since, until) == window.tool_calls(tool)
    # run h starts 67·h minutes before NOW: h = 3..35 fall in [40 h, 3 h) before NOW
    assert len(durations.load_tool_calls(conn, K8S, since, until)) == 33
    assert durations.load_tool_calls(conn, K8S, since) == HistoryWindow(conn=conn, since=since).tool_calls(K8S)


def test_the_strategy_and_the_simulation_use_the_same_fitted_model(binks_home):
    db = binks_home / "conversations.db"
    timeout_history(db, NOW, runs=300, seed=3, old_limit=45_000, median=20_000, sigma=0.6)
    conn = connect(db)
    settings = settings_for(binks_home)
    imp = propose_improvement(conn, settings, f"timeout:{K8S}", since=SINCE, now=NOW)
    assert imp.strategy == "timeout"
    evidence = imp.evidence
    new_limit = imp.changes[0]["value"]
    assert new_limit == evidence["new_timeout_ms"] >= evidence["p99_ms"]

    result = simulation.test_improvement(conn, settings, imp.id, since=SINCE, now=NOW)
    model = result["models"][0]
    assert model["model"] == "duration" and model["new_limit_ms"] == new_limit
    # one fit: the same parameters, the same p99, the same probability that a timed-out call finishes
    assert (model["mu"], model["sigma"]) == (evidence["lognormal_mu"], evidence["lognormal_sigma"])
    assert model["p99_ms"] == evidence["p99_ms"]
    assert model["p_timed_out_call_finishes"] == pytest.approx(evidence["expected_reduction"], abs=1e-4)
    assert model["p_timed_out_call_finishes_interval"] == evidence["timed_out_finish_interval"]
    # and the same name in both outputs
    name = model["duration_model"]
    assert name.startswith("censored log-normal (n=") and name == evidence["duration_model"]
    assert f"durations ~ {name}" in imp.expected_impact

    res = CliRunner().invoke(agent, ["self-heal", "test", imp.id, "--home", str(binks_home), "--db", str(db),
                                     "--since", SINCE], catch_exceptions=False,
                             env={"COLUMNS": "200"})  # the Model: line whole (xdist's COLUMNS=80 wraps it)
    assert f"durations ~ {name}:" in res.output


def test_no_model_reads_the_same_in_the_strategy_and_the_simulation(binks_home):
    db = binks_home / "conversations.db"
    # 5 successful calls (1.0–1.4 s) and 12 timeouts: too few observed durations to fit
    runs = [RunSpec(NOW - timedelta(hours=1 + h), "failed",
                    ([(K8S, True, 1000.0 + 100 * h, None)] if h < 5 else []) + [(K8S, False, 30_003, "timeout")])
            for h in range(12)]
    write_runs(db, runs)
    conn = connect(db)
    settings = settings_for(binks_home)
    imp = propose_improvement(conn, settings, f"timeout:{K8S}", since=SINCE, now=NOW)
    reason = "only 5 successful calls with a duration (need 8)"
    assert imp.evidence["expected_reduction"] is None and reason in imp.expected_impact
    assert imp.evidence["duration_model"].startswith(f"no model: {reason}")
    sim = simulation.simulate_changes(conn, [timeout_change(45_000)], "timeout",
                                      (NOW - timedelta(days=7)).timestamp(), NOW.timestamp())
    assert sim.simulated_success_rate is None and sim.unmodeled[0]["reason"].startswith(reason)
