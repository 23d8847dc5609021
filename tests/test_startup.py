"""What a user waits for, checked by what happens rather than by the clock: which libraries a
command imports, that detection built from grouped counts equals detection built row by row,
and that ``--json`` carries a bounded sample of affected runs."""
from __future__ import annotations

import importlib
import subprocess
import sys
from collections import Counter
from datetime import timedelta

from selfheal_plugin.analysis import patterns as P
from selfheal_plugin.cli import main as cli_main
from selfheal_plugin.history.connection import connect
from selfheal_plugin.lifecycle.cooldown import claim_notification, claim_notifications

from tests.conftest import NOW, agent_bin

HEAVY = ("rich", "numpy", "scipy", "mcp", "watchdog", "git", "pydantic", "tomlkit", "pluggy")
SINCE = (NOW - timedelta(days=7)).isoformat()


def imported_by(*args: str) -> set[str]:
    res = subprocess.run([sys.executable, "-X", "importtime", agent_bin(), *args], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return {line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}


def test_version_imports_no_heavy_library_and_not_the_engine():
    mods = imported_by("--version")
    assert not {m.split(".")[0] for m in mods} & set(HEAVY)
    assert "selfheal_plugin.service" not in mods


def test_detect_json_with_flags_imports_no_heavy_library(history_copy, binks_home):
    # the first detect proposes (a timeout strategy fits durations with numpy/scipy); the
    # second finds its proposals open and only reports
    subprocess.run([agent_bin(), "self-heal", "detect", "--json", "--home", str(binks_home), "--since", SINCE],
                   capture_output=True, timeout=120, check=True)
    mods = imported_by("self-heal", "detect", "--json", "--home", str(binks_home), "--since", SINCE,
                       "--min-occurrences", "3", "--confidence", "0.5", "--limit", "5")
    assert "selfheal_plugin.service" in mods  # it did run the engine
    heavy = {m.split(".")[0] for m in mods} & set(HEAVY + ("filelock",))
    assert heavy <= {"pluggy"}, heavy  # pluggy: detect proposes through the strategy plugins
    # filelock: only a write that needs a lock (an inbox entry, a plugin error, an apply) imports it
    # nor the lifecycle it does not use: with nothing interrupted, recovery imports nothing either
    unused = {f"selfheal_plugin.lifecycle.{m}" for m in ("apply", "ab", "canary", "simulation", "verification",
                                                          "autopilot", "sharing")}
    assert not mods & unused, mods & unused


def test_lazy_command_table_matches_the_modules():
    for group, table in ((cli_main.self_heal, cli_main.LAZY_COMMANDS), (cli_main.agent, cli_main.LAZY_AGENT_COMMANDS)):
        for module_name in set(table.values()):
            module = importlib.import_module(f"selfheal_plugin.cli.{module_name}")
            names = {c.name for c in module.COMMANDS}
            assert names == {n for n, m in table.items() if m == module_name}
        for name in table:
            assert group.get_command(None, name).name == name  # type: ignore[arg-type]


def test_help_lists_lazy_commands():
    res = subprocess.run([agent_bin(), "self-heal", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0
    for name in cli_main.LAZY_COMMANDS:
        assert f"  {name} " in res.stdout


def test_grouped_detection_equals_row_by_row(sample_history):
    db, _ = sample_history
    conn = connect(db)
    try:
        found = P.detect_failure_patterns(conn, since="-7d", now=NOW, min_occurrences=1, confidence_threshold=0.0)
        start = (NOW - timedelta(days=7)).timestamp()
        rows = P._error_rows(conn, start, None, None, None)
        by_sig: dict[tuple[str, str], list[dict]] = {}
        for r in rows:
            by_sig.setdefault((r["error_type"], r["tool_name"]), []).append(r)
        calls = P._tool_calls(conn, start, None)
        expected = sorted((P._build_pattern(e, t, occ, calls.get(t, 0)) for (e, t), occ in by_sig.items()),
                          key=lambda p: (-p.occurrences, p.id))
        P.attach_evidence_all(conn, expected)  # detection reads each pattern's evidence too
        assert [p.to_dict() for p in found.patterns] == [p.to_dict() for p in expected]
        lazy = P.detect_failure_patterns(conn, since="-7d", now=NOW, min_occurrences=1, confidence_threshold=0.0,
                                         lazy_detail=True)
        assert [p.to_dict() for p in lazy.patterns] == [p.to_dict() for p in expected]
        for p in lazy.patterns:  # the rows, read when a strategy (or show) looks at them
            assert len(p.occurrences_detail) == p.occurrences
            assert list(p.occurrences_detail) == by_sig[(p.error_type, p.tool_name)]
    finally:
        conn.close()
    for p in found.patterns:  # read with the patterns: usable after the connection is closed
        assert p.occurrences_detail == by_sig[(p.error_type, p.tool_name)]


def test_correlation_of_many_distinct_contexts_is_seeded_and_order_free():
    contexts = [frozenset({f"msg:w{i % 400}", f"step:{i % 3}"}) for i in range(1200)]
    value = P.context_correlation(contexts)
    assert value == P.context_correlation(list(reversed(contexts)))
    assert value == P._correlation(Counter(contexts), len(contexts))


def test_to_dict_runs_limit_keeps_the_latest_runs_and_the_count():
    p = P.Pattern(id="timeout:t", error_type="timeout", tool_name="t", occurrences=5, correlation_score=0.5,
                  confidence=0.8, affected_runs=["r1", "r2", "r3", "r4"], first_seen="a", last_seen="b",
                  failure_rate=0.1)
    d = p.to_dict(runs_limit=2)
    assert d["affected_runs"] == ["r3", "r4"] and d["affected_run_count"] == 4
    assert p.to_dict()["affected_runs"] == ["r1", "r2", "r3", "r4"]


def test_claim_notifications_in_one_transaction_honours_the_cooldown(history_copy):
    db, _ = history_copy
    conn = connect(db)
    try:
        assert claim_notification(conn, "a:x", NOW, 60)
        assert claim_notifications(conn, ["a:x", "b:y", "c:z"], NOW + timedelta(minutes=1), 60) == ["b:y", "c:z"]
        assert claim_notifications(conn, ["a:x", "b:y"], NOW + timedelta(minutes=2), 60) == []
        assert claim_notifications(conn, ["a:x"], NOW + timedelta(hours=2), 60) == ["a:x"]
        assert claim_notifications(conn, [], NOW, 60) == []
    finally:
        conn.close()
