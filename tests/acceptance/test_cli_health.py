"""`agent self-heal dashboard` and `agent self-heal health`, run as the installed console
script against a generated history in a temp home."""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3

import pytest

from ..conftest import run_agent

SINCE = "2026-11-13T12:00:00Z"  # the generated week ends at conftest.NOW; the window ends now


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dashboard_text(history_copy, binks_home):
    res = run_agent("self-heal", "dashboard", "--home", str(binks_home), "--since", SINCE)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith(f"🩺 Health dashboard (since {SINCE}")
    for text in ("Overall health:", "Success rate:", "Trend:", "Daily success:", "Worst tools",
                 "mcp__kubernetes__pods_list", "No improvements recorded yet"):
        assert text in out, text
    assert any(block in out for block in "▁▂▃▄▅▆▇█")
    assert "Agents" not in out  # only with --detailed


def test_dashboard_json_shape(history_copy, binks_home):
    db, truth = history_copy
    res = run_agent("self-heal", "dashboard", "--db", str(db), "--since", SINCE, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    for key in ("overall_health_score", "trend", "success_rate", "recent_improvements", "daily_success",
                "error_types_over_time", "worst_tools", "trend_detail", "runs", "window"):
        assert key in data, key
    assert "agents" not in data and "tools" not in data
    assert 0 <= data["overall_health_score"] <= 100
    assert data["trend"] in ("improving", "degrading", "stable", "insufficient_data")
    assert data["runs"]["total"] == truth["runs"]
    assert data["runs"]["running"] == truth["running_runs"]
    detailed = json.loads(run_agent("self-heal", "dashboard", "--db", str(db), "--since", SINCE, "--json",
                                    "--detailed").stdout)
    assert {a["name"] for a in detailed["agents"]} == {"planner", "coder", "researcher", "k8s-ops"}
    assert sum(a["total_runs"] for a in detailed["agents"]) == truth["runs"]
    assert {"name", "success_rate", "total_calls", "timeout_rate", "error_rate", "p95_duration_ms"} <= set(
        detailed["tools"][0])


def test_dashboard_html_report(history_copy, binks_home, tmp_path):
    report = tmp_path / "report.html"
    res = run_agent("self-heal", "dashboard", "--home", str(binks_home), "--since", SINCE, "--html", str(report),
                    "--detailed")
    assert res.returncode == 0, res.stderr
    assert "HTML report written to" in res.stderr
    html = report.read_text(encoding="utf-8")
    for marker in ('id="chart-daily-success"', 'id="chart-error-types"', 'id="chart-tool-reliability"',
                   'id="overall-score"', 'id="table-tools"', 'id="table-agents"', "mcp__kubernetes__pods_list"):
        assert marker in html, marker
    assert "Agents" in res.stdout


def test_dashboard_bad_since_is_usage_error(history_copy, binks_home, tmp_path):
    db, _ = history_copy
    before = _digest(db)
    res = run_agent("self-heal", "dashboard", "--db", str(db), "--since", "-7x", "--html", str(tmp_path / "r.html"))
    assert res.returncode == 2
    assert "invalid time window '-7x'" in res.stderr
    assert not (tmp_path / "r.html").exists()
    assert _digest(db) == before and res.stdout == ""


def test_dashboard_errors_are_one_line(history_copy, binks_home, tmp_path):
    res = run_agent("self-heal", "dashboard", "--db", str(tmp_path / "missing.db"))
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "no run history" in res.stderr
    res = run_agent("self-heal", "dashboard", "--home", str(binks_home), "--html", str(tmp_path / "no" / "r.html"))
    assert res.returncode == 1
    assert "directory" in res.stderr and "does not exist" in res.stderr
    assert "Traceback" not in res.stderr


def test_dashboard_empty_history(binks_home):
    from selfheal_plugin.history.connection import connect

    connect(binks_home / "conversations.db", create=True).close()
    res = run_agent("self-heal", "dashboard", "--home", str(binks_home), "--json", "--detailed")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["overall_health_score"] is None and data["trend"] == "insufficient_data"
    assert data["agents"] == [] and data["tools"] == []
    text = run_agent("self-heal", "dashboard", "--home", str(binks_home))
    assert text.returncode == 0 and "n/a" in text.stdout


def test_run_health_by_prefix(history_copy, binks_home):
    db, _ = history_copy
    conn = sqlite3.connect(db)
    ids = [r[0] for r in conn.execute("SELECT id FROM runs WHERE status = 'failed' ORDER BY id")]
    all_ids = [r[0] for r in conn.execute("SELECT id FROM runs")]
    conn.close()
    run_id = ids[0]
    prefix = next(run_id[:n] for n in range(4, 37) if sum(i.startswith(run_id[:n]) for i in all_ids) == 1)
    res = run_agent("self-heal", "health", prefix, "--home", str(binks_home), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["run_id"] == run_id and 0 <= data["health_score"] <= 100
    assert data["issues"] and data["issues"][0]["severity"] == "high"
    assert {"severity", "description", "recommendation"} <= set(data["issues"][0])
    text = run_agent("self-heal", "health", prefix, "--home", str(binks_home))
    assert text.returncode == 0 and f"Run {run_id}" in text.stdout and "[HIGH]" in text.stdout


def test_run_health_unknown_and_ambiguous(history_copy, binks_home):
    res = run_agent("self-heal", "health", "no-such-run", "--home", str(binks_home))
    assert res.returncode == 1 and "no run 'no-such-run'" in res.stderr
    db, _ = history_copy
    conn = sqlite3.connect(db)
    first = conn.execute("SELECT substr(id, 1, 1) AS p FROM runs GROUP BY p ORDER BY count(*) DESC").fetchone()[0]
    conn.close()
    res = run_agent("self-heal", "health", first, "--home", str(binks_home), "--json")
    assert res.returncode == 2 and "ambiguous" in res.stderr and res.stdout == ""


def test_dashboard_html_never_replaces_the_history_or_config(history_copy, binks_home, tmp_path):
    db, _ = history_copy
    config = binks_home / "config.toml"
    config.write_text("[self_heal]\nmin_occurrences = 3\n")
    wal = binks_home / "conversations.db-wal"
    wal.write_bytes(b"not really a wal")
    link = tmp_path / "innocent.html"
    link.symlink_to(db)
    hard = tmp_path / "hard.html"
    hard.hardlink_to(config)
    before = {p: _digest(p) for p in (db, config, wal)}
    for target in (db, wal, config, link, hard, binks_home / "." / "conversations.db"):
        for force in ((), ("--force",)):
            res = run_agent("self-heal", "dashboard", "--home", str(binks_home), "--since", SINCE,
                            "--html", str(target), *force)
            assert res.returncode == 1, (target, force, res.stderr)
            assert res.stderr.strip().count("\n") == 0 and "refusing to write the HTML report" in res.stderr
            assert res.stdout == ""
    assert {p: _digest(p) for p in before} == before
    assert link.is_symlink() and not list(binks_home.glob(".selfheal-report-*"))


def test_dashboard_html_replaces_only_its_own_reports_unless_forced(history_copy, binks_home, tmp_path):
    notes = tmp_path / "notes.html"
    notes.write_text("<p>my notes</p>")
    res = run_agent("self-heal", "dashboard", "--home", str(binks_home), "--since", SINCE, "--html", str(notes))
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0
    assert "not an earlier selfheal report" in res.stderr and "--force" in res.stderr
    assert notes.read_text() == "<p>my notes</p>"
    report = tmp_path / "report.html"
    for _ in range(2):  # a new file, then the earlier report replaced without --force
        res = run_agent("self-heal", "dashboard", "--home", str(binks_home), "--since", SINCE, "--html", str(report))
        assert res.returncode == 0, res.stderr
    assert 'id="overall-score"' in report.read_text()
    link = tmp_path / "latest.html"
    link.symlink_to(report)
    report.write_text(report.read_text().replace("selfheal health report</title>", "old</title>"))
    res = run_agent("self-heal", "dashboard", "--home", str(binks_home), "--since", SINCE, "--html", str(link))
    assert res.returncode == 0, res.stderr
    assert link.is_symlink() and "selfheal health report</title>" in report.read_text()  # followed the link
    res = run_agent("self-heal", "dashboard", "--home", str(binks_home), "--since", SINCE, "--html", str(notes),
                    "--force")
    assert res.returncode == 0, res.stderr
    assert 'id="overall-score"' in notes.read_text()


def test_run_health_text_shows_the_weights_json_has(binks_home):
    """A re-weighted run: the text shows each component's effective weight (the one the score
    used, as --json's effective_weight), with the nominal weight beside it where they differ."""
    from selfheal_plugin.history.connection import connect

    c = connect(binks_home / "conversations.db", create=True)
    c.execute("INSERT INTO runs VALUES ('abc-1','lonely','t','completed','m','2026-11-19T12:00:00Z',"
              "'2026-11-19T12:01:00Z',60000,NULL,NULL,NULL)")
    for k in range(5):  # reference runs: the duration is known, tool reliability and resources are not
        c.execute("INSERT INTO runs VALUES (?,'lonely','t','completed','m','2026-11-18T12:00:00Z',NULL,30000,"
                  "NULL,NULL,NULL)", (f"ref-{k}",))
    c.close()
    data = json.loads(run_agent("self-heal", "health", "abc-1", "--home", str(binks_home), "--json").stdout)
    assert data["score_basis"] == "reweighted"
    text = run_agent("self-heal", "health", "abc-1", "--home", str(binks_home)).stdout
    for name, comp in data["components"].items():
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(name.replace("_", " ")))
        assert f"weight {comp['effective_weight']:g}" in line, line
    assert data["components"]["success"]["effective_weight"] == 0.7143
    assert "weight 0.7143, nominally 0.5" in text


def test_run_health_keeps_each_command_of_a_hint_on_one_line_at_80_columns(history_copy, binks_home):
    """A hint's command is pasted: the line breaks before it, never between `agent` and `self-heal`."""
    db, _ = history_copy
    assert run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE).returncode == 0
    conn = sqlite3.connect(db)
    failed = [r[0] for r in conn.execute("SELECT id FROM runs WHERE status = 'failed' ORDER BY id LIMIT 12")]
    conn.close()
    seen = 0
    for run_id in failed:
        data = json.loads(run_agent("self-heal", "health", run_id, "--home", str(binks_home), "--json").stdout)
        commands = [c for issue in data["issues"] for c in re.findall(
            r"agent self-heal (?:apply|verify|show|test|rollback) [^\s(),;]+", issue["recommendation"])]
        text = run_agent("self-heal", "health", run_id, "--home", str(binks_home), env={"COLUMNS": "80"})
        assert text.returncode == 0, text.stderr
        lines = text.stdout.splitlines()
        assert all(len(line) <= 80 for line in lines), text.stdout
        assert not any(line.rstrip().endswith(" agent") for line in lines), text.stdout
        for command in commands:
            assert any(command in line for line in lines), (command, text.stdout)
        seen += len(commands)
    assert seen  # the history's failed runs have hints with commands


@pytest.mark.parametrize("columns", [80, 120])
def test_dashboard_shows_each_top_error_type_whole_with_its_count(history_copy, binks_home, columns):
    """At 80 columns the column cut `permission_de…` and put its count on the next line."""
    args = ("self-heal", "dashboard", "--home", str(binks_home), "--since", SINCE, "--detailed")
    data = json.loads(run_agent(*args, "--json").stdout)
    res = run_agent(*args, env={"COLUMNS": str(columns)})
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert all(len(line) <= columns for line in lines), res.stdout
    entries = {f"{e['error_type']} {e['count']}" for t in data["tools"] for e in t["top_error_types"]}
    assert entries and all(any(re.search(rf"(^|\s){re.escape(e)}(\s|$)", line) for line in lines) for e in entries)
