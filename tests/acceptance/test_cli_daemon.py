"""`agent self-heal-daemon` as the installed console script: hooks failures written by
another process, refuses a second daemon, stops cleanly on SIGTERM/SIGINT."""
import json
import signal
import subprocess
import textwrap

import pytest

from ..conftest import agent_bin, run_agent
from ..watchsupport import failed_ids, new_history, wait_until, write_runs

RECORD_PLUGIN = """
import os
from selfheal_plugin import hookimpl

@hookimpl
def run_failed(run, settings):
    with open(os.path.join(str(settings.home), "hooked.log"), "a") as fh:
        fh.write(run["id"] + "\\n")
"""


@pytest.fixture
def home(binks_home):
    new_history(binks_home / "conversations.db")
    plugins = binks_home / "selfheal" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "record_failed.py").write_text(textwrap.dedent(RECORD_PLUGIN))
    return binks_home


def hooked(home) -> list[str]:
    log = home / "hooked.log"
    return log.read_text().split() if log.exists() else []


def stacks(proc, stderr) -> str:
    """The daemon's log with every thread's stack (SIGUSR1). faulthandler writes the threads
    one after the other, so it waits for two at least (the main thread and the watcher's)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGUSR1)
        wait_until(lambda: stderr.read_text().count("(most recent call first)") >= 2)
    return stderr.read_text()


def start_daemon(home, tmp_path, *args):
    err = open(tmp_path / "daemon.err", "w")
    proc = subprocess.Popen([agent_bin(), "self-heal-daemon", "--home", str(home), *args],
                            stdout=subprocess.PIPE, stderr=err, text=True)
    err.close()
    stderr = tmp_path / "daemon.err"
    assert wait_until(lambda: "tick at" in stderr.read_text() or proc.poll() is not None), stderr.read_text()
    assert proc.poll() is None, stderr.read_text()
    return proc, stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_daemon_hooks_failures_refuses_a_second_one_and_stops_cleanly(home, tmp_path, sig):
    proc, stderr = start_daemon(home, tmp_path, "--interval", "1h")
    try:
        second = run_agent("self-heal-daemon", "--home", str(home), "--once")
        assert second.returncode == 1
        assert "another self-heal daemon is already running" in second.stderr
        assert f"(pid {proc.pid})" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1

        expected = failed_ids(write_runs(home / "conversations.db", "--runs", "12", "--journal", "wal"))
        assert wait_until(lambda: set(hooked(home)) >= expected), stacks(proc, stderr)

        proc.send_signal(sig)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 0, stderr.read_text()
    log = stderr.read_text()
    assert f"received {sig.name}: stopping" in log and "self-heal daemon stopped" in log
    assert "Traceback" not in log
    assert sorted(hooked(home)) == sorted(expected)  # each failed run once
    # the lock is free again: a new daemon runs, and hooks nothing twice
    again = run_agent("self-heal-daemon", "--home", str(home), "--once", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["hooked_runs"] == []
    assert sorted(hooked(home)) == sorted(expected)


def test_once_hooks_what_was_written_while_no_daemon_ran(home):
    first = run_agent("self-heal-daemon", "--home", str(home), "--once", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["initialized"] is True
    expected = failed_ids(write_runs(home / "conversations.db", "--runs", "8"))
    res = run_agent("self-heal-daemon", "--home", str(home), "--once", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert sorted(data["hooked_runs"]) == sorted(expected)
    assert set(data["tick"]) >= {"patterns", "verified", "rolled_back", "applied", "errors"}
    text = run_agent("self-heal-daemon", "--home", str(home), "--once")
    assert text.returncode == 0 and "Hooked 0 failed run(s)" in text.stdout


def test_once_prints_its_round_once(home):
    """The round --once prints on stdout is not repeated as a log line on stderr."""
    res = run_agent("self-heal-daemon", "--home", str(home), "--once")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("Round at ") == 1
    assert "tick at" not in res.stderr


@pytest.mark.parametrize("args, message", [
    (["--interval", "0"], "invalid interval '0'"),
    (["--interval", "1x"], "invalid interval '1x'"),
    (["--watch", "inotify"], "Invalid value for '--watch'"),
])
def test_bad_options_exit_2(home, args, message):
    res = run_agent("self-heal-daemon", "--home", str(home), "--once", *args)
    assert res.returncode == 2
    assert message in res.stderr


def test_bad_watch_mode_in_the_environment_exits_2(home):
    res = run_agent("self-heal-daemon", "--home", str(home), "--once", env={"SELFHEAL_WATCH": "inotify"})
    assert res.returncode == 2 and "SELFHEAL_WATCH" in res.stderr


def test_missing_history_is_one_line_and_creates_nothing(tmp_path):
    home = tmp_path / "nowhere"
    res = run_agent("self-heal-daemon", "--home", str(home), "--once")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [f"Error: no run history at {home / 'conversations.db'} "
                                               "(use --home, --db or BINKS_HOME)"]
    assert not home.exists()


SLOW_PROPOSAL_PLUGIN = """
import os, time
from selfheal_plugin import hookimpl

@hookimpl
def improvement_proposed(improvement, settings):
    with open(os.path.join(str(settings.home), "proposed.log"), "a") as fh:
        fh.write(improvement.id + "\\n")
    time.sleep(60)  # a slow reaction to each proposal: the tick's detection step takes long
"""


def test_sigterm_during_a_long_tick_stops_between_patterns(binks_home, tmp_path):
    from datetime import datetime, timezone

    from selfheal_plugin.testbed.generator import generate_history

    # the daemon runs on the wall clock: the history must end now to be in its lookback
    generate_history(binks_home / "conversations.db", seed=7, runs=300, end=datetime.now(timezone.utc))
    plugins = binks_home / "selfheal" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "slow_proposal.py").write_text(textwrap.dedent(SLOW_PROPOSAL_PLUGIN))
    log = binks_home / "proposed.log"
    err = open(tmp_path / "daemon.err", "w")
    proc = subprocess.Popen([agent_bin(), "self-heal-daemon", "--home", str(binks_home), "--auto-detect"],
                            stdout=subprocess.PIPE, stderr=err, text=True)
    err.close()
    try:
        assert wait_until(lambda: log.exists() or proc.poll() is not None), (tmp_path / "daemon.err").read_text()
        assert proc.poll() is None, (tmp_path / "daemon.err").read_text()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)  # a hang, not a speed limit: how soon it stops is shown below
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "daemon.err").read_text()
    assert rc == 0 and "Traceback" not in text, text
    assert "received SIGTERM: stopping" in text and "self-heal daemon stopped" in text
    # one proposal was being handled when the signal came; the other patterns were not
    # proposed for (the whole tick would have taken a minute per pattern: long enough that a
    # busy machine cannot delay the signal past the first, and the daemon abandons the hook)
    assert len(log.read_text().split()) == 1, text
    assert "(stopped early)" in text


def test_sigusr1_writes_every_threads_stack_and_the_daemon_goes_on(home, tmp_path):
    proc, stderr = start_daemon(home, tmp_path, "--interval", "1h")
    try:
        text = stacks(proc, stderr)
        assert text.count("(most recent call first)") >= 2, text
        assert proc.poll() is None  # still running
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, stderr.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
