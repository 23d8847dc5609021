"""``agent self-heal test|apply|rollback|verify|reject``: thin shells over the service."""
from __future__ import annotations

import click

from selfheal_plugin.cli.common import (asking, check_option, common_options, confirm, confirm_or_abort, echo_json,
                                        exit_for_verdict, format_p, open_service, pct, print_line, table_console,
                                        working, yes_option)
from selfheal_plugin.history.text import for_rich
from selfheal_plugin.service import EARLY_HELP, TEST_MODES
from selfheal_plugin.cli.options import setting_option


@click.command("test")
@click.argument("improvement_id")
@click.option("--mode", type=click.Choice(TEST_MODES), default="simulation", show_default=True,
              help="How to test the improvement.")
@setting_option("lookback", "--since", help="Baseline window start")
@setting_option("fraction", "--fraction", default=None)
@check_option
@common_options
def test_command(improvement_id: str, home: str | None, db: str | None, as_json: bool, mode: str = "simulation",
                 since: str | None = None, fraction: float | None = None, check: bool = False) -> None:
    """Test an improvement: replay history (simulation), or run it on a share of runs
    (canary) or beside the current settings (shadow) via a config.toml section.

    With --check the exit code is 3 when the simulation says risky or reject."""
    with open_service(home, db) as sh, working(not as_json, f"Testing {improvement_id} ({mode})…"):
        r = sh.test(improvement_id, mode, since=since, fraction=fraction)
    _render_test(r, mode, as_json)
    exit_for_verdict(check, r.get("recommendation") if mode == "simulation" else None)


def _render_test(r: dict, mode: str, as_json: bool) -> None:
    if as_json:
        echo_json(r)
        return
    if mode != "simulation":
        from selfheal_plugin.cli.canary import print_experiment_test

        print_experiment_test(r)
        return
    out = table_console()  # a long line wraps under its indent at the terminal's width (print_line)
    print_line(out, f"🧪 Testing {for_rich(r['improvement_id'])} ({for_rich(r['test_mode'])}, {r['runs_replayed']} "
               f"runs replayed, {for_rich(r['window']['since'])} → {for_rich(r['window']['until'])})", hang=3)
    out.print()
    if r.get("failure_kind"):
        print_line(out, f"  Failure kind:           {for_rich(r['failure_kind'])}")
    print_line(out, f"  Baseline success rate:  {pct(r['baseline_success_rate'])}")
    if r["simulated_success_rate"] is not None:
        lo, hi = r["interval"]["simulated_success_rate"]
        print_line(out, f"  Simulated success rate: {pct(r['simulated_success_rate'])} "
                   f"(95% interval {pct(lo)}–{pct(hi)})")
        nxt = r["interval"].get("next_window_success_rate")
        if nxt:
            print_line(out, f"  Next {r['interval']['next_window_runs']} runs:          {pct(nxt[0])}–{pct(nxt[1])} "
                       f"success expected (95% prediction interval)")
        print_line(out, f"  Expected improvement:   {for_rich(r['expected_improvement'])}")
        print_line(out, f"  Runs recovered:         {r['runs_recovered']:g} of {r['runs_replayed']} "
                   f"({r['failures_fixed']:g} of {r['failures_targeted']} targeted failures fixed)")
    else:
        print_line(out, "  Simulated success rate: no model")
    for m in r["models"]:
        if m["model"] == "duration":
            ci = m.get("p_timed_out_call_finishes_interval")
            print_line(out, f"  Model: {for_rich(m['tool'])} durations ~ {for_rich(m.get('duration_model', m['family']))}: "
                       f"median {m['median_ms']} ms, p95 {m['p95_ms']} ms; a timed-out call finishes under "
                       f"{m['new_limit_ms']} ms with p={m['p_timed_out_call_finishes']}"
                       + (f" (95% {ci[0]}–{ci[1]})" if ci else ""))
        elif m["model"] == "retry":
            print_line(out, f"  Model: retry of {for_rich(m['tool'])} succeeds with p={m['p_retry_succeeds']} "
                       f"({m['followups_succeeded']}/{m['followups_observed']} follow-up calls ok, estimate "
                       f"({m['followups_succeeded']}+1)/({m['followups_observed']}+2))")
    for note in r["notes"]:
        print_line(out, f"  Note: {for_rich(note)}")
    out.print()
    icon = {"safe_to_apply": "✅", "risky": "⚠️ ", "reject": "❌"}[r["recommendation"]]
    print_line(out, f"{icon} Recommendation: {r['recommendation']} — {for_rich(r['reason'])}", hang=3)
    print_line(out, f"   Next: {for_rich(r['next_step'])}", hang=2)


@click.command("apply")
@click.argument("improvement_id")
@yes_option
@click.option("--changes-made", default=None,
              help="What was done (required for an improvement with only manual steps).")
@common_options
def apply_command(improvement_id: str, home: str | None, db: str | None, as_json: bool, yes: bool = False,
                  changes_made: str | None = None) -> None:
    """Apply an improvement: edit config.toml and commit it to git."""
    sh = open_service(home, db)
    plan = sh.plan_apply(improvement_id)
    expected = plan["old_sha256"] if plan["config_changes"] else None
    if asking(yes=yes, as_json=as_json):
        out = table_console()
        print_line(out, f"Improvement {for_rich(plan['improvement_id'])}: {for_rich(plan['description'])}")
        print_line(out, for_rich(plan["test_note"]))
        if plan["config_changes"]:
            where = for_rich(plan["repository"]) + (" (new repository)" if plan["creates_repository"] else "")
            print_line(out, f"Config: {for_rich(plan['config_path'])}   git: {where}")
            click.echo()
            click.echo(plan["diff"].rstrip("\n"))
            click.echo()
        for step in plan["manual_steps"]:
            print_line(out, f"Manual step (not applied by selfheal): {for_rich(step)}")
        if plan.get("same_change_undone"):
            print_line(out, f"⚠ Note: {for_rich(plan['same_change_undone']['note'])}")
        confirm("Apply this change and commit it?" if plan["config_changes"] else
                "Record these manual steps as applied?")
    with sh:
        r = sh.apply(improvement_id, changes_made, expected_sha256=expected)
    if as_json:
        echo_json(r)
        return
    out = table_console()
    print_line(out, f"✅ Applied {for_rich(r['improvement_id'])}", hang=3)
    if yes:  # not seen before it was applied: what the result says (the MCP tool and --json carry the same)
        for warning in r["warnings"]:
            print_line(out, f"  ⚠ {for_rich(warning)}")
    if r["commit_sha"]:
        print_line(out, f"  Commit: {r['commit_sha'][:12]} in {for_rich(r['repository'])}"
                   + (" (new repository)" if r["created_repository"] else ""))
    for line in (r["changes_made"] or "").splitlines():
        print_line(out, f"  {for_rich(line)}")
    for step in r["manual_steps"]:
        print_line(out, f"  Still to do by hand: {for_rich(step)}")
    print_line(out, f"  Verification scheduled: {for_rich(r['verification_scheduled'])} (agent self-heal verify "
               f"{for_rich(r['improvement_id'])})")


@click.command("rollback")
@click.argument("improvement_id")
@click.option("--reason", default=None, help="Why (goes into the commit message).")
@yes_option
@common_options
def rollback_command(improvement_id: str, home: str | None, db: str | None, as_json: bool,
                     reason: str | None = None, yes: bool = False) -> None:
    """Roll back an applied improvement (git revert, or the inverse edit). Asks first unless --yes."""
    with open_service(home, db) as sh:
        if asking(yes=yes, as_json=as_json):  # what would be undone, and any refusal, before the question
            plan = sh.plan_rollback(improvement_id)
            print_line(table_console(), f"Improvement {for_rich(plan['improvement_id'])} ({for_rich(plan['status'])}): "
                                        f"{for_rich(plan['description'])}")
            if plan["diff"]:
                how = "git revert" if plan["method"] == "revert" else "inverse edit (config.toml changed since)"
                click.echo(f"Undoes {plan['commit_sha'][:12]} by {how}:")
                click.echo(plan["diff"].rstrip("\n"))
            confirm("Roll back this change (a revert commit)?" if plan["diff"] else
                    "Mark it rolled back (its manual steps are undone by hand)?")
        r = sh.rollback(improvement_id, reason=reason)
    if as_json:
        echo_json(r)
        return
    click.echo(f"↩️  Rolled back {r['improvement_id']}")
    if r["rollback_sha"]:
        how = "git revert" if r["method"] == "revert" else "inverse edit (config.toml changed since)"
        click.echo(f"  Commit: {r['rollback_sha'][:12]} ({how} of {r['commit_sha'][:12]})")
        if r["diff"]:
            click.echo(r["diff"].rstrip("\n"))
    if r.get("note"):
        print_line(table_console(), f"  Note: {for_rich(r['note'])}")


@click.command("verify")
@click.argument("improvement_id")
@setting_option("window_days", "--window-days")
@click.option("--early", is_flag=True, help=EARLY_HELP)
@check_option
@common_options
def verify_command(improvement_id: str, home: str | None, db: str | None, as_json: bool,
                   window_days: float | None = None, early: bool = False, check: bool = False) -> None:
    """Measure an applied improvement: before vs after, with a significance test.

    With --check the exit code is 3 for rollback and 4 for extend (inconclusive so far)."""
    with open_service(home, db) as sh, working(not as_json, f"Verifying {improvement_id}…"):
        r = sh.verify(improvement_id, window_days, early=early)
    _render_verify(r, as_json)
    exit_for_verdict(check, r.get("recommendation"))


def _render_verify(r: dict, as_json: bool) -> None:
    if as_json:
        echo_json(r)
        return
    if r.get("mode") in ("canary", "shadow"):
        from selfheal_plugin.cli.canary import print_experiment_report

        print_experiment_report(r)
        return
    m = r["metrics"]
    out = table_console()
    print_line(out, f"📏 Verifying {for_rich(r['improvement_id'])} ({r['window']['days']:g}-day windows around the apply"
               + ("" if r["window"]["complete"] else ", after-window still open") + ")", hang=3)
    out.print()
    print_line(out, f"  Expected: {for_rich(r['expected_impact'] or 'unknown')}")
    print_line(out, f"  Actual:   {for_rich(r['actual_impact'])}")
    print_line(out, f"  Success rate before: {pct(m['before_success_rate'])} ({m['runs_before']} runs)")
    print_line(out, f"  Success rate after:  {pct(m['after_success_rate'])} ({m['runs_after']} runs)")
    if m["tests"]:
        print_line(out, f"  Runs analyzed: {m['runs_analyzed']}   success rate: {format_p(m['p_value'])} (Fisher)   "
                   f"significant below {m['alpha_per_test']:.2g} (Bonferroni, {m['tests']} test(s))")
    else:
        print_line(out, f"  Runs analyzed: {m['runs_analyzed']}   no significance test yet (too few runs on one "
                   "side)")
    p = m.get("pattern")
    if p:
        print_line(out, f"  {for_rich(p['pattern_id'])} error rate: {pct(p['before_error_rate'])} → "
                   f"{pct(p['after_error_rate'])} per call ({p['before_errors']} → {p['after_errors']} errors"
                   + (f"; {format_p(p['p_value'])})" if p["p_value"] is not None else ")"))
    out.print()
    icon = {"keep": "✅", "rollback": "❌", "extend": "⏳"}[r["recommendation"]]
    print_line(out, f"{icon} Recommendation: {r['recommendation']} ({r['verification_status']}) — "
               f"{for_rich(r['reason'])}", hang=3)


@click.command("reject")
@click.argument("improvement_id")
@yes_option
@common_options
def reject_command(improvement_id: str, home: str | None, db: str | None, as_json: bool, yes: bool = False) -> None:
    """Reject a proposed improvement (not proposed again until its evidence changes). Asks first unless --yes."""
    with open_service(home, db) as sh:
        confirm_or_abort(sh, improvement_id, "Reject this proposal?", yes=yes, as_json=as_json)
        r = sh.reject(improvement_id)
    if as_json:
        echo_json(r)
        return
    click.echo(f"🗑️  Rejected {r['improvement_id']}")


COMMANDS = [test_command, apply_command, rollback_command, verify_command, reject_command]
