"""The suite never touches the user's files: not from a test, and not from a module- or
session-scoped fixture (which run outside the per-test ``isolated_env``)."""
from __future__ import annotations

import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from selfheal_plugin.history.settings import inbox_dir, resolve_home

from .conftest import SESSION_ROOT, XDG_DIRS

ACCOUNT_HOME = Path(pwd.getpwuid(os.getuid()).pw_dir)


def where_files_go() -> dict[str, Path]:
    """Every place selfheal, git or an XDG program would put a user's file right now."""
    found = {"HOME": Path(os.environ["HOME"]), "Path.home()": Path.home(), "expanduser": Path("~").expanduser(),
             "BINKS_HOME": resolve_home(None), "INBOX_PATH": inbox_dir(),
             "GIT_CONFIG_GLOBAL": Path(os.environ.get("GIT_CONFIG_GLOBAL", "~/.gitconfig")).expanduser()}
    found.update({var: Path(os.environ.get(var, f"~/{sub}")).expanduser() for var, sub in XDG_DIRS.items()})
    return found


def assert_isolated(places: dict[str, Path], under: Path) -> None:
    for name, place in places.items():
        assert place.resolve().is_relative_to(under.resolve()), (name, place, under)
        # (the account's home from the password database, whatever $HOME said at the start)
        assert not place.resolve().is_relative_to(ACCOUNT_HOME.resolve()) or under.resolve().is_relative_to(
            ACCOUNT_HOME.resolve()), (name, place)
    assert os.environ.get("GIT_CONFIG_NOSYSTEM") == "1"


@pytest.fixture(scope="module")
def seen_by_a_module_fixture() -> dict[str, Path]:
    return where_files_go()


@pytest.fixture(scope="session")
def seen_by_a_session_fixture() -> dict[str, Path]:
    return where_files_go()


def test_module_and_session_fixtures_are_isolated(seen_by_a_module_fixture, seen_by_a_session_fixture):
    assert_isolated(seen_by_a_module_fixture, SESSION_ROOT)
    assert_isolated(seen_by_a_session_fixture, SESSION_ROOT)


def test_each_test_gets_its_own_directories(tmp_path):
    assert_isolated(where_files_go(), tmp_path)


def test_a_subprocess_inherits_the_isolation(tmp_path):
    code = "import os, pathlib; print(pathlib.Path.home()); print(os.environ['INBOX_PATH'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert Path(out[0]).is_relative_to(tmp_path) and Path(out[1]).is_relative_to(tmp_path)


def test_git_sees_no_configuration_of_the_machine(tmp_path):
    """No user.name from ~/.gitconfig or /etc/gitconfig reaches the tests' commits."""
    out = subprocess.run(["git", "config", "--list", "--show-origin"], capture_output=True, text=True, cwd=tmp_path)
    assert "file:" not in out.stdout, out.stdout
