"""Cross-project learning against the testbed: a fix verified (keep) in home A on real MCP
servers travels as a fix pack, by file and through a git remote, to home B.

The rule is recorded from A's verified improvement here, by hand, with the fields the
verification measured (recording rules on keep is the learn/verify side's job); everything
else is the real loop of tests/test_closed_loop.py (its week of history and its healed home).
"""
from __future__ import annotations

import subprocess

import pytest

from selfheal_plugin.history.connection import connect
from selfheal_plugin.history.rules import Rule, RuleStore, home_id, instantiate, template_from_changes
from selfheal_plugin.service import SelfHeal

from .test_closed_loop import END, SEARCH, healed, week_before  # noqa: F401  (module fixtures)

pytestmark = [pytest.mark.closed_loop, pytest.mark.timeout(1200)]


def _record_verified_rule(sh: SelfHeal, imp, verified: dict) -> Rule:
    pattern = verified["metrics"]["pattern"]
    hid = home_id(sh.conn)
    evidence = {f"{hid}:{SEARCH}": {
        "source": "verified", "subject": SEARCH, "home": hid,
        "before": pattern["before_error_rate"], "after": pattern["after_error_rate"],
        "n_before": pattern["before_calls"], "n_after": pattern["after_calls"],
        "reduction": pattern["reduction"], "p_value": pattern["p_value"], "worked": True,
        "measured_at": verified.get("verified_at") or END.isoformat()}}
    template = template_from_changes(imp.changes, SEARCH)
    assert template is not None, imp.changes
    kind = (imp.evidence or {}).get("failure_kind") or "slow_tail"
    rule, _ = RuleStore(sh.conn).merge(Rule.build(kind, template, imp.description, evidence, imp.error_type))
    return rule


def test_a_fix_verified_in_one_home_reaches_another_by_pack_and_by_sync(healed, tmp_path):  # noqa: F811
    v = healed["verified"]
    assert v["recommendation"] == "keep"
    home_b = tmp_path / "b"
    home_b.mkdir()
    connect(home_b / "conversations.db", create=True).close()
    with SelfHeal(healed["home"], clock=lambda: END) as a, SelfHeal(home_b, clock=lambda: END) as b:
        rule = _record_verified_rule(a, healed["imp"], v)
        pack = a.export_pack()
        (shared,) = [r for r in pack["rules"] if r["id"] == rule.id]
        (entry,) = shared["evidence"].values()
        # the verification's own measurement travels; the fall is at least halved (test_closed_loop's bar:
        # idle it is ~80 %, a busy machine adds timeouts after the apply)
        measured = v["metrics"]["pattern"]
        assert (entry["n_before"], entry["n_after"], entry["reduction"]) == (
            measured["before_calls"], measured["after_calls"], measured["reduction"])
        assert entry["n_before"] > 0 and entry["n_after"] > 0 and entry["reduction"] >= 0.5
        assert str(healed["home"]) not in str(pack)  # no path of home A travels

        imported = b.import_pack(pack)
        assert [r["id"] for r in imported["added"]] == [rule.id]
        got = RuleStore(b.conn).get(rule.id)
        assert got.summary().startswith("worked in 1 of 1 place") and got.sources == ["imported"]
        # what B would write for its own slow tool: the same setting, B's tool name, nothing else
        other = "mcp__files__read_file"
        assert instantiate(got.template, other) == [
            {**c, "path": ["tools", other, *c["path"][2:]]} for c in healed["imp"].changes]
        assert not b.improvements()  # an imported rule applies nothing by itself

        remote = tmp_path / "team.git"
        subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
        a.sync(remote.as_uri())
        synced = b.sync(remote.as_uri())
        assert synced["pushed"] and len(synced["packs_read"]) == 1
        assert RuleStore(b.conn).get(rule.id).evidence == got.evidence  # the same origin, already here
