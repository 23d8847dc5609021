"""Every test runs with a temp HOME, BINKS_HOME and INBOX_PATH, and git isolated from the
machine's configuration, so nothing touches the real ~/.binks, ~/.notes or ~/.gitconfig.

Two layers: the whole session (set below when this file is imported, before any test module,
fixture or plugin of ours is loaded, so module- and session-scoped fixtures and every
subprocess they start are isolated too) and each test (``isolated_env``, fresh directories)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

# What the session isolates: the variables that choose where user files live.
GIT_IDENTITY = ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL")
SESSION_UNSET = (*GIT_IDENTITY, "SELFHEAL_LOG", "RUST_LOG", "SELFHEAL_MCP_TOKEN", "GIT_DIR", "GIT_WORK_TREE",
                 "GIT_INDEX_FILE")
XDG_DIRS = {"XDG_CONFIG_HOME": ".config", "XDG_DATA_HOME": ".local/share", "XDG_STATE_HOME": ".local/state",
            "XDG_CACHE_HOME": ".cache"}


def isolate_session() -> tuple[Path, dict[str, str | None]]:
    """Point HOME, BINKS_HOME, INBOX_PATH, the XDG folders and git's global config into a
    fresh temporary directory for the rest of the process; returns it and what was there."""
    root = Path(tempfile.mkdtemp(prefix="selfheal-tests-"))
    home = root / "home"
    env = {"HOME": str(home), "BINKS_HOME": str(root / "binks"), "INBOX_PATH": str(root / "inbox"),
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": str(home / ".gitconfig"),
           **{var: str(home / sub) for var, sub in XDG_DIRS.items()}}
    saved = {var: os.environ.get(var) for var in (*env, *SESSION_UNSET)}
    for sub in XDG_DIRS.values():
        (home / sub).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)
    for var in SESSION_UNSET:
        os.environ.pop(var, None)
    return root, saved


SESSION_ROOT, _SAVED_ENV = isolate_session()

from selfheal_plugin.testbed.generator import generate_history  # after the isolation, on purpose  # noqa: E402

NOW = datetime(2026, 11, 20, 12, 0, 0, tzinfo=timezone.utc)


def pytest_unconfigure(config):
    """Give the process its environment back and remove the session's home."""
    for var, value in _SAVED_ENV.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    shutil.rmtree(SESSION_ROOT, ignore_errors=True)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    home = tmp_path / "user-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("BINKS_HOME", str(tmp_path / "binks"))
    monkeypatch.setenv("INBOX_PATH", str(tmp_path / "inbox"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
    for var, sub in XDG_DIRS.items():
        monkeypatch.setenv(var, str(home / sub))
    for var in SESSION_UNSET:
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
    """Run the installed `agent` command with the test's isolated environment. The terminal's
    size is the test's to give (``env``): an xdist worker has ``COLUMNS=80`` of its own, a plain
    pytest run none, and a command wraps differently with it."""
    inherited = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run([agent_bin(), *args], capture_output=True, text=True, timeout=timeout,
                          env={**inherited, **(env or {})}, input=input)


# ------------------------------------------------------------------ scheduling under xdist
# The closed loops mostly wait: their workloads sleep through simulated time on real MCP
# servers (the closed-loop modules, the demo's among them, hold ~430 s of wall time for ~70 s
# of CPU). So `-n auto` starts two workers per core and one more (a worker that waits leaves
# its core to the others: 4-5 min on 2 cores against 7-8 with one worker per core, see
# docs/performance.md), pyproject's addopts hand out whole modules (`--dist loadfile`, so a module-scoped
# fixture is built once) in the order below, and the closed loops come first, so that the
# short tests fill the cores around them rather than after them.
#
# The closed loops keep their timing, though: a call's outcome there is a race in real time
# (a stall of 30 ms is 3 simulated seconds at their time scale), so a worker lowers its own
# priority (nice) before its first other test. Those then use what the closed loops leave of
# the cores instead of delaying their servers' answers. Every worker starts with a closed-loop
# module while any is left (they come first), so no closed loop runs on a lowered worker.
OTHER_TESTS_NICE = 10
MAX_WORKERS = 16  # past this the demo's module (~2.5 min) is the suite's length anyway; a worker is ~200 MB
_lowered = False


def pytest_xdist_auto_num_workers(config):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(2 * cores + 1, MAX_WORKERS)


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("closed_loop") is None)  # stable: the rest keep their order


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    global _lowered
    if not _lowered and "PYTEST_XDIST_WORKER" in os.environ and hasattr(os, "nice") \
            and item.get_closest_marker("closed_loop") is None:
        os.nice(OTHER_TESTS_NICE)
        _lowered = True
