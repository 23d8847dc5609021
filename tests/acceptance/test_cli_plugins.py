"""`detect` proposals and inbox summary, `improvements` and `plugins`, through the installed
`agent` command — with a third-party strategy installed as a real distribution."""
import json
import os
import re
import sqlite3
from datetime import UTC

from selfheal_plugin.plugins.inbox import parse_inbox

from ..conftest import run_agent
from ..test_plugins import test_strategy_site  # noqa: F401  (session fixture: pip-installed test plugin)

SINCE = "2026-11-13T12:00:00Z"


def _inbox_entries() -> list:
    folder = os.environ["INBOX_PATH"]
    return [e for name in sorted(os.listdir(folder)) if name.endswith(".md")
            for e in parse_inbox(open(os.path.join(folder, name)).read())]


def _mcp_detect(home, since: str) -> list[dict]:
    import anyio
    from mcp import Client

    from selfheal_plugin.mcp.server import build_server

    async def go():
        async with Client(build_server(home)) as client:
            return await client.call_tool("detect_failure_patterns", {"since": since})
    result = anyio.run(go)
    assert not result.is_error
    return result.structured_content["patterns"]


def test_detect_proposes_writes_inbox_and_is_idempotent(history_copy, binks_home):
    db, truth = history_copy
    res = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    proposals = re.findall(r"^  ✓ Proposal (imp-\d{8}-[0-9a-f]{8}) for pattern (\S+)$", out, re.MULTILINE)
    assert {p for _, p in proposals} == {p["id"] for p in truth["patterns"]}
    tail = out[out.index("💡 Generating improvement proposals...\n"):]
    assert "\n📬 Writing summary to inbox...\n\n📋 Next steps:\n" \
           "  - Test: agent self-heal test <improvement-id>\n" \
           "  - Apply: agent self-heal apply <improvement-id>\n" \
           "  - View: agent self-heal show <pattern-id>\n" in tail
    rows = dict(sqlite3.connect(db).execute("SELECT id, pattern_id FROM improvements WHERE status = 'proposed'"))
    assert rows == {i: p for i, p in proposals}
    (entry,) = _inbox_entries()
    assert (entry.source, entry.tags, entry.priority) == ("self-heal", ["self-heal", "patterns"], "high")
    assert entry.body.startswith(f"Detected {len(truth['patterns'])} failure pattern(s). "
                                 "View details: agent self-heal show PATTERN")

    again = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE, "--json")
    assert again.returncode == 0, again.stderr
    data = json.loads(again.stdout)
    assert {p["improvement_id"] for p in data["proposals"]} == set(rows)
    assert not any(p["created"] for p in data["proposals"])
    assert data["notified"] == []  # the cooldown: one inbox entry per pattern per cooldown_minutes
    # one suggested_fix per pattern: detect --json, show --json and the MCP tool agree, and it
    # is the stored open proposal's description
    mcp = _mcp_detect(binks_home, SINCE)
    assert {p["id"] for p in mcp} == {p["id"] for p in data["patterns"]}
    by_pattern = {p["pattern_id"]: p for p in data["proposals"]}
    for pat in data["patterns"]:
        shown = json.loads(run_agent("self-heal", "show", pat["id"], "--home", str(binks_home), "--since", SINCE,
                                     "--json").stdout)
        assert pat["suggested_fix"] and pat["suggested_fix"] == shown["suggested_fix"]
        assert pat["suggested_fix"] == next(p["suggested_fix"] for p in mcp if p["id"] == pat["id"])
        assert pat["suggested_fix"] == by_pattern[pat["id"]]["description"] and pat["suggested_by"] == "proposal"
        assert f"{by_pattern[pat['id']]['improvement_id']} for pattern {pat['id']}\n" \
               f"      {by_pattern[pat['id']]['description']}\n" in out
    for p in data["proposals"]:
        assert p["changes"] and p["risk_level"] in ("low", "medium", "high") and p["expected_impact"]
    assert len(_inbox_entries()) == 1

    listing = run_agent("self-heal", "improvements", "--home", str(binks_home), "--json")
    assert {r["id"] for r in json.loads(listing.stdout)["improvements"]} == set(rows)
    text = run_agent("self-heal", "improvements", "--home", str(binks_home), "--status", "proposed")
    assert text.returncode == 0 and all(i in text.stdout for i in rows)


def test_an_inbox_that_cannot_be_written_does_not_use_up_the_cooldown(history_copy, binks_home, tmp_path):
    """A summary delivered nowhere is not counted as told: the next detect, with a working
    inbox, writes it (before, the patterns' cooldown was spent on the failed write)."""
    not_a_folder = tmp_path / "inbox-is-a-file"
    not_a_folder.write_text("")
    res = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE,
                    env={"INBOX_PATH": str(not_a_folder)})
    assert res.returncode == 0, res.stderr
    assert "Writing summary to inbox" not in res.stdout
    assert "\n📭 Inbox summary not written (see the warning above): the next detect tries again\n" in res.stdout
    assert "notify" in res.stderr and "inbox-is-a-file" in res.stderr  # the failure, said
    assert not_a_folder.read_text() == ""
    data = json.loads(run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE, "--json",
                                env={"INBOX_PATH": str(not_a_folder)}).stdout)
    assert data["notified"] == [] and sorted(data["undelivered"]) == sorted(p["id"] for p in data["patterns"])

    again = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE, "--json")
    assert again.returncode == 0, again.stderr
    told = json.loads(again.stdout)
    assert sorted(told["notified"]) == sorted(p["id"] for p in told["patterns"]) and told["undelivered"] == []
    (entry,) = _inbox_entries()
    assert entry.body.startswith(f"Detected {len(told['patterns'])} failure pattern(s).")


def test_detect_says_no_inbox_summary_when_notify_patterns_is_off(history_copy, binks_home):
    (binks_home / "config.toml").write_text("[self_heal]\nnotify_patterns = false\n")
    res = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE)
    assert res.returncode == 0, res.stderr
    assert "✓ Proposal imp-" in res.stdout
    assert "Writing summary to inbox" not in res.stdout
    assert "\n📭 Inbox summary off (notify_patterns = false)\n\n📋 Next steps:\n" in res.stdout
    assert not os.path.exists(os.environ["INBOX_PATH"])  # nothing written there


def test_third_party_strategy_overrides_builtin(history_copy, binks_home, test_strategy_site):  # noqa: F811
    env = {"PYTHONPATH": str(test_strategy_site)}
    res = run_agent("self-heal", "plugins", "--home", str(binks_home), "--json", env=env)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    plugin = next(p for p in info["plugins"] if p["name"] == "test_strategy")
    assert plugin == {"name": "test_strategy", "source": "entrypoint", "hooks": ["register_strategies"],
                      "distribution": "selfheal-test-strategy", "version": "0.3.1",
                      "path": "selfheal_test_strategy"}
    table = {r["error_type"]: r for r in info["strategies"]}
    assert (table["server_crashed"]["strategy"], table["server_crashed"]["plugin"]) == ("restart-only",
                                                                                         "test_strategy")
    assert table["timeout"]["plugin"] == "selfheal.strategies.timeout"
    text = run_agent("self-heal", "plugins", "--home", str(binks_home), env=env)
    assert "test_strategy" in text.stdout and "restart-only" in text.stdout

    det = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE, "--json", env=env)
    prop = next(p for p in json.loads(det.stdout)["proposals"] if p["pattern_id"].startswith("server_crashed:"))
    assert prop["strategy"] == "restart-only"
    assert prop["changes"] == [{"kind": "config", "file": "config.toml", "path": ["servers", "search", "auto_restart"],
                                "op": "set", "value": True}]
    # without the distribution on the path the built-in answers again
    plain = json.loads(run_agent("self-heal", "plugins", "--home", str(binks_home), "--json").stdout)
    assert {r["error_type"]: r["strategy"] for r in plain["strategies"]}["server_crashed"] == "server_crashed"

    # SELFHEAL_LOAD_PLUGINS takes the name `plugins` shows; another name is one warning line
    only = run_agent("self-heal", "plugins", "--home", str(binks_home), "--json",
                     env={**env, "SELFHEAL_LOAD_PLUGINS": "test_strategy"})
    assert {r["error_type"]: r["strategy"] for r in json.loads(only.stdout)["strategies"]}["server_crashed"] == \
        "restart-only"
    assert "SELFHEAL_LOAD_PLUGINS" not in only.stderr
    wrong = run_agent("self-heal", "plugins", "--home", str(binks_home), "--json",
                      env={**env, "SELFHEAL_LOAD_PLUGINS": "selfheal-test-strategy"})
    assert wrong.returncode == 0, wrong.stderr
    assert {r["error_type"]: r["strategy"] for r in json.loads(wrong.stdout)["strategies"]}["server_crashed"] == \
        "server_crashed"
    (warning,) = [line for line in wrong.stderr.splitlines() if "SELFHEAL_LOAD_PLUGINS" in line]
    assert "'selfheal-test-strategy' (a distribution; its plugins: test_strategy)" in warning


def test_broken_user_plugins_are_reported_and_the_rest_works(history_copy, binks_home):
    plugins_dir = binks_home / "selfheal" / "plugins"
    plugins_dir.mkdir(parents=True)
    (plugins_dir / "broken.py").write_text("from selfheal_plugin import hookimpl\n@hookimpl\ndef notify(:\n")
    (plugins_dir / "crashy_strategy.py").write_text(
        "from selfheal_plugin import hookimpl\n"
        "from selfheal_plugin.plugins.strategy import Strategy\n"
        "class Crashy(Strategy):\n"
        "    name = 'crashy'\n"
        "    error_types = ('connection_refused',)\n"
        "    def propose(self, pattern, history):\n"
        "        raise RuntimeError('cannot think today')\n"
        "@hookimpl\n"
        "def register_strategies(register):\n"
        "    register(Crashy())\n"
        "@hookimpl\n"
        "def patterns_detected(patterns, settings):\n"
        "    raise ValueError('listener down')\n")
    res = run_agent("self-heal", "plugins", "--home", str(binks_home))
    assert res.returncode == 0, res.stderr
    assert "1 plugin error(s) (this command's and the last 7 days'):" in res.stdout
    assert re.search(r"✗ user:broken \(load\): SyntaxError: .*broken\.py", res.stdout)

    det = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE)
    assert det.returncode == 0, det.stderr
    assert ("  ✗ No proposal for pattern connection_refused:mcp__github__create_issue: strategy 'crashy' "
            "(plugin user:crashy_strategy) failed in propose(): RuntimeError: cannot think today\n") in det.stdout
    assert len(re.findall(r"^  ✓ Proposal imp-", det.stdout, re.MULTILINE)) == 4
    assert "plugin user:crashy_strategy failed in hook patterns_detected" in det.stderr
    assert "plugin user:broken failed" in det.stderr
    assert len(_inbox_entries()) == 1  # the built-in inbox hook still ran


def test_installed_wheel_loads_its_builtin_plugins(tmp_path):
    """In a wheel the built-ins live in selfheal_plugin/strategies and /hooks, found through
    selfheal_plugin/plugin.toml; nothing is importable as top-level strategies/hooks."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(root)], check=True)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                    str(next((tmp_path / "dist").glob("selfheal-*.whl")))], check=True)
    assert not {"strategies", "hooks"} & {p.name for p in target.iterdir()}
    code = ("import json, selfheal_plugin\n"
            "from selfheal_plugin.plugins import manager as plugins\n"
            "d = plugins.describe()\n"
            "print(json.dumps({'pkg': selfheal_plugin.__file__, 'paths': [p.get('path') for p in d['plugins']],\n"
            "  'types': [s['error_type'] for s in d['strategies']], 'errors': d['errors']}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["pkg"].startswith(str(target))
    assert info["errors"] == []
    assert all(p.startswith(str(target / "selfheal_plugin")) for p in info["paths"])
    assert {"timeout", "tool_error", "connection_refused", "server_crashed", "permission_denied",
            "transport_error", "Unknown"} <= set(info["types"])


# ---------------------------------------------------------------- containment, through the installed command


def _write_plugins(binks_home, **files: str):
    folder = binks_home / "selfheal" / "plugins"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.py").write_text(text)


EXITS_ON_NOTIFY = (
    "import sys\n"
    "from selfheal_plugin import hookimpl\n"
    "@hookimpl\n"
    "def notify(notification, settings):\n"
    "    sys.exit(3)\n")


def test_exits_in_plugins_never_end_a_command_and_a_later_plugins_lists_them(history_copy, binks_home):
    db, truth = history_copy
    _write_plugins(binks_home, quits="raise SystemExit(0)\n", exits_on_notify=EXITS_ON_NOTIFY)
    det = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE, "--json")
    assert det.returncode == 0, det.stderr
    proposals = json.loads(det.stdout)["proposals"]
    assert len(proposals) == len(truth["patterns"])  # SystemExit(0) at load did not end detect
    assert "plugin user:quits failed (load): SystemExit: 0" in det.stderr
    assert "plugin user:exits_on_notify failed in hook notify (hook): SystemExit: 3" in det.stderr
    assert "Traceback" not in det.stderr

    imp = next(p for p in proposals if any(c["kind"] == "config" for c in p["changes"]))
    applied = run_agent("self-heal", "apply", imp["improvement_id"], "--yes", "--home", str(binks_home))
    assert applied.returncode == 0, applied.stdout + applied.stderr  # not the plugin's exit code 3
    status = sqlite3.connect(db).execute("SELECT status FROM improvements WHERE id = ?",
                                         (imp["improvement_id"],)).fetchone()[0]
    assert status == "applied"

    # a later process, which itself calls no hook, lists what the earlier ones met
    (binks_home / "selfheal" / "plugins" / "exits_on_notify.py").unlink()
    listed = run_agent("self-heal", "plugins", "--home", str(binks_home), "--json")
    assert listed.returncode == 0, listed.stderr
    errors = {(e["plugin"], e["phase"], e["hook"], e["error"]): e for e in json.loads(listed.stdout)["errors"]}
    assert ("user:quits", "load", None, "SystemExit: 0") in errors
    hook_error = errors[("user:exits_on_notify", "hook", "notify", "SystemExit: 3")]
    assert hook_error["count"] >= 2 and hook_error["last_seen"]  # detect's and apply's notifications
    text = run_agent("self-heal", "plugins", "--home", str(binks_home))
    assert re.search(r"✗ user:exits_on_notify \(hook in notify\): SystemExit: 3 \(\d+×, last ", text.stdout)


BAD_STRATEGIES = {
    "bad_evidence": (
        "from selfheal_plugin import hookimpl\n"
        "from selfheal_plugin.plugins.strategy import Change, Strategy\n"
        "class Bad(Strategy):\n"
        "    name = 'bad-evidence'\n"
        "    error_types = ('connection_refused',)\n"
        "    def propose(self, pattern, history):\n"
        "        return self.make_proposal(pattern, description='d', expected_impact='unknown', risk_level='low',\n"
        "                                  changes=[Change.manual('x')], evidence={'at': object()})\n"
        "@hookimpl\n"
        "def register_strategies(register):\n"
        "    register(Bad())\n"),
    "hangs": (
        "import threading\n"
        "from selfheal_plugin import hookimpl\n"
        "from selfheal_plugin.plugins.strategy import Strategy\n"
        "class Hang(Strategy):\n"
        "    name = 'hang'\n"
        "    error_types = ('timeout',)\n"
        "    def propose(self, pattern, history):\n"
        "        threading.Event().wait()\n"
        "@hookimpl\n"
        "def register_strategies(register):\n"
        "    register(Hang())\n"),
}


def test_invalid_and_hanging_strategies_cost_their_patterns_only(history_copy, binks_home):
    db, truth = history_copy
    # Every plugin call of the process has this deadline, the built-in strategies' too: 5 s,
    # which a busy machine's stalls do not reach (the command waits it out once, for Hang).
    (binks_home / "config.toml").write_text("[self_heal]\nplugin_timeout_seconds = 5\n")
    _write_plugins(binks_home, **BAD_STRATEGIES)
    det = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE)
    assert det.returncode == 0, det.stderr
    failed = dict(re.findall(r"^  ✗ No proposal for pattern (\S+): (.*)$", det.stdout, re.MULTILINE))
    by_type = {pid.split(":")[0]: text for pid, text in failed.items()}
    assert set(by_type) == {"connection_refused", "timeout"}
    assert by_type["connection_refused"].startswith("strategy 'bad-evidence' (plugin user:bad_evidence) returned "
                                                    "an invalid proposal for connection_refused:")
    assert "evidence is not JSON data" in by_type["connection_refused"]
    assert by_type["timeout"] == ("strategy 'hang' (plugin user:hangs) failed in propose(): timed out after 5 s "
                                  "(plugin_timeout_seconds); call abandoned; skipped for the rest of this process")
    proposed = re.findall(r"^  ✓ Proposal imp-\S+ for pattern (\S+)", det.stdout, re.MULTILINE)
    assert sorted(proposed + list(failed)) == sorted(p["id"] for p in truth["patterns"])  # the others went on
    stored = {r[0] for r in sqlite3.connect(db).execute("SELECT pattern_id FROM improvements")}
    assert not stored & set(failed)


def test_a_strategy_that_failed_to_load_lets_no_other_store_a_proposal(history_copy, binks_home):
    db, truth = history_copy
    _write_plugins(binks_home, refused=BAD_STRATEGIES["bad_evidence"].replace("import hookimpl", "import hookimpl, nope")
                   .replace("'connection_refused'", "'connection_refused', 'Unknown'"))
    det = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE)
    assert det.returncode == 0, det.stderr
    failed = dict(re.findall(r"^  ✗ No proposal for pattern (\S+): (.*)$", det.stdout, re.MULTILINE))
    assert failed and all(pid.split(":")[0] in ("connection_refused", "Unknown") for pid in failed)
    for pid, text in failed.items():
        assert text.startswith(f"strategy for {pid.split(':')[0]} failed to load (plugin user:refused: ImportError: ")
    stored = {r[0] for r in sqlite3.connect(db).execute("SELECT pattern_id FROM improvements")}
    assert stored == {p["id"] for p in truth["patterns"]} - set(failed)
    shown = run_agent("self-heal", "plugins", "--home", str(binks_home))
    assert "✗ strategy for connection_refused failed to load (plugin user:refused)" in shown.stdout


HANGING_PROPOSE = """
import os
import threading

from selfheal_plugin import hookimpl
from selfheal_plugin.plugins.strategy import Strategy

class Hang(Strategy):
    name = "hang"
    error_types = ("timeout", "tool_error", "connection_refused", "server_crashed", "permission_denied",
                   "transport_error", "Unknown")

    def propose(self, pattern, history):
        with open(os.path.join(str(history.settings.home), "proposing.log"), "a") as fh:
            fh.write(pattern.id + "\\n")
        threading.Event().wait()  # never returns

@hookimpl
def register_strategies(register):
    register(Hang())
"""


def test_the_daemon_stops_on_sigterm_while_a_strategy_hangs(binks_home, tmp_path):
    import signal
    import subprocess
    from datetime import datetime

    from selfheal_plugin.testbed.generator import generate_history

    from ..conftest import agent_bin
    from ..watchsupport import wait_until

    generate_history(binks_home / "conversations.db", seed=7, runs=300, end=datetime.now(UTC))
    (binks_home / "config.toml").write_text("[self_heal]\nplugin_timeout_seconds = 3600\n")
    _write_plugins(binks_home, hang=HANGING_PROPOSE)
    marker = binks_home / "proposing.log"
    err_path = tmp_path / "daemon.err"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([agent_bin(), "self-heal-daemon", "--home", str(binks_home), "--auto-detect"],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        assert wait_until(lambda: marker.exists() or proc.poll() is not None, 120), err_path.read_text()
        assert proc.poll() is None, err_path.read_text()  # inside the hanging propose()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)  # generous: it must end, not end fast
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = err_path.read_text()
    assert rc == 0, text
    assert "received SIGTERM: stopping" in text and "self-heal daemon stopped" in text
    assert "Traceback" not in text
    assert len(marker.read_text().split()) == 1  # stopped there: no other pattern was proposed for


def test_the_daemons_round_report_lists_plugin_errors(binks_home):
    from datetime import datetime, timezone

    from selfheal_plugin.testbed.generator import generate_history

    generate_history(binks_home / "conversations.db", seed=7, runs=300, end=datetime.now(timezone.utc))
    _write_plugins(binks_home, quits="raise SystemExit(0)\n", listener=(
        "from selfheal_plugin import hookimpl\n"
        "@hookimpl\n"
        "def patterns_detected(patterns, settings):\n"
        "    raise ValueError('listener down')\n"))
    res = run_agent("self-heal-daemon", "--home", str(binks_home), "--once", "--json")
    assert res.returncode == 0, res.stderr  # SystemExit(0) at load did not end the daemon before its round
    tick = json.loads(res.stdout)["tick"]
    assert tick["patterns"]
    assert tick["plugin_errors"] == ["plugin user:quits (load): SystemExit: 0",
                                     "plugin user:listener (hook patterns_detected): ValueError: listener down"]
    text = run_agent("self-heal-daemon", "--home", str(binks_home), "--once")
    assert text.returncode == 0, text.stderr
    # the cooldown holds this round's notification back: no hook call, no error; the
    # persisted error is still listed by `plugins`
    listed = json.loads(run_agent("self-heal", "plugins", "--home", str(binks_home), "--json").stdout)
    assert any(e["plugin"] == "user:listener" and e["hook"] == "patterns_detected" for e in listed["errors"])
