"""Fix rules (history.rules): validation of templates read from anywhere, ids, merging."""
from __future__ import annotations

import pytest

from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.rules import (
    Rule, RuleError, RuleStore, home_id, instantiate, rule_id, template_from_changes, validate_template,
)

TOOL = "mcp__search__web_search"
H1, H2 = "a1" * 8, "b2" * 8  # home ids as home_id() makes them: 16 hex digits
CHANGE = {"kind": "config", "file": "config.toml", "path": ["tools", TOOL, "timeout_ms"], "op": "set",
          "value": 90000}
EV = {f"{H1}:mcp__search__web_search": {"source": "learned", "before": 0.3, "after": 0.02, "n_before": 500,
                                      "n_after": 480, "reduction": 0.93, "p_value": 1e-30, "worked": True,
                                      "measured_at": "2026-11-01T00:00:00.000000Z"}}


def test_a_template_is_the_change_with_the_tool_taken_out_and_comes_back_for_another_tool():
    tmpl = template_from_changes([CHANGE], TOOL)
    assert tmpl == [{"path": ["tools", "{tool}", "timeout_ms"], "op": "set", "value": 90000}]
    other = instantiate(tmpl, "mcp__files__read_file")
    assert other == [{**CHANGE, "path": ["tools", "mcp__files__read_file", "timeout_ms"]}]
    server = template_from_changes([{**CHANGE, "path": ["servers", "search", "health_check"], "value": True}], TOOL)
    assert instantiate(server, "mcp__files__read_file")[0]["path"] == ["servers", "files", "health_check"]
    with pytest.raises(RuleError, match="names no server"):
        instantiate(server, "plain_tool")


@pytest.mark.parametrize("bad", [
    [], "x", [{"path": ["tools", "{tool}", "command"], "op": "set", "value": "rm -rf /"}],
    [{"path": ["servers", "{server}", "command"], "op": "set", "value": "sh"}],
    [{"path": ["tools", "mcp__x__y", "timeout_ms"], "op": "set", "value": 1}],
    [{"path": ["..", "{tool}", "timeout_ms"], "op": "set", "value": 1}],
    [{"path": ["tools", "{tool}", "timeout_ms"], "op": "set", "value": {"a": 1}}],
    [{"path": ["tools", "{tool}", "timeout_ms"], "op": "set", "value": float("nan")}],
    [{"path": ["tools", "{tool}", "timeout_ms"], "op": "set"}],
    [{"path": ["tools", "{tool}", "timeout_ms"], "op": "chmod", "value": 1}],
    [{"path": ["tools", "{tool}", "timeout_ms"], "op": "set", "value": 1, "file": "/etc/passwd"}],
])
def test_a_template_that_could_name_a_path_a_command_or_junk_is_refused(bad):
    with pytest.raises(RuleError):
        validate_template(bad)


def test_changes_a_template_cannot_hold_give_no_template():
    assert template_from_changes([{"kind": "manual", "text": "grant access"}], TOOL) is None
    assert template_from_changes([{**CHANGE, "path": ["tools", "other_tool", "timeout_ms"]}], TOOL) is None


def test_the_same_fix_is_one_rule_and_evidence_merges_per_origin(tmp_path):
    conn = connect(tmp_path / "h.db", create=True)
    store = RuleStore(conn)
    tmpl = template_from_changes([CHANGE], TOOL)
    r = Rule.build("slow_tail", tmpl, "raise the timeout to 90 s", EV, error_type="timeout")
    assert r.id == rule_id("slow_tail", tmpl) and r.id != rule_id("hang", tmpl)
    stored, changed = store.merge(r)
    assert changed and stored.summary() == "worked in 1 of 1 place (median -93% errors)"
    again, changed = store.merge(r)
    assert not changed and again.places == 1  # a pack imported twice counts nothing twice
    other = {f"{H2}:mcp__files__read_file": {**EV[f"{H1}:mcp__search__web_search"], "source": "imported",
                                           "worked": False, "reduction": 0.0}}
    newer = {f"{H1}:mcp__search__web_search": {**EV[f"{H1}:mcp__search__web_search"], "reduction": 0.5,
                                             "measured_at": "2026-11-20T00:00:00.000000Z"}}
    store.merge(Rule.build("slow_tail", tmpl, "raise the timeout to 90 s", other))
    merged, _ = store.merge(Rule.build("slow_tail", tmpl, "raise the timeout to 90 s", newer))
    assert (merged.worked, merged.places, merged.median_reduction) == (1, 2, 0.5)
    off, changed = store.set_enabled(r.id, False)
    assert changed and not off.enabled and store.list(enabled_only=True) == []
    store.merge(Rule.build("slow_tail", tmpl, "raise the timeout to 90 s", EV))
    assert not store.get(r.id).enabled  # a merge never turns a rule back on
    assert home_id(conn) == home_id(conn) and len(home_id(conn)) == 16


@pytest.mark.parametrize("kind, ev, match", [
    ("Slow Tail", EV, "kind name"),
    ("slow_tail", {f"{H1}:t": {"source": "learned"}}, "worked"),
    ("slow_tail", {f"{H1}:t": {"source": "gossip", "worked": True}}, "source"),
    ("slow_tail", {f"{H1}:t": {"source": "learned", "worked": True, "before": "lots"}}, "before"),
    ("slow_tail", {f"{H1}:t": {"source": "learned", "worked": True, "note": "x" * 1000}}, "note"),
    ("slow_tail", {"": {"source": "learned", "worked": True}}, "origin"),
])
def test_a_rule_with_bad_fields_is_refused_with_one_line(kind, ev, match):
    with pytest.raises(RuleError, match=match):
        Rule.build(kind, [{"path": ["tools", "{tool}", "timeout_ms"], "op": "set", "value": 1}], "d", ev)
