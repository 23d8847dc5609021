"""``agent self-heal canary promote|drop``, and the text of canary/shadow test and verify
results (``agent self-heal test ID --mode canary|shadow``, ``agent self-heal verify ID``)."""
from __future__ import annotations

from typing import Any

import click

from selfheal_plugin.cli.common import common_options, confirm_or_abort, echo_json, format_p, open_service, pct, yes_option
from selfheal_plugin.cli.options import WholeSummaries


def _rate(x: float | None) -> str:
    return "n/a" if x is None else pct(x)


def _p(x: float | None) -> str:
    return format_p(x)


def print_experiment_report(r: dict[str, Any], indent: str = "  ") -> None:
    """The measurement of a canary (arms) or shadow (outcome changes)."""
    m, w = r["metrics"], r["window"]
    if r["mode"] == "canary":
        split = m["split"]
        click.echo(f"{indent}Canary vs control since {w['since']} (until {w['until']}"
                   + ("" if w["complete"] else ", window still open") + ")")
        click.echo(f"{indent}Runs: {m['runs_canary']} canary, {m['runs_control']} control "
                   f"(canary share {_rate(split['canary_share'])}, configured {pct(split['fraction'])}, "
                   f"binomial {_p(split['p_value'])})")
        click.echo(f"{indent}Success rate: canary {_rate(m['canary_success_rate'])}, control "
                   f"{_rate(m['control_success_rate'])} (Fisher {_p(m['p_value'])})")
        p = m.get("pattern")
        if p:
            click.echo(f"{indent}{p['pattern_id']} error rate: canary {_rate(p['canary_error_rate'])}, control "
                       f"{_rate(p['control_error_rate'])} per call ({_p(p['p_value'])})")
    else:
        click.echo(f"{indent}Shadow observations since {w['since']} (until {w['until']})")
        click.echo(f"{indent}Runs observed: {m['runs_observed']} of {m['runs_in_period']}; calls observed: "
                   f"{m['calls_observed']}")
        click.echo(f"{indent}Calls that would have changed outcome: {m['calls_would_change']} "
                   f"({m['calls_would_succeed']} failure → success, {m['calls_would_fail']} success → failure)")
        click.echo(f"{indent}Runs: {m['runs_would_recover']} failed run(s) would have got past that call, "
                   f"{m['runs_would_break']} completed run(s) would have failed")
    icon = {"keep": "✅", "rollback": "❌", "extend": "⏳"}[r["recommendation"]]
    click.echo(f"{icon} Recommendation: {r['recommendation']} ({r['verification_status']}) — {r['reason']}")


def print_experiment_test(r: dict[str, Any]) -> None:
    mode = r["test_mode"]
    if r["started"]:
        what = f"on {pct(r['fraction'])} of runs" if mode == "canary" else "observed only; outcomes unchanged"
        click.echo(f"🧪 Started {mode} of {r['improvement_id']} ({what})")
        click.echo(f"  Section: {r['config_section']} in config.toml, commit {(r['commit_sha'] or '')[:12]}")
        if r.get("diff"):
            click.echo(r["diff"].rstrip("\n"))
        click.echo(f"  Next: agent self-heal verify {r['improvement_id']}; end it with agent self-heal canary "
                   f"promote|drop {r['improvement_id']}")
        return
    click.echo(f"🧪 {r['improvement_id']} runs as a {mode} since {r['started_at']}")
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
    ended = r["ended"]
    click.echo(f"⬆️  Promoted {r['improvement_id']} from {ended['mode']}")
    if ended["end_commit_sha"]:
        click.echo(f"  Section removed: commit {ended['end_commit_sha'][:12]}")
    click.echo(f"  Applied: commit {(r['commit_sha'] or '')[:12]} in {r['repository']}")
    for line in (r["changes_made"] or "").splitlines():
        click.echo(f"  {line}")
    click.echo(f"  Verification scheduled: {r['verification_scheduled']} (agent self-heal verify "
               f"{r['improvement_id']})")


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
