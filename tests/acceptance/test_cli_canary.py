"""``agent self-heal test --mode canary|shadow``, ``verify`` and ``canary promote|drop``
through the installed command, including a crash in the middle of a section edit."""
from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore

from ..conftest import run_agent
from ..lifecycle_data import add_improvement, git, rate_runs, timeout_change, write_runs

NOW = datetime.now(timezone.utc)


@pytest.fixture
def db(binks_home):
    path = binks_home / "conversations.db"
    write_runs(path, rate_runs(NOW - timedelta(days=6), NOW - timedelta(hours=1), 60, 0.3))
    return path


def status(db, imp_id):
    return ImprovementStore(connect(db)).get(imp_id).status


def test_canary_start_report_and_promote(db, binks_home):
    imp = add_improvement(db, [timeout_change(90_000)])
    r = run_agent("self-heal", "canary", "promote", imp.id, "--yes")  # no canary yet: its own reason, not verify's
    assert r.returncode == 1 and f"{imp.id} is proposed; only an improvement running as a canary or shadow can be " \
        "promoted" in r.stderr
    r = run_agent("self-heal", "test", imp.id, "--mode", "canary", "--fraction", "0.3")
    assert r.returncode == 0, r.stderr
    assert f"Started canary of {imp.id} (on 30% of runs)" in r.stdout and "+timeout_ms = 90000" in r.stdout
    assert status(db, imp.id) == "canary"
    r = run_agent("self-heal", "verify", imp.id)
    assert r.returncode == 0, r.stderr
    assert "Canary vs control since" in r.stdout and "Recommendation: extend" in r.stdout
    r = run_agent("self-heal", "test", imp.id, "--mode", "canary", "--json")
    d = json.loads(r.stdout)
    assert d["started"] is False and d["test_mode"] == "canary" and d["fraction"] == 0.3
    before = (binks_home / "config.toml").read_text()
    r = run_agent("self-heal", "canary", "promote", imp.id, "--yes", "--json")  # no runs yet: the verdict is extend
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"Error: {imp.id}: the canary's verdict is extend (extend monitoring: 0 finished run(s) in the canary arm "
        "and 0 in the control arm (min_sample_size 30)); promote anyway with --force"]
    assert status(db, imp.id) == "canary" and (binks_home / "config.toml").read_text() == before
    r = run_agent("self-heal", "canary", "promote", imp.id, "--force", "--yes", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["status"] == "applied" and d["ended"]["end_commit_sha"] and d["commit_sha"]
    assert d["forced"] is True and d["verdict"] == "extend"
    assert "promoted with --force (verdict extend)" in d["changes_made"]
    text = (binks_home / "config.toml").read_text()
    assert "canary" not in text and "timeout_ms = 90000" in text
    assert len(git(binks_home, "log", "--format=%H").split()) == 4  # start versioning, canary, end, apply


def test_canary_text_wraps_under_its_indent_at_80_columns(db, binks_home):
    imp = add_improvement(db, [timeout_change(90_000)])
    outputs = [run_agent("self-heal", *args, env={"COLUMNS": "80"}) for args in (
        ("test", imp.id, "--mode", "canary", "--fraction", "0.3"), ("verify", imp.id),
        ("canary", "promote", imp.id, "--force", "--yes"))]
    for r in outputs:
        assert r.returncode == 0, r.stderr
        lines = [line for line in r.stdout.splitlines() if not line.startswith(("+", "-", "@"))]  # the diff: as is
        assert all(len(line) <= 80 for line in lines), r.stdout
        assert all(line.startswith(("  ", "🧪", "✅", "❌", "⏳", "⬆️")) for line in lines if line), r.stdout
    started, verified, promoted = (r.stdout for r in outputs)
    # the Next: line wraps before a command, never inside it: each is pasted whole
    assert f"\n    agent self-heal canary promote|drop {imp.id}" in started, started
    assert any(line.startswith("  Next: ") and f"agent self-heal verify {imp.id};" in line
               for line in started.splitlines()), started
    assert "Canary vs control since" in verified and "Recommendation: extend" in verified
    assert "Verification scheduled:" in promoted


def test_shadow_then_drop_in_text(db, binks_home):
    imp = add_improvement(db, [timeout_change(90_000)])
    r = run_agent("self-heal", "test", imp.id, "--mode", "shadow")
    assert r.returncode == 0 and "observed only; outcomes unchanged" in r.stdout
    r = run_agent("self-heal", "verify", imp.id)
    assert "Calls that would have changed outcome: 0" in r.stdout
    r = run_agent("self-heal", "canary", "drop", imp.id, "--yes")
    assert r.returncode == 0 and f"Dropped the shadow of {imp.id} (now proposed)" in r.stdout
    assert (binks_home / "config.toml").read_text() == ""
    r = run_agent("self-heal", "canary", "drop", imp.id, "--yes")
    assert r.returncode == 1 and r.stderr.strip().splitlines() == [
        f"Error: {imp.id} is proposed; only an improvement running as a canary or shadow can be dropped "
        f"(start one: agent self-heal test {imp.id} --mode canary)"]


@pytest.mark.parametrize("step, expect_status, section", [
    ("experiment-start-after-write", "proposed", False),  # no commit yet: undone
    ("experiment-start-after-commit", "canary", True),  # committed: finished
])
def test_a_crash_during_the_section_edit_is_recovered(db, binks_home, step, expect_status, section):
    imp = add_improvement(db, [timeout_change(90_000)])
    r = run_agent("self-heal", "test", imp.id, "--mode", "canary", env={"SELFHEAL_CRASH_AT": step})
    assert r.returncode == 99
    r = run_agent("self-heal", "verify", imp.id)  # every lifecycle command recovers first
    assert "recovered interrupted experiment-start" in r.stderr
    assert status(db, imp.id) == expect_status
    text = (binks_home / "config.toml").read_text() if (binks_home / "config.toml").exists() else ""
    assert ("[canary." in text) == section
    assert not git(binks_home, "status", "--porcelain", "--", "config.toml").strip()
