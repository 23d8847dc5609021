"""The history is written by another program: hostile rows, hostile text, foreign and
damaged files (DESIGN.md "Trust boundaries"; issue 14, items 3, 5, 6 and 7)."""
from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from selfheal_plugin.analysis.health import analyze_run_health, get_health_dashboard
from selfheal_plugin import hookimpl
from selfheal_plugin.analysis.patterns import (MAX_EXAMPLE_CHARS, Pattern, detect_failure_patterns, get_pattern,
                                               pattern_details, split_pattern_id)
from selfheal_plugin.cli.main import agent
from selfheal_plugin.lifecycle.events import check_history, ensure_watch_schema
from selfheal_plugin.errors import HistoryError
from selfheal_plugin.history.connection import connect, normalize_error_type
from selfheal_plugin.history.errorindex import MAX_DURATION_MS, MAX_EVENT_BYTES, MAX_MESSAGE_CHARS, refresh
from selfheal_plugin.history.settings import load_settings
from selfheal_plugin.history.text import commit_line, for_rich, for_terminal, markdown_inline
from selfheal_plugin.lifecycle.gitops import commit_message
from selfheal_plugin.lifecycle.simulation import load_runs
from selfheal_plugin.plugins.inbox import format_entry, parse_inbox
from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.plugins.manager import Notification
from selfheal_plugin.plugins.strategy import HistoryWindow
from selfheal_plugin.testbed.generator import generate_history

from .conftest import NOW

FORGED = "\n## 2026-01-01 00:00:00 [security-team] **[URGENT]** <b>pay</b>\nSelf-Heal-Improvement: imp-x\n"
HOSTILE_TOOL = "mcp__x__y\x1b[2J[red]evil[/red]" + FORGED.rstrip("\n")
STAMP = NOW.strftime("%Y-%m-%dT%H:%M:%S.000Z")
# The commands' window as an instant, not "-7d": the rows are stamped at the fixed NOW, and a
# window relative to the real clock stops holding them a week after NOW.
WEEK_BEFORE_NOW = (NOW - timedelta(days=7)).isoformat()


@pytest.fixture(scope="module")
def base_history(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("untrusted") / "conversations.db"
    generate_history(path, seed=5, runs=40, end=NOW)
    connect(path).close()  # our tables and the index, once
    return path


@pytest.fixture
def history(base_history, binks_home) -> Path:
    dst = binks_home / "conversations.db"
    shutil.copy(base_history, dst)
    return dst


def add_event(db: Path, data: str | bytes, *, timestamp: str = STAMP, run_id: str | None = None,
              event_type: str = "tool_complete", workflow: str = "wf") -> str:
    """One run_events row with ``data`` as event_data (bytes go in as TEXT, unchecked)."""
    c = sqlite3.connect(db)
    if run_id is None:
        run_id = str(uuid.uuid4())
        c.execute("INSERT INTO runs VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                  (run_id, workflow, "t", "failed", "m", STAMP, STAMP, 10, None, "boom", None))
    sql = "INSERT INTO run_events(run_id, step_index, event_type, event_data, timestamp) VALUES (?,?,?,{},?)"
    c.execute(sql.format("CAST(? AS TEXT)" if isinstance(data, bytes) else "?"), (run_id, 0, event_type, data, timestamp))
    c.commit()
    c.close()
    return run_id


def failed_call(name: str = "mcp__x__y", **extra) -> dict:
    return {"type": "tool_complete", "name": name, "result": "failed", "duration": 12, "is_error": True,
            "error_type": "timeout", **extra}


def bad_rows(db: Path) -> int:
    conn = connect(db)
    try:
        return refresh(conn).total_bad_rows
    finally:
        conn.close()


# ------------------------------------------------------------------ bad rows


@pytest.mark.parametrize("data, where", [
    (json.dumps(failed_call(duration=1e30)), "window"),  # OverflowError before
    (json.dumps(failed_call(duration=-1e30)), "window"),
    ('{"type": "tool_complete", "name": "t", "duration": 1e400, "is_error": true}', "window"),  # inf
    (json.dumps(failed_call(duration=MAX_DURATION_MS + 1, is_error=False)), "window"),
    (json.dumps(failed_call(result="bad @@")).encode().replace(b"@@", b"\xff\xfe"), "old"),  # invalid UTF-8, years ago
    (json.dumps(failed_call()).encode().replace(b"mcp__x__y", b"mcp__x\xc3__y"), "window"),  # in the name
    (json.dumps(failed_call(result="x" * (MAX_EVENT_BYTES + 10))), "window"),  # absurd size
])
def test_a_bad_row_is_counted_and_skipped_everywhere(history, data, where):
    before = bad_rows(history)
    run_id = add_event(history, data, timestamp=STAMP if where == "window" else "2019-01-01T00:00:00Z")
    conn = connect(history)
    try:
        detection = detect_failure_patterns(conn, since="-7d", now=NOW, min_occurrences=1, confidence_threshold=0)
        assert detection.scanned.total_bad_rows == before + 1
        assert all(p.tool_name != "mcp__x__y" for p in detection.patterns)
        dash = get_health_dashboard(conn, since="-7d", now=NOW)
        if where == "window":
            assert dash["skipped_rows"] >= 1
        assert analyze_run_health(conn, run_id, now=NOW)["skipped_events"] == 1
        assert all(c.tool != "mcp__x__y" for r in load_runs(conn, 0, None) for c in r.calls)
        assert HistoryWindow(conn, NOW - timedelta(days=7)).tool_calls("mcp__x__y") == []
        ensure_watch_schema(conn)
        check_history(conn, load_settings(history.parent), fire=False)
    finally:
        conn.close()


def test_a_result_nested_deeper_than_python_parses_is_still_a_failure(history):
    """SQLite takes the fields apart for every reader, so a result nested 1500 deep (past
    Python's json recursion limit) is one failed call everywhere, not a traceback."""
    run_id = add_event(history, json.dumps(failed_call(result="@@")).replace('"@@"', "[" * 1500 + "]" * 1500))
    conn = connect(history)
    try:
        found = detect_failure_patterns(conn, since="-7d", now=NOW, min_occurrences=1, confidence_threshold=0)
        assert [p.occurrences for p in found.patterns if p.tool_name == "mcp__x__y"] == [1]
        health = analyze_run_health(conn, run_id, now=NOW)
        assert health["skipped_events"] == 0 and health["events"] == 1
        assert [c.tool for r in load_runs(conn, 0, None) if r.run_id == run_id for c in r.calls] == ["mcp__x__y"]
    finally:
        conn.close()


def test_the_calls_scan_reads_past_invalid_utf8_in_a_calls_arguments(history):
    """The index reads the tools' calls with sqlite3's strict C decoder; a row with invalid
    UTF-8 (in a call's arguments, here) switches the rest of the scan to the lenient one, and
    the evidence reads what it stored."""
    from selfheal_plugin.analysis.evidence import failed_calls
    from selfheal_plugin.history.errorindex import args_key, refresh

    bad_run = add_event(history, json.dumps({"type": "tool_start", "name": "mcp__x__y", "arguments": {"path": "@@"}})
                        .encode().replace(b"@@", b"/tmp/\xff"), event_type="tool_start")
    add_event(history, json.dumps(failed_call()), run_id=bad_run)
    good_run = add_event(history, json.dumps({"type": "tool_start", "name": "mcp__x__y", "arguments": {"path": "/a"}}),
                         event_type="tool_start")
    add_event(history, json.dumps(failed_call()), run_id=good_run)
    conn = connect(history)
    try:
        refresh(conn)
        mine = conn.execute("SELECT event_id, run_id, ok, args_key FROM selfheal_calls WHERE run_id IN (?, ?) "
                            "ORDER BY event_id", (bad_run, good_run)).fetchall()
        keys, texts = failed_calls(conn, [eid for eid, *_ in mine])
    finally:
        conn.close()
    assert [run for _, run, _, _ in mine] == [bad_run, good_run] and not any(ok for _, _, ok, _ in mine)
    bad, good = (texts[eid] for eid, *_ in mine)
    assert "\ufffd" in bad and json.loads(good) == {"path": "/a"}
    assert [keys[eid] for eid, *_ in mine] == [key for *_, key in mine] == [args_key(bad), args_key(good)]


def test_bad_rows_cost_no_traceback_in_the_commands(history):
    add_event(history, json.dumps(failed_call(duration=1e30)))
    add_event(history, json.dumps(failed_call()).encode().replace(b"failed", b"fa\xffiled"),
              timestamp="2019-01-01T00:00:00Z")
    for args in (["detect"], ["dashboard"], ["detect", "--json"]):
        res = CliRunner().invoke(agent, ["self-heal", *args, "--db", str(history)])
        assert res.exit_code == 0, res.output
        assert "Traceback" not in res.output


def test_a_long_message_is_stored_cut(history):
    for _ in range(3):
        add_event(history, json.dumps(failed_call(result="y" * 200_000)))
    conn = connect(history)
    try:
        pattern = get_pattern(conn, "timeout:mcp__x__y", since="-7d", now=NOW)
        assert all(len(o["message"]) <= MAX_MESSAGE_CHARS for o in pattern.occurrences_detail)
        assert all(len(t["example"]) <= MAX_EXAMPLE_CHARS for t in pattern_details(pattern)["templates"])
    finally:
        conn.close()


def test_show_bounds_huge_messages(history):
    """4 × 10 MB messages took 34 s to wrap; the examples are bounded now (an old index
    with whole messages is rebuilt: its version changed)."""
    conn = connect(history)
    conn.execute("UPDATE selfheal_state SET value = '3' WHERE key = 'errors_index_version'")
    conn.close()
    for _ in range(4):
        add_event(history, json.dumps(failed_call(result="z" * 900_000)))
    res = CliRunner().invoke(agent, ["self-heal", "show", "timeout:mcp__x__y", "--db", str(history), "--since", WEEK_BEFORE_NOW])
    assert res.exit_code == 0, res.output
    assert "zzzz" in res.output
    assert len(res.output) < 20 * MAX_EXAMPLE_CHARS  # not 3.6 MB of messages


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
HOSTILE_EVENT = st.fixed_dictionaries({}, optional={
    "type": st.just("tool_complete"), "name": st.text(max_size=20) | JSON_VALUES,
    "is_error": st.booleans() | JSON_VALUES, "error_type": st.text(max_size=20) | JSON_VALUES,
    "duration": st.floats(allow_nan=False) | st.integers(min_value=-2**70, max_value=2**70) | JSON_VALUES,
    "result": st.text() | JSON_VALUES, "arguments": JSON_VALUES})
KNOWN_BAD = st.one_of(
    st.builds(lambda d, err: json.dumps(failed_call(duration=d, is_error=err)),
              st.floats(min_value=MAX_DURATION_MS + 1, max_value=1e300) | st.floats(max_value=-MAX_DURATION_MS - 1,
                                                                                     min_value=-1e300),
              st.booleans()),
    st.builds(lambda junk, text: json.dumps(failed_call(result=text + "@@")).encode().replace(b"@@", junk),
              st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80abc"]), st.text()),
    st.text().filter(lambda t: not _is_json(t)),
)
ANY_ROW = st.one_of(
    st.builds(json.dumps, HOSTILE_EVENT),
    st.text(),
    st.binary(max_size=60),
    st.builds(lambda d, junk: json.dumps(d).encode() + junk, HOSTILE_EVENT, st.binary(max_size=4)),
)
TIMESTAMPS = st.one_of(st.just(STAMP), st.just("2019-01-01T00:00:00Z"), st.text(max_size=30),
                       st.datetimes().map(lambda d: d.isoformat()))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(bad=st.lists(KNOWN_BAD, max_size=3), others=st.lists(st.tuples(ANY_ROW, TIMESTAMPS), max_size=4))
def test_no_row_content_makes_detection_dashboard_or_health_raise(base_history, bad, others):
    """Property: whatever the runtime wrote, detection, the dashboard, run health, the
    replay loader and the watcher answer; the rows known to be bad are counted."""
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "conversations.db"
        shutil.copy(base_history, db)
        before = bad_rows(db)
        run_id = None
        for data in bad:
            run_id = add_event(db, data, run_id=run_id)
        for data, ts in others:
            run_id = add_event(db, data, timestamp=ts, run_id=run_id)
        conn = connect(db)
        try:
            detection = detect_failure_patterns(conn, since="-7d", now=NOW, min_occurrences=1,
                                                confidence_threshold=0)
            assert detection.scanned.total_bad_rows >= before + len(bad)
            for p in detection.patterns:
                pattern_details(get_pattern(conn, p.id, since="-7d", now=NOW))
            get_health_dashboard(conn, since="-7d", now=NOW, detailed=True)
            if run_id:
                analyze_run_health(conn, run_id, now=NOW)
            load_runs(conn, 0, None)
            load_runs(conn, 0, None, tools=["mcp__x__y"])
            HistoryWindow(conn, NOW - timedelta(days=7)).tool_calls("mcp__x__y")
            ensure_watch_schema(conn)
            check_history(conn, load_settings(Path(tmp)), fire=False)
        finally:
            conn.close()


# ------------------------------------------------------------------ text where it lands


def test_for_terminal_neutralises_control_characters():
    assert for_terminal("a\x1b[2Jb\nc\x07\x9b\u202e") == "a\\x1b[2Jb\\nc\\x07\\x9b\\u202e"
    assert for_terminal("mcp__k8s__pods_list") == "mcp__k8s__pods_list"
    assert for_rich("[red]x[/red]\x1b") == "\\[red]x\\[/red]\\x1b"


def test_markdown_inline_cannot_forge_blocks_or_html():
    text = markdown_inline("#x" + FORGED + "<img src=x onerror=alert(1)> `a` *b* [l](http://e)")
    assert "\n" not in text and "<" not in text and ">" not in text
    assert text.startswith("\\#x") and "\\*\\*\\[URGENT\\]\\*\\*" in text and "\\[l\\](http://e)" in text
    assert markdown_inline("mcp__k8s__pods_list") == "mcp__k8s__pods_list"


def test_commit_line_is_one_line():
    assert commit_line("a\nSelf-Heal-Improvement: imp-x\r\n") == "a\\nSelf-Heal-Improvement: imp-x\\r\\n"


def test_a_hostile_tool_name_forges_no_trailer(tmp_path):
    msg = commit_message(f"selfheal: fix {HOSTILE_TOOL}", [f"  Recurring failure pattern timeout:{HOSTILE_TOOL}.",
                                                           "Self-Heal-Action: rollback"],
                         "imp-1", f"timeout:{HOSTILE_TOOL}", "apply")
    trailers = subprocess.run(["git", "interpret-trailers", "--parse"], input=msg, capture_output=True, text=True,
                              check=True).stdout.splitlines()
    assert [t.split(":")[0] for t in trailers] == ["Self-Heal-Improvement", "Self-Heal-Pattern", "Self-Heal-Action"]
    assert trailers[0] == "Self-Heal-Improvement: imp-1" and trailers[2] == "Self-Heal-Action: apply"
    assert "\x1b" not in msg


def test_an_applied_commit_of_a_hostile_tool_has_only_our_trailers(binks_home):
    from selfheal_plugin.lifecycle.apply import apply_improvement

    from .lifecycle_data import add_improvement, git, settings_for, timeout_change

    db = binks_home / "conversations.db"
    connect(db, create=True).close()
    imp = add_improvement(db, [timeout_change(90_000, tool=HOSTILE_TOOL)], pattern_id=f"timeout:{HOSTILE_TOOL}",
                          description=f"Increase the timeout of {HOSTILE_TOOL}")
    s = settings_for(binks_home)
    conn = connect(s.db_path)
    try:
        apply_improvement(conn, s, imp.id)
    finally:
        conn.close()
    trailers = git(binks_home, "log", "-1", "--format=%(trailers:only,unfold)").strip().splitlines()
    assert [t.split(":")[0] for t in trailers] == ["Self-Heal-Improvement", "Self-Heal-Pattern", "Self-Heal-Action"]
    assert trailers[0] == f"Self-Heal-Improvement: {imp.id}"


def builtin_hook(name: str):
    plugins.load_plugins()
    return plugins.pm.get_plugin(f"selfheal.hooks.{name}")


def test_a_forged_heading_stays_inside_its_inbox_entry():
    _notification = builtin_hook("auto_analysis")._notification

    pattern = Pattern(f"timeout:{HOSTILE_TOOL}", "timeout", HOSTILE_TOOL, 3, 0.9, 0.9, ["r1"], "a", "b", 0.5,
                      suggested_fix=f"raise the timeout of {HOSTILE_TOOL}")
    note = _notification({"id": "r1", "workflow_name": "wf" + FORGED}, pattern, None, False, "no strategy" + FORGED)
    text = format_entry(note)
    entries = parse_inbox(f"# Inbox - 2026-01-01\n\n{text}\n")
    assert len(entries) == 1 and entries[0].source == "self-heal" and entries[0].priority == "high"
    assert sum(line.startswith("#") for line in text.splitlines()) == 1  # the real header only
    assert "<b>" not in text and "\x1b" not in text
    # the sink guards any notifier's body too
    raw = format_entry(Notification(title="t", body="ok" + FORGED + "<script>x</script>\n===\n\x1b[2J"))
    assert sum(line.startswith("#") for line in raw.splitlines()) == 1
    assert "<script>" not in raw and "\x1b" not in raw and "\n===" not in raw


def test_the_patterns_detected_summary_escapes_pattern_ids():
    patterns_detected = builtin_hook("notifications").patterns_detected

    class Sink:
        def __init__(self):
            self.notes = []

        @hookimpl
        def notify(self, notification, settings):
            self.notes.append(notification)

    sink = Sink()
    plugins.register(sink, "test-untrusted-sink")
    try:
        pattern = Pattern(f"timeout:{HOSTILE_TOOL}", "timeout", HOSTILE_TOOL, 3, 0.9, 0.9, ["r"], "a", "b", 0.5)
        patterns_detected(patterns=[pattern], found=1, settings=load_settings())
    finally:
        plugins.unregister(sink)
    body = sink.notes[-1].body
    assert not any(line.startswith(("#", "Self-Heal")) for line in body.splitlines())
    assert "<b>" not in body


@pytest.fixture
def hostile_history(history) -> Path:
    """Four failures of a tool whose name, message, workflow and argument keys are hostile."""
    for _ in range(4):
        run_id = add_event(history, json.dumps({"type": "tool_start", "name": HOSTILE_TOOL,
                                                "arguments": {"k\x1b[2J": 1}}),
                           event_type="tool_start", workflow="wf\x1b]0;pwned\x07\x1b[31m")
        add_event(history, json.dumps(failed_call(HOSTILE_TOOL, result="fail \x1b[2J" + FORGED,
                                                  error_type="Boom\x1b[2J")), run_id=run_id)
    return history


@pytest.mark.parametrize("args", [["detect", "--since", WEEK_BEFORE_NOW, "--confidence", "0", "--min-occurrences", "1"],
                                  ["dashboard", "--since", WEEK_BEFORE_NOW, "--detailed"], ["improvements"]])
def test_the_terminal_gets_no_escape_sequence_from_the_history(hostile_history, args):
    if args[0] == "improvements":  # proposals for the hostile pattern first
        assert CliRunner().invoke(agent, ["self-heal", "detect", "--since", WEEK_BEFORE_NOW, "--confidence", "0",
                                          "--db", str(hostile_history)]).exit_code == 0
    res = CliRunner().invoke(agent, ["self-heal", *args, "--db", str(hostile_history)], color=True)
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\x07" not in res.output
    assert not any(line.startswith("## 2026") for line in res.output.splitlines())


def test_show_prints_a_hostile_pattern_escaped(hostile_history):
    conn = connect(hostile_history)
    try:
        ids = [p.id for p in detect_failure_patterns(conn, since="-7d", now=NOW, min_occurrences=1,
                                                     confidence_threshold=0).patterns if "evil" in p.id]
    finally:
        conn.close()
    assert len(ids) == 1
    res = CliRunner().invoke(agent, ["self-heal", "show", ids[0], "--db", str(hostile_history), "--since", WEEK_BEFORE_NOW],
                             color=True)
    assert res.exit_code == 0, res.output
    assert "\x1b" not in res.output and "\\x1b[2J" in res.output and "[red]evil[/red]" in res.output
    assert not any(line.startswith("## 2026") for line in res.output.splitlines())


def test_a_plugin_error_quoting_a_hostile_pattern_is_escaped_in_daemon_and_plugins(history):
    """A strategy refuses a description holding the tool name's control characters; the
    plugin error that quotes the pattern id reaches the terminal escaped, as one line."""
    from datetime import datetime, timezone
    tool = "evil\x1b[31mRED\x1b[0m\u202eexe.txt\nFAKE LINE"
    now = datetime.now(timezone.utc)
    for i in range(8):  # in the daemon's window, which ends at the real clock
        stamp = (now - timedelta(hours=i + 1)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        add_event(history, json.dumps(failed_call(tool, error_type="tool_error")), timestamp=stamp)
    home = ["--home", str(history.parent)]
    for args in (["self-heal-daemon", "--once"], ["self-heal", "plugins"]):
        res = CliRunner().invoke(agent, [*args, *home], color=True, env={"COLUMNS": "200"})  # whole lines
        assert res.exit_code == 0, res.output
        assert "invalid proposal for tool_error:evil" in res.output
        assert "\x1b" not in res.output and "\u202e" not in res.output, res.output
        assert not any(line.startswith("FAKE LINE") for line in res.output.splitlines()), res.output


def test_an_old_improvements_row_with_an_unreadable_applied_at_is_refused_in_one_line(history):
    """The runtime's own older improvements rows may hold any text in applied_at."""
    connect(history).close()  # our columns of improvements
    c = sqlite3.connect(history)
    c.execute("INSERT INTO improvements(id, category, description, created_at, applied_at, status) "
              "VALUES ('L1', 'tool', 'x', '2025-01-01', 'also-garbage', 'applied')")
    c.commit()
    before = c.execute("SELECT * FROM improvements WHERE id = 'L1'").fetchall()
    c.close()
    db = ["--db", str(history)]
    for args in (["verify", "L1"], ["verify", "L1", "--json"], ["verify", "L1", "--early"]):
        res = CliRunner().invoke(agent, ["self-heal", *args, *db])
        assert res.exit_code == 1 and res.stdout == "", res.output
        assert res.stderr.count("\n") == 1 and "L1 has an unreadable applied_at" in res.stderr
        assert "nothing was changed" in res.stderr
    c = sqlite3.connect(history)
    assert c.execute("SELECT * FROM improvements WHERE id = 'L1'").fetchall() == before
    c.close()
    for args in (["improvements"], ["improvements", "--json"], ["dashboard", "--json"], ["learn"]):
        res = CliRunner().invoke(agent, ["self-heal", *args, *db])
        assert res.exit_code == 0 and "Traceback" not in res.output, res.output


def test_a_strategy_refusing_a_hostile_pattern_is_one_warning_line_per_command(history, caplog):
    tool = "evil\x1b[31mRED\x1b[0m\u202eexe.txt\nFAKE LINE"
    for _ in range(8):
        add_event(history, json.dumps(failed_call(tool, error_type="tool_error")))
    with caplog.at_level("WARNING", logger="selfheal"):
        res = CliRunner().invoke(agent, ["self-heal", "detect", "--since", WEEK_BEFORE_NOW, "--db", str(history)])
    assert res.exit_code == 0, res.output
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "evil" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in warned]


# ------------------------------------------------------------------ pattern ids with ':'


def test_an_error_type_with_a_colon_is_found_by_show(history):
    for _ in range(3):
        add_event(history, json.dumps(failed_call("api:get", error_type="HTTP:503")))
    conn = connect(history)
    try:
        found = [p for p in detect_failure_patterns(conn, since="-7d", now=NOW, min_occurrences=1,
                                                    confidence_threshold=0).patterns if p.tool_name == "api:get"]
        assert [p.id for p in found] == ["http_503:api:get"]
        assert get_pattern(conn, found[0].id, since="-7d", now=NOW).occurrences == 3
    finally:
        conn.close()
    assert split_pattern_id("http_503:api:get") == ("http_503", "api:get")
    assert normalize_error_type("HTTP:503") == "http_503" and ":" not in normalize_error_type("a:b:c")
    res = CliRunner().invoke(agent, ["self-heal", "show", "http_503:api:get", "--db", str(history), "--since", WEEK_BEFORE_NOW])
    assert res.exit_code == 0, res.output


# ------------------------------------------------------------------ foreign and damaged files


def test_a_foreign_database_is_refused_and_left_untouched(tmp_path):
    """Another program's SQLite file, even one with tables called runs and run_events."""
    path = tmp_path / "foreign.db"
    c = sqlite3.connect(path)
    c.executescript("CREATE TABLE runs (id INTEGER PRIMARY KEY, km REAL);"
                    "CREATE TABLE run_events (id INTEGER PRIMARY KEY, lap INTEGER);"
                    "INSERT INTO runs VALUES (1, 5.2);")
    c.commit()
    c.close()
    before = path.read_bytes()
    with pytest.raises(HistoryError, match="runs table without the runtime's column") as exc:
        connect(path)
    assert "\n" not in str(exc.value) and "nothing was written" in str(exc.value)
    assert path.read_bytes() == before
    res = CliRunner().invoke(agent, ["self-heal", "detect", "--db", str(path)])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    assert path.read_bytes() == before


def test_a_foreign_improvements_table_is_refused(tmp_path, base_history):
    path = tmp_path / "h.db"
    shutil.copy(base_history, path)
    c = sqlite3.connect(path)
    c.executescript("DROP TABLE improvements; CREATE TABLE improvements (sku TEXT, price REAL);")
    c.commit()
    c.close()
    before = path.read_bytes()
    with pytest.raises(HistoryError, match="improvements table without"):
        connect(path)
    assert path.read_bytes() == before


def _damage(src: Path, dst: Path, first_page: int = 3) -> Path:
    shutil.copy(src, dst)
    data = bytearray(dst.read_bytes())
    page = 4096
    for p in range(first_page, len(data) // page, 4):  # scribble over a b-tree page header now and then
        data[p * page:p * page + 12] = b"\xde\xad\xbe\xef" * 3
    dst.write_bytes(bytes(data))
    return dst


def test_a_damaged_database_is_refused_and_nothing_written(tmp_path, base_history):
    path = _damage(base_history, tmp_path / "damaged.db")
    before = path.read_bytes()
    with pytest.raises(HistoryError, match="damaged"):
        connect(path)
    assert path.read_bytes() == before
    res = CliRunner().invoke(agent, ["self-heal", "detect", "--db", str(path)])
    assert res.exit_code == 1 and "Traceback" not in res.output and "damaged" in res.output
    assert path.read_bytes() == before


def test_a_truncated_or_foreign_file_is_refused(tmp_path, base_history):
    path = tmp_path / "h.db"
    path.write_bytes(base_history.read_bytes()[:50])
    with pytest.raises(HistoryError, match="damaged"):
        connect(path)
    assert len(path.read_bytes()) == 50
    path.write_bytes(b"PK\x03\x04" + bytes(200))  # a zip file, say
    with pytest.raises(HistoryError, match="not an SQLite file"):
        connect(path)
    assert path.read_bytes() == b"PK\x03\x04" + bytes(200)


def test_a_directory_at_the_history_path_is_one_line(tmp_path):
    (tmp_path / "h.db").mkdir()
    with pytest.raises(HistoryError, match="cannot open .*h.db: it is a directory"):
        connect(tmp_path / "h.db")
    assert list((tmp_path / "h.db").iterdir()) == []


def test_missing_and_empty_files_keep_their_behaviour(tmp_path):
    with pytest.raises(HistoryError, match="no run history"):
        connect(tmp_path / "missing.db")
    assert not (tmp_path / "missing.db").exists()
    connect(tmp_path / "new.db", create=True).close()  # created with the runtime's schema
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(HistoryError, match="no runs or run_events table"):
        connect(tmp_path / "empty.db")
    connect(tmp_path / "empty.db", create=True).close()
    assert connect(tmp_path / "empty.db").execute("SELECT count(*) FROM runs").fetchone()[0] == 0



def test_damage_past_the_up_front_check_is_one_line(tmp_path, base_history, monkeypatch):
    """A file over the quick_check size limit is not checked up front: the damage is
    reported as one line when a read reaches it, not as a traceback."""
    from selfheal_plugin.history import connection

    monkeypatch.setattr(connection, "QUICK_CHECK_MAX_BYTES", 0)
    path = _damage(base_history, tmp_path / "damaged.db", first_page=len(base_history.read_bytes()) // 4096 // 2)
    connect(path).close()  # the schema is intact: the damage is in the events
    res = CliRunner().invoke(agent, ["self-heal", "dashboard", "--db", str(path)])
    assert res.exit_code == 1, res.output
    assert "damaged" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_invalid_utf8_in_the_runs_table_raises_nowhere(history):
    c = sqlite3.connect(history)
    run_id = str(uuid.uuid4())
    c.execute("INSERT INTO runs VALUES (?, CAST(? AS TEXT), 't', CAST(? AS TEXT), 'm', ?, ?, 10, NULL, "
              "CAST(? AS TEXT), CAST(? AS TEXT))", (run_id, b"wf\xff", b"fail\xc3ed", STAMP, STAMP, b"err\xfe", b"{\xff}"))
    c.commit()
    c.close()
    for _ in range(3):
        add_event(history, json.dumps(failed_call()), run_id=run_id)
    conn = connect(history)
    try:
        found = detect_failure_patterns(conn, since="-7d", now=NOW, min_occurrences=1, confidence_threshold=0)
        pattern = [p for p in found.patterns if p.tool_name == "mcp__x__y"][0]
        details = pattern_details(get_pattern(conn, pattern.id, since="-7d", now=NOW))
        assert details["runs"][0]["workflow"] == "wf\ufffd"
        get_health_dashboard(conn, since="-7d", now=NOW, detailed=True)
        analyze_run_health(conn, run_id, now=NOW)
        load_runs(conn, 0, None)
        ensure_watch_schema(conn)
        check_history(conn, load_settings(history.parent), fire=False)
    finally:
        conn.close()
    for args in (["show", pattern.id, "--since", WEEK_BEFORE_NOW], ["dashboard", "--detailed"], ["health", run_id]):
        res = CliRunner().invoke(agent, ["self-heal", *args, "--db", str(history)])
        assert res.exit_code == 0, res.output


@pytest.mark.parametrize("column", ["id", "workflow_name", "status", "started_at"])
def test_a_blob_in_a_runs_row_is_counted_and_skipped_everywhere(history, column):
    """A runs row with a BLOB where the runtime writes text breaks no command: the row is
    skipped by every reader of runs (its failures with it) and counted (skipped_runs)."""
    run_id = add_event(history, json.dumps(failed_call("mcp__blob__run")))
    for _ in range(3):
        add_event(history, json.dumps(failed_call("mcp__blob__run")), run_id=run_id)
    c = sqlite3.connect(history)
    c.execute("INSERT INTO runs(id, workflow_name, task, status, model, started_at) "
              "VALUES ('b1', 'w', 't', 'completed', 'm', X'FFFE')")
    c.execute(f"UPDATE runs SET {column} = X'0102' WHERE id = ?", (run_id,))
    c.commit()
    c.close()
    db = ["--db", str(history)]
    res = CliRunner().invoke(agent, ["self-heal", "detect", "--json", "--since", WEEK_BEFORE_NOW,
                                     "--min-occurrences", "1", *db])
    assert res.exit_code == 0, res.output
    found = json.loads(res.stdout)
    assert found["skipped_runs"] == 2
    assert not [p for p in found["patterns"] if p["tool_name"] == "mcp__blob__run"]
    assert res.stderr.count("\n") == 1 and "2 malformed runs row(s)" in res.stderr
    res = CliRunner().invoke(agent, ["self-heal", "dashboard", "--json", "--detailed", "--since", WEEK_BEFORE_NOW, *db])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["skipped_runs"] == 2
    for args in (["dashboard"], ["dashboard", "--html", str(history.parent / "d.html")], ["learn"]):
        res = CliRunner().invoke(agent, ["self-heal", *args, *db])
        assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    res = CliRunner().invoke(agent, ["self-heal-daemon", "--once", "--json", *db])
    assert res.exit_code == 0, res.output
    assert not json.loads(res.stdout)["tick"]["errors"]
    conn = connect(history)
    try:
        assert all(isinstance(r.run_id, str) for r in load_runs(conn, 0, None))
        check_history(conn, load_settings(history.parent), fire=False)
    finally:
        conn.close()


@pytest.mark.parametrize("key, value", [("errors_watermark", "'garbage'"), ("bad_rows", "X'FF'"),
                                        ("errors_watermark", "-5"), ("watch_events_watermark", "1e30"),
                                        ("watch_runs_floor", "'not a floor'")])
def test_an_unreadable_mark_of_ours_is_started_again_with_one_warning(history, key, value, caplog):
    """selfheal_state lives in a file other programs write: a mark that is not an integer is
    treated as absent (the index or the watcher starts again), one warning, nothing raises."""
    db = ["--db", str(history)]
    window = ["--since", WEEK_BEFORE_NOW, "--min-occurrences", "1"]
    assert CliRunner().invoke(agent, ["self-heal-daemon", "--once", "--json", *db]).exit_code == 0
    before = json.loads(CliRunner().invoke(agent, ["self-heal", "detect", "--json", *window, *db]).stdout)
    c = sqlite3.connect(history)
    c.execute(f"UPDATE selfheal_state SET value = {value} WHERE key = ?", (key,))
    assert c.total_changes == 1
    c.commit()
    c.close()
    with caplog.at_level("WARNING", logger="selfheal"):
        res = CliRunner().invoke(agent, ["self-heal", "detect", "--json", *window, *db])
        assert res.exit_code == 0, res.output
        after = json.loads(res.stdout)
        assert [(p["id"], p["occurrences"]) for p in after["patterns"]] == \
            [(p["id"], p["occurrences"]) for p in before["patterns"]]
        assert after["skipped_rows"] == before["skipped_rows"]
        for args in (["show", before["patterns"][0]["id"], "--since", WEEK_BEFORE_NOW], ["dashboard", "--json"],
                     ["learn"]):
            res = CliRunner().invoke(agent, ["self-heal", *args, *db])
            assert res.exit_code == 0 and "Traceback" not in res.output, res.output
        res = CliRunner().invoke(agent, ["self-heal-daemon", "--once", "--json", *db])
        assert res.exit_code == 0, res.output
        assert not json.loads(res.stdout)["tick"]["errors"]
    warned = [r.getMessage() for r in caplog.records if "selfheal_state" in r.getMessage()]
    if value != "-5":  # a negative watermark is read, and repaired as an emptied table is
        assert len(warned) == 1 and key in warned[0] and "\n" not in warned[0], warned
    c = sqlite3.connect(history)
    assert int(c.execute("SELECT value FROM selfheal_state WHERE key = ?", (key,)).fetchone()[0]) >= 0
    c.close()


def test_log_lines_quote_history_text_neutralised():
    import logging

    from selfheal_plugin.history.text import TerminalFormatter

    record = logging.LogRecord("selfheal.watcher", logging.INFO, __file__, 1, "run %s (%s) failed", ("r1", "wf" + FORGED
                               + "\x1b[2J"), None)
    line = TerminalFormatter("%(levelname)s %(name)s: %(message)s").format(record)
    assert "\n" not in line and "\x1b" not in line and line.startswith("INFO selfheal.watcher: run r1 (wf\\n## ")


def test_scan_id_range_switches_to_lenient_decoding_at_the_first_bad_row(tmp_path):
    from selfheal_plugin.history.connection import scan_id_range
    from selfheal_plugin.history.text import Undecodable

    conn = sqlite3.connect(tmp_path / "t.db")  # the default, strict text factory
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, x TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, CAST(? AS TEXT))", [(1, b"a"), (2, b"b\xff"), (3, b"c")])
    rows = list(scan_id_range(conn, "SELECT id, x FROM t WHERE id > ? AND id <= ? ORDER BY id", 0, 3))
    assert [r[1] for r in rows] == ["a", "b\ufffd", "c"] and isinstance(rows[1][1], Undecodable)
    assert conn.text_factory is str


def test_other_tables_with_odd_names_beside_the_history_are_fine(history):
    c = sqlite3.connect(history)
    c.execute('CREATE TABLE "x); DROP TABLE runs; --" (a)')
    c.execute('CREATE TABLE "my notes" (a)')
    c.commit()
    c.close()
    conn = connect(history)
    assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] > 0
    conn.close()
