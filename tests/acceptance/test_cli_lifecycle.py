"""`agent self-heal test|apply|rollback|verify|reject` end to end (installed console script)."""
from __future__ import annotations

import json

import pytest

from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore

from ..conftest import NOW, run_agent
from ..lifecycle_data import add_improvement, git, git_as_user, timeout_change, timeout_history


@pytest.fixture
def db(binks_home):
    path = binks_home / "conversations.db"
    timeout_history(path, NOW, runs=150, seed=5)
    return path


def status(db, imp_id):
    return ImprovementStore(connect(db)).get(imp_id).status


def one_line_error(r, code=1):
    assert r.returncode == code, (r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), r.stderr
    return lines[0]


def test_full_cycle_with_prompt(db, binks_home):
    imp = add_improvement(db, [timeout_change(90_000)])
    r = run_agent("self-heal", "test", imp.id, "--since", "2026-11-13")
    assert r.returncode == 0, r.stderr
    assert "Recommendation: safe_to_apply" in r.stdout and "Simulated success rate:" in r.stdout

    r = run_agent("self-heal", "apply", imp.id, input="n\n")
    assert r.returncode == 1 and r.stderr.strip() == "Aborted: nothing was changed."
    assert "+[tools.mcp__k8s__pods_list]" in r.stdout and "+timeout_ms = 90000" in r.stdout
    assert "Its test said: safe_to_apply" in r.stdout  # what its test said, before the question
    assert not (binks_home / ".git").exists() and not (binks_home / "config.toml").exists()
    assert status(db, imp.id) == "tested"

    r = run_agent("self-heal", "apply", imp.id, "--json")
    assert r.returncode == 2 and "--json needs --yes" in r.stderr

    r = run_agent("self-heal", "apply", imp.id, input="y\n")
    assert r.returncode == 0, r.stderr
    sha = git(binks_home, "rev-parse", "HEAD").strip()
    assert f"Commit: {sha[:12]}" in r.stdout and "Verification scheduled:" in r.stdout
    assert status(db, imp.id) == "applied"

    r = run_agent("self-heal", "verify", imp.id, "--json", "--window-days", "3")
    assert r.returncode == 0, r.stderr
    v = json.loads(r.stdout)
    assert v["recommendation"] == "extend" and v["verification_status"] == "inconclusive"
    assert v["metrics"]["runs_after"] == 0 and v["window"]["days"] == 3

    r = run_agent("self-heal", "rollback", imp.id, "--yes", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["method"] == "revert" and out["rollback_sha"] == git(binks_home, "rev-parse", "HEAD").strip()
    assert status(db, imp.id) == "rolled_back" and not (binks_home / "config.toml").exists()


def test_test_json_has_the_design_fields(db):
    imp = add_improvement(db, [timeout_change(90_000)])
    r = run_agent("self-heal", "test", imp.id, "--json", "--since", "2026-11-13")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in ("improvement_id", "test_mode", "simulated_success_rate", "baseline_success_rate",
                "expected_improvement", "recommendation", "interval", "runs_replayed"):
        assert key in d
    assert d["runs_replayed"] == 150 and d["expected_improvement"].startswith("+")


def test_user_errors_are_one_line_and_change_nothing(db, binks_home):
    imp = add_improvement(db, [timeout_change(90_000)])
    for cmd in ("test", "apply", "rollback", "verify", "reject"):
        line = one_line_error(run_agent("self-heal", cmd, "imp-nope", *(["--yes"] if cmd == "apply" else [])))
        assert "no improvement 'imp-nope'" in line
    assert run_agent("self-heal", "verify", imp.id, "--window-days", "0").returncode == 2
    assert run_agent("self-heal", "test", imp.id, "--mode", "bogus").returncode == 2
    bad = run_agent("self-heal", "test", imp.id, "--mode", "canary", "--fraction", "1.5")
    assert bad.returncode == 2 and "--fraction must be between 0 and 1" in bad.stderr
    assert "only applied improvements" in one_line_error(run_agent("self-heal", "verify", imp.id))

    # a config with the user's uncommitted edit
    (binks_home / "config.toml").write_text('model = "a"\n')
    git(binks_home, "init", "-q")
    git(binks_home, "add", "config.toml")
    git_as_user(binks_home, "commit", "-q", "-m", "mine")
    (binks_home / "config.toml").write_text('model = "b"\n')
    line = one_line_error(run_agent("self-heal", "apply", imp.id, "--yes"))
    assert "has uncommitted changes" in line and "Nothing was changed" in line
    assert (binks_home / "config.toml").read_text() == 'model = "b"\n' and status(db, imp.id) == "proposed"

    # unparsable config
    (binks_home / "config.toml").write_text("[tools\n")
    git_as_user(binks_home, "commit", "-q", "-am", "broken")
    line = one_line_error(run_agent("self-heal", "apply", imp.id, "--yes"))
    assert "is not valid TOML" in line


def test_conflicting_user_edit_exits_1(db, binks_home):
    imp = add_improvement(db, [timeout_change(90_000)])
    applied = run_agent("self-heal", "apply", imp.id, "--yes")
    assert applied.returncode == 0  # applied untested: the output says so, as the question would have
    assert f"Not tested: agent self-heal test {imp.id}" in applied.stdout
    cfg = binks_home / "config.toml"
    cfg.write_text(cfg.read_text().replace("90000", "120000"))
    git_as_user(binks_home, "commit", "-q", "-am", "mine")
    line = one_line_error(run_agent("self-heal", "rollback", imp.id, "--yes"))
    assert "timeout_ms is now 120000 (selfheal set 90000)" in line
    assert "120000" in cfg.read_text() and status(db, imp.id) == "applied"


def test_reject(db):
    imp = add_improvement(db, [timeout_change()])
    r = run_agent("self-heal", "reject", imp.id, "--yes", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"improvement_id": imp.id, "status": "rejected"}
    assert "is rejected" in one_line_error(run_agent("self-heal", "apply", imp.id, "--yes"))


@pytest.mark.parametrize("state", ["applied", "verified", "rolled_back", "rejected"])
def test_test_refuses_an_improvement_that_is_past_testing(db, state):
    imp = add_improvement(db, [timeout_change(90_000)], status=state, test_result={"recommendation": "reject"})
    line = one_line_error(run_agent("self-heal", "test", imp.id))
    assert f"{imp.id} is {state}; only proposed or tested improvements can be tested" in line
    assert "agent self-heal apply" not in line
    row = ImprovementStore(connect(db)).get(imp.id)
    assert (row.status, row.test_result) == (state, {"recommendation": "reject"})  # nothing changed


def test_a_crlf_config_is_changed_only_where_the_key_changes(db, binks_home):
    cfg = binks_home / "config.toml"
    cfg.write_bytes(b'# c\r\nmodel = "x"\r\n\r\n[tools."mcp__k8s__pods_list"]\r\nretry_attempts = 2\r\n')
    imp = add_improvement(db, [{"kind": "config", "path": ["tools", "mcp__k8s__pods_list", "retry_attempts"],
                                "value": 3}])
    r = run_agent("self-heal", "apply", imp.id, "--yes")
    assert r.returncode == 0, r.stderr
    stat = git(binks_home, "show", "--format=", "--numstat", "HEAD").split()
    assert stat == ["1", "1", "config.toml"]
    assert cfg.read_bytes() == b'# c\r\nmodel = "x"\r\n\r\n[tools."mcp__k8s__pods_list"]\r\nretry_attempts = 3\r\n'


def test_a_locked_git_index_is_one_line_with_gits_reason_and_changes_nothing(db, binks_home):
    imp = add_improvement(db, [timeout_change(90_000)])
    (binks_home / "config.toml").write_text('model = "a"\n')
    git(binks_home, "init", "-q")
    git(binks_home, "add", "config.toml")
    git_as_user(binks_home, "commit", "-q", "-m", "mine")
    head = git(binks_home, "rev-parse", "HEAD")
    (binks_home / ".git" / "index.lock").write_text("")
    line = one_line_error(run_agent("self-heal", "apply", imp.id, "--yes"))
    assert "Unable to create" in line and "index.lock': File exists" in line and not line.endswith("'")
    assert "nothing was changed" in line
    assert (binks_home / "config.toml").read_text() == 'model = "a"\n' and git(binks_home, "rev-parse", "HEAD") == head
    assert status(db, imp.id) == "proposed"
    (binks_home / ".git" / "index.lock").unlink()
    assert git(binks_home, "status", "--porcelain", "--", "config.toml") == ""
    r = run_agent("self-heal", "apply", imp.id, "--yes")  # no recovery warning: nothing was left over
    assert r.returncode == 0 and "recovered" not in r.stderr, r.stderr


def test_rollback_shows_what_it_undoes_and_refuses_a_moved_home_before_asking(db, binks_home, tmp_path):
    import shutil

    imp = add_improvement(db, [timeout_change(90_000)])
    assert run_agent("self-heal", "apply", imp.id, "--yes").returncode == 0
    no = run_agent("self-heal", "rollback", imp.id, input="n\n")
    assert no.returncode == 1 and no.stderr.strip() == "Aborted: nothing was changed."
    assert "by git revert:" in no.stdout and "-timeout_ms = 90000" in no.stdout  # the diff, before the question
    # a copy of the home: its apply record names the original's config.toml
    copy = tmp_path / "copy"
    shutil.copytree(binks_home, copy)
    head = git(copy, "rev-parse", "HEAD")
    moved = run_agent("self-heal", "rollback", imp.id, "--home", str(copy), input="y\n")
    assert moved.returncode == 1 and "moved or copied" in moved.stderr
    assert "Roll back this change" not in moved.stdout  # refused before any question
    assert git(copy, "rev-parse", "HEAD") == head and status(copy / "conversations.db", imp.id) == "applied"
