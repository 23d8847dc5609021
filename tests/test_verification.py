"""verify_improvement on histories written around a chosen apply time."""
from __future__ import annotations

from datetime import timedelta

import pytest

from selfheal_plugin import hookimpl

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.lifecycle.apply import LifecycleError
from selfheal_plugin.errors import UsageError
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.history.times import format_timestamp
from selfheal_plugin.lifecycle.verification import compare_with_expected, compare_with_prediction, verify_improvement

from .conftest import NOW
from .lifecycle_data import K8S, RunSpec, add_improvement, rate_runs, settings_for, timeout_change, write_runs

APPLIED = NOW - timedelta(days=7)
WEEK = timedelta(days=7)


def history(db, before_rate: float, after_rate: float, n_before: int = 60, n_after: int = 60,
            after_tool: str = K8S, after_type: str = "timeout"):
    runs = rate_runs(APPLIED - WEEK, APPLIED, n_before, before_rate, seed=1)
    runs += rate_runs(APPLIED, NOW, n_after, after_rate, tool=after_tool, error_type=after_type, seed=2)
    # outside both windows: must not count
    runs += rate_runs(APPLIED - 3 * WEEK, APPLIED - WEEK - timedelta(hours=1), 40, 0.9, seed=3)
    write_runs(db, runs)


def applied(db, **kw):
    return add_improvement(db, [timeout_change()], status="applied", applied_at=format_timestamp(APPLIED),
                           commit_sha="0" * 40, **kw)


@pytest.fixture
def db(binks_home):
    return binks_home / "conversations.db"


def verify(db, imp_id, home, **kw):
    return verify_improvement(connect(db), settings_for(home), imp_id, now=NOW, **kw)


def test_real_improvement_says_keep(db, binks_home):
    history(db, before_rate=0.3, after_rate=0.02)
    imp = applied(db, expected_impact="40% reduction in timeout errors")
    seen = []

    class Capture:
        @hookimpl
        def improvement_verified(self, improvement, verification, settings):
            seen.append((improvement.status, verification["recommendation"]))

    cap = Capture()
    plugins.register(cap, "capture-verified")
    try:
        r = verify(db, imp.id, binks_home)
    finally:
        plugins.unregister(cap)
    m = r["metrics"]
    assert (r["recommendation"], r["verification_status"], r["status"]) == ("keep", "verified", "verified")
    assert (m["runs_before"], m["runs_after"], m["runs_analyzed"]) == (60, 60, 120)
    assert m["before_success_rate"] == pytest.approx(42 / 60, abs=1e-4)
    assert m["after_success_rate"] == pytest.approx(59 / 60, abs=1e-4)
    assert m["p_value"] < 0.001 and r["pattern_p_value"] < 0.001
    # the JSON carries scipy's p-values as they are (the text says "p < 0.001"), not rounded to 6 places
    from scipy import stats
    assert m["p_value"] == stats.fisher_exact([[42, 18], [59, 1]])[1]
    assert r["pattern_p_value"] == m["pattern"]["p_value"] == stats.fisher_exact([[18, 60], [1, 60]])[1] > 0
    assert r["before_error_rate"] == pytest.approx(18 / 78, abs=1e-4)  # 18 timeouts in 60 + 18 calls
    assert r["after_error_rate"] == pytest.approx(1 / 61, abs=1e-4)
    assert r["actual_impact"] == "93% reduction in timeout errors, +28% success rate (better than expected!)"
    stored = ImprovementStore(connect(db)).get(imp.id)
    assert stored.status == "verified" and stored.verified_at and stored.actual_impact == r["actual_impact"]
    assert stored.metrics["recommendation"] == "keep"
    assert seen == [("verified", "keep")]
    inbox = "".join(p.read_text() for p in (binks_home.parent / "inbox").glob("*.md"))
    assert f"Verified improvement {imp.id}:" in inbox and "- Runs analyzed: 120" in inbox


def test_harmful_change_says_rollback_but_does_not_roll_back(db, binks_home):
    history(db, before_rate=0.05, after_rate=0.4, after_tool="list_dir", after_type="tool_error")
    imp = applied(db)
    r = verify(db, imp.id, binks_home)
    assert (r["recommendation"], r["verification_status"]) == ("rollback", "failed")
    assert r["metrics"]["after_success_rate"] < r["metrics"]["before_success_rate"]
    assert r["metrics"]["p_value"] < 0.05
    assert f"agent self-heal rollback {imp.id}" in r["reason"]
    stored = ImprovementStore(connect(db)).get(imp.id)
    assert (stored.status, stored.verified_at, stored.rollback_sha) == ("applied", None, None)
    assert stored.metrics["recommendation"] == "rollback"


def test_too_few_runs_says_extend(db, binks_home):
    history(db, before_rate=0.3, after_rate=0.0, n_after=20)
    imp = applied(db)
    r = verify(db, imp.id, binks_home)
    assert (r["recommendation"], r["verification_status"], r["status"]) == ("extend", "inconclusive", "applied")
    assert "20 finished run(s) since the apply" in r["reason"] and "min_sample_size 30" in r["reason"]
    # a lower floor from the settings makes the same data conclusive
    r = verify_improvement(connect(db), settings_for(binks_home, min_sample_size=20), imp.id, now=NOW)
    assert r["recommendation"] == "keep"


def test_no_significant_change_says_extend(db, binks_home):
    history(db, before_rate=0.1, after_rate=0.1)
    imp = applied(db)
    r = verify(db, imp.id, binks_home)
    assert (r["recommendation"], r["verification_status"]) == ("extend", "inconclusive")
    assert r["window"]["complete"] is True and "full window" in r["reason"]


def test_window_days_and_open_window(db, binks_home):
    history(db, before_rate=0.3, after_rate=0.02)
    imp = applied(db)
    r = verify(db, imp.id, binks_home, measurement_window_days=3)
    assert r["window"]["days"] == 3 and r["metrics"]["runs_after"] == 26  # runs in the first 3 of 7 days
    early = verify_improvement(connect(db), settings_for(binks_home), imp.id, now=APPLIED + timedelta(days=2))
    assert early["window"]["complete"] is False and early["metrics"]["runs_after"] == 17


def test_a_keep_before_the_window_ends_is_provisional(db, binks_home):
    history(db, before_rate=0.3, after_rate=0.02)
    imp = applied(db)
    five_days = APPLIED + timedelta(days=5)
    r = verify_improvement(connect(db), settings_for(binks_home), imp.id, now=five_days)
    assert r["metrics"]["runs_after"] >= 30 and r["pattern_p_value"] < 0.01  # already significant ...
    assert (r["recommendation"], r["verification_status"], r["status"]) == ("extend", "inconclusive", "applied")
    assert r["provisional_recommendation"] == "keep" and "--early" in r["reason"]  # ... but not final
    stored = ImprovementStore(connect(db)).get(imp.id)
    assert (stored.status, stored.verified_at) == ("applied", None)
    ok = verify_improvement(connect(db), settings_for(binks_home), imp.id, now=five_days, early=True)
    assert (ok["recommendation"], ok["status"]) == ("keep", "verified")
    # measured again without --early, the accepted keep stands (it said extend against its own status)
    again = verify_improvement(connect(db), settings_for(binks_home), imp.id, now=five_days + timedelta(hours=1))
    assert (again["recommendation"], again["status"], again["previous_recommendation"]) == ("keep", "verified", "keep")
    assert again["provisional_recommendation"] is None


def test_the_inbox_hears_a_verdict_once(db, binks_home, tmp_path, monkeypatch):
    """Each verification fires improvement_verified; the built-in note is written when the
    recommendation changes, not again for the same verdict."""
    inbox = tmp_path / "inbox"
    monkeypatch.setenv("INBOX_PATH", str(inbox))
    history(db, before_rate=0.3, after_rate=0.02)
    imp = applied(db)
    five_days = APPLIED + timedelta(days=5)
    firsts = (f"Verification of {imp.id}:", f"Verified improvement {imp.id}:")  # extend, keep
    notes = lambda: sum(f.read_text().count(first) for f in inbox.glob("*.md") for first in firsts)

    results = []
    for hours, early in ((0, False), (1, False), (2, True), (3, False)):
        results.append(verify_improvement(connect(db), settings_for(binks_home), imp.id,
                                          now=five_days + timedelta(hours=hours), early=early)["recommendation"])
        results.append(notes())
    assert results == ["extend", 1, "extend", 1, "keep", 2, "keep", 2]


def test_an_empty_window_is_named(db, binks_home):
    """Nothing to compare: the actual impact says which window had no finished run (an
    apply dated at the start of the history, a verify right after the apply)."""
    write_runs(db, rate_runs(APPLIED, NOW, 60, 0.2, seed=2))  # runs only after the apply
    r = verify(db, applied(db).id, binks_home)
    assert r["actual_impact"] == "not measurable (no finished run before the apply)"
    assert "0 before the apply" in r["reason"]
    r = verify_improvement(connect(db), settings_for(binks_home), applied(db).id, now=APPLIED)
    assert r["actual_impact"] == "not measurable (no finished run before the apply or since the apply)"
    late = add_improvement(db, [timeout_change()], status="applied", applied_at=format_timestamp(NOW),
                           commit_sha="0" * 40)
    r = verify_improvement(connect(db), settings_for(binks_home), late.id, now=NOW + timedelta(minutes=1))
    assert r["actual_impact"] == "not measurable (no finished run since the apply)"


def test_harm_is_a_rollback_even_before_the_window_ends(db, binks_home):
    history(db, before_rate=0.05, after_rate=0.6)
    imp = applied(db)
    r = verify_improvement(connect(db), settings_for(binks_home), imp.id, now=APPLIED + timedelta(days=4))
    assert r["window"]["complete"] is False and r["recommendation"] == "rollback"
    # more errors is not a smaller gain than expected: it is the opposite of one
    assert "increase in timeout errors" in r["actual_impact"], r["actual_impact"]
    assert r["actual_impact"].endswith("(the opposite of the expected improvement)")


def test_the_two_tests_share_the_significance_level(db, binks_home):
    """Both measures improve with 0.025 < p < 0.05: either test alone would pass 0.05, but
    one verdict from two tests holds each to 0.05 / 2 (Bonferroni)."""
    history(db, before_rate=10 / 60, after_rate=2 / 60)
    imp = applied(db)
    r = verify(db, imp.id, binks_home)
    assert 0.025 < r["p_value"] < 0.05 and 0.025 < r["pattern_p_value"] < 0.05
    assert (r["recommendation"], r["verification_status"]) == ("extend", "inconclusive")
    assert (r["metrics"]["tests"], r["metrics"]["alpha_per_test"]) == (2, 0.025)


def test_instants_not_strings_decide_the_window(db, binks_home):
    """Runs just after the apply written at -05:00 sort before it as strings, and runs
    just before it written at +02:00 sort after it."""
    after = [RunSpec(APPLIED + timedelta(minutes=10 + i), "completed", [(K8S, True, 900.0, None)], offset_hours=-5)
             for i in range(30)]
    before = [RunSpec(APPLIED - timedelta(minutes=10 + i), "failed", [(K8S, False, 60_003.0, "timeout")],
                      offset_hours=2) for i in range(30)]
    write_runs(db, after + before)
    imp = applied(db)
    r = verify(db, imp.id, binks_home)
    m = r["metrics"]
    assert (m["runs_before"], m["before_success_rate"], m["runs_after"], m["after_success_rate"]) == (30, 0.0, 30, 1.0)
    assert r["recommendation"] == "keep"


def test_bad_requests(db, binks_home):
    write_runs(db, [])
    proposed = add_improvement(db, [timeout_change()])
    with pytest.raises(LifecycleError, match="only applied improvements can be verified"):
        verify(db, proposed.id, binks_home)
    imp = applied(db)
    with pytest.raises(UsageError, match="positive number of days"):
        verify(db, imp.id, binks_home, measurement_window_days=0)


@pytest.mark.parametrize("expected, delta, reduction, verdict", [
    ("40% reduction in timeout errors", None, 0.85, "better than expected!"),
    ("30-40% reduction in list_dir errors", None, 0.36, "as expected"),
    ("~62% fewer timeouts on x (basis)", 0.01, 0.2, "less than expected"),
    ("+7% success rate", 0.09, None, "as expected"),
    ("+7% success rate", 0.2, None, "better than expected!"),
    ("unknown reduction in crashes", 0.1, 0.5, None),
])
def test_compare_with_expected(expected, delta, reduction, verdict):
    assert compare_with_expected(expected, delta, reduction) == verdict


def _tested(success: list[float], pattern: list[float] | None = None, runs: int = 60, calls: int = 60,
           point: float = 0.9, rate: float = 0.05) -> dict:
    """A stored `test` result with its 95% prediction intervals (as simulation.test_improvement writes it)."""
    iv = {"simulated_success_rate": [point - 0.02, point + 0.02], "next_window_success_rate": success,
          "next_window_runs": runs}
    if pattern is not None:
        iv.update(pattern_error_rate=rate, pattern_error_rate_interval=[rate - 0.01, rate + 0.01],
                  next_window_pattern_error_rate=pattern, next_window_pattern_calls=calls)
    return {"simulated_success_rate": point, "interval": iv}


@pytest.mark.parametrize("success, pattern, sr, er, verdict", [
    ([0.85, 0.95], [0.0, 0.1], 0.9, 0.05, "as expected"),
    ([0.85, 0.95], [0.0, 0.1], 0.8, 0.05, "less than expected"),   # success below its interval
    ([0.85, 0.95], [0.0, 0.1], 0.9, 0.2, "less than expected"),    # the pattern above its interval
    ([0.85, 0.95], [0.02, 0.1], 0.97, 0.05, "better than expected!"),
    ([0.85, 0.95], [0.02, 0.1], 0.9, 0.0, "better than expected!"),  # fewer pattern errors than predicted
    ([0.85, 0.95], [0.02, 0.1], 0.97, 0.2, "less than expected"),  # one better, one short: short wins
    ([0.85, 0.95], None, 0.9, 0.5, "as expected"),                 # no pattern interval: success alone
])
def test_compare_with_prediction(success, pattern, sr, er, verdict):
    assert compare_with_prediction(_tested(success, pattern), sr, 60, er, 60) == verdict


def test_compare_with_prediction_without_an_interval_says_nothing():
    assert compare_with_prediction(None, 0.9, 60) is None
    assert compare_with_prediction({"recommendation": "risky", "interval": None}, 0.9, 60) is None


def test_a_window_of_another_size_widens_the_interval_by_its_own_noise():
    t = _tested([0.85, 0.95], runs=200, point=0.9)
    assert compare_with_prediction(t, 0.83, 200) == "less than expected"
    assert compare_with_prediction(t, 0.83, 20) == "as expected"  # 20 runs: ±13 points of binomial noise alone


def test_verify_says_as_expected_only_inside_the_prediction_interval(db, binks_home):
    """The issue's case: the expected impact's number is close to the measured one, but the
    measured success rate lies outside the simulation's 95% prediction interval."""
    history(db, before_rate=0.3, after_rate=0.02)  # after: 59 of 60 runs succeed, 1 timeout in 61 calls
    inside = applied(db, expected_impact="+28% success rate", test_result=_tested([0.93, 1.0], [0.0, 0.05]))
    r = verify(db, inside.id, binks_home)
    assert r["comparison"] == "as expected" and r["actual_impact"].endswith("(as expected)")
    below = applied(db, expected_impact="+28% success rate", test_result=_tested([0.99, 1.0], [0.0, 0.05]))
    r = verify(db, below.id, binks_home)  # the text alone would say "as expected" (+28% vs +28%)
    assert compare_with_expected("+28% success rate", r["metrics"]["after_success_rate"] -
                                 r["metrics"]["before_success_rate"], None) == "as expected"
    assert r["comparison"] == "less than expected" and r["actual_impact"].endswith("(less than expected)")
    above = applied(db, expected_impact="+28% success rate", test_result=_tested([0.6, 0.75], [0.0, 0.05]))
    assert verify(db, above.id, binks_home)["comparison"] == "better than expected!"
    # the pattern's error rate (1 timeout in 61 calls) above its interval: less than expected
    pattern_short = applied(db, expected_impact="+28% success rate",
                            test_result=_tested([0.93, 1.0], [0.0, 0.005], calls=61))
    assert verify(db, pattern_short.id, binks_home)["comparison"] == "less than expected"
