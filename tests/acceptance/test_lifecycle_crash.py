"""Kill `agent self-heal apply` / `rollback` at each step, run the next command, and check
that config file, git and database agree (SELFHEAL_CRASH_AT makes the process exit 99)."""
from __future__ import annotations

import json

import pytest

from selfheal_plugin.lifecycle.apply import APPLY_STEPS, ROLLBACK_STEPS, apply_improvement
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore

from ..conftest import run_agent
from ..lifecycle_data import add_improvement, git, git_as_user, settings_for, timeout_change

CONFIG = '# runtime\nmodel = "m"  # comment\n\n[tools."mcp__k8s__pods_list"]\ntimeout_ms = 60000\n'
APPLIED = CONFIG.replace("60000", "90000")


def row(db, imp_id):
    conn = connect(db)
    try:
        return ImprovementStore(conn).get(imp_id)
    finally:
        conn.close()


def apply_commits(home, imp_id, action="apply"):
    log = git(home, "log", "--format=%H%x00%B%x1e")
    return [e.split("\x00")[0].strip() for e in log.split("\x1e")
            if f"Self-Heal-Improvement: {imp_id}" in e and f"Self-Heal-Action: {action}" in e]


def assert_clean(home):
    assert git(home, "status", "--porcelain") == ""
    assert not list(home.glob(".config.toml.selfheal-*.tmp"))
    assert not (home / ".git" / "REVERT_HEAD").exists()


@pytest.fixture
def setup(binks_home):
    db = binks_home / "conversations.db"
    connect(db, create=True).close()
    (binks_home / "config.toml").write_text(CONFIG)
    imp = add_improvement(db, [timeout_change(90000)])
    return binks_home, db, imp


@pytest.mark.parametrize("step", APPLY_STEPS)
def test_apply_killed_at_each_step_is_recovered(setup, step):
    home, db, imp = setup
    r = run_agent("self-heal", "apply", imp.id, "--yes", env={"SELFHEAL_CRASH_AT": step})
    assert r.returncode == 99, r.stderr
    assert row(db, imp.id).pending_op["op"] == "apply"

    r = run_agent("self-heal", "detect", "--json")  # any command recovers first
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(f"recovered interrupted apply of {imp.id}") == 1, r.stderr  # said once, not logged too
    state = row(db, imp.id)
    assert state.pending_op is None
    assert_clean(home)
    finished = step in ("after-commit", "before-db-update")
    if finished:
        commits = apply_commits(home, imp.id)
        assert len(commits) == 1 and commits[0] == git(home, "rev-parse", "HEAD").strip()
        assert (state.status, state.commit_sha) == ("applied", commits[0])
        assert state.applied_at and state.verification_scheduled and state.apply_record
        assert (home / "config.toml").read_text() == APPLIED
        again = run_agent("self-heal", "apply", imp.id, "--yes")
        assert again.returncode == 1 and "is applied" in again.stderr
    else:
        assert apply_commits(home, imp.id) == []
        assert (state.status, state.commit_sha) == ("proposed", None)
        assert (home / "config.toml").read_text() == CONFIG
        again = run_agent("self-heal", "apply", imp.id, "--yes", "--json")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["commit_sha"] == git(home, "rev-parse", "HEAD").strip()
    assert (home / "config.toml").read_text() == APPLIED
    assert len(apply_commits(home, imp.id)) == 1
    assert row(db, imp.id).status == "applied"
    assert_clean(home)


@pytest.mark.parametrize("step, method", [(s, "revert") for s in ROLLBACK_STEPS] + [
    ("rollback-after-write", "inverse-edit")])
def test_rollback_killed_at_each_step_is_recovered(setup, step, method):
    home, db, imp = setup
    s = settings_for(home)
    conn = connect(db)
    apply_improvement(conn, s, imp.id)
    conn.close()
    expected_after = CONFIG
    if method == "inverse-edit":  # a later commit touches the file: rollback edits instead of reverting
        cfg = home / "config.toml"
        cfg.write_text(cfg.read_text().replace('model = "m"', 'model = "n"'))
        git_as_user(home, "commit", "-q", "-am", "model n")
        expected_after = CONFIG.replace('model = "m"', 'model = "n"')
    before_rollback = (home / "config.toml").read_text()
    r = run_agent("self-heal", "rollback", imp.id, "--yes", env={"SELFHEAL_CRASH_AT": step})
    assert r.returncode == 99, r.stderr

    r = run_agent("self-heal", "detect", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(f"recovered interrupted rollback of {imp.id}") == 1, r.stderr
    state = row(db, imp.id)
    assert state.pending_op is None
    assert_clean(home)
    if step == "rollback-after-commit":
        assert state.status == "rolled_back"
        assert state.rollback_sha == git(home, "rev-parse", "HEAD").strip()
        assert (home / "config.toml").read_text() == expected_after
    else:
        assert (state.status, state.rollback_sha) == ("applied", None)
        assert (home / "config.toml").read_text() == before_rollback
        assert apply_commits(home, imp.id, "rollback") == []
        again = run_agent("self-heal", "rollback", imp.id, "--yes", "--json")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["method"] == method
    assert (home / "config.toml").read_text() == expected_after
    assert row(db, imp.id).status == "rolled_back"
    assert len(apply_commits(home, imp.id, "rollback")) == 1
    assert_clean(home)
