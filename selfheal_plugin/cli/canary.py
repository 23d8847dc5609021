"""``agent self-heal canary promote|drop``, and the text of canary/shadow test and verify
results (``agent self-heal test ID --mode canary|shadow``, ``agent self-heal verify ID``)."""
from __future__ import annotations

from typing import Any

import click

from selfheal_plugin.cli.common import (common_options, confirm_or_abort, echo_json, format_p, open_service, pct,
                                        print_line, table_console, yes_option)
from selfheal_plugin.cli.options import WholeSummaries
from selfheal_plugin.history.text import for_rich


def print_experiment_report(r: dict[str, Any], indent: str = "  ") -> None:
    """The measurement of a canary (arms) or shadow (outcome changes)."""
    out = table_console()
    m, w = r["metrics"], r["window"]
    if r["mode"] == "canary":
        split = m["split"]
        print_line(out, f"{indent}Canary vs control since {for_rich(w['since'])} (until {for_rich(w['until'])}"
                   + ("" if w["complete"] else ", window still open") + ")")
        print_line(out, f"{indent}Runs: {m['runs_canary']} canary, {m['runs_control']} control "
                   f"(canary share {pct(split['canary_share'])}, configured {pct(split['fraction'])}, "
                   f"binomial {format_p(split['p_value'])})")
        print_line(out, f"{indent}Success rate: canary {pct(m['canary_success_rate'])}, control "
                   f"{pct(m['control_success_rate'])} (Fisher {format_p(m['p_value'])})")
        p = m.get("pattern")
        if p:
            print_line(out, f"{indent}{for_rich(p['pattern_id'])} error rate: canary {pct(p['canary_error_rate'])}, "
                       f"control {pct(p['control_error_rate'])} per call ({format_p(p['p_value'])})")
    else:
        print_line(out, f"{indent}Shadow observations since {for_rich(w['since'])} (until {for_rich(w['until'])})")
        print_line(out, f"{indent}Runs observed: {m['runs_observed']} of {m['runs_in_period']}; calls observed: "
                   f"{m['calls_observed']}")
        print_line(out, f"{indent}Calls that would have changed outcome: {m['calls_would_change']} "
                   f"({m['calls_would_succeed']} failure → success, {m['calls_would_fail']} success → failure)")
        print_line(out, f"{indent}Runs: {m['runs_would_recover']} failed run(s) would have got past that call, "
                   f"{m['runs_would_break']} completed run(s) would have failed")
    icon = {"keep": "✅", "rollback": "❌", "extend": "⏳"}[r["recommendation"]]
    print_line(out, f"{icon} Recommendation: {r['recommendation']} ({r['verification_status']}) — "
               f"{for_rich(r['reason'])}", hang=3)


def print_experiment_test(r: dict[str, Any]) -> None:
    out = table_console()
    mode = r["test_mode"]
    if r["started"]:
        what = f"on {pct(r['fraction'])} of runs" if mode == "canary" else "observed only; outcomes unchanged"
        print_line(out, f"🧪 Started {mode} of {for_rich(r['improvement_id'])} ({what})", hang=3)
        print_line(out, f"  Section: {for_rich(r['config_section'])} in config.toml, commit "
                   f"{(r['commit_sha'] or '')[:12]}")
        if r.get("diff"):
            click.echo(r["diff"].rstrip("\n"))
        print_line(out, f"  Next: agent self-heal verify {for_rich(r['improvement_id'])}; end it with agent "
                   f"self-heal canary promote|drop {for_rich(r['improvement_id'])}")
        return
    print_line(out, f"🧪 {for_rich(r['improvement_id'])} runs as a {mode} since {for_rich(r['started_at'])}", hang=3)
    print_experiment_report(r["report"])


@click.group("canary", cls=WholeSummaries)
def canary_group() -> None:
    """End a canary or shadow test: promote it (apply) or drop it."""


@canary_group.command("promote")
@click.argument("improvement_id")
@click.option("--changes-made", default=None, help="A note recorded with the apply.")
@click.option("--force", is_flag=True, help="Promote although the canary's verdict is not keep (recorded).")
@yes_option
@common_options
def promote_command(improvement_id: str, home: str | None, db: str | None, as_json: bool,
                    changes_made: str | None = None, force: bool = False, yes: bool = False) -> None:
    """Remove the canary/shadow section and apply the improvement to every run (two commits).
    Refused unless the canary's verdict (verify) is keep. Asks first unless --yes."""
    with open_service(home, db) as sh:
        confirm_or_abort(sh, improvement_id, "Promote it to every run (two commits)?", yes=yes, as_json=as_json)
        r = sh.canary_promote(improvement_id, force=force, changes_made=changes_made)
    if as_json:
        echo_json(r)
        return
    out = table_console()
    ended = r["ended"]
    print_line(out, f"⬆️  Promoted {for_rich(r['improvement_id'])} from {ended['mode']}", hang=4)
    if ended["end_commit_sha"]:
        print_line(out, f"  Section removed: commit {ended['end_commit_sha'][:12]}")
    print_line(out, f"  Applied: commit {(r['commit_sha'] or '')[:12]} in {for_rich(r['repository'])}")
    for line in (r["changes_made"] or "").splitlines():
        print_line(out, f"  {for_rich(line)}")
    print_line(out, f"  Verification scheduled: {for_rich(r['verification_scheduled'])} (agent self-heal verify "
               f"{for_rich(r['improvement_id'])})")


@canary_group.command("drop")
@click.argument("improvement_id")
@yes_option
@common_options
def drop_command(improvement_id: str, home: str | None, db: str | None, as_json: bool, yes: bool = False) -> None:
    """Remove the canary/shadow section without applying (the improvement goes back to tested).
    Asks first unless --yes."""
    with open_service(home, db) as sh:
        confirm_or_abort(sh, improvement_id, "Drop this experiment (a commit removing its section)?", yes=yes,
                         as_json=as_json)
        r = sh.canary_drop(improvement_id)
    if as_json:
        echo_json(r)
        return
    click.echo(f"🗑️  Dropped the {r['mode']} of {r['improvement_id']} (now {r['status']})")
    if r["commit_sha"]:
        click.echo(f"  Commit: {r['commit_sha'][:12]}")
        click.echo(r["diff"].rstrip("\n"))


COMMANDS = [canary_group]
