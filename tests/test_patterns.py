import json
import sqlite3
from datetime import timedelta

import pytest
from hypothesis import given, settings as hsettings, strategies as st

from selfheal_plugin.history.errorindex import message_template, refresh
from selfheal_plugin.errors import NotFoundError, UsageError
from selfheal_plugin.testbed.generator import generate_history
from selfheal_plugin.history.connection import connect
from selfheal_plugin.analysis.patterns import (confidence_score, detect_failure_patterns, get_pattern, jaccard,
                                      context_correlation, pattern_details, split_pattern_id)

from .conftest import NOW


def brute_force_correlation(contexts):
    """The definition, pair by pair: each occurrence's mean similarity to the others, then the
    lower median."""
    per = sorted(sum(jaccard(c, d) for j, d in enumerate(contexts) if j != i) / (len(contexts) - 1)
                 for i, c in enumerate(contexts))
    return per[(len(per) - 1) // 2]


@given(st.lists(st.frozensets(st.sampled_from("abcdefg"), max_size=5), min_size=2, max_size=25))
def test_grouped_correlation_equals_brute_force(contexts):
    assert context_correlation(contexts) == pytest.approx(brute_force_correlation(contexts))


def test_jaccard_bounds_and_cases():
    a, b = frozenset("abc"), frozenset("bcd")
    assert jaccard(a, b) == pytest.approx(2 / 4)
    assert context_correlation([a, a, a]) == 1.0
    assert context_correlation([frozenset("a"), frozenset("b")]) == 0.0
    assert context_correlation([a]) == 0.0  # one occurrence carries no evidence


def test_correlation_resists_unrelated_errors_on_the_signature():
    """Six alike failures among four unrelated ones still correlate strongly; a plain
    mean over all pairs would fall to about a third."""
    alike = [frozenset({"msg:server", "msg:exited", "workflow:r", "step:0"})] * 6
    strangers = [frozenset({f"msg:w{i}", f"msg:v{i}", f"workflow:x{i}"}) for i in range(4)]
    assert context_correlation(alike + strangers) > 0.5
    assert context_correlation(strangers * 1) == 0.0


def test_sampled_correlation_is_deterministic_and_close():
    contexts = [frozenset({f"t{i}", f"t{i + 1}", "shared"}) for i in range(400)]  # > MAX_CONTEXT_GROUPS
    first = context_correlation(contexts)
    assert first == context_correlation(list(contexts))
    assert first == pytest.approx(brute_force_correlation(contexts), abs=0.02)


def test_confidence_moves_with_each_component():
    base = confidence_score(5, 0.6, 0.01)
    assert confidence_score(20, 0.6, 0.01) > base
    assert confidence_score(5, 0.9, 0.01) > base
    assert confidence_score(5, 0.6, 0.02) > base
    assert 0.0 <= confidence_score(1, 0.0, 0.0) < confidence_score(1000, 1.0, 1.0) <= 1.0


@pytest.mark.parametrize("message, template", [
    ("Tool x timed out after 60s", "Tool x timed out after <n>s"),
    ("Path not found: /home/dev/project/a/b", "Path not found: <path>"),
    ("run 3f2b1c9e-0000-4000-8000-123456789abc failed", "run <id> failed"),
    ("bad value 'abc' for limit", "bad value <str> for limit"),
])
def test_message_templates(message, template):
    assert message_template(message) == template


@given(st.text(max_size=200))
def test_template_never_crashes(text):
    assert isinstance(message_template(text), str)


def test_split_pattern_id():
    assert split_pattern_id("Timeout:mcp__k8s__pods_list") == ("timeout", "mcp__k8s__pods_list")
    assert split_pattern_id("tool_error:server:tool") == ("tool_error", "server:tool")
    with pytest.raises(UsageError, match="expected error_type:tool_name"):  # bad usage, not an unknown id
        split_pattern_id("list_dir")


def _quality(seed: int, noise: float, on_patterns: bool, tmp_path):
    path = tmp_path / f"q{seed}.db"
    truth = generate_history(path, seed=seed, runs=600, end=NOW, noise_rate=noise, noise_on_patterns=on_patterns)
    conn = connect(path)
    found = detect_failure_patterns(conn, since="-7d", now=NOW).patterns
    conn.close()
    return {p.id: p for p in found}, {p["id"]: p for p in truth["patterns"]}


def test_detection_quality_against_ground_truth(tmp_path):
    """Precision and recall of pattern ids, and exactness of occurrence counts and affected
    runs, over noisy histories with several seeds: 2 % of calls failing at random, on the
    injected signatures too (with unrelated messages, so a count that misses or adds a row
    is caught), and 8 % failing at random on other signatures."""
    tp = fp = fn = exact_counts = noisy_patterns = 0
    for seed in range(4):
        for noise, on_patterns in ((0.02, True), (0.08, False)):
            found, truth = _quality(seed, noise, on_patterns, tmp_path)
            noisy_patterns += sum(1 for p in truth.values() if p["noise_occurrences"])
            tp += len(found.keys() & truth.keys())
            fp += len(found.keys() - truth.keys())
            fn += len(truth.keys() - found.keys())
            for pid in found.keys() & truth.keys():
                if (found[pid].occurrences == truth[pid]["occurrences"]
                        and sorted(found[pid].affected_runs) == truth[pid]["affected_runs"]):
                    exact_counts += 1
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert precision >= 0.95, (tp, fp, fn)
    assert recall >= 0.95, (tp, fp, fn)
    assert exact_counts / tp >= 0.95
    assert noisy_patterns > 0  # the noise did land on real patterns


def test_pattern_fields_and_order(sample_history):
    path, truth = sample_history
    conn = connect(path)
    patterns = detect_failure_patterns(conn, since="-7d", now=NOW).patterns
    assert [p.occurrences for p in patterns] == sorted((p.occurrences for p in patterns), reverse=True)
    d = patterns[0].to_dict()
    for key in ("id", "error_type", "tool_name", "occurrences", "correlation_score", "affected_runs",
                "confidence", "first_seen", "last_seen"):
        assert key in d
    assert "occurrences_detail" not in d
    assert len({p.confidence for p in patterns}) > 1 and len({p.correlation_score for p in patterns}) > 1
    unknown = [p for p in patterns if p.tool_name == "execute_command"][0]
    assert unknown.id == "Unknown:execute_command"  # absent, null and "Unknown" are one type


def test_filters_and_thresholds(sample_history):
    path, truth = sample_history
    conn = connect(path)
    only = detect_failure_patterns(conn, since="-7d", now=NOW, error_type="Timeout").patterns
    assert [p.id for p in only] == ["timeout:mcp__kubernetes__pods_list"]
    by_tool = detect_failure_patterns(conn, since="-7d", now=NOW, tool_name="list_dir").patterns
    assert [p.id for p in by_tool] == ["tool_error:list_dir"]
    everything = detect_failure_patterns(conn, since="-7d", now=NOW, confidence_threshold=0.0, min_occurrences=1)
    assert len(everything.patterns) > len(truth["patterns"])  # noise appears without the filter
    strict = detect_failure_patterns(conn, since="-7d", now=NOW, min_occurrences=20).patterns
    assert all(p.occurrences >= 20 for p in strict) and strict


def test_window_compares_instants(tmp_path):
    """Events written with +02:00 and -05:00 offsets fall in or out of the window by
    their instant, not by how their strings sort."""
    path = tmp_path / "w.db"
    generate_history(path, seed=2, runs=20, end=NOW, patterns=())
    c = sqlite3.connect(path)
    run_id = c.execute("SELECT id FROM runs WHERE status='completed' LIMIT 1").fetchone()[0]
    cutoff = NOW - timedelta(hours=1)
    inside = (cutoff + timedelta(minutes=5)).astimezone(__import__("datetime").timezone(timedelta(hours=-5)))
    outside = (cutoff - timedelta(minutes=5)).astimezone(__import__("datetime").timezone(timedelta(hours=2)))
    rows = []
    for when, tool in ((inside, "in_tool"), (outside, "out_tool")):
        for _ in range(3):
            rows.append((run_id, 0, "tool_complete", json.dumps({
                "type": "tool_complete", "name": tool, "result": "boom", "duration": 5, "is_error": True,
                "error_type": "tool_error"}), when.isoformat()))
    c.executemany("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) VALUES (?,?,?,?,?)", rows)
    c.commit()
    conn = connect(path)
    found = detect_failure_patterns(conn, since="-1h", now=NOW, confidence_threshold=0.0).patterns
    assert [p.tool_name for p in found] == ["in_tool"]


def test_incremental_index_matches_a_fresh_scan(tmp_path):
    path = tmp_path / "inc.db"
    generate_history(path, seed=5, runs=120, end=NOW)
    conn = connect(path)
    first = detect_failure_patterns(conn, since="-7d", now=NOW, confidence_threshold=0).patterns
    # the runtime appends more failures after our first scan
    src = tmp_path / "more.db"
    generate_history(src, seed=6, runs=60, end=NOW)
    c = sqlite3.connect(path)
    c.execute("ATTACH ? AS more", (str(src),))
    c.execute("INSERT INTO runs SELECT * FROM more.runs")
    c.execute("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) "
              "SELECT run_id, step_index, event_type, event_data, timestamp FROM more.run_events ORDER BY id")
    c.commit()
    c.close()
    warm = detect_failure_patterns(conn, since="-7d", now=NOW, confidence_threshold=0).patterns
    assert sum(p.occurrences for p in warm) > sum(p.occurrences for p in first)
    conn.execute("DELETE FROM selfheal_state")  # force a full rebuild
    cold = detect_failure_patterns(conn, since="-7d", now=NOW, confidence_threshold=0).patterns
    assert [p.to_dict() for p in warm] == [p.to_dict() for p in cold]


def test_bad_rows_are_counted_once_and_skipped(tmp_path):
    local = tmp_path / "b.db"
    truth = generate_history(local, seed=9, runs=60, end=NOW, bad_rows=9)
    conn = connect(local)
    first = refresh(conn)
    assert first.new_bad_rows == truth["bad_rows"] and first.total_bad_rows == truth["bad_rows"]
    again = refresh(conn)
    assert again.new_bad_rows == 0 and again.total_bad_rows == truth["bad_rows"] and again.scanned_rows == 0


def test_show_details(sample_history):
    path, truth = sample_history
    conn = connect(path)
    pattern = get_pattern(conn, "tool_error:list_dir", since="-7d", now=NOW)
    details = pattern_details(pattern)
    expected = [p for p in truth["patterns"] if p["id"] == "tool_error:list_dir"][0]
    assert sum(t["count"] for t in details["templates"]) == expected["occurrences"]
    assert {t["template"] for t in details["templates"]} == {"Path not found: <path>", "Directory <path> does not exist"}
    assert sorted(r["run_id"] for r in details["runs"]) == expected["affected_runs"]
    assert set(details["context"]["workflows"]) <= {"planner", "coder"}
    assert set(details["context"]["error_type_spellings"]) == {"tool_error", "ToolError"}
    with pytest.raises(NotFoundError, match="no pattern"):
        get_pattern(conn, "timeout:no_such_tool", since="-7d", now=NOW)


@pytest.mark.parametrize("stamp", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "yesterday"])
def test_extreme_timestamps_do_not_break_detection(tmp_path, stamp):
    path = tmp_path / "x.db"
    generate_history(path, seed=3, runs=40, end=NOW)
    c = sqlite3.connect(path)
    run_id = c.execute("SELECT id FROM runs LIMIT 1").fetchone()[0]
    c.execute("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) VALUES (?,?,?,?,?)",
              (run_id, 0, "tool_complete", json.dumps({"type": "tool_complete", "name": "read_file", "result": "x",
                                                       "duration": 1, "is_error": True}), stamp))
    c.commit()
    conn = connect(path)
    first = detect_failure_patterns(conn, since="-7d", now=NOW)
    again = detect_failure_patterns(conn, since="-7d", now=NOW)
    assert [p.id for p in first.patterns] == [p.id for p in again.patterns]
    assert again.scanned.scanned_rows == 0  # the watermark moved past the row
