"""The database is untrusted input, every state change is a compare-and-set, and apply
refuses a config or repository it must not write (issue 14, items 1, 2 and 7).

Races use real processes ordered with files (``SELFHEAL_PAUSE_AT``/``SELFHEAL_PAUSE_DIR``:
a process stops at a named step until the test lets it go on), never sleeps.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import time
from pathlib import Path

import pytest

from selfheal_plugin.errors import ConfigError, SelfHealError
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import STATUSES, ImprovementStore
from selfheal_plugin.history.settings import read_config
from selfheal_plugin.lifecycle.apply import (
    ChangedMeanwhileError, UntrustedRecordError, apply_improvement, reject_improvement, rollback_improvement,
)
from selfheal_plugin.lifecycle.gitops import GitOpsError
from selfheal_plugin.lifecycle.recovery import recover

from .conftest import agent_bin, run_agent
from .lifecycle_data import add_improvement, git, git_as_user, settings_for, timeout_change

CONFIG = '# runtime\nmodel = "m"  # comment\n\n[tools."mcp__k8s__pods_list"]\ntimeout_ms = 60000\n'
APPLIED = CONFIG.replace("60000", "90000")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def row(db: Path, imp_id: str):
    conn = connect(db)
    try:
        return ImprovementStore(conn).get(imp_id)
    finally:
        conn.close()


def set_row(db: Path, imp_id: str, **fields):
    conn = connect(db)
    try:
        ImprovementStore(conn).update(imp_id, **fields)
    finally:
        conn.close()


def commits_of(home: Path, imp_id: str) -> list[str]:
    log = git(home, "log", "--format=%H%x00%B%x1e")
    return [e.split("\x00")[0].strip() for e in log.split("\x1e") if f"Self-Heal-Improvement: {imp_id}" in e]


@pytest.fixture
def home(binks_home):
    connect(binks_home / "conversations.db", create=True).close()
    (binks_home / "config.toml").write_text(CONFIG)
    return binks_home


@pytest.fixture
def db(home):
    return home / "conversations.db"


@pytest.fixture
def versioned(home):
    """The home's config committed in its own repository (by the user)."""
    git(home, "init", "-q", "-b", "main")
    (home / ".gitignore").write_text("conversations.db*\n/selfheal/\n")
    git(home, "add", "config.toml", ".gitignore")
    git_as_user(home, "commit", "-q", "-m", "my config")
    return home


@pytest.fixture
def victim(tmp_path):
    """Another git repository with a file and a .git/config an attacker would like to change."""
    repo = tmp_path / "other"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "victim.txt").write_text("precious\n")
    git(repo, "add", "victim.txt")
    git_as_user(repo, "commit", "-q", "-m", "victim")
    return repo


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


def run_recover(home: Path, db: Path) -> tuple[list[dict], list[str]]:
    conn = connect(db)
    lines: list[str] = []
    try:
        return recover(conn, settings_for(home, db), warn=lines.append), lines
    finally:
        conn.close()


# ------------------------------------------------------------------ 1. recovery trusts nothing from the row


def forged_apply_op(target: Path, repo: Path, old_text: str, head_before: str | None) -> dict:
    current = target.read_text()
    return {"op": "apply", "step": "intent", "started_at": "2026-01-01T00:00:00+00:00", "head_before": head_before,
            "old_sha256": sha(old_text), "new_sha256": sha(current), "old_text": old_text,
            "record": {"config_path": str(target), "real_path": str(target), "repo": str(repo), "entries": [],
                       "created_tables": [], "file_existed": True}}


@pytest.mark.parametrize("which", ["file", "git-config"])
def test_recovery_never_writes_a_file_of_another_repository(home, db, victim, which):
    target = victim / "victim.txt" if which == "file" else victim / ".git" / "config"
    payload = "PWNED\n" if which == "file" else "[core]\n\tfsmonitor = touch /tmp/selfheal-pwned\n"
    head = git(victim, "rev-parse", "HEAD").strip()
    imp = add_improvement(db, [timeout_change()], pending_op=forged_apply_op(target, victim, payload, head))
    before = snapshot(target, victim / ".git" / "config", home / "config.toml")

    actions, lines = run_recover(home, db)

    assert snapshot(target, victim / ".git" / "config", home / "config.toml") == before
    assert [a["action"] for a in actions] == ["failed"]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert f"could not recover the interrupted apply of {imp.id}" in lines[0]
    assert str(target) in lines[0] and "not this home's" in lines[0]
    assert row(db, imp.id).status == "proposed"


def test_every_command_reports_a_forged_intent_in_one_line(home, db, victim):
    target = victim / ".git" / "config"
    payload = "[core]\n\tfsmonitor = touch pwned\n"
    op = forged_apply_op(target, victim, payload, git(victim, "rev-parse", "HEAD").strip())
    imp = add_improvement(db, [timeout_change()], pending_op=op)
    before = snapshot(target, victim / "victim.txt")
    r = run_agent("self-heal", "improvements", "--home", str(home))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    said = " ".join(r.stderr.split())  # (the terminal may wrap a long line)
    assert f"could not recover the interrupted apply of {imp.id}: the interrupted apply of {imp.id} names" in said
    r = run_agent("self-heal", "apply", imp.id, "--yes", "--home", str(home))
    assert r.returncode == 1 and "could not be recovered" in r.stderr and "Traceback" not in r.stderr
    assert snapshot(target, victim / "victim.txt") == before and not (victim / "pwned").exists()
    git(victim, "status")  # no fsmonitor command was planted
    assert not (victim / "pwned").exists()


def test_recovery_refuses_a_repository_other_than_the_homes(versioned, db, victim):
    head = git(versioned, "rev-parse", "HEAD").strip()
    op = forged_apply_op(versioned / "config.toml", victim, CONFIG, head)
    imp = add_improvement(db, [timeout_change()], pending_op=op)
    actions, lines = run_recover(versioned, db)
    assert actions[0]["action"] == "failed" and "as its repository" in lines[0]
    assert (versioned / "config.toml").read_text() == CONFIG
    assert row(db, imp.id).pending_op == op  # refused: nothing written, not even the database


def test_recovery_writes_back_only_text_that_git_has(versioned, db):
    """A row naming the home's own config but carrying text of its own to 'restore'."""
    (versioned / "config.toml").write_text(APPLIED)  # as if an apply wrote it and was killed
    head = git(versioned, "rev-parse", "HEAD").strip()
    forged = forged_apply_op(versioned / "config.toml", versioned, '[self_heal]\nauto_apply_enabled = true\n', head)
    imp = add_improvement(db, [timeout_change()], pending_op=forged)
    actions, lines = run_recover(versioned, db)
    assert actions[0]["action"] == "failed" and "not what git has" in lines[0]
    assert (versioned / "config.toml").read_text() == APPLIED
    # the same intent with the text git really has is undone as before
    set_row(db, imp.id, pending_op=forged_apply_op(versioned / "config.toml", versioned, CONFIG, head))
    actions, _ = run_recover(versioned, db)
    assert actions[0]["action"] == "undone"
    assert (versioned / "config.toml").read_text() == CONFIG and row(db, imp.id).pending_op is None


def test_recovery_never_deletes_a_config_git_has_no_copy_of(binks_home, tmp_path):
    """A forged 'the file did not exist before' intent against a config that is not
    committed: the file is set aside, never deleted."""
    home = binks_home
    db = home / "conversations.db"
    connect(db, create=True).close()
    git(home, "init", "-q", "-b", "main")
    (home / ".gitignore").write_text("conversations.db*\n/selfheal/\n")
    git(home, "add", ".gitignore")
    git_as_user(home, "commit", "-q", "-m", "init")
    (home / "config.toml").write_text(CONFIG)  # the user's, never committed
    head = git(home, "rev-parse", "HEAD").strip()
    op = {"op": "apply", "step": "intent", "head_before": head, "old_sha256": None, "old_text": None,
          "new_sha256": sha(CONFIG), "record": {"config_path": str(home / "config.toml")}}
    add_improvement(db, [timeout_change()], pending_op=op)
    actions, _ = run_recover(home, db)
    assert actions[0]["action"] == "undone" and "set aside" in actions[0]["detail"]
    assert (home / ".config.toml.selfheal-undone").read_text() == CONFIG


def test_recovery_restores_nothing_once_head_moved_on(versioned, db):
    head = git(versioned, "rev-parse", "HEAD").strip()
    (versioned / "config.toml").write_text(APPLIED)
    git(versioned, "add", "config.toml")
    git_as_user(versioned, "commit", "-q", "-m", "user commits the new value")
    (versioned / "config.toml").write_text(APPLIED)
    op = forged_apply_op(versioned / "config.toml", versioned, CONFIG, head)
    op["old_sha256"], op["new_sha256"] = sha(CONFIG), sha(APPLIED)
    add_improvement(db, [timeout_change()], pending_op=op)
    actions, lines = run_recover(versioned, db)
    assert actions[0]["action"] == "failed" and "refused to guess" in lines[0]
    assert (versioned / "config.toml").read_text() == APPLIED


def test_recovery_never_passes_a_recorded_revision_to_git(versioned, db, tmp_path):
    out = tmp_path / "written-by-git-log"
    op = forged_apply_op(versioned / "config.toml", versioned, CONFIG, f"--output={out}")
    imp = add_improvement(db, [timeout_change()], pending_op=op)
    actions, lines = run_recover(versioned, db)
    assert actions[0]["action"] == "failed" and "not a commit in the history of HEAD" in lines[0]
    assert not out.exists() and not list(tmp_path.glob("written-by-git-log*"))
    assert row(db, imp.id).status == "proposed"


def test_recovery_refuses_a_recorded_commit_without_our_trailers(versioned, db):
    head = git(versioned, "rev-parse", "HEAD").strip()
    op = {**forged_apply_op(versioned / "config.toml", versioned, CONFIG, head), "commit_sha": head}
    imp = add_improvement(db, [timeout_change()], pending_op=op)
    actions, lines = run_recover(versioned, db)
    assert actions[0]["action"] == "failed" and "trailers" in lines[0]
    assert row(db, imp.id).status == "proposed"  # not marked applied with the user's commit


def test_experiment_recovery_refuses_another_file_and_foreign_fields(versioned, db, victim):
    head = git(versioned, "rev-parse", "HEAD").strip()
    target = victim / "victim.txt"
    op = {**forged_apply_op(target, victim, "PWNED\n", git(victim, "rev-parse", "HEAD").strip()),
          "op": "experiment-start", "action": "canary", "finish": {"status": "canary"}, "sha_key": "commit_sha"}
    imp = add_improvement(db, [timeout_change()], pending_op=op)
    actions, lines = run_recover(versioned, db)
    assert actions[0]["action"] == "failed" and target.read_text() == "precious\n"
    # a real commit of ours, but the intent would set a status an experiment never sets
    op2 = {**forged_apply_op(versioned / "config.toml", versioned, CONFIG, head), "op": "experiment-start",
           "action": "canary", "finish": {"status": "verified"}, "sha_key": "commit_sha"}
    (versioned / "config.toml").write_text(APPLIED)
    git(versioned, "add", "config.toml")
    git(versioned, "-c", "user.name=x", "-c", "user.email=x@y", "commit", "-q", "-m",
        f"selfheal: canary\n\nSelf-Heal-Improvement: {imp.id}\nSelf-Heal-Action: canary\n")
    set_row(db, imp.id, pending_op=op2)
    actions, lines = run_recover(versioned, db)
    assert actions[0]["action"] == "failed" and "'verified'" in lines[0]
    assert row(db, imp.id).status == "proposed"


# ------------------------------------------------------------------ 1. rollback reverts only our commits


@pytest.fixture
def applied(versioned, db):
    imp = add_improvement(db, [timeout_change()])
    conn = connect(db)
    try:
        apply_improvement(conn, settings_for(versioned, db), imp.id)
    finally:
        conn.close()
    assert (versioned / "config.toml").read_text() == APPLIED
    return imp


def assert_rollback_refused(home: Path, db: Path, imp_id: str, match: str) -> None:
    head = git(home, "rev-parse", "HEAD")
    before = row(db, imp_id)
    conn = connect(db)
    try:
        with pytest.raises(UntrustedRecordError, match=match) as info:
            rollback_improvement(conn, settings_for(home, db), imp_id)
    finally:
        conn.close()
    assert "\n" not in str(info.value) and "nothing was changed" in str(info.value)
    assert git(home, "rev-parse", "HEAD") == head and git(home, "status", "--porcelain") == ""
    assert (home / "config.toml").read_text() == APPLIED
    after = row(db, imp_id)
    assert (after.status, after.pending_op, after.rollback_sha) == (before.status, None, None)


def test_rollback_refuses_a_commit_of_another_repository(versioned, db, applied, victim):
    set_row(db, applied.id, commit_sha=git(victim, "rev-parse", "HEAD").strip())
    assert_rollback_refused(versioned, db, applied.id, "is not in the repository")
    assert (victim / "victim.txt").read_text() == "precious\n"


def test_rollback_refuses_a_commit_without_our_trailers(versioned, db, applied):
    user_commit = git(versioned, "rev-parse", "HEAD~1").strip()  # the user's "my config"
    set_row(db, applied.id, commit_sha=user_commit)
    assert_rollback_refused(versioned, db, applied.id, "does not carry selfheal's trailers")


def test_rollback_refuses_a_commit_of_another_improvement(versioned, db, applied):
    other = add_improvement(db, [timeout_change(120000)], pattern_id="timeout:other")
    set_row(db, other.id, status="applied", commit_sha=row(db, applied.id).commit_sha,
            apply_record=row(db, applied.id).apply_record, applied_at=row(db, applied.id).applied_at)
    assert_rollback_refused(versioned, db, other.id, f"trailers for {other.id}")


def test_rollback_refuses_a_commit_not_reachable_from_head(versioned, db, applied):
    git(versioned, "checkout", "-q", "-b", "side")
    (versioned / "config.toml").write_text(APPLIED + "# side\n")
    git(versioned, "add", "config.toml")
    git(versioned, "-c", "user.name=x", "-c", "user.email=x@y", "commit", "-q", "-m",
        f"side\n\nSelf-Heal-Improvement: {applied.id}\nSelf-Heal-Action: apply\n")
    side = git(versioned, "rev-parse", "HEAD").strip()
    git(versioned, "checkout", "-q", "main")
    set_row(db, applied.id, commit_sha=side)
    assert_rollback_refused(versioned, db, applied.id, "not in the history of HEAD")


@pytest.mark.parametrize("bad", ["HEAD", "--output=/tmp/x", "0" * 40])
def test_rollback_refuses_what_is_not_a_full_commit_id(versioned, db, applied, bad):
    set_row(db, applied.id, commit_sha=bad)
    assert_rollback_refused(versioned, db, applied.id, "is not a commit id|is not in the repository")


def test_rollback_refuses_a_record_naming_another_file(versioned, db, applied, victim):
    record = {**row(db, applied.id).apply_record, "config_path": str(victim / "victim.txt")}
    set_row(db, applied.id, apply_record=record)
    assert_rollback_refused(versioned, db, applied.id, "as its config file.*moved or copied.*git revert")


def test_inverse_edit_refuses_recorded_edits_the_commit_did_not_make(versioned, db, applied):
    (versioned / "config.toml").write_text(APPLIED + "\n[servers.\"x\"]\nauto_restart = true\n")
    git(versioned, "add", "config.toml")
    git_as_user(versioned, "commit", "-q", "-m", "later edit")  # rollback must use the inverse edit
    record = row(db, applied.id).apply_record
    record["entries"].append({"path": ["self_heal", "auto_apply_enabled"], "op": "delete", "existed": True,
                              "old": True, "new": None})
    set_row(db, applied.id, apply_record=record)
    head = git(versioned, "rev-parse", "HEAD")
    conn = connect(db)
    try:
        with pytest.raises(UntrustedRecordError, match="self_heal.auto_apply_enabled"):
            rollback_improvement(conn, settings_for(versioned, db), applied.id)
    finally:
        conn.close()
    assert git(versioned, "rev-parse", "HEAD") == head and "[self_heal]" not in (versioned / "config.toml").read_text()
    assert row(db, applied.id).status == "applied"


def test_a_genuine_rollback_still_works(versioned, db, applied):
    conn = connect(db)
    try:
        out = rollback_improvement(conn, settings_for(versioned, db), applied.id)
    finally:
        conn.close()
    assert out["status"] == "rolled_back" and (versioned / "config.toml").read_text() == CONFIG


# ------------------------------------------------------------------ 2. compare-and-set, real processes


def spawn(*args: str, pause_at: str | None = None, pause_dir: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if pause_at:
        env.update(SELFHEAL_PAUSE_AT=pause_at, SELFHEAL_PAUSE_DIR=str(pause_dir))
    return subprocess.Popen([agent_bin(), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_reached(pause_dir: Path, step: str, proc: subprocess.Popen, limit: float = 300) -> None:
    """Until ``proc`` stands at ``step`` (a file it creates); fails if it ended instead."""
    deadline = time.monotonic() + limit
    while not (pause_dir / f"{step}.reached").exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended before {step} (exit {proc.returncode}): {err or out}")
        assert time.monotonic() < deadline, f"never reached {step}"
        time.sleep(0.01)


def go(pause_dir: Path, step: str) -> None:
    (pause_dir / f"{step}.go").touch()


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def assert_consistent(home: Path, db: Path, imp_id: str) -> None:
    """Row status agrees with config.toml and git."""
    state = row(db, imp_id)
    assert state.pending_op is None
    assert git(home, "status", "--porcelain") == ""
    ours = commits_of(home, imp_id)
    text = (home / "config.toml").read_text()
    if state.status == "applied":
        assert text == APPLIED and state.commit_sha in ours and git(home, "rev-parse", "HEAD").strip() in ours
    else:
        assert text == CONFIG and ours == []


def test_a_simulation_that_finishes_after_an_apply_does_not_overwrite_it(versioned, db, tmp_path):
    imp = add_improvement(db, [timeout_change()])
    pause = tmp_path / "pause"
    pause.mkdir()
    tester = spawn("self-heal", "test", imp.id, "--home", str(versioned), pause_at="before-conditional-write",
                   pause_dir=pause)
    wait_reached(pause, "before-conditional-write", tester)  # simulated, read "proposed", not yet written
    r = run_agent("self-heal", "apply", imp.id, "--yes", "--home", str(versioned))
    assert r.returncode == 0, r.stderr
    go(pause, "before-conditional-write")
    code, out, err = finish(tester)
    assert code == 1, (out, err)
    assert f"{imp.id} changed meanwhile (now applied); the test result was not stored" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    state = row(db, imp.id)
    assert state.status == "applied" and state.test_result is None
    assert_consistent(versioned, db, imp.id)


def test_reject_during_an_apply_loses_cleanly(versioned, db, tmp_path):
    imp = add_improvement(db, [timeout_change()])
    pause_a, pause_r = tmp_path / "a", tmp_path / "r"
    pause_a.mkdir()
    pause_r.mkdir()
    applier = spawn("self-heal", "apply", imp.id, "--yes", "--home", str(versioned), pause_at="after-write",
                    pause_dir=pause_a)
    wait_reached(pause_a, "after-write", applier)  # config written, lock held, row still "proposed"
    go(pause_r, "lock-busy")  # the rejecter only reports that it waits for the lock
    rejecter = spawn("self-heal", "reject", imp.id, "--yes", "--home", str(versioned), pause_at="lock-busy",
                     pause_dir=pause_r)
    wait_reached(pause_r, "lock-busy", rejecter)  # it read "proposed" and waits for the apply's lock
    go(pause_a, "after-write")
    code_a, _, err_a = finish(applier)
    code_r, out_r, err_r = finish(rejecter)
    assert code_a == 0, err_a
    assert code_r == 1, (out_r, err_r)
    assert f"{imp.id} changed meanwhile (now applied); nothing was changed" in err_r
    assert "Rejected" not in out_r and "Traceback" not in err_r
    assert row(db, imp.id).status == "applied"
    assert_consistent(versioned, db, imp.id)


def test_verify_that_finishes_after_a_rollback_does_not_overwrite_it(versioned, db, applied, tmp_path):
    pause = tmp_path / "pause"
    pause.mkdir()
    verifier = spawn("self-heal", "verify", applied.id, "--home", str(versioned), "--early",
                     pause_at="before-conditional-write", pause_dir=pause)
    wait_reached(pause, "before-conditional-write", verifier)
    r = run_agent("self-heal", "rollback", applied.id, "--yes", "--home", str(versioned))
    assert r.returncode == 0, r.stderr
    go(pause, "before-conditional-write")
    code, out, err = finish(verifier)
    assert code == 1 and f"{applied.id} changed meanwhile (now rolled_back)" in err, (out, err)
    state = row(db, applied.id)
    assert state.status == "rolled_back" and state.metrics is None
    assert (versioned / "config.toml").read_text() == CONFIG


def test_two_applies_at_once_make_one_commit(versioned, db, tmp_path):
    imp = add_improvement(db, [timeout_change()])
    pause_a, pause_b = tmp_path / "a", tmp_path / "b"
    pause_a.mkdir()
    pause_b.mkdir()
    first = spawn("self-heal", "apply", imp.id, "--yes", "--home", str(versioned), pause_at="after-commit",
                  pause_dir=pause_a)
    wait_reached(pause_a, "after-commit", first)  # committed, row not yet applied, lock held
    go(pause_b, "lock-busy")
    second = spawn("self-heal", "apply", imp.id, "--yes", "--home", str(versioned), pause_at="lock-busy",
                   pause_dir=pause_b)
    wait_reached(pause_b, "lock-busy", second)
    go(pause_a, "after-commit")
    code_a, _, err_a = finish(first)
    code_b, _, err_b = finish(second)
    assert code_a == 0, err_a
    assert code_b == 1 and f"{imp.id} changed meanwhile (now applied)" in err_b, err_b
    assert len(commits_of(versioned, imp.id)) == 1
    assert_consistent(versioned, db, imp.id)


def test_a_simulation_that_finishes_after_a_canary_start_does_not_overwrite_it(versioned, db, tmp_path):
    imp = add_improvement(db, [timeout_change()])
    pause = tmp_path / "pause"
    pause.mkdir()
    tester = spawn("self-heal", "test", imp.id, "--home", str(versioned), pause_at="before-conditional-write",
                   pause_dir=pause)
    wait_reached(pause, "before-conditional-write", tester)
    r = run_agent("self-heal", "test", imp.id, "--mode", "canary", "--home", str(versioned))
    assert r.returncode == 0, r.stderr
    go(pause, "before-conditional-write")
    code, out, err = finish(tester)
    assert code == 1 and f"{imp.id} changed meanwhile (now canary)" in err, (out, err)
    state = row(db, imp.id)
    assert state.status == "canary" and state.test_result is None and state.pending_op is None
    assert f"[canary.{imp.id}]" in (versioned / "config.toml").read_text()
    assert git(versioned, "status", "--porcelain") == ""
    assert state.experiment["commit_sha"] == git(versioned, "rev-parse", "HEAD").strip()


def test_promote_during_a_drop_loses_cleanly(versioned, db, tmp_path):
    imp = add_improvement(db, [timeout_change()])
    r = run_agent("self-heal", "test", imp.id, "--mode", "canary", "--home", str(versioned))
    assert r.returncode == 0, r.stderr
    pause_d, pause_p = tmp_path / "d", tmp_path / "p"
    pause_d.mkdir()
    pause_p.mkdir()
    dropper = spawn("self-heal", "canary", "drop", imp.id, "--yes", "--home", str(versioned),
                    pause_at="experiment-end-after-write", pause_dir=pause_d)
    wait_reached(pause_d, "experiment-end-after-write", dropper)
    go(pause_p, "lock-busy")
    promoter = spawn("self-heal", "canary", "promote", imp.id, "--yes", "--home", str(versioned), pause_at="lock-busy",
                     pause_dir=pause_p)
    wait_reached(pause_p, "lock-busy", promoter)
    go(pause_d, "experiment-end-after-write")
    code_d, _, err_d = finish(dropper)
    code_p, out_p, err_p = finish(promoter)
    assert code_d == 0, err_d
    assert code_p == 1 and f"{imp.id} changed meanwhile (now proposed)" in err_p, (out_p, err_p)
    state = row(db, imp.id)
    assert state.status == "proposed" and state.pending_op is None and state.commit_sha is None
    assert (versioned / "config.toml").read_text() == CONFIG and git(versioned, "status", "--porcelain") == ""


def test_conditional_update_in_process(versioned, db):
    imp = add_improvement(db, [timeout_change()])
    conn = connect(db)
    try:
        store = ImprovementStore(conn)
        stale = store.get(imp.id)
        reject_improvement(conn, settings_for(versioned, db), imp.id)
        from selfheal_plugin.lifecycle.apply import update_if_unchanged
        with pytest.raises(ChangedMeanwhileError, match=r"changed meanwhile \(now rejected\)"):
            update_if_unchanged(store, settings_for(versioned, db), stale, status="tested")
        assert store.get(imp.id).status == "rejected"
    finally:
        conn.close()


# ------------------------------------------------------------------ 3. apply refuses what it must not write


def apply_refused(home: Path, db: Path, match: str, exc=SelfHealError):
    imp = add_improvement(db, [timeout_change()])
    conn = connect(db)
    try:
        with pytest.raises(exc, match=match) as info:
            apply_improvement(conn, settings_for(home, db), imp.id)
    finally:
        conn.close()
    assert "\n" not in str(info.value)
    state = row(db, imp.id)
    assert (state.status, state.pending_op, state.commit_sha) == ("proposed", None, None)
    return imp


def test_apply_refuses_a_detached_head(versioned, db):
    git(versioned, "checkout", "-q", "--detach")
    head = git(versioned, "rev-parse", "HEAD")
    apply_refused(versioned, db, "detached HEAD", GitOpsError)
    assert git(versioned, "rev-parse", "HEAD") == head and (versioned / "config.toml").read_text() == CONFIG


def test_apply_refuses_a_read_only_config(versioned, db):
    cfg = versioned / "config.toml"
    cfg.chmod(0o444)
    try:
        apply_refused(versioned, db, "read-only", GitOpsError)
        assert cfg.read_text() == CONFIG and (cfg.stat().st_mode & 0o777) == 0o444
    finally:
        cfg.chmod(0o644)


def test_canary_start_refuses_a_read_only_config(versioned, db):
    from selfheal_plugin.lifecycle.canary import test_experiment
    cfg = versioned / "config.toml"
    cfg.chmod(0o444)
    imp = add_improvement(db, [timeout_change()])
    conn = connect(db)
    try:
        with pytest.raises(GitOpsError, match="read-only"):
            test_experiment(conn, settings_for(versioned, db), imp.id, "canary")
    finally:
        conn.close()
        cfg.chmod(0o644)
    assert cfg.read_text() == CONFIG and row(db, imp.id).status == "proposed"


def test_apply_refuses_a_directory_at_config_toml(binks_home):
    db = binks_home / "conversations.db"
    connect(db, create=True).close()
    (binks_home / "config.toml").mkdir()
    apply_refused(binks_home, db, "not a regular file")


def test_apply_refuses_a_dangling_symlink_out_of_the_home(binks_home, tmp_path):
    db = binks_home / "conversations.db"
    connect(db, create=True).close()
    (binks_home / "config.toml").symlink_to(tmp_path / "elsewhere" / "config.toml")
    apply_refused(binks_home, db, "outside BINKS_HOME|does not exist")
    assert not (tmp_path / "elsewhere").exists()


def test_apply_refuses_an_unsafe_repository_in_one_line(versioned, db, monkeypatch):
    monkeypatch.setenv("GIT_TEST_ASSUME_DIFFERENT_OWNER", "1")
    apply_refused(versioned, db, "git refuses the repository at .*dubious ownership", GitOpsError)
    monkeypatch.delenv("GIT_TEST_ASSUME_DIFFERENT_OWNER")
    assert (versioned / "config.toml").read_text() == CONFIG
    assert git(versioned, "status", "--porcelain") == ""


def test_cli_apply_in_an_unsafe_repository_is_one_line(versioned, db):
    imp = add_improvement(db, [timeout_change()])
    r = run_agent("self-heal", "apply", imp.id, "--yes", "--home", str(versioned),
                  env={"GIT_TEST_ASSUME_DIFFERENT_OWNER": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "dubious ownership" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert row(db, imp.id).status == "proposed"


def test_a_fifo_at_config_toml_never_blocks(binks_home):
    db = binks_home / "conversations.db"
    connect(db, create=True).close()
    os.mkfifo(binks_home / "config.toml")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_config(binks_home / "config.toml")
    # every command: nothing writes the FIFO, so a blocking open would hang until the timeout
    for args in (("self-heal", "improvements"), ("self-heal", "detect")):
        r = run_agent(*args, "--home", str(binks_home), timeout=120)
        assert r.returncode != 0 and "not a regular file" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_invalid_utf8_in_config_is_like_invalid_toml(binks_home, db):
    (binks_home / "config.toml").write_bytes(b'model = "m\xff"\n')
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_config(binks_home / "config.toml")
    for args in (("self-heal", "improvements"), ("self-heal", "detect")):
        r = run_agent(*args, "--home", str(binks_home))
        assert r.returncode == 1 and "not valid TOML" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ properties: any row, any config bytes


def test_any_forged_intent_writes_nothing_outside_the_home_config(tmp_path_factory):
    """Whatever a row's pending_op holds, recovery raises nothing but reports, and no file
    but the home's config.toml (with text git has) is ever written."""
    from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

    base = tmp_path_factory.mktemp("forged")
    home = base / "binks"
    home.mkdir()
    (home / "config.toml").write_text(CONFIG)
    git(home, "init", "-q", "-b", "main")
    (home / ".gitignore").write_text("conversations.db*\n/selfheal/\n")
    git(home, "add", "config.toml", ".gitignore")
    git_as_user(home, "commit", "-q", "-m", "my config")
    other = base / "other"
    other.mkdir()
    git(other, "init", "-q", "-b", "main")
    (other / "victim.txt").write_text("precious\n")
    git(other, "add", "victim.txt")
    git_as_user(other, "commit", "-q", "-m", "victim")
    db = home / "conversations.db"
    connect(db, create=True).close()
    watched = [other / "victim.txt", other / ".git" / "config", home / ".git" / "config", home / ".gitignore"]
    before = snapshot(*watched)
    heads = [git(home, "rev-parse", "HEAD").strip(), git(other, "rev-parse", "HEAD").strip()]
    paths = [str(home / "config.toml"), str(other / "victim.txt"), str(other / ".git" / "config"),
             str(home / ".git" / "config"), str(home / ".." / "other" / "victim.txt"), "config.toml", "/dev/null"]
    texts = st.one_of(st.none(), st.sampled_from([CONFIG, APPLIED, "PWNED\n"]), st.text(max_size=30))
    trap = base / "written-by-git"
    revs = st.one_of(st.none(), st.sampled_from(heads + ["HEAD", f"--output={trap}", "0" * 40]), st.text(max_size=12))
    anything = st.one_of(st.none(), st.integers(), st.text(max_size=10), st.lists(st.integers(), max_size=2))
    record = st.fixed_dictionaries({}, optional={
        "config_path": st.one_of(st.sampled_from(paths), anything), "real_path": st.sampled_from(paths),
        "repo": st.sampled_from([str(home), str(other), "/"]), "entries": st.one_of(st.just([]), anything)})
    op = st.fixed_dictionaries({"op": st.sampled_from(["apply", "rollback", "experiment-start", "experiment-end",
                                                       "rm -rf", None])}, optional={
        "record": st.one_of(record, anything), "old_text": texts, "head_before": revs, "commit_sha": revs,
        "old_sha256": st.one_of(st.none(), st.sampled_from([sha(CONFIG), sha(APPLIED), sha("PWNED\n")])),
        "new_sha256": st.sampled_from([sha(CONFIG), sha(APPLIED)]), "started_at": anything,
        "action": st.sampled_from(["canary", "shadow-end", "apply", "x"]),
        "finish": st.one_of(anything, st.fixed_dictionaries({"status": st.sampled_from(STATUSES)})),
        "sha_key": st.sampled_from(["commit_sha", "status"])})

    @hsettings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(pending=st.one_of(op, anything))
    def check(pending):
        (home / "config.toml").write_text(APPLIED)
        imp = add_improvement(db, [timeout_change()], pending_op=pending)
        try:
            _, lines = run_recover(home, db)
            assert all("\n" not in line for line in lines)
            assert snapshot(*watched) == before
            assert (home / "config.toml").read_text() in (CONFIG, APPLIED)
            assert not list(base.glob("written-by-git*"))
            state = row(db, imp.id)
            assert state.status in ("proposed", "canary", "shadow", "tested")  # never applied without our commit
        finally:
            set_row(db, imp.id, pending_op=None, status="rejected")
            git(home, "checkout", "-q", "--", "config.toml")

    check()


def test_any_config_bytes_are_parsed_or_one_config_error(tmp_path):
    from hypothesis import given, settings as hsettings, strategies as st

    path = tmp_path / "config.toml"

    @hsettings(max_examples=200, deadline=None)
    @given(data=st.one_of(st.binary(max_size=200),
                          st.text(max_size=100).map(lambda t: ("[self_heal]\nx = \"" + t + "\"\n").encode())))
    def check(data):
        path.write_bytes(data)
        try:
            read_config(path)
        except ConfigError as exc:
            assert str(exc).startswith(str(path))

    check()
