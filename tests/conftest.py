"""Every test runs with a temp HOME, BINKS_HOME and INBOX_PATH, and git isolated from the
machine's configuration, so nothing touches the real ~/.binks, ~/.notes or ~/.gitconfig."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from selfheal_plugin.testbed.generator import generate_history

NOW = datetime(2026, 11, 20, 12, 0, 0, tzinfo=timezone.utc)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    home = tmp_path / "user-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("BINKS_HOME", str(tmp_path / "binks"))
    monkeypatch.setenv("INBOX_PATH", str(tmp_path / "inbox"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL",
                "SELFHEAL_LOG", "RUST_LOG"):
        monkeypatch.delenv(var, raising=False)
    yield


@pytest.fixture
def binks_home(tmp_path) -> Path:
    path = tmp_path / "binks"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def sample_history(tmp_path_factory) -> tuple[Path, dict]:
    """A generated history (seed 7, 400 runs over the week before NOW) and its truth.

    Session-scoped and read-only: tests that write must copy it (see ``history_copy``)."""
    path = tmp_path_factory.mktemp("hist") / "conversations.db"
    truth = generate_history(path, seed=7, runs=400, end=NOW)
    return path, truth


@pytest.fixture
def history_copy(sample_history, binks_home) -> tuple[Path, dict]:
    src, truth = sample_history
    dst = binks_home / "conversations.db"
    shutil.copy(src, dst)
    return dst, truth


def agent_bin() -> str:
    """The installed console script next to this interpreter."""
    exe = Path(sys.executable).parent / "agent"
    if not exe.exists():
        found = shutil.which("agent")
        if not found:
            pytest.fail("the `agent` console script is not installed (pip install -e '.[test]')")
        return found
    return str(exe)


def run_agent(*args: str, env: dict | None = None, timeout: float = 120, input: str | None = None
              ) -> subprocess.CompletedProcess:
    """Run the installed `agent` command with the test's isolated environment."""
    return subprocess.run([agent_bin(), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, input=input)
