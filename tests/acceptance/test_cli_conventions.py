"""CLI conventions of issue 15, through the installed `agent`: help and version at every
level, global options on either side of the subcommand, tables that fit an 80-column
terminal, confirmation before every state change, --check exit codes, the subject line of
selfheal's commits, p-values as people read them, `plugins` columns, the MCP server's exit
on SIGTERM (stdio and HTTP)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from selfheal_plugin.cli.common import format_p
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.lifecycle.gitops import commit_subject

from ..conftest import NOW, agent_bin, run_agent
from ..lifecycle_data import add_improvement, git, timeout_change, timeout_history
from ..mcp_helpers import start_http_server
from .test_cli_plugins import HANGING_PROPOSE

LEVELS = [[], ["self-heal"], ["self-heal", "detect"], ["self-heal", "apply"], ["self-heal", "canary"],
          ["self-heal", "canary", "drop"], ["self-heal", "improvements"], ["self-heal-daemon"]]


@pytest.fixture
def db(binks_home):
    path = binks_home / "conversations.db"
    timeout_history(path, NOW, runs=150, seed=5)
    return path


def status(db, imp_id):
    return ImprovementStore(connect(db)).get(imp_id).status


@pytest.mark.parametrize("level", LEVELS, ids=lambda lv: " ".join(lv) or "agent")
def test_help_and_version_at_every_level(level):
    short = run_agent(*level, "-h")
    assert short.returncode == 0 and short.stdout.startswith("Usage: agent"), short.stderr
    assert run_agent(*level, "--help").stdout == short.stdout
    version = run_agent(*level, "--version")
    assert version.returncode == 0 and version.stdout.startswith("selfheal, version "), version.stderr


def test_global_options_before_or_after_the_subcommand(db, binks_home):
    imp = add_improvement(db, [timeout_change(90_000)])
    before = run_agent("self-heal", "--json", "--home", str(binks_home), "improvements")
    after = run_agent("self-heal", "improvements", "--json", "--home", str(binks_home))
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert json.loads(before.stdout) == json.loads(after.stdout)
    assert [r["id"] for r in json.loads(before.stdout)["improvements"]] == [imp.id]
    mixed = run_agent("self-heal", "--db", str(db), "improvements", "--json", env={"BINKS_HOME": "/nonexistent"})
    assert mixed.returncode == 0 and json.loads(mixed.stdout)["improvements"]


def test_global_options_go_where_the_help_and_docs_say(db, binks_home):
    """After `agent self-heal` or after a nested command's own words, never between a group
    and its command; the group's help points to them where they are printed (below)."""
    home = str(binks_home)
    assert run_agent("self-heal", "--json", "--home", home, "ab", "status").returncode == 0
    after = run_agent("self-heal", "ab", "status", "--json", "--home", home)
    assert after.returncode == 0 and json.loads(after.stdout) == {"experiments": []}
    for between in (["ab", "--json", "status"], ["canary", "--home", home, "promote", "imp-x"]):
        assert run_agent("self-heal", *between).returncode == 2, between
    help_text = run_agent("self-heal", "--help", env={"COLUMNS": "80"}).stdout
    intro, options = help_text.split("Options:", 1)
    intro = " ".join(intro.split())
    assert "options above" not in intro and "The options below may also follow the command" in intro
    assert all(f"{opt} " in options for opt in ("--home", "--db", "--json"))


def test_json_is_indented_at_a_terminal_and_one_line_when_piped(db, binks_home):
    import pty

    piped = run_agent("self-heal", "improvements", "--json", "--home", str(binks_home))
    assert piped.returncode == 0 and piped.stdout.count("\n") == 1, piped.stderr
    primary, secondary = pty.openpty()
    try:
        try:
            proc = subprocess.run([agent_bin(), "self-heal", "improvements", "--json", "--home", str(binks_home)],
                                  stdout=secondary, stderr=subprocess.PIPE, timeout=120)
        finally:
            os.close(secondary)
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the terminal's other end is closed: all of it was read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(primary)
    shown = b"".join(chunks).decode().replace("\r\n", "\n")
    assert proc.returncode == 0, proc.stderr
    assert shown.startswith("{\n  ") and json.loads(shown) == json.loads(piped.stdout)


def test_tables_fit_80_columns_and_ids_never_wrap(history_copy, binks_home):
    env = {"COLUMNS": "80"}
    assert run_agent("self-heal", "detect", "--since", "2026-11-13", env=env).returncode == 0
    ids = [r["id"] for r in json.loads(run_agent("self-heal", "improvements", "--json").stdout)["improvements"]]
    assert ids
    for args in (["improvements"], ["plugins"], ["dashboard", "--since", "2026-11-13", "--detailed"],
                 ["show", "tool_error:list_dir", "--since", "2026-11-13"]):
        r = run_agent("self-heal", *args, env=env)
        assert r.returncode == 0, r.stderr
        # a plain line naming a file (the plugin folder) may be longer: a path is not cut
        too_wide = [line for line in r.stdout.splitlines() if len(line) > 80 and str(binks_home) not in line]
        assert not too_wide, (args, too_wide)
        if args[0] == "improvements":
            assert all(any(i in line for line in r.stdout.splitlines()) for i in ids), "each id on one line"
        if args[0] == "plugins":  # names, hooks and paths whole, never cut into pieces
            info = json.loads(run_agent("self-heal", "plugins", "--json").stdout)
            words = {w for line in r.stdout.splitlines() for w in line.replace(",", " ").split()}
            for plugin in info["plugins"]:
                assert {plugin["name"], *plugin["hooks"]} <= words, plugin["name"]
                assert any(plugin["path"] in line for line in r.stdout.splitlines()), plugin["path"]
        if args[0] == "show":  # an affected run a line: its whole id, its start to the minute and its status
            runs = json.loads(run_agent("self-heal", *args, "--json").stdout)["runs"]
            for run in runs:
                row = next(line for line in r.stdout.splitlines() if run["run_id"] in line)
                assert run["started_at"][:16].replace("T", " ") in row and run["status"] in row, row


def test_detect_test_apply_verify_and_the_daemon_wrap_under_their_indent_at_80_columns(history_copy, binks_home):
    """Their text went out through click.echo whole: a `Suggested fix:` of 159 columns, a `Model:`
    of 195. At 80 each line fits, continues under its indent, and ids and commands are whole."""
    import re

    env = {"COLUMNS": "80"}
    since = ("--since", "2026-11-13")
    home = ("--home", str(binks_home))
    found = json.loads(run_agent("self-heal", "detect", *since, *home, "--json").stdout)
    ids = {o["pattern_id"]: o["improvement_id"] for o in found["proposals"] if o.get("improvement_id")}
    timeout_id = next(i for p, i in ids.items() if p.startswith("timeout:"))
    others = [i for i in ids.values() if i != timeout_id]
    runs = [("detect", *since), *(("test", i, *since) for i in ids.values()), ("apply", others[0]),
            ("apply", timeout_id, "--yes"), ("verify", timeout_id)]
    outputs = [run_agent("self-heal", *args, *home, env=env, input="n\n") for args in runs]
    outputs.append(run_agent("self-heal-daemon", "--once", *home, env=env))
    for args, r in zip([*runs, ("self-heal-daemon",)], outputs):
        assert r.returncode == (1 if args == ("apply", others[0]) else 0), (args, r.stderr)
        lines = [line for line in r.stdout.splitlines() if not re.match(r"[-+@]", line)]  # a diff: as is
        assert lines and all(len(line) <= 80 for line in lines), (args, r.stdout)
        assert not any(line.rstrip().endswith(" agent") for line in lines), (args, r.stdout)
    detected, *_, verified, daemon = (r.stdout for r in outputs)
    for p, i in ids.items():
        assert f"  Pattern {p}\n" in detected and re.search(rf"✓ Proposal {i}\b", detected), detected
    fixes = [line for line in detected.splitlines() if line.startswith("    Suggested fix:")]
    assert fixes and any(detected.split(f + "\n", 1)[1].startswith("      ") for f in fixes), detected
    tested = "".join(r.stdout for r in outputs[1:1 + len(ids)])
    assert re.search(r"^  Model: .*\n    \S", tested, re.M), tested  # the model line continues under it
    assert all(re.search(rf"Next: agent self-heal \S+ {i}\b", tested) for i in ids.values()), tested
    assert f"(agent self-heal verify {timeout_id})" in outputs[-3].stdout
    assert "Recommendation: extend" in verified and "Round at " in daemon
    # rollback's question names the fix by its description, wrapped the same way (answered no)
    asked = run_agent("self-heal", "rollback", timeout_id, *home, env=env, input="n\n")
    lines = [line for line in asked.stdout.splitlines() if not re.match(r"[-+@]", line)]
    assert lines[0].startswith(f"Improvement {timeout_id} (applied): ") and lines[1].startswith("  "), asked.stdout
    assert all(len(line) <= 80 for line in lines), asked.stdout


def test_a_long_line_wraps_under_its_indent_never_at_column_0(monkeypatch):
    import io

    from rich.console import Console

    from selfheal_plugin.cli.common import print_line

    text = "  Suggested fix: " + " ".join(["raise the timeout of [bold]x[/]"] * 5)
    out = Console(file=io.StringIO(), width=40, highlight=False, force_terminal=True, color_system=None)
    print_line(out, text)
    lines = out.file.getvalue().splitlines()
    assert len(lines) > 2 and all(len(line) <= 40 for line in lines)
    assert lines[0].startswith("  Suggested fix: raise") and all(line.startswith("    ") for line in lines[1:])
    assert "[bold]" not in out.file.getvalue()  # markup is markup, as with Console.print
    piped = Console(file=io.StringIO(), width=40, highlight=False)  # not a terminal, no COLUMNS: one line for grep
    monkeypatch.delenv("COLUMNS", raising=False)
    print_line(piped, text)
    assert piped.file.getvalue().splitlines() == ["  Suggested fix: " + " ".join(["raise the timeout of x"] * 5)]


@pytest.mark.parametrize("width", [*range(64, 81, 2), 100, 120])  # each command fits in the width
def test_a_line_breaks_before_a_command_never_inside_it(width):
    import io

    from rich.console import Console

    from selfheal_plugin.cli.common import print_line

    commands = ["agent self-heal verify imp-20261128-822040f0", "agent self-heal canary promote|drop imp-20261128-822040f0",
                "agent self-heal detect --since -30d", "agent self-heal show timeout:mcp__kubernetes__pods_list"]
    text = (f"  Next: check it with {commands[0]}; end it with {commands[1]}, or look again: {commands[2]} "
            f"(the pattern: {commands[3]}) when you have the time")
    out = Console(file=io.StringIO(), width=width, highlight=False, force_terminal=True, color_system=None)
    print_line(out, text)
    lines = out.file.getvalue().splitlines()
    assert all(len(line) <= width for line in lines), lines
    assert all(any(c in line for line in lines) for c in commands), lines
    assert " ".join(line.strip() for line in lines) == text.strip()  # only where it breaks changed


def test_plugins_has_version_and_path_columns(history_copy):
    r = run_agent("self-heal", "plugins", env={"COLUMNS": "200"})
    assert r.returncode == 0, r.stderr
    header = next(line for line in r.stdout.splitlines() if line.lstrip().startswith("name"))
    assert header.split() == ["name", "source", "version", "hooks", "path"]
    assert "version / path" not in r.stdout


@pytest.mark.parametrize("command", [["rollback"], ["reject"]])
def test_state_changes_ask_first(db, binks_home, command):
    imp = add_improvement(db, [timeout_change(90_000)])
    if command == ["rollback"]:
        assert run_agent("self-heal", "apply", imp.id, "--yes").returncode == 0
    state = status(db, imp.id)
    head = git(binks_home, "rev-parse", "HEAD").strip() if (binks_home / ".git").exists() else None
    no = run_agent("self-heal", *command, imp.id, input="n\n")
    assert no.returncode == 1 and "Aborted" in no.stderr and f"Improvement {imp.id} ({state})" in no.stdout
    assert status(db, imp.id) == state
    if head:
        assert git(binks_home, "rev-parse", "HEAD").strip() == head
    as_json = run_agent("self-heal", *command, imp.id, "--json")
    assert as_json.returncode == 2 and "--json needs --yes" in as_json.stderr
    yes = run_agent("self-heal", *command, imp.id, input="y\n")
    assert yes.returncode == 0, yes.stderr
    assert status(db, imp.id) == ("rolled_back" if command == ["rollback"] else "rejected")


def test_canary_promote_and_drop_ask_first(db, binks_home):
    imp = add_improvement(db, [timeout_change(90_000)])
    assert run_agent("self-heal", "test", imp.id, "--mode", "canary").returncode == 0
    for sub in ("promote", "drop"):
        r = run_agent("self-heal", "canary", sub, imp.id, input="n\n")
        assert r.returncode == 1 and "Aborted" in r.stderr
        assert status(db, imp.id) == "canary"
    assert run_agent("self-heal", "canary", "drop", imp.id, "-y").returncode == 0
    assert status(db, imp.id) != "canary"


def test_check_gives_verdicts_an_exit_code(db, binks_home):
    imp = add_improvement(db, [timeout_change(90_000)])
    assert run_agent("self-heal", "apply", imp.id, "--yes").returncode == 0
    plain = run_agent("self-heal", "verify", imp.id)
    assert plain.returncode == 0 and "Recommendation: extend" in plain.stdout
    assert "no significance test yet" in plain.stdout and "0 test(s)" not in plain.stdout
    assert run_agent("self-heal", "verify", imp.id, "--check").returncode == 4
    risky = add_improvement(db, [{"kind": "manual", "text": "look at it"}], pattern_id="tool_error:x")
    r = run_agent("self-heal", "test", risky.id, "--since", "2026-11-13")
    assert r.returncode == 0 and "Recommendation: risky" in r.stdout
    assert run_agent("self-heal", "test", risky.id, "--since", "2026-11-13", "--check").returncode == 3


def test_p_values_read_as_people_write_them():
    assert format_p(0.0) == "p < 0.001" and format_p(1.2e-5) == "p < 0.001"
    assert format_p(0.16123) == "p = 0.16" and format_p(0.0123) == "p = 0.012" and format_p(1.0) == "p = 1"
    assert format_p(None) == "p n/a"


def test_commit_subjects_fit_72_characters_at_a_word():
    long = "selfheal: Health-check and auto-restart MCP server github; retry mcp__github__create_issue with backoff"
    cut = commit_subject(long)
    assert len(cut) <= 72 and cut.endswith("…") and long.startswith(cut[:-1])
    assert long[len(cut) - 1] == " " and "retry" in cut
    assert commit_subject("selfheal: short") == "selfheal: short"
    assert len(commit_subject("selfheal: " + "x" * 100)) == 72


def test_an_applied_commit_subject_is_cut_at_a_word(db, binks_home):
    description = ("Raise the timeout of the kubernetes pod listing tool so that slow clusters stop failing "
                   "every morning")
    imp = add_improvement(db, [timeout_change(90_000)], description=description)
    assert run_agent("self-heal", "apply", imp.id, "--yes").returncode == 0
    subject = git(binks_home, "log", "-1", "--format=%s").strip()
    full = f"selfheal: {description}"
    assert len(subject) <= 72 and subject.endswith("…")
    assert full.startswith(subject[:-1]) and full[len(subject) - 1] == " "


def test_mcp_server_exits_0_on_sigterm(binks_home):
    exe = Path(sys.executable).parent / "self-healing-mcp"
    proc = subprocess.Popen([str(exe), "--home", str(binks_home)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "SELFHEAL_LOG": "info"})
    # wait until it serves (it logs its start on stderr), then stop it as a supervisor would
    deadline = time.monotonic() + 60
    line = b""
    while b"self-healing-mcp" not in line and time.monotonic() < deadline:
        line = proc.stderr.readline()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def _stdio_server(home: Path, errlog) -> subprocess.Popen:
    """The console script over stdio, its stdin a pipe this test keeps open (a client that is
    connected and idle), its stderr a file (a pipe nobody reads could block the server)."""
    exe = Path(sys.executable).parent / "self-healing-mcp"
    return subprocess.Popen([str(exe), "--home", str(home)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=errlog, env={**os.environ, "SELFHEAL_LOG": "info"}, text=True)


def _send(proc: subprocess.Popen, message: dict) -> None:
    proc.stdin.write(json.dumps(message) + "\n")
    proc.stdin.flush()


def _initialize(proc: subprocess.Popen) -> None:
    """The MCP handshake: once its answer is read the SDK's stdin reader is waiting for the
    next line, the state in which a first SIGTERM used to be ignored."""
    _send(proc, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}})
    assert json.loads(proc.stdout.readline())["result"]["serverInfo"]["name"] == "self-healing"
    _send(proc, {"jsonrpc": "2.0", "method": "notifications/initialized"})


def _stopped(proc: subprocess.Popen, errlog) -> str:
    """Wait for the exit (60 s only guards against a hang) and return its stderr."""
    try:
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        errlog.seek(0)
    return errlog.read()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stdio_mcp_server_with_a_client_connected_exits_0_on_the_first_signal(binks_home, sig):
    """A client did the handshake and keeps stdin open, doing nothing: one SIGTERM (or Ctrl-C)
    ends the server with exit 0 and no traceback, although the SDK's thread is blocked
    reading stdin (docs/mcp.md). It used to live on until a second signal."""
    with tempfile.TemporaryFile("w+") as errlog:
        proc = _stdio_server(binks_home, errlog)
        _initialize(proc)
        proc.send_signal(sig)
        stderr = _stopped(proc, errlog)
        proc.stdin.close()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert stderr.count("exiting") == 1 and f"{sig.name}, exiting" in stderr


def test_stdio_mcp_server_exits_0_on_sigterm_during_a_call(binks_home):
    """SIGTERM while a tool call is in progress (a strategy that never returns, under an hour's
    plugin deadline): the call is abandoned, the exit is still 0, at once, without a traceback."""
    from datetime import datetime, timezone

    from selfheal_plugin.testbed.generator import generate_history

    from ..watchsupport import DEADLINE, wait_until

    generate_history(binks_home / "conversations.db", seed=7, runs=300, end=datetime.now(timezone.utc))
    (binks_home / "config.toml").write_text("[self_heal]\nplugin_timeout_seconds = 3600\n")
    (binks_home / "selfheal" / "plugins").mkdir(parents=True)
    (binks_home / "selfheal" / "plugins" / "hang.py").write_text(HANGING_PROPOSE)  # its propose never returns
    marker = binks_home / "proposing.log"
    with tempfile.TemporaryFile("w+") as errlog:
        proc = _stdio_server(binks_home, errlog)
        _initialize(proc)
        _send(proc, {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                     "params": {"name": "detect_failure_patterns", "arguments": {}}})
        assert wait_until(lambda: marker.exists() or proc.poll() is not None, DEADLINE)
        assert proc.poll() is None  # inside the call: its strategy is proposing a fix
        proc.send_signal(signal.SIGTERM)
        stderr = _stopped(proc, errlog)
        proc.stdin.close()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "SIGTERM, exiting" in stderr
    assert proc.stdout.read() == ""  # the call was abandoned: no answer


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_http_mcp_server_exits_0_on_sigterm(binks_home, sig):
    """Over HTTP, uvicorn shuts down on SIGTERM or SIGINT and raises the signal again: still
    exit 0 (not click's "Aborted!" and 1 for SIGINT), after a clean shutdown (docs/mcp.md)."""
    proc, _ = start_http_server("--home", str(binks_home), env={"SELFHEAL_LOG": "info"})
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()
    assert b"Application shutdown complete" in err and b"Traceback" not in err


def test_the_demo_shows_a_live_status_line_while_a_step_runs(monkeypatch):
    """Each demo step shows its title as a transient status while it runs (on a terminal),
    and stops it before the step's findings are printed."""
    from selfheal_plugin.cli import demo as cli_demo

    events = []

    class FakeStatus:
        def __init__(self, text):
            self.text = text

        def start(self):
            events.append(("start", self.text))

        def stop(self):
            events.append(("stop", self.text))

    monkeypatch.setattr(cli_demo.sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(cli_demo.err_console, "status", FakeStatus, raising=False)
    live = cli_demo._LiveStatus(enabled=True)
    printed = []
    done = live.done(lambda step: printed.append((step, list(events))))
    live.start("detect", "Detect recurring failures")
    done("detect-step")
    assert events == [("start", "Detect recurring failures…"), ("stop", "Detect recurring failures…")]
    assert printed == [("detect-step", events)]  # the status was gone before the findings printed
    assert not cli_demo._LiveStatus(enabled=False).enabled


def test_a_long_step_shows_a_transient_status_on_a_terminal_only(monkeypatch):
    """`test` and `verify` can take seconds: a status line on stderr while they run, on a
    terminal only (never in --json or piped output)."""
    from selfheal_plugin.cli import common

    seen = []

    class FakeStatus:
        def __init__(self, label):
            seen.append(label)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            seen.append("done")

    monkeypatch.setattr(common.err_console, "status", FakeStatus, raising=False)
    monkeypatch.setattr(common.sys.stderr if hasattr(common, "sys") else __import__("sys").stderr, "isatty",
                        lambda: True, raising=False)
    with common.working(True, "Testing imp-1 (simulation)…"):
        seen.append("work")
    with common.working(False, "quiet"):
        seen.append("json work")
    assert seen == ["Testing imp-1 (simulation)…", "work", "done", "json work"]


@pytest.mark.parametrize("group", [[], ["ab"], ["canary"]])
def test_group_help_lists_each_command_summary_whole(group):
    """Click cut every summary longer than the line with "..."; they wrap under themselves now."""
    r = run_agent("self-heal", *group, "--help", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    commands = r.stdout.split("Commands:", 1)[1]
    assert "..." not in commands and all(len(line) <= 80 for line in commands.splitlines())


def _help_pages(command, path, parent=None):
    """(path, --help page) of ``command`` and every subcommand, as each prints it."""
    import click

    ctx = command.context_class(command, info_name=path[-1], parent=parent)
    yield path, command.get_help(ctx)
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from _help_pages(sub, [*path, name], ctx)


@pytest.mark.parametrize("columns", ["80", "120"])
def test_help_wraps_at_spaces_never_inside_an_option_a_command_or_a_path(monkeypatch, columns):
    """click's textwrap broke `--token-` / `file` and the sync summary's `(packs/<home` / `id>.json)`."""
    import re

    from selfheal_plugin.cli.main import agent
    from selfheal_plugin.mcp.server import cli as mcp_cli

    monkeypatch.setenv("COLUMNS", columns)
    pages = [*_help_pages(agent, ["agent"]), *_help_pages(mcp_cli, ["self-healing-mcp"])]
    assert len(pages) > 25
    for path, page in pages:
        lines = page.splitlines()
        assert all(len(line) <= int(columns) for line in lines), (path, page)
        assert not [line for line in lines if re.search(r"\w-$", line)], (path, page)  # cut after a hyphen
        assert "\u2011" not in page, path
    text = dict((" ".join(path), page) for path, page in pages)
    assert "(packs/<home-id>.json)" in text["agent self-heal"]
    assert "--token-file" in text["self-healing-mcp"].split("HTTP access:")[1]
