"""The generator extends a history past an apply (issue 15): a user working by hand applies
a fix, adds the runs that followed it, and sees `verify` reach keep — through the installed
`agent` and the generator's own command line."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

from datetime import timedelta

import click
import pytest

from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.times import parse_timestamp
from selfheal_plugin.lifecycle.simulation import load_runs
from selfheal_plugin.testbed import generator
from selfheal_plugin.testbed.generator import DEFAULT_PATTERNS, fixed_by_config, scaled_patterns

from ..conftest import NOW, run_agent


def gen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selfheal_plugin.testbed.generator", *args],
                          capture_output=True, text=True, timeout=120)


def runs_in(db, *, finished: bool = False) -> list[str]:
    """The ids of the history's runs (only the finished ones with ``finished``: what verify counts)."""
    from selfheal_plugin.history.outcome import finished_sql

    conn = sqlite3.connect(db)
    try:
        where = " WHERE " + finished_sql() if finished else ""
        return [r[0] for r in conn.execute("SELECT id FROM runs" + where)]
    finally:
        conn.close()


def test_apply_then_append_then_verify_keeps(binks_home):
    db = binks_home / "conversations.db"
    r = gen(str(db), "--runs", "400", "--seed", "3")
    assert r.returncode == 0, r.stderr
    truth_before = (binks_home / "conversations.db.truth.json").read_text()

    r = run_agent("self-heal", "detect", "--json")
    assert r.returncode == 0, r.stderr
    proposals = {p["pattern_id"]: p["improvement_id"] for p in json.loads(r.stdout)["proposals"]}
    imp = proposals["timeout:mcp__kubernetes__pods_list"]
    assert run_agent("self-heal", "apply", imp, "--yes").returncode == 0

    # nothing after the apply yet: inconclusive
    r = run_agent("self-heal", "verify", imp, "--json")
    assert json.loads(r.stdout)["recommendation"] == "extend"

    before = runs_in(db)
    # at once, as the README's walkthrough scripted back to back does (the window from the
    # apply to now may be well under a second)
    r = gen(str(db), "--append", "--from", "applied", "--runs", "200")
    assert r.returncode == 0, r.stderr
    assert "fixed by the config: timeout:mcp__kubernetes__pods_list" in r.stdout
    after = runs_in(db)
    assert len(after) == len(before) + 200 and len(set(after)) == len(after) and set(before) <= set(after)
    assert (binks_home / "conversations.db.truth.json").read_text() == truth_before

    r = run_agent("self-heal", "verify", imp, "--json")
    result = json.loads(r.stdout)
    assert result["recommendation"] == "extend" and result["provisional_recommendation"] == "keep", result
    # every finished appended run is after the apply (how many finished depends on the
    # appended batch's seed, which depends on the apply's instant: count them, never guess)
    assert result["metrics"]["runs_after"] == len(set(runs_in(db, finished=True)) - set(before)) >= 190

    r = run_agent("self-heal", "verify", imp, "--early", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["recommendation"] == "keep"


def test_append_refuses_what_it_cannot_do(binks_home, tmp_path):
    db = binks_home / "conversations.db"
    r = gen(str(db), "--append", "--from", "-1h")
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert gen(str(db), "--runs", "50").returncode == 0
    r = gen(str(db), "--append", "--from", "applied")
    assert r.returncode == 2 and "no applied improvement" in r.stderr
    r = gen(str(db), "--append")
    assert r.returncode == 2 and "--append needs --from" in r.stderr
    r = gen(str(db), "--append", "--from", "-1h", "--until", "-1d")
    assert r.returncode == 2 and "nothing to add" in r.stderr
    r = gen(str(db), "--append", "--from", "now")  # was documented, could never work (--until is now)
    assert r.returncode == 2 and "--from now leaves no time" in r.stderr
    r = gen(str(db), "--from", "-1h")
    assert r.returncode == 2 and "--from needs --append" in r.stderr


@pytest.mark.parametrize("seconds", [30, 120], ids=["30s", "2min"])  # runs moved earlier, and squeezed
def test_appended_runs_end_by_the_end_of_the_window(tmp_path, seconds):
    """An append seconds after an apply (the README's walkthrough) wrote runs that finished
    minutes after `now`: every appended run now starts after the start and has ended,
    events and all, by the end (the moment of writing, for the command)."""
    db = tmp_path / "h.db"
    start, end = NOW, NOW + timedelta(seconds=seconds)
    generator.generate_history(db, runs=50, seed=5, end=start, bad_rows=0)
    before = set(runs_in(db))
    patterns, _ = scaled_patterns(DEFAULT_PATTERNS, 300, None, residual=0.1)
    generator.generate_history(db, append=True, start=start, end=end, runs=300, seed=5, patterns=patterns,
                               bad_rows=0, running_runs=0)
    conn = sqlite3.connect(db)
    try:
        runs = [r for r in conn.execute("SELECT id, started_at, completed_at FROM runs") if r[0] not in before]
        events = [t for rid, t in conn.execute("SELECT run_id, timestamp FROM run_events") if rid not in before]
    finally:
        conn.close()
    assert len(runs) == 300 and all(completed for _, _, completed in runs)
    assert all(start < parse_timestamp(started) and parse_timestamp(completed) <= end
               for _, started, completed in runs)
    assert all(start < parse_timestamp(t) <= end for t in events)


@pytest.mark.parametrize("window_ms", [5, 300, 999])
def test_an_append_a_moment_after_the_apply_fills_that_moment_and_nothing_before(tmp_path, window_ms):
    """--from an apply that happened under a second before --until (a walkthrough run back to
    back) adds its runs; none is written, cut to fewer digits, before the apply, and
    verification's reader (SQLite's julianday(), to the millisecond) finds them all after it."""
    db = tmp_path / "h.db"
    generator.generate_history(db, runs=50, seed=5, end=NOW, bad_rows=0)
    before = set(runs_in(db))
    applied = NOW + timedelta(seconds=2, microseconds=913_031)  # a fraction a cut to the second drops
    end = applied + timedelta(milliseconds=window_ms)
    r = gen(str(db), "--append", "--from", applied.isoformat(), "--until", end.isoformat(), "--runs", "200")
    assert r.returncode == 0, r.stderr
    conn = sqlite3.connect(db)
    try:
        runs = [r for r in conn.execute("SELECT id, started_at, completed_at FROM runs") if r[0] not in before]
        events = [t for rid, t in conn.execute("SELECT run_id, timestamp FROM run_events") if rid not in before]
    finally:
        conn.close()
    assert len(runs) == 200
    stamps = [s for _, started, completed in runs for s in (started, completed) if s] + events
    assert all(applied < parse_timestamp(s) <= end for s in stamps)
    conn = connect(db)
    try:
        finished_after = {r.run_id for r in load_runs(conn, applied.timestamp(), end.timestamp() + 1)}
        assert not {r.run_id for r in load_runs(conn, applied.timestamp() - 86400, applied.timestamp())} - before
    finally:
        conn.close()
    assert finished_after == set(runs_in(db, finished=True)) - before and len(finished_after) > 190
    if window_ms > 500:  # the window holds a whole second (3 s): the runtime's fractionless shape is still written
        assert any("." not in s.split("T")[1] for s in stamps)


def test_the_config_in_force_decides_which_patterns_are_fixed():
    timeout = next(p for p in DEFAULT_PATTERNS if p.error_type == "timeout")
    crash = next(p for p in DEFAULT_PATTERNS if p.error_type == "server_crashed")
    assert not fixed_by_config(timeout, {})
    assert not fixed_by_config(timeout, {"tools": {timeout.tool_name: {"timeout_ms": 30_000}}})  # still too low
    assert fixed_by_config(timeout, {"tools": {timeout.tool_name: {"timeout_ms": 90_000}}})
    assert fixed_by_config(crash, {"servers": {"search": {"auto_restart": True}}})
    assert not fixed_by_config(crash, {"servers": {"github": {"auto_restart": True}}})
    scaled, fixed = scaled_patterns(DEFAULT_PATTERNS, 200, {"tools": {timeout.tool_name: {"timeout_ms": 90_000}}},
                                    residual=0.0)
    sizes = {p.id: p.occurrences for p in scaled}
    assert fixed == [timeout.id] and sizes[timeout.id] == 0
    assert sizes["tool_error:list_dir"] == round(15 * 200 / 400)


def test_every_generator_option_has_a_help_text():
    for param in generator.main.params:
        if isinstance(param, click.Option):
            assert param.help, f"{param.opts} has a help text"
    r = gen("-h")
    assert r.returncode == 0 and "--append" in r.stdout and "--from" in r.stdout
