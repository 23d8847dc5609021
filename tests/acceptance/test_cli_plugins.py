"""`detect` proposals and inbox summary, `improvements` and `plugins`, through the installed
`agent` command — with a third-party strategy installed as a real distribution."""
import json
import os
import re
import sqlite3

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
    return result.structured_content["result"]


def test_detect_proposes_writes_inbox_and_is_idempotent(history_copy, binks_home):
    db, truth = history_copy
    res = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    proposals = re.findall(r"^  ✓ Proposal (imp-\d{8}-[0-9a-f]{8}) for pattern (\S+)$", out, re.M)
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
                                 "View details: agent self-heal improvements")

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
    assert "1 plugin error(s):" in res.stdout
    assert re.search(r"✗ user:broken \(load\): SyntaxError: .*broken\.py", res.stdout)

    det = run_agent("self-heal", "detect", "--home", str(binks_home), "--since", SINCE)
    assert det.returncode == 0, det.stderr
    assert ("  ✗ No proposal for pattern connection_refused:mcp__github__create_issue: strategy 'crashy' "
            "failed to propose a fix for connection_refused:mcp__github__create_issue: "
            "RuntimeError: cannot think today") in det.stdout
    assert len(re.findall(r"^  ✓ Proposal imp-", det.stdout, re.M)) == 4
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
