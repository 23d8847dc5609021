"""Each built-in strategy on generated histories: valid config changes, numbers that come
from the data, and the fix chosen from what the messages say."""
from __future__ import annotations

import json
import re
import sqlite3
import tomllib
from pathlib import Path

import pytest
import tomlkit

from selfheal_plugin.testbed import generator

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.testbed.generator import DEFAULT_PATTERNS, InjectedPattern, generate_history
from selfheal_plugin.history.connection import connect
from selfheal_plugin.lifecycle.proposals import history_window, make_proposal
from selfheal_plugin.analysis.patterns import get_pattern
from selfheal_plugin.history.settings import load_settings
from selfheal_plugin.plugins.strategy import Change, Proposal, server_of

from .conftest import NOW

SINCE = "-8d"
EXTRA_PATTERNS = (
    InjectedPattern("permission_denied", "write_file", 7, ("Permission denied: cannot write {path}",),
                    ("coder",), 2, ("permission_denied", "PermissionDenied")),
    InjectedPattern("transport_error", "read_file", 9,
                    ("Failed to parse tool response: expected value at line {n}",),
                    ("planner", "researcher"), 1, ("transport_error", "TransportError")),
)
EXPECTED_STRATEGY = {"timeout": "timeout", "tool_error": "tool_error", "connection_refused": "connection_refused",
                     "server_crashed": "server_crashed", "permission_denied": "permission_denied",
                     "transport_error": "transport_error", "Unknown": "unknown"}
TOOL_KEYS = {"timeout_ms": int, "retry_attempts": int, "retry_backoff_ms": int, "preflight": list}
BREAKER_KEYS = {"failure_threshold": int, "timeout_duration_sec": int, "half_open_requests": int}
SERVER_KEYS = {"health_check": bool, "auto_restart": bool}


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugins.reset()
    yield
    plugins.reset()


@pytest.fixture(scope="session")
def all_types_history(tmp_path_factory) -> tuple[Path, dict]:
    path = tmp_path_factory.mktemp("all-types") / "conversations.db"
    truth = generate_history(path, seed=11, runs=500, end=NOW, patterns=DEFAULT_PATTERNS + EXTRA_PATTERNS)
    return path, truth


def _propose(db: Path, pattern_id: str, home: Path | None = None) -> Proposal:
    s = load_settings(home or db.parent, db)
    conn = connect(db)
    pattern = get_pattern(conn, pattern_id, since=SINCE, now=NOW)
    return make_proposal(pattern, history_window(conn, s, SINCE, now=NOW))


def _apply_to_toml(changes: list[Change]) -> str:
    doc = tomlkit.document()
    for ch in changes:
        if ch.kind != "config":
            continue
        node = doc
        for key in ch.path[:-1]:
            if key not in node:
                node[key] = tomlkit.table()
            node = node[key]
        node[ch.path[-1]] = ch.value
    return tomlkit.dumps(doc)


def _lookup(data: dict, path: list[str]):
    for key in path:
        data = data[key]
    return data


def test_every_error_type_gets_its_strategy_and_valid_changes(all_types_history):
    db, truth = all_types_history
    assert {p["error_type"] for p in truth["patterns"]} == set(EXPECTED_STRATEGY)
    for injected in truth["patterns"]:
        proposal = _propose(db, injected["id"])
        assert proposal.strategy == EXPECTED_STRATEGY[injected["error_type"]]
        assert proposal.pattern_id == injected["id"] and proposal.tool_name == injected["tool_name"]
        assert proposal.risk_level in ("low", "medium", "high")
        assert proposal.description and proposal.expected_impact
        assert len(proposal.changes_required) == len(proposal.changes)
        configs = [c for c in proposal.changes if c.kind == "config"]
        text = _apply_to_toml(configs)
        parsed = tomllib.loads(text)  # a valid TOML document...
        for ch in configs:
            assert ch.file == "config.toml" and ch.op == "set"
            assert _lookup(parsed, ch.path) == ch.value  # ...holding every value at its path
            if ch.path[0] == "tools":
                assert ch.path[1] == injected["tool_name"]
                if ch.path[2] == "circuit_breaker":
                    assert len(ch.path) == 4 and isinstance(ch.value, BREAKER_KEYS[ch.path[3]])
                else:
                    assert len(ch.path) == 3 and isinstance(ch.value, TOOL_KEYS[ch.path[2]])
            else:
                assert ch.path[0] == "servers" and ch.path[1] == server_of(injected["tool_name"])
                assert len(ch.path) == 3 and isinstance(ch.value, SERVER_KEYS[ch.path[2]])
        # the proposal survives a JSON round trip as data
        again = Proposal(**{**proposal.to_dict(), "changes": proposal.to_dict()["changes"]})
        assert again.to_dict() == proposal.to_dict()
        if proposal.expected_reduction is None:
            assert "unknown" in proposal.expected_impact
        else:
            assert 0 <= proposal.expected_reduction <= 1
            assert f"{proposal.expected_reduction * 100:.0f}%" in proposal.expected_impact


def test_round_trip_into_an_existing_config_keeps_it(all_types_history, tmp_path):
    db, truth = all_types_history
    original = '# my runtime\n[self_heal]\nmin_occurrences = 2  # keep\n\n[tools."other"]\ntimeout_ms = 5\n'
    doc = tomlkit.parse(original)
    for injected in truth["patterns"]:
        for ch in _propose(db, injected["id"]).changes:
            if ch.kind == "config":
                node = doc
                for key in ch.path[:-1]:
                    node = node.setdefault(key, tomlkit.table())
                node[ch.path[-1]] = ch.value
    text = tomlkit.dumps(doc)
    assert text.startswith(original.rstrip("\n"))
    parsed = tomllib.loads(text)
    assert parsed["tools"]["other"]["timeout_ms"] == 5
    assert parsed["tools"]["mcp__kubernetes__pods_list"]["timeout_ms"] > 60_000


def _timeout_history(path: Path, median_ms: float, monkeypatch) -> Path:
    keys, _ = generator.TOOLS["mcp__kubernetes__pods_list"]
    monkeypatch.setitem(generator.TOOLS, "mcp__kubernetes__pods_list", (keys, median_ms))
    generate_history(path, seed=3, runs=300, end=NOW, patterns=DEFAULT_PATTERNS[:1])
    return path


def test_timeout_comes_from_the_observed_durations(tmp_path, monkeypatch):
    fast = _propose(_timeout_history(tmp_path / "a" / "c.db", 15_000.0, monkeypatch), "timeout:mcp__kubernetes__pods_list")
    slow = _propose(_timeout_history(tmp_path / "b" / "c.db", 35_000.0, monkeypatch), "timeout:mcp__kubernetes__pods_list")
    t_fast, t_slow = fast.changes[0].value, slow.changes[0].value
    assert fast.changes[0].path == ["tools", "mcp__kubernetes__pods_list", "timeout_ms"]
    assert 60_000 < t_fast < t_slow <= 600_000
    assert t_fast % 5_000 == 0 and t_slow % 5_000 == 0  # rounded up to a step a person would pick
    for p in (fast, slow):
        assert p.evidence["p99_ms"] <= p.changes[0].value
        assert p.evidence["old_timeout_ms"] == 60_000
        assert p.evidence["timed_out_calls"] == 24
    assert fast.expected_reduction != slow.expected_reduction


def test_timeout_respects_the_configured_limit(all_types_history, tmp_path):
    db, _ = all_types_history
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[tools."mcp__kubernetes__pods_list"]\ntimeout_ms = 60000\n')
    p = _propose(db, "timeout:mcp__kubernetes__pods_list", home)
    assert p.evidence["old_timeout_source"] == "config.toml"
    assert "60000 → " in p.changes_required[0]


def test_a_proposal_and_its_apply_give_the_same_from_value(tmp_path, monkeypatch, all_types_history):
    """The timeout limit the calls show (60 s) is evidence; the from value of the config edit is
    what config.toml holds, (absent) where it sets nothing, in the proposal as in apply."""
    from selfheal_plugin.lifecycle import configedit

    bare = _propose(_timeout_history(tmp_path / "a" / "c.db", 15_000.0, monkeypatch), "timeout:mcp__kubernetes__pods_list")
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[tools."mcp__kubernetes__pods_list"]\ntimeout_ms = 60000\n')
    set_ = _propose(all_types_history[0], "timeout:mcp__kubernetes__pods_list", home)
    for p, text in ((bare, None), (set_, (home / "config.toml").read_text())):
        edits, _ = configedit.split_changes(p.changes)
        applied = configedit.describe_entries(configedit.edit_config(text, edits).entries)
        assert p.changes_required == ["Set " + line for line in applied]
    assert bare.evidence["old_timeout_ms"] == 60_000
    assert bare.changes_required[0].startswith("Set tools.mcp__kubernetes__pods_list.timeout_ms: (absent) → ")
    assert set_.changes_required[0].startswith("Set tools.mcp__kubernetes__pods_list.timeout_ms: 60000 → ")


def _tool_error_history(path: Path, templates: tuple[str, ...]) -> Path:
    pat = InjectedPattern("tool_error", "list_dir", 12, templates, ("planner", "coder"), 0, ("tool_error",))
    generate_history(path, seed=5, runs=150, end=NOW, patterns=(pat,))
    return path


@pytest.mark.parametrize("templates, expect", [
    (("Path not found: {path}", "Directory {path} does not exist"), "preflight"),
    (("Permission denied while listing {path}",), "permission"),
    (("Invalid parameter 'recursive': must be a boolean, got {n}",), "validate"),
])
def test_tool_error_fix_follows_the_messages(tmp_path, templates, expect):
    p = _propose(_tool_error_history(tmp_path / "c.db", templates), "tool_error:list_dir")
    configs = [c for c in p.changes if c.kind == "config"]
    manual = " ".join(c.text for c in p.changes if c.kind == "manual")
    if expect == "preflight":
        assert [c.path for c in configs] == [["tools", "list_dir", "preflight"]]
        assert configs[0].value == ["path_exists"]
        assert p.description == "Add file existence checks before list_dir calls"
        assert p.expected_reduction == 1.0 and p.risk_level == "medium"  # never auto-applied
    elif expect == "permission":
        assert not configs and "Grant list_dir" in manual and p.risk_level == "medium"
        assert p.expected_reduction is None and "unknown" in p.expected_impact
    else:
        assert not configs and "Validate" in manual and "recursive" in manual
        assert p.description == "Validate list_dir arguments before calling it"


def test_preflight_keeps_checks_already_configured_and_not_ones_the_runtime_refuses(tmp_path, caplog):
    db = _tool_error_history(tmp_path / "c.db", ("Path not found: {path}",))
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text('[tools.list_dir]\npreflight = ["path_exists"]\n')
    assert _propose(db, "tool_error:list_dir", home).changes[0].value == ["path_exists"]
    # a check ToolPolicy does not know makes it refuse the file: the reader ignores it and says so
    (home / "config.toml").write_text('[tools.list_dir]\npreflight = ["non_empty"]\n')
    with caplog.at_level("WARNING", logger="selfheal.settings"):
        p = _propose(db, "tool_error:list_dir", home)
    assert p.changes[0].value == ["path_exists"]
    assert "[tools.\"list_dir\"] preflight: unknown preflight check 'non_empty'" in caplog.text


def test_connection_refused_retries_follow_the_failure_rate(all_types_history):
    db, _ = all_types_history
    p = _propose(db, "connection_refused:mcp__github__create_issue")
    rate = p.evidence["failure_rate"]
    n = p.evidence["attempts"]
    assert rate ** (n + 1) <= 0.01 and (n == 1 or rate ** n > 0.01)
    # no retry of the call in the history: sized as if independent, the impact stays unknown
    assert p.evidence["model"] == "independence" and p.expected_reduction is None
    assert p.evidence["independent_reduction"] == pytest.approx(1 - rate ** n, abs=1e-4)
    paths = [c.path for c in p.changes]
    assert ["servers", "github", "health_check"] in paths and ["servers", "github", "auto_restart"] in paths


def test_unknown_delegates_when_messages_agree(all_types_history):
    db, _ = all_types_history
    p = _propose(db, "Unknown:execute_command")
    assert p.strategy == "unknown" and p.error_type == "Unknown"
    assert p.evidence["reclassified_as"] == "tool_error"
    assert p.evidence["delegate_strategy"] == "tool_error"
    assert any(c.kind == "manual" and "record an error_type" in c.text for c in p.changes)


def test_change_validation():
    with pytest.raises(ValueError, match="only touch"):
        Change.config(["tools", "x", "timeout_ms"], 1, file="../etc/passwd")
    with pytest.raises(ValueError, match="not a TOML value"):
        Change.config(["tools", "x", "timeout_ms"], None)
    with pytest.raises(ValueError, match="non-empty list"):
        Change.config([], 1)
    with pytest.raises(ValueError, match="needs its text"):
        Change.manual("  ")
    assert Change.from_dict(Change.config(["tools", "a:b", "timeout_ms"], 5).to_dict()).describe() == \
        'config.toml: tools."a:b".timeout_ms = 5'


def test_server_crashed_adds_a_breaker_only_for_streaks(tmp_path):
    """Isolated crashes get a restart of the server; streaks of failures get a breaker too."""
    from selfheal_plugin.testbed.generator import InjectedPattern

    def crash_pattern(fail_run):
        return InjectedPattern("server_crashed", "mcp__search__web_search", 8,
                               ("MCP server process exited unexpectedly (code {n})",), ("researcher",), 0,
                               ("server_crashed",), fail_run=fail_run)

    db = tmp_path / "isolated.db"
    generate_history(db, seed=5, runs=300, end=NOW, patterns=(crash_pattern(0.7),))
    isolated = _propose(db, "server_crashed:mcp__search__web_search")
    paths = [tuple(c.path) for c in isolated.changes]
    assert isolated.evidence["short_circuited_calls"] == 0  # scattered crashes: no streak to cut short
    assert not any("circuit_breaker" in p for p in paths)
    assert ("servers", "search", "auto_restart") in paths and isolated.risk_level == "low"
    # a streak: the same run fails the call again and again
    streak = tmp_path / "streak.db"
    generate_history(streak, seed=5, runs=300, end=NOW, patterns=())
    c = sqlite3.connect(streak)
    run_id = c.execute("SELECT id FROM runs WHERE status = 'completed' LIMIT 1").fetchone()[0]
    stamp = c.execute("SELECT started_at FROM runs WHERE id = ?", (run_id,)).fetchone()[0]
    for _ in range(8):
        c.execute("INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) VALUES (?,?,?,?,?)",
                  (run_id, 0, "tool_complete", json.dumps({
                      "type": "tool_complete", "name": "mcp__search__web_search", "is_error": True, "duration": 5,
                      "result": "MCP server process exited unexpectedly", "error_type": "server_crashed"}), stamp))
    c.commit()
    c.close()
    streaky = _propose(streak, "server_crashed:mcp__search__web_search")
    assert streaky.evidence["short_circuited_calls"] > 0
    assert any("circuit_breaker" in tuple(c.path) for c in streaky.changes) and streaky.risk_level == "medium"


# ---------------------------------------------------------------- the plugin API as a third party meets it


def test_a_string_path_is_a_toml_dotted_key_never_split_into_characters():
    assert Change.config("tools.x.y", 3).path == ["tools", "x", "y"]
    assert Change.config('tools."mcp__k8s__pods.list".timeout_ms', 3).path == [
        "tools", "mcp__k8s__pods.list", "timeout_ms"]
    assert Change.config(("tools", "x", "y"), 3).path == ["tools", "x", "y"]
    for bad in ("tools..x", "", "tools.x =", 'tools."x', "a b", "x = 1\ny"):
        with pytest.raises(ValueError, match="dotted key"):
            Change.config(bad, 1)
    for bad in (["tools", ""], ["tools", 3], 42, None):
        with pytest.raises(ValueError, match="non-empty list of keys"):
            Change.config(bad, 1)


def test_changes_given_as_data_are_accepted():
    from selfheal_plugin.analysis.patterns import Pattern
    from selfheal_plugin.plugins.strategy import Strategy

    class DataStrategy(Strategy):
        name = "data"
        error_types = ("timeout",)

        def propose(self, pattern, history):
            return self.make_proposal(pattern, description="d", expected_impact="unknown", risk_level="low", changes=[
                {"kind": "config", "file": "config.toml", "path": ["tools", "t", "timeout_ms"], "op": "set",
                 "value": 90000},
                {"kind": "config", "path": "tools.t.retry_attempts", "value": 2},  # file and op by default
                {"kind": "manual", "text": "look at it"}])

    pattern = Pattern(id="timeout:t", error_type="timeout", tool_name="t", occurrences=3, correlation_score=1.0,
                      confidence=0.9, affected_runs=["r"], first_seen="", last_seen="", failure_rate=0.5)
    p = DataStrategy().propose(pattern, None)
    assert [c.to_dict() for c in p.changes] == [
        {"kind": "config", "file": "config.toml", "path": ["tools", "t", "timeout_ms"], "op": "set", "value": 90000},
        {"kind": "config", "file": "config.toml", "path": ["tools", "t", "retry_attempts"], "op": "set", "value": 2},
        {"kind": "manual", "text": "look at it"}]
    assert p.changes_required == ["config.toml: tools.t.timeout_ms = 90000", "config.toml: tools.t.retry_attempts = 2",
                                  "look at it"]
    assert Change.from_dict({"kind": "config", "path": ["a", "b"]}).op == "delete"
    with pytest.raises(ValueError, match="change 1: unknown change field"):
        DataStrategy().make_proposal(pattern, description="d", expected_impact="u", risk_level="low",
                                     changes=[{"kind": "config", "paht": ["a"], "value": 1}])
    with pytest.raises(ValueError, match="change 1: a change must be a Change or a dict, got str"):
        DataStrategy().make_proposal(pattern, description="d", expected_impact="u", risk_level="low",
                                     changes=["tools.a = 1"])


def _deep(n: int) -> dict:
    d: dict = {}
    for _ in range(n):
        d = {"x": d}
    return d


def _non_change(p):
    p.changes.append("raise the timeout")
    return p


BAD_PROPOSALS = {
    "non-JSON evidence": (lambda p: p, {"evidence": {"when": object()}}, "evidence is not JSON data"),
    "NaN evidence": (lambda p: p, {"evidence": {"rate": float("nan")}}, "evidence is not JSON data"),
    "deep nesting": (lambda p: p, {"evidence": _deep(5000)}, "evidence is nested more than 16 levels deep"),
    "None description": (lambda p: p, {"description": None}, "description must be a non-empty string, got None"),
    "non-Change items": (_non_change, {}, "change 2 is a str, not a Change"),
    "not a proposal": (lambda p: {"description": "d"}, {}, "returned dict, not a Proposal"),
    "huge description": (lambda p: p, {"description": "A" * 200_000},
                         "description's first line is 200000 characters, more than 300 (the fix in one line; "
                         "detail goes on the lines after it)"),
    "long detail": (lambda p: p, {"description": "Retry it\n" + "detail " * 400},
                    "description is 2809 characters, more than 2000"),
    "CRLF description": (lambda p: p, {"description": "line1\r\n## Injected heading\n- [ ] fake task"},
                         "description holds the control character \\r; only \\n may separate its lines"),
    "escape in description": (lambda p: p, {"description": "Retry\x1b[2J it"},
                              "description holds the control character \\x1b; only \\n may separate its lines"),
    "line separator": (lambda p: p, {"description": "Retry it\u2028## heading"},
                       "description holds the control character \\u2028"),
    "empty first line": (lambda p: p, {"description": "\nRetry it"},
                         "description's first line is empty; it must say the fix"),
    "impact of two lines": (lambda p: p, {"expected_impact": "80% fewer\n## Injected heading"},
                            "expected_impact holds the control character \\n; it is one line"),
    "huge impact": (lambda p: p, {"expected_impact": "x" * 2001}, "expected_impact is 2001 characters, more than 2000"),
}


def test_a_description_is_a_line_that_says_the_fix_and_maybe_lines_of_detail():
    from selfheal_plugin.plugins.strategy import MAX_DESCRIPTION_CHARS, MAX_SUMMARY_CHARS, check_description

    check_description("Increase the timeout of mcp__k8s__pods_list to 90 s")
    check_description("Retry it once\nmost failures were followed by a success\n- 3 of 4 runs")
    check_description("x" * MAX_SUMMARY_CHARS + "\n" + "y" * (MAX_DESCRIPTION_CHARS - MAX_SUMMARY_CHARS - 1))
    with pytest.raises(ValueError, match="more than 2000"):
        check_description("x" * MAX_SUMMARY_CHARS + "\n" + "y" * (MAX_DESCRIPTION_CHARS - MAX_SUMMARY_CHARS))
    with pytest.raises(ValueError, match="first line is 301 characters"):
        check_description("x" * (MAX_SUMMARY_CHARS + 1))
    root = Path(__file__).resolve().parent.parent / "docs"
    for page in ("plugins.md", "plugin-tutorial.md"):  # the docs quote the numbers of the code
        text = " ".join((root / page).read_text(encoding="utf-8").split())
        assert f"at most {MAX_SUMMARY_CHARS} characters" in text and f"{MAX_DESCRIPTION_CHARS:,} characters" in text


@pytest.mark.parametrize("case", sorted(BAD_PROPOSALS))
def test_an_invalid_proposal_is_one_line_naming_the_plugin_and_the_others_go_on(case, all_types_history, tmp_path):
    import shutil

    from selfheal_plugin import hookimpl
    from selfheal_plugin.history.improvements import ImprovementStore
    from selfheal_plugin.lifecycle.proposals import Proposed, StrategyError, propose_all
    from selfheal_plugin.plugins.strategy import Strategy

    edit, fields, message = BAD_PROPOSALS[case]

    class Bad(Strategy):
        name = "bad"
        error_types = ("connection_refused",)

        def propose(self, pattern, history):
            made = self.make_proposal(pattern, description="d", expected_impact="unknown", risk_level="low",
                                      changes=[Change.manual("x")])
            for key, value in fields.items():
                setattr(made, key, value)
            return edit(made)

    class Plugin:
        @hookimpl
        def register_strategies(self, register):
            register(Bad())

    src, truth = all_types_history
    db = tmp_path / "conversations.db"
    shutil.copy(src, db)
    s = load_settings(tmp_path, db)
    conn = connect(db)
    ids = sorted(p["id"] for p in truth["patterns"] if p["id"].split(":")[0] in ("connection_refused", "timeout"))
    patterns = [get_pattern(conn, i, since=SINCE, now=NOW) for i in ids]
    plugin = Plugin()
    plugins.load_plugins()
    plugins.register(plugin, "bad-plugin")
    try:
        results = propose_all(conn, s, patterns, since=SINCE, now=NOW)
    finally:
        plugins.unregister(plugin)
    by_id = dict(zip(ids, results))
    bad_id = next(i for i in ids if i.startswith("connection_refused:"))
    err = by_id.pop(bad_id)
    assert isinstance(err, StrategyError)
    assert str(err).startswith(f"strategy 'bad' (plugin bad-plugin) returned an invalid proposal for {bad_id}: "
                               f"{message}")
    assert "\n" not in str(err)
    assert all(isinstance(r, Proposed) and r.created for r in by_id.values())  # the others go on
    assert ImprovementStore(conn).open_for_pattern(bad_id) is None  # nothing stored
    assert any(e.plugin == "bad-plugin" and e.phase == "strategy" and message in e.error for e in plugins.errors())


def test_a_hanging_or_exiting_strategy_costs_its_pattern_only(all_types_history):
    import threading

    from selfheal_plugin import hookimpl
    from selfheal_plugin.lifecycle.proposals import StrategyError
    from selfheal_plugin.plugins.strategy import Strategy

    release = threading.Event()

    class Hang(Strategy):
        name = "hang"
        error_types = ("connection_refused",)

        def propose(self, pattern, history):
            release.wait()

    class Exit(Strategy):
        name = "exit"
        error_types = ("timeout",)

        def propose(self, pattern, history):
            raise SystemExit(3)

    class Plugin:
        @hookimpl
        def register_strategies(self, register):
            register(Hang())
            register(Exit())

    db, truth = all_types_history
    # Every plugin call has this deadline (the odd plugin's registration, Exit's propose):
    # 2 s, which a busy machine's stalls do not reach; the test waits it out once, for Hang.
    s = load_settings(db.parent, db).with_overrides(plugin_timeout_seconds=2)
    conn = connect(db)
    plugin = Plugin()
    plugins.load_plugins()
    plugins.register(plugin, "odd")
    try:
        # an exit costs its call; a hang its call and every later call into the plugin (skipped, not waited for)
        for prefix, expected in (("timeout:", "failed in propose(): SystemExit: 3"),
                                 ("connection_refused:", "failed in propose(): timed out after 2 s"),
                                 ("timeout:", "failed in propose(): skipped: it timed out earlier in this process")):
            pid = next(p["id"] for p in truth["patterns"] if p["id"].startswith(prefix))
            pattern = get_pattern(conn, pid, since=SINCE, now=NOW)
            with pytest.raises(StrategyError, match=r"^strategy '\w+' \(plugin odd\) " + re.escape(expected)):
                make_proposal(pattern, history_window(conn, s, SINCE, now=NOW))
    finally:
        release.set()
        plugins.unregister(plugin)


def test_the_history_window_always_has_an_end(all_types_history):
    from datetime import timedelta

    from selfheal_plugin.plugins.strategy import HistoryWindow

    db, _ = all_types_history
    conn = connect(db)
    s = load_settings(db.parent, db)
    assert history_window(conn, s, SINCE, now=NOW).until == NOW
    assert history_window(conn, s, SINCE).until is not None
    assert HistoryWindow(conn, NOW - timedelta(days=1)).until is not None
    assert HistoryWindow(conn, NOW - timedelta(days=1), None).until is not None


def test_the_reference_documents_what_a_strategy_author_meets():
    import dataclasses
    import inspect

    from selfheal_plugin.analysis.patterns import Pattern
    from selfheal_plugin.plugins import strategy as api

    module_doc = inspect.getdoc(api)
    for f in dataclasses.fields(Pattern):
        assert f.name in module_doc, f"Pattern.{f.name} documented"
    for level in api.RISK_LEVELS:
        assert f"``{level}``" in module_doc
    for cls in (api.ToolCall, api.Change):
        doc = inspect.getdoc(cls)
        for f in dataclasses.fields(cls):
            assert f"``{f.name}``" in doc, f"{cls.__name__}.{f.name} documented"
    assert "suggested_fix" in inspect.getdoc(api.Strategy) and not hasattr(api.Strategy, "suggest")
    assert "never None" in inspect.getdoc(api.HistoryWindow)
    assert "dotted key" in inspect.getdoc(api.parse_key_path)
