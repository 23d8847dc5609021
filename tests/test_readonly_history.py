"""A history (or home) this user cannot write is one line, never a traceback, and apply
refuses it before it creates a repository or a commit.

Tests run as root in CI, and root writes a chmod 444 file anyway: here the history is
opened with SQLite's ``mode=ro`` (which binds root too) in place of the file the command
names, which is what SQLite does for a user who may only read it. A home folder root cannot
be kept out of is tested through the decision (:func:`gitops.can_write_in`). The same
commands were checked by hand as an unprivileged process (``setpriv`` without
CAP_DAC_OVERRIDE) on a chmod 444 history, a chmod 555 home and a WAL history in a chmod 555
folder.
"""
from __future__ import annotations

import os
import sqlite3
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from selfheal_plugin.cli.main import agent
from selfheal_plugin.errors import HistoryError
from selfheal_plugin.history.connection import check_writable, connect, create_runtime_schema
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.lifecycle import gitops
from selfheal_plugin.lifecycle.apply import apply_improvement
from selfheal_plugin.lifecycle.gitops import GitOpsError

from .conftest import NOW
from .lifecycle_data import add_improvement, rate_runs, settings_for, timeout_change, write_runs

SINCE = (NOW - timedelta(days=7)).isoformat()
REAL_CONNECT = sqlite3.connect


def read_only(monkeypatch, db: Path) -> None:
    """Every connection to ``db`` from now on is read-only, as for a user who may only read it."""
    target = os.path.realpath(db)

    def connect_ro(database, *args, **kwargs):
        if isinstance(database, (str, os.PathLike)) and os.path.realpath(database) == target:
            kwargs["uri"] = True
            return REAL_CONNECT(f"file:{target}?mode=ro", *args, **kwargs)
        return REAL_CONNECT(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect_ro)


def run(*args: str):
    return CliRunner().invoke(agent, ["self-heal", *args])


def one_line_readonly(res, db: Path) -> None:
    assert res.exit_code == 1, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output
    assert f"Error: the history is read-only ({db})" in res.output and "nothing was changed" in res.output


@pytest.fixture
def analysed(binks_home):
    """A history that was analysed (our tables, an index up to date), with a proposal, and then
    got new events that the index has not seen."""
    db = binks_home / "conversations.db"
    write_runs(db, rate_runs(NOW - timedelta(days=6), NOW - timedelta(days=1), 60, 0.3))
    res = run("detect", "--since", SINCE, "--home", str(binks_home))
    assert res.exit_code == 0, res.output
    imp = add_improvement(db, [timeout_change()])
    write_runs(db, rate_runs(NOW - timedelta(hours=20), NOW - timedelta(hours=1), 10, 0.5, seed=1))
    return binks_home, db, imp


@pytest.mark.parametrize("args", [["detect", "--since", SINCE], ["detect", "--since", SINCE, "--json"], ["learn"],
                                  ["test", "{id}"], ["reject", "{id}", "--yes"], ["apply", "{id}", "--yes"]])
def test_a_command_that_must_write_a_read_only_history_is_one_line(analysed, monkeypatch, args):
    home, db, imp = analysed
    config_before = (home / "config.toml").exists()
    read_only(monkeypatch, db)
    res = run(*[a.format(id=imp.id) for a in args], "--home", str(home))
    one_line_readonly(res, db)
    if "--json" in args:
        assert "{" not in res.stdout
    assert not (home / ".git").exists() and (home / "config.toml").exists() == config_before
    monkeypatch.undo()
    assert ImprovementStore(connect(db)).get(imp.id).status == "proposed"


def test_a_never_analysed_read_only_history_is_not_called_a_foreign_file(binks_home, monkeypatch):
    db = binks_home / "conversations.db"
    conn = REAL_CONNECT(str(db), isolation_level=None)
    create_runtime_schema(conn)  # the runtime's tables only: ours would be added on first use
    conn.close()
    read_only(monkeypatch, db)
    res = run("detect", "--home", str(binks_home))
    one_line_readonly(res, db)
    assert "not a run-history database" not in res.output


def test_reading_works_when_the_index_is_current(analysed, monkeypatch):
    home, db, imp = analysed
    res = run("show", f"timeout:{imp.tool_name}", "--since", SINCE, "--home", str(home))  # index brought up to date
    assert res.exit_code == 0, res.output
    read_only(monkeypatch, db)
    for args in (["show", f"timeout:{imp.tool_name}", "--since", SINCE], ["improvements"], ["dashboard"]):
        res = run(*args, "--home", str(home))
        assert res.exit_code == 0, (args, res.output, res.exception)


def test_check_writable_refuses_a_read_only_connection_and_writes_nothing(binks_home, monkeypatch):
    db = binks_home / "conversations.db"
    connect(db, create=True).close()
    conn = connect(db)
    check_writable(conn)  # writable: passes, and leaves no row behind
    assert conn.execute("SELECT count(*) FROM selfheal_state WHERE key = 'write-check'").fetchone()[0] == 0
    conn.close()
    read_only(monkeypatch, db)
    conn = connect(db)
    with pytest.raises(HistoryError, match=r"the history is read-only \(.*conversations.db\)"):
        check_writable(conn)
    assert not conn.in_transaction


@pytest.mark.parametrize("versioned", [False, True])
def test_apply_refuses_a_home_it_cannot_write_before_any_repository_or_commit(binks_home, monkeypatch, versioned):
    db = binks_home / "conversations.db"
    connect(db, create=True).close()
    (binks_home / "config.toml").write_text("# mine\n")
    if versioned:
        settings = settings_for(binks_home, db)
        gitops.ensure_repo(gitops.locate(settings.config_path, settings.home))
    head = gitops.head_sha(gitops.locate(binks_home / "config.toml", binks_home))
    imp = add_improvement(db, [timeout_change()])
    refused = os.path.realpath(binks_home / ".git" if versioned else binks_home)  # a chmod 555 .git, or home
    real = gitops.can_write_in
    monkeypatch.setattr(gitops, "can_write_in", lambda folder: os.path.realpath(folder) != refused and real(folder))
    conn = connect(db)
    try:
        with pytest.raises(GitOpsError, match=r"the home is read-only for this user \("):
            apply_improvement(conn, settings_for(binks_home, db), imp.id)
        assert ImprovementStore(conn).get(imp.id).pending_op is None
    finally:
        conn.close()
    assert (binks_home / ".git").exists() == versioned
    assert gitops.head_sha(gitops.locate(binks_home / "config.toml", binks_home)) == head
    assert (binks_home / "config.toml").read_text() == "# mine\n"
