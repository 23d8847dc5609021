"""`agent self-heal detect` and `show`, run as the installed console script in a temp home."""
import json
import sqlite3
import subprocess
import sys
import zipfile

import pytest

from selfheal_plugin.testbed.generator import add_runtime_improvements, generate_history

from ..conftest import run_agent

SINCE = "2026-11-13T12:00:00Z"  # the generated week ends at conftest.NOW


def test_detect_text_output(history_copy, binks_home):
    db, truth = history_copy
    res = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith(f"🔍 Detecting failure patterns (last {SINCE}, min 3 occurrences, confidence >= 75%)...")
    assert f"📊 Found {len(truth['patterns'])} pattern(s):" in out
    for p in truth["patterns"]:
        block = (f"  Pattern {p['id']}\n    Error: {p['error_type']} on {p['tool_name']}\n"
                 f"    Occurrences: {p['occurrences']}\n    Correlation: ")
        assert block in out
    warnings = [line for line in res.stderr.splitlines() if "malformed" in line]
    assert warnings == [f"warning: skipped {truth['bad_rows']} malformed run_events row(s) (invalid JSON or UTF-8, "
                        "missing tool name, unparsable timestamp, absurd duration or size)"]


def test_detect_json_shape(history_copy, binks_home):
    db, truth = history_copy
    res = run_agent("self-heal", "detect", "--db", str(db), "--since", SINCE, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    found = {p["id"]: p for p in data["patterns"]}
    assert set(found) == {p["id"] for p in truth["patterns"]}
    for p in truth["patterns"]:
        got = found[p["id"]]
        assert got["occurrences"] == p["occurrences"]
        assert got["affected_run_count"] == len(p["affected_runs"])
        assert set(got["affected_runs"]) <= set(p["affected_runs"])
        assert len(got["affected_runs"]) == min(20, len(p["affected_runs"]))  # --limit's default
        assert 0 < got["correlation_score"] <= 1 and 0 < got["confidence"] <= 1
        assert got["first_seen"] <= got["last_seen"]
    assert data["skipped_rows"] == truth["bad_rows"]


def test_nothing_found_says_why(history_copy, binks_home):
    """No pattern: the line says what is true — no failed call in the window at all, too
    few failures of each signature, or too little confidence."""
    home = ["--home", str(binks_home)]
    res = run_agent("self-heal", "detect", *home, "--since", "-0d")  # the history ended a while ago
    assert res.returncode == 0, res.stderr
    assert "✅ No recurring failure patterns (no failed tool call since " in res.stdout
    assert "below the confidence" not in res.stdout
    res = run_agent("self-heal", "detect", *home, "--since", SINCE, "--min-occurrences", "100000", "--json")
    data = json.loads(res.stdout)
    assert data["patterns"] == [] and data["candidates"] == 0 and data["failing_signatures"] > 0
    res = run_agent("self-heal", "detect", *home, "--since", SINCE, "--min-occurrences", "100000")
    assert f"({data['failing_signatures']} signature(s) failed, none 100000 or more times)" in res.stdout


def test_detect_json_limit_bounds_affected_runs(history_copy, binks_home):
    db, truth = history_copy
    res = run_agent("self-heal", "detect", "--db", str(db), "--since", SINCE, "--json", "--limit", "2")
    assert res.returncode == 0, res.stderr
    found = {p["id"]: p for p in json.loads(res.stdout)["patterns"]}
    for p in truth["patterns"]:
        got = found[p["id"]]
        assert got["affected_run_count"] == len(p["affected_runs"]) > 2
        assert len(got["affected_runs"]) == 2 and set(got["affected_runs"]) <= set(p["affected_runs"])
    bad = run_agent("self-heal", "detect", "--db", str(db), "--json", "--limit", "0")
    assert bad.returncode == 2 and "--limit" in bad.stderr


def test_plain_self_heal_prints_help_and_writes_nothing(history_copy, binks_home, tmp_path):
    """Issue 15: a bare `agent self-heal` (or `python -m selfheal_plugin`) is help, not a detect
    that writes proposals and an inbox entry."""
    db, _ = history_copy
    before = db.read_bytes()
    res = run_agent("self-heal", "--home", str(binks_home))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Usage: agent self-heal") and "detect" in res.stdout
    mod = subprocess.run([sys.executable, "-m", "selfheal_plugin", "--home", str(binks_home)],
                         capture_output=True, text=True)
    assert mod.returncode == 0 and "Usage:" in mod.stdout and "detect" in mod.stdout
    assert db.read_bytes() == before
    assert not (tmp_path / "inbox").exists() and not (binks_home / "selfheal").exists()


def test_settings_from_config_and_flag_precedence(history_copy, binks_home):
    (binks_home / "config.toml").write_text('[self_heal]\nmin_occurrences = 20\nconfidence_threshold = 0.5\n')
    res = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE, "--json")
    data = json.loads(res.stdout)
    assert data["patterns"] and all(p["occurrences"] >= 20 for p in data["patterns"])
    res = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE, "--min-occurrences", "3",
                    "--json")
    assert min(p["occurrences"] for p in json.loads(res.stdout)["patterns"]) < 20
    text = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE)
    assert "confidence >= 50%" in text.stdout


def test_show_pattern(history_copy, binks_home):
    db, truth = history_copy
    expected = [p for p in truth["patterns"] if p["id"] == "tool_error:list_dir"][0]
    res = run_agent("self-heal", "show", "tool_error:list_dir", "--home", str(binks_home), "--since", SINCE)
    assert res.returncode == 0, res.stderr
    assert "Error: tool_error on list_dir" in res.stdout
    assert "Path not found: <path>" in res.stdout and "First seen:" in res.stdout
    for run_id in expected["affected_runs"]:
        assert run_id in res.stdout
    js = json.loads(run_agent("self-heal", "show", "ToolError:list_dir", "--home", str(binks_home),
                              "--since", SINCE, "--json").stdout)
    assert js["occurrences"] == expected["occurrences"] and js["templates"][0]["count"] >= 1


@pytest.mark.parametrize("args, code, message", [
    (["detect", "--since", "-7x"], 2, "invalid time window '-7x'"),
    (["detect", "--since", "yesterday"], 2, "invalid time window"),
    (["detect", "--since", "2999-01-01T00:00"], 2, "it starts in the future"),
    (["detect", "--confidence", "1.5"], 2, "--confidence"),
    (["show", "timeout:no_such_tool"], 1, "no pattern timeout:no_such_tool"),
    (["show", "list_dir"], 2, "expected error_type:tool_name"),  # a malformed id is bad usage
])
def test_bad_input(history_copy, binks_home, args, code, message):
    db, _ = history_copy
    before = db.read_bytes()
    res = run_agent("self-heal", *args, "--home", str(binks_home))
    assert res.returncode == code
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    if code == 2:  # bad usage: one line, as a bad flag value (no usage block)
        assert res.stderr.strip().splitlines() == [f"Error: {res.stderr.strip()[7:]}"]
        assert db.read_bytes() == before  # nothing touched


def test_missing_database(binks_home):
    res = run_agent("self-heal", "detect", "--home", str(binks_home))
    assert res.returncode == 1
    assert f"no run history at {binks_home / 'conversations.db'}" in res.stderr
    assert not (binks_home / "conversations.db").exists()


def test_not_sqlite_and_no_run_tables(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_text("hello " * 1000)
    res = run_agent("self-heal", "detect", "--db", str(junk))
    assert res.returncode == 1 and "is not a run-history database" in res.stderr
    other = tmp_path / "other.db"
    c = sqlite3.connect(other)
    c.execute("CREATE TABLE t(x)")
    c.commit()
    c.close()
    res = run_agent("self-heal", "detect", "--db", str(other), "--json")
    assert res.returncode == 1 and "no runs or run_events table" in res.stderr and res.stdout == ""


def test_broken_config_is_reported(history_copy, binks_home):
    (binks_home / "config.toml").write_text("[self_heal\nmin_occurrences = ")
    res = run_agent("self-heal", "detect", "--home", str(binks_home))
    assert res.returncode == 1 and "is not valid TOML" in res.stderr
    (binks_home / "config.toml").write_text('[self_heal]\nmin_occurrences = "three"\n')
    res = run_agent("self-heal", "detect", "--home", str(binks_home))
    assert res.returncode == 1 and "[self_heal] min_occurrences must be an integer between 1 and 1000000, got 'three'" in res.stderr


def test_legacy_improvement_rows_survive_commands(history_copy, binks_home):
    db, _ = history_copy
    ids = add_runtime_improvements(db, rows=3)
    before = sqlite3.connect(db).execute("SELECT id, category, description, impact FROM improvements").fetchall()
    for args in (["detect", "--since", SINCE], ["show", "tool_error:list_dir", "--since", SINCE]):
        assert run_agent("self-heal", *args, "--home", str(binks_home)).returncode == 0
    after = sqlite3.connect(db).execute(
        f"SELECT id, category, description, impact FROM improvements WHERE id IN ({','.join('?' * len(ids))})",
        ids).fetchall()
    assert sorted(after) == sorted(before)


def test_busy_database_is_a_clear_error(history_copy, binks_home):
    db, _ = history_copy
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        res = run_agent("self-heal", "detect", "--home", str(binks_home), env={"SELFHEAL_BUSY_TIMEOUT_MS": "200"})
    finally:
        holder.execute("ROLLBACK")
    assert res.returncode == 1
    assert "database is busy" in res.stderr and "Traceback" not in res.stderr


def test_wheel_has_no_top_level_plugin_folders(tmp_path):
    """strategies/ and hooks/ ship inside selfheal_plugin/, never as top-level modules."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path), str(root)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    wheel = next(tmp_path.glob("selfheal-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "strategies" not in tops and "hooks" not in tops
    assert "selfheal_plugin/plugin.toml" in names
    assert all(t.startswith("selfheal") for t in tops), tops
