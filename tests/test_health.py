"""Health analysis checked against values computed independently from the generated history
(plain Python over the rows: json.loads, times.parse_timestamp), not through the library."""
from __future__ import annotations

import json
import math
import sqlite3
import statistics
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from selfheal_plugin.errors import NotFoundError, UsageError
from selfheal_plugin.testbed.generator import GeneratorConfig, add_runtime_improvements, generate_history
from selfheal_plugin.analysis.health import (
    MIN_REFERENCE_RUNS, OUTCOME_SCORE, WEIGHTS, analyze_run_health, classify_trend, compute_agent_metrics,
    compute_tool_reliability, get_health_dashboard,
)
from selfheal_plugin.history.connection import connect, normalize_error_type
from selfheal_plugin.history.improvements import Improvement, ImprovementStore
from selfheal_plugin.lifecycle.proposals import propose_detailed
from selfheal_plugin.history.settings import load_settings
from selfheal_plugin.history.times import parse_timestamp

from selfheal_plugin.service import SelfHeal

from .conftest import NOW

FINISHED = ("completed", "failed", "cancelled")


# ------------------------------------------------------------------ independent reference computations


def _instant(text):
    try:
        return parse_timestamp(text)
    except ValueError:
        return None


def load_runs(db: Path) -> list[dict]:
    c = sqlite3.connect(db)
    c.row_factory = sqlite3.Row
    runs = [dict(r) for r in c.execute("SELECT * FROM runs")]
    c.close()
    for r in runs:
        r["at"] = _instant(r["started_at"])
    return runs


def load_calls(db: Path) -> list[dict]:
    """Every well-formed tool_complete event (valid JSON, a tool name, a parsable timestamp)."""
    c = sqlite3.connect(db)
    out = []
    for run_id, data, ts in c.execute("SELECT run_id, event_data, timestamp FROM run_events "
                                      "WHERE event_type = 'tool_complete' ORDER BY id"):
        try:
            ev = json.loads(data)
        except ValueError:
            continue
        at = _instant(ts)
        if at is None or not isinstance(ev.get("name"), str) or not ev["name"]:
            continue
        out.append({"run_id": run_id, "at": at, "tool": ev["name"], "error": ev.get("is_error") is True,
                    "type": normalize_error_type(ev.get("error_type")), "duration": ev.get("duration")})
    c.close()
    return out


def success_rate(runs):
    fin = [r for r in runs if r["status"] in FINISHED]
    return (sum(r["status"] == "completed" for r in fin) / len(fin) if fin else None), len(fin)


def expected_trend(recent, n_recent, hist, n_hist, min_runs):
    if recent is None or hist is None or n_recent < min_runs or n_hist < min_runs:
        return "insufficient_data"
    return "improving" if recent > hist + 0.05 else "degrading" if recent < hist - 0.05 else "stable"


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def conn(history_copy):
    path, _ = history_copy
    c = connect(path)
    yield c
    c.close()


@pytest.fixture(scope="module")
def trend_histories(tmp_path_factory):
    """40 days of runs whose failure rate ramps up (degrading), down (improving), or stays."""
    base = tmp_path_factory.mktemp("trend")
    out = {}
    for name, ramp in (("degrading", (0.0, 0.6)), ("improving", (0.6, 0.0)), ("flat", None)):
        path = base / f"{name}.db"
        generate_history(path, GeneratorConfig(seed=11, runs=800, days=40, end=NOW, failure_ramp=ramp))
        out[name] = path
    return out


# ------------------------------------------------------------------ agent metrics


@pytest.mark.parametrize("since", ["-7d", "-3d", "-36h"])
def test_agent_metrics_match_independent_counts(conn, history_copy, since):
    path, _ = history_copy
    hours = {"-7d": 168, "-3d": 72, "-36h": 36}[since]
    start = NOW - timedelta(hours=hours)
    runs = [r for r in load_runs(path) if r["at"] and start <= r["at"] < NOW]
    by_wf = defaultdict(list)
    for r in runs:
        by_wf[r["workflow_name"]].append(r)
    result = compute_agent_metrics(conn, since=since, now=NOW)
    got = {a["name"]: a for a in result["agents"]}
    assert set(got) == set(by_wf)
    mid = start + (NOW - start) / 2
    for wf, rs in by_wf.items():
        a = got[wf]
        rate, n_fin = success_rate(rs)
        assert a["total_runs"] == len(rs)
        assert a["finished_runs"] == n_fin
        assert a["failed_runs"] == sum(r["status"] == "failed" for r in rs)
        assert a["running_runs"] == sum(r["status"] == "running" for r in rs)
        assert a["success_rate"] == pytest.approx(rate, abs=1e-4)
        durs = [r["duration_ms"] for r in rs if r["status"] in FINISHED]
        assert a["avg_duration_seconds"] == pytest.approx(sum(durs) / len(durs) / 1000, abs=1e-3)
        first, n1 = success_rate([r for r in rs if r["at"] < mid])
        second, n2 = success_rate([r for r in rs if r["at"] >= mid])
        assert a["trend"] == expected_trend(second, n2, first, n1, 5)
    assert [a["total_runs"] for a in result["agents"]] == sorted((a["total_runs"] for a in result["agents"]),
                                                                 reverse=True)


def test_agent_trend_follows_a_changing_failure_rate(trend_histories):
    with connect(trend_histories["degrading"]) as c:
        agents = compute_agent_metrics(c, since="-40d", now=NOW)["agents"]
    assert agents and all(a["trend"] == "degrading" for a in agents)
    assert all(a["second_half_success_rate"] < a["first_half_success_rate"] - 0.05 for a in agents)
    with connect(trend_histories["improving"]) as c:
        agents = compute_agent_metrics(c, since="-40d", now=NOW)["agents"]
    assert agents and all(a["trend"] == "improving" for a in agents)


# ------------------------------------------------------------------ tool reliability


@pytest.mark.parametrize("since", ["-7d", "-2d"])
def test_tool_reliability_matches_independent_counts(conn, history_copy, since):
    path, _ = history_copy
    start = NOW - timedelta(days=int(since[1:-1]))
    calls = [c for c in load_calls(path) if start <= c["at"] < NOW]
    by_tool = defaultdict(list)
    for c in calls:
        by_tool[c["tool"]].append(c)
    result = compute_tool_reliability(conn, since=since, now=NOW)
    got = {t["name"]: t for t in result["tools"]}
    assert set(got) == set(by_tool)
    for tool, cs in by_tool.items():
        t = got[tool]
        n = len(cs)
        errors = [c for c in cs if c["error"]]
        timeouts = [c for c in errors if c["type"] == "timeout"]
        assert t["total_calls"] == n
        assert t["failed_calls"] == len(errors)
        assert t["success_rate"] == pytest.approx(1 - len(errors) / n, abs=1e-4)
        assert t["timeout_rate"] == pytest.approx(len(timeouts) / n, abs=1e-4)
        assert t["error_rate"] == pytest.approx((len(errors) - len(timeouts)) / n, abs=1e-4)
        durs = sorted(c["duration"] for c in cs if isinstance(c["duration"], (int, float)))
        assert t["avg_duration_ms"] == pytest.approx(sum(durs) / len(durs), abs=0.1)
        assert t["p95_duration_ms"] == durs[math.ceil(0.95 * len(durs)) - 1]
        types = Counter(c["type"] for c in errors)
        expected_top = sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        assert [(e["error_type"], e["count"]) for e in t["top_error_types"]] == expected_top
    rates = [t["success_rate"] for t in result["tools"]]
    assert rates == sorted(rates)  # worst first


def test_tool_reliability_finds_the_injected_timeouts(conn, history_copy):
    _, truth = history_copy
    tools = {t["name"]: t for t in compute_tool_reliability(conn, since="-7d", now=NOW)["tools"]}
    k8s = tools["mcp__kubernetes__pods_list"]
    injected = next(p for p in truth["patterns"] if p["id"] == "timeout:mcp__kubernetes__pods_list")
    # the injected pattern's occurrences are all timeouts (plus maybe noise timeouts)
    assert k8s["timeout_rate"] * k8s["total_calls"] >= injected["occurrences"]
    assert k8s["top_error_types"][0]["error_type"] == "timeout"
    assert k8s["p95_duration_ms"] == 60003


def test_malformed_rows_are_skipped_and_counted(conn, history_copy):
    path, truth = history_copy
    # widen the window so every bad row (they are stamped at the history's end) is inside it
    result = compute_tool_reliability(conn, since="-8d", now=NOW + timedelta(days=1))
    assert result["skipped_rows"] == truth["bad_rows"]
    db = sqlite3.connect(path)
    db.execute("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) "
               "SELECT id, 0, 'tool_complete', '{\"name\": 5, \"is_error\": true}', '2026-11-19T00:00:00Z' "
               "FROM runs LIMIT 1")
    db.commit()
    db.close()
    again = compute_tool_reliability(conn, since="-8d", now=NOW + timedelta(days=1))
    assert again["skipped_rows"] == truth["bad_rows"] + 1
    assert again["tools"] == result["tools"]


def test_mixed_offsets_are_compared_as_instants(binks_home):
    """A call at 01:00+02:00 is 23:00Z the day before: outside a window starting at 00:00Z."""
    path = binks_home / "conversations.db"
    c = connect(path, create=True)
    c.execute("INSERT INTO runs VALUES ('r1','wf','t','completed','m','2026-11-19T12:00:00Z',NULL,1000,NULL,NULL,NULL)")
    rows = [("2026-11-19T01:00:00+02:00", "early"), ("2026-11-18T20:00:00-05:00", "late"),
            ("2026-11-19T00:30:00.123456789Z", "late")]
    for ts, name in rows:
        c.execute("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) VALUES "
                  "('r1', 0, 'tool_complete', ?, ?)", (json.dumps({"type": "tool_complete", "name": name,
                                                                   "is_error": False, "duration": 5}), ts))
    tools = {t["name"]: t["total_calls"] for t in
             compute_tool_reliability(c, since="2026-11-19", now=datetime(2026, 11, 20, tzinfo=timezone.utc))["tools"]}
    assert tools == {"late": 2}


# ------------------------------------------------------------------ run health


def _independent_run_health(path: Path, run_id: str) -> dict:
    runs = load_runs(path)
    run = next(r for r in runs if r["id"] == run_id)
    calls = load_calls(path)
    mine = [c for c in calls if c["run_id"] == run_id]
    outcome = OUTCOME_SCORE[run["status"]]
    success = 0.7 * outcome + 0.3 * sum(not c["error"] for c in mine) / len(mine)
    ref = [r["duration_ms"] for r in runs if r["workflow_name"] == run["workflow_name"]
           and r["status"] == "completed"]
    median = statistics.median(ref)
    duration = min(1.0, median / run["duration_ms"])
    hist = defaultdict(lambda: [0, 0])
    for c in calls:
        hist[c["tool"]][0] += 1
        hist[c["tool"]][1] += c["error"]
    used = Counter(c["tool"] for c in mine)
    reliability = sum(n * (hist[t][0] - hist[t][1]) / hist[t][0] for t, n in used.items()) / sum(used.values())
    db = sqlite3.connect(path)
    db.row_factory = sqlite3.Row
    metrics = {r["run_id"]: dict(r) for r in db.execute(
        "SELECT m.*, r.workflow_name FROM run_metrics m JOIN runs r ON r.id = m.run_id")}
    iterations = db.execute("SELECT count(*) FROM run_events WHERE run_id = ? AND event_type = 'iteration'",
                            (run_id,)).fetchone()[0]
    db.close()
    wf = [m for m in metrics.values() if m["workflow_name"] == run["workflow_name"]]
    med = {"iterations": statistics.median(m["total_iterations"] for m in wf),
           "tool_calls": statistics.median(m["total_tool_calls"] for m in wf),
           "tokens": statistics.median(m["total_tokens_in"] + (m["total_tokens_out"] or 0)
                                       for m in wf if m["total_tokens_in"] is not None)}
    if run_id in metrics:
        m = metrics[run_id]
        values = {"iterations": m["total_iterations"], "tool_calls": m["total_tool_calls"],
                  "tokens": None if m["total_tokens_in"] is None else m["total_tokens_in"] + (m["total_tokens_out"] or 0)}
    else:
        values = {"iterations": iterations, "tool_calls": len(mine), "tokens": None}
    ratios = [min(1.0, med[k] / v) if v else 1.0 for k, v in values.items() if v is not None]
    efficiency = sum(ratios) / len(ratios)
    comps = {"success": success, "duration": duration, "tool_reliability": reliability,
             "resource_efficiency": efficiency}
    return {"components": comps, "score": 100 * sum(WEIGHTS[k] * v for k, v in comps.items())}


def _pick(path: Path, status: str, with_metrics: bool, tool_error: bool) -> str:
    db = sqlite3.connect(path)
    sql = ("SELECT r.id FROM runs r WHERE r.status = ? AND "
           f"{'' if with_metrics else 'NOT '}EXISTS (SELECT 1 FROM run_metrics m WHERE m.run_id = r.id) AND "
           f"{'' if tool_error else 'NOT '}EXISTS (SELECT 1 FROM run_events e WHERE e.run_id = r.id AND "
           "e.event_type = 'tool_complete' AND e.event_data LIKE '%\"is_error\": true%' "
           "AND e.event_data LIKE '%timed out%') ORDER BY r.id LIMIT 1")
    row = db.execute(sql, (status,)).fetchone()
    db.close()
    assert row, (status, with_metrics, tool_error)
    return row[0]


@pytest.mark.parametrize("status,with_metrics,tool_error", [
    ("failed", True, True), ("completed", True, False), ("completed", False, False), ("failed", False, False)])
def test_run_health_components_match_independent_values(conn, history_copy, status, with_metrics, tool_error):
    path, _ = history_copy
    run_id = _pick(path, status, with_metrics, tool_error)
    got = analyze_run_health(conn, run_id, now=NOW)
    want = _independent_run_health(path, run_id)
    for name, value in want["components"].items():
        assert got["components"][name]["score"] == pytest.approx(value, abs=1e-4), name
    assert got["health_score"] == pytest.approx(want["score"], abs=0.051)
    assert got["score_basis"] == "all_components"
    assert got["components"]["resource_efficiency"]["source"] == ("run_metrics" if with_metrics else "run_events")
    assert 0 <= got["health_score"] <= 100


def test_failed_run_with_a_timeout_recommends_raising_that_timeout(conn, history_copy):
    path, _ = history_copy
    db = sqlite3.connect(path)
    run_id = db.execute(
        "SELECT r.id FROM runs r JOIN run_events e ON e.run_id = r.id WHERE r.status = 'failed' "
        "AND e.event_data LIKE '%pods_list timed out%' ORDER BY r.id LIMIT 1").fetchone()[0]
    db.close()
    got = analyze_run_health(conn, run_id[:12], now=NOW)
    assert got["run_id"] == run_id
    assert got["issues"][0]["severity"] == "high"
    timeout = next(i for i in got["issues"] if i.get("pattern_id") == "timeout:mcp__kubernetes__pods_list")
    assert timeout["severity"] == "high"
    assert timeout["description"].startswith("Tool timeout on mcp__kubernetes__pods_list")
    # no improvement yet: the key to raise and where its value is computed, no number of its own
    rec = timeout["recommendation"]
    assert 'tools."mcp__kubernetes__pods_list".timeout_ms' in rec and "agent self-heal detect" in rec
    assert "timeout_ms =" not in rec
    severities = [i["severity"] for i in got["issues"]]
    assert severities == sorted(severities, key=["high", "medium", "low"].index)
    assert got["health_score"] < 60
    # with the strategy's open proposal, the recommendation is that proposal and its value
    imp = propose_detailed(conn, load_settings(history_copy[0].parent), "timeout:mcp__kubernetes__pods_list",
                           since="-7d", now=NOW).improvement
    value = next(c["value"] for c in imp.changes if c["path"][-1] == "timeout_ms")
    with SelfHeal(path.parent) as sh:
        again = sh.run_health(run_id)
    rec = next(i for i in again["issues"] if i.get("pattern_id") == timeout["pattern_id"])["recommendation"]
    assert rec.startswith(f"Apply {imp.id} (") and f"tools.mcp__kubernetes__pods_list.timeout_ms = {value})" in rec
    assert rec.endswith(f": agent self-heal apply {imp.id}")


def _timed_out_run(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT r.id FROM runs r JOIN run_events e ON e.run_id = r.id WHERE r.status = 'failed' "
                          "AND e.event_data LIKE '%pods_list timed out%' ORDER BY r.id LIMIT 1").fetchone()[0]
    finally:
        db.close()


def _recommended(sh: SelfHeal, run_id: str, pattern_id: str) -> str:
    return next(i for i in sh.run_health(run_id)["issues"] if i.get("pattern_id") == pattern_id)["recommendation"]


def test_health_recommends_the_step_test_would_say_for_an_open_proposal(history_copy):
    """A proposal of manual steps only is applied saying what was done (apply refuses it
    without --changes-made, exit 2); a tested one gets the step its test gave (a risky change
    a canary can run is tried on a share of runs first): health and test share one choice."""
    from selfheal_plugin.steps import for_agent

    from .lifecycle_data import add_improvement, timeout_change

    path, _ = history_copy
    run_id, pid = _timed_out_run(path), "timeout:mcp__kubernetes__pods_list"
    manual = add_improvement(path, [{"kind": "manual", "text": "ask the cluster owner for a faster API server"}],
                             pattern_id=pid)
    with SelfHeal(path.parent) as sh:
        rec = _recommended(sh, run_id, pid)
        assert rec.startswith(f"Apply {manual.id} (") and "ask the cluster owner" in rec
        assert rec.endswith(f": agent self-heal apply {manual.id} --changes-made TEXT")
        with for_agent():
            assert _recommended(sh, run_id, pid).endswith(
                f': apply_improvement(improvement_id="{manual.id}", changes_made="TEXT")')
        assert rec.endswith(sh._after_test(manual.id, "safe_to_apply"))
        ImprovementStore(sh.conn).update(manual.id, expect_status="proposed", status="rejected")
    risky = add_improvement(path, [timeout_change(90_000)], pattern_id=pid, status="tested",
                            test_result={"recommendation": "risky"})
    with SelfHeal(path.parent) as sh:
        rec = _recommended(sh, run_id, pid)
        assert rec.startswith(f"Try {risky.id} (") and rec.endswith(f"agent self-heal test {risky.id} --mode canary")
        assert rec.endswith(sh._after_test(risky.id, "risky"))


def test_running_run_is_scored_on_elapsed_time(conn, history_copy):
    path, truth = history_copy
    db = sqlite3.connect(path)
    run_id, started = db.execute("SELECT id, started_at FROM runs WHERE status = 'running' LIMIT 1").fetchone()
    db.close()
    got = analyze_run_health(conn, run_id, now=NOW)
    dur = got["components"]["duration"]
    assert dur["elapsed_so_far"] is True
    assert dur["duration_ms"] == int((NOW - parse_timestamp(started)).total_seconds() * 1000)
    assert got["components"]["success"]["outcome_score"] is None
    # running for days against a median of seconds: the run is flagged, not scored as fine
    assert dur["score"] < 0.01
    assert any("still running" in i["description"] for i in got["issues"])
    assert 0 <= got["health_score"] <= 100


def test_run_without_events_or_reference_is_reweighted(binks_home):
    path = binks_home / "conversations.db"
    c = connect(path, create=True)
    c.execute("INSERT INTO runs VALUES ('abc-1','lonely','t','completed','m','2026-11-19T12:00:00Z',"
              "'2026-11-19T12:01:00Z',60000,NULL,NULL,NULL)")
    got = analyze_run_health(c, "abc-1", now=NOW)
    assert got["components"]["success"]["score"] == 1.0
    assert got["components"]["duration"]["score"] is None  # no reference runs of `lonely`
    assert got["components"]["tool_reliability"]["score"] is None
    assert got["score_basis"] == "reweighted"
    assert got["health_score"] == 100.0
    assert got["components"]["success"]["effective_weight"] == 1.0
    descriptions = " ".join(i["description"] for i in got["issues"])
    assert "No events" in descriptions and "Not enough data" in descriptions
    # with reference runs of the same workflow, the duration is normalised against their median
    for k in range(MIN_REFERENCE_RUNS):
        c.execute("INSERT INTO runs VALUES (?,'lonely','t','completed','m','2026-11-18T12:00:00Z',NULL,30000,"
                  "NULL,NULL,NULL)", (f"ref-{k}",))
    got = analyze_run_health(c, "abc-1", now=NOW)
    assert got["components"]["duration"]["workflow_median_ms"] == 30000
    assert got["components"]["duration"]["score"] == pytest.approx(30000 / 60000)
    assert got["health_score"] == pytest.approx(100 * (0.5 * 1 + 0.2 * 0.5) / 0.7, abs=0.05)


def test_a_timeout_recommendation_names_the_step_that_proposes(binks_home):
    """The MCP detect tool is read-only: what proposes the timeout fix is propose (the
    propose_improvement tool for an agent), never detect_failure_patterns."""
    from selfheal_plugin.analysis.health import _recommendation
    from selfheal_plugin.steps import for_agent

    store = ImprovementStore(connect(binks_home / "conversations.db", create=True))
    person = _recommendation("mcp__k8s__pods_list", "timeout", [30000.0], store, None)
    with for_agent():
        agent = _recommendation("mcp__k8s__pods_list", "timeout", [30000.0], store, None)
    assert "agent self-heal detect proposes" in person  # the CLI has no propose command: detect proposes
    assert 'propose_improvement(pattern_id="timeout:mcp__k8s__pods_list") proposes' in agent
    assert "detect" not in agent


def test_running_run_with_nothing_known_gets_the_neutral_score(binks_home):
    c = connect(binks_home / "conversations.db", create=True)
    c.execute("INSERT INTO runs VALUES ('r-new','wf','t','running','m','2026-11-20T11:59:00Z',NULL,NULL,"
              "NULL,NULL,NULL)")
    got = analyze_run_health(c, "r-new", now=NOW)
    assert got["score_basis"] == "no_data" and got["health_score"] == 50.0


def test_unknown_and_ambiguous_run_ids(conn, history_copy):
    path, _ = history_copy
    ids = [r["id"] for r in load_runs(path)]
    with pytest.raises(NotFoundError, match="no run 'zzz-not-a-run'"):
        analyze_run_health(conn, "zzz-not-a-run", now=NOW)
    first = Counter(i[0] for i in ids).most_common(1)[0][0]
    with pytest.raises(UsageError, match="ambiguous"):
        analyze_run_health(conn, first, now=NOW)
    with pytest.raises(UsageError):
        analyze_run_health(conn, "  ", now=NOW)
    unique = next(i for i in ids if sum(j.startswith(i[:6]) for j in ids) == 1)
    assert analyze_run_health(conn, unique[:6].upper(), now=NOW)["run_id"] == unique


# ------------------------------------------------------------------ dashboard


def test_dashboard_numbers_match_independent_values(conn, history_copy):
    path, _ = history_copy
    start = NOW - timedelta(days=7)
    runs = [r for r in load_runs(path) if r["at"] and start <= r["at"] < NOW]
    d = get_health_dashboard(conn, detailed=True, since="-7d", now=NOW)
    rate, n_fin = success_rate(runs)
    assert d["success_rate"] == pytest.approx(rate, abs=1e-4)
    assert d["runs"]["total"] == len(runs) and d["runs"]["finished"] == n_fin
    assert d["runs"]["running"] == sum(r["status"] == "running" for r in runs)
    # the generated week has nothing before it: no trend
    assert d["trend"] == "insufficient_data"
    assert d["trend_detail"]["historical"]["finished_runs"] == 0
    # daily series
    assert len(d["daily_success"]) == 8  # 2026-11-13 12:00 .. 2026-11-20 12:00 touches 8 UTC days
    for day in d["daily_success"]:
        rs = [r for r in runs if r["at"].strftime("%Y-%m-%d") == day["date"]]
        want, n = success_rate(rs)
        assert day["runs"] == len(rs) and day["finished_runs"] == n
        assert day["success_rate"] == (None if want is None else pytest.approx(want, abs=1e-4))
    # error types over time
    calls = [c for c in load_calls(path) if start <= c["at"] < NOW and c["error"]]
    for day in d["error_types_over_time"]:
        want = Counter(c["type"] for c in calls if c["at"].strftime("%Y-%m-%d") == day["date"])
        assert day["counts"] == dict(want)
    assert sum(day["total"] for day in d["error_types_over_time"]) == len(calls)
    # worst tools are the least reliable ones with enough calls, worst first
    assert [t["name"] for t in d["worst_tools"]] == [t["name"] for t in d["tools"] if t["total_calls"] >= 5][:5]
    assert {a["name"] for a in d["agents"]} == {r["workflow_name"] for r in runs}
    assert 0 <= d["overall_health_score"] <= 100


def test_overall_score_is_the_mean_of_run_scores(tmp_path):
    path = tmp_path / "small.db"
    generate_history(path, seed=3, runs=60, end=NOW)
    with connect(path) as c:
        d = get_health_dashboard(c, since="-8d", now=NOW)
        finished = [r["id"] for r in load_runs(path) if r["status"] in FINISHED]
        scores = [analyze_run_health(c, rid, now=NOW)["health_score"] for rid in finished]
    assert d["runs"]["scored"] == len(finished)
    assert d["overall_health_score"] == pytest.approx(sum(scores) / len(scores), abs=0.051)


@pytest.mark.parametrize("kind", ["degrading", "improving", "flat"])
def test_dashboard_trend_against_the_30_days_before(trend_histories, kind):
    path = trend_histories[kind]
    runs = load_runs(path)
    recent, n_recent = success_rate([r for r in runs if NOW - timedelta(days=7) <= r["at"] < NOW])
    hist, n_hist = success_rate([r for r in runs if NOW - timedelta(days=37) <= r["at"] < NOW - timedelta(days=7)])
    with connect(path) as c:
        d = get_health_dashboard(c, now=NOW)
    want = expected_trend(recent, n_recent, hist, n_hist, 10)
    assert d["trend"] == want
    assert d["trend"] == {"degrading": "degrading", "improving": "improving", "flat": "stable"}[kind]
    assert d["trend_detail"]["recent"]["success_rate"] == pytest.approx(recent, abs=1e-4)
    assert d["trend_detail"]["historical"]["success_rate"] == pytest.approx(hist, abs=1e-4)
    assert d["trend_detail"]["historical"]["finished_runs"] == n_hist


def test_trend_rule_boundaries():
    assert classify_trend(0.86, 0.80, 10, 10, 10) == "improving"
    assert classify_trend(0.85, 0.80, 10, 10, 10) == "stable"
    assert classify_trend(0.74, 0.80, 10, 10, 10) == "degrading"
    assert classify_trend(0.99, 0.10, 9, 10, 10) == "insufficient_data"
    assert classify_trend(None, 0.5, 10, 10, 10) == "insufficient_data"


def test_dashboard_on_an_empty_database(binks_home):
    c = connect(binks_home / "conversations.db", create=True)
    d = get_health_dashboard(c, detailed=True, now=NOW)
    assert d["overall_health_score"] is None and d["success_rate"] is None
    assert d["trend"] == "insufficient_data"
    assert d["runs"]["total"] == 0 and d["tools"] == [] and d["agents"] == [] and d["worst_tools"] == []
    assert all(day["success_rate"] is None for day in d["daily_success"])
    assert d["recent_improvements"] == []
    assert compute_agent_metrics(c, now=NOW)["agents"] == []
    assert compute_tool_reliability(c, now=NOW)["tools"] == []


def test_dashboard_window_with_no_runs(conn):
    before = NOW - timedelta(days=30)
    d = get_health_dashboard(conn, detailed=True, since="-7d", now=before)
    assert d["runs"]["total"] == 0 and d["overall_health_score"] is None
    assert d["tools"] == [] and d["agents"] == []
    assert sum(day["total"] for day in d["error_types_over_time"]) == 0
    assert compute_tool_reliability(conn, since="-7d", now=before)["tools"] == []


def test_bad_window_is_a_usage_error(conn):
    with pytest.raises(UsageError, match="invalid time window"):
        get_health_dashboard(conn, since="-7x", now=NOW)
    with pytest.raises(UsageError, match="starts in the future"):
        compute_agent_metrics(conn, since="2027-01-01", now=NOW)
    with pytest.raises(UsageError, match="not before now"):
        compute_agent_metrics(conn, since=NOW.isoformat(), now=NOW)


def test_recent_improvements_show_measured_impact_or_say_not_yet(conn, history_copy):
    path, _ = history_copy
    store = ImprovementStore(conn)
    store.insert(Improvement(id="imp-measured", status="verified", description="Raise k8s timeout",
                             pattern_id="timeout:mcp__kubernetes__pods_list", expected_impact="+7% success rate",
                             actual_impact="+9% success rate", applied_at="2026-11-10T12:00:00Z",
                             verified_at="2026-11-17T12:00:00Z",
                             metrics={"before_success_rate": 0.85, "after_success_rate": 0.94,
                                      "runs_analyzed": 127}))
    store.insert(Improvement(id="imp-applied", status="applied", description="Retry github",
                             pattern_id="connection_refused:mcp__github__create_issue",
                             applied_at="2026-11-18T12:00:00Z"))
    store.insert(Improvement(id="imp-rejected", status="rejected", description="nope"))
    d = get_health_dashboard(conn, now=NOW)
    imps = {i["id"]: i for i in d["recent_improvements"]}
    assert "imp-rejected" not in imps
    assert imps["imp-measured"]["impact"] == "+9% success rate" and imps["imp-measured"]["measured"]
    assert imps["imp-measured"]["before_success_rate"] == 0.85 and imps["imp-measured"]["runs_analyzed"] == 127
    assert imps["imp-applied"]["impact"] == "not yet measured" and not imps["imp-applied"]["measured"]
    assert [i["id"] for i in d["recent_improvements"]][:2] == ["imp-applied", "imp-measured"]


def test_improvements_and_the_dashboard_list_the_latest_status_change_first(conn):
    """A fix proposed first, applied, then rolled back after three newer proposals: what happened
    last is the rollback, first in `improvements --limit 3` as on the dashboard (one order)."""
    from selfheal_plugin.history.times import format_timestamp, utcnow
    from selfheal_plugin.lifecycle.proposals import list_improvements

    store = ImprovementStore(conn)
    store.insert(Improvement(id="imp-old", status="proposed", description="Raise k8s timeout"))
    store.update("imp-old", status="applied", applied_at=format_timestamp(utcnow()))
    for k in range(3):
        store.insert(Improvement(id=f"imp-new-{k}", status="proposed", description=f"fix {k}"))
    store.update("imp-new-0", status="rejected")
    store.update("imp-old", status="rolled_back", rolled_back_at=format_timestamp(utcnow()))
    listed = [r["id"] for r in list_improvements(conn, limit=3)]
    assert listed == ["imp-old", "imp-new-0", "imp-new-2"]  # rolled back, rejected, the latest proposal
    dashboard = [i["id"] for i in get_health_dashboard(conn, now=NOW)["recent_improvements"]]
    assert dashboard == ["imp-old", "imp-new-2", "imp-new-1"]  # the same order, rejections left out


def test_runtime_legacy_improvements_are_listed(tmp_path):
    path = tmp_path / "legacy.db"
    generate_history(path, seed=1, runs=30, end=NOW)
    add_runtime_improvements(path, rows=2)
    with connect(path) as c:
        imps = get_health_dashboard(c, now=NOW)["recent_improvements"]
    assert {i["id"] for i in imps} == {"legacy-0", "legacy-1"}
    assert all(i["impact"].startswith("{") for i in imps)


def test_generator_default_stream_is_unchanged_by_failure_ramp_field(tmp_path):
    """The new optional field must not change what the defaults generate."""
    a, b = tmp_path / "a.db", tmp_path / "b.db"
    generate_history(a, seed=5, runs=50, end=NOW)
    generate_history(b, GeneratorConfig(seed=5, runs=50, end=NOW, failure_ramp=None))
    dump = lambda p: sqlite3.connect(p).execute("SELECT * FROM runs ORDER BY id").fetchall()  # noqa: E731
    assert dump(a) == dump(b)
    ramped = tmp_path / "c.db"
    generate_history(ramped, GeneratorConfig(seed=5, runs=50, end=NOW, failure_ramp=(1.0, 1.0)))
    statuses = {r[3] for r in dump(ramped)}
    assert statuses <= {"failed", "running"}
