"""``agent self-heal ab start|status|promote|drop``: A/B experiments of fix strategies."""
from __future__ import annotations

from typing import Any

import click
from rich.table import Table

from selfheal_plugin.cli.common import (
    ask, common_options, echo_json, format_p, open_service, p_cell, print_line, table_console, yes_option,
)
from selfheal_plugin.cli.options import WholeSummaries
from selfheal_plugin.history.text import for_rich, for_terminal


def _rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def _short(text: str | None, n: int = 12) -> str:
    return (text or "")[:n]


def _arms_table(out: Any, r: dict[str, Any]) -> None:
    v = r.get("verdict") or {}
    control = (v.get("groups") or {}).get("control")
    table = Table(box=None, pad_edge=False)
    table.add_column("Arm", no_wrap=True)
    table.add_column("Runs", justify="right")
    table.add_column("Errors", justify="right")
    table.add_column("Success", justify="right")
    table.add_column("p (Holm)", justify="right")
    table.add_column("", no_wrap=True)
    if control:
        table.add_row("control", str(control["runs"]), _rate(control["error_rate"]), _rate(control["success_rate"]),
                      "", "")
    measured = {a["improvement_id"]: a for a in v.get("arms") or []}
    for arm in r.get("arms") or []:
        imp_id = str(arm.get("improvement_id"))
        m = measured.get(imp_id)
        mark = "winner" if imp_id == (v.get("winner") or r.get("winner")) else (
            "better" if m and m.get("better") else "worse" if m and m.get("worse") else "")
        if m:
            table.add_row(for_rich(imp_id), str(m["runs"]), _rate(m["error_rate"]), _rate(m["success_rate"]),
                          p_cell(m["p_error_holm"]), mark)
        else:
            table.add_row(for_rich(imp_id), "-", "-", "-", "-", mark)
    out.print(table)
    for arm in r.get("arms") or []:  # a long description wraps under its arm, not at column 0
        print_line(out, f"  {for_rich(str(arm.get('improvement_id')))}: {for_rich(str(arm.get('description') or ''))}",
                   hang=4)


def print_experiment(r: dict[str, Any]) -> None:
    v = r.get("verdict") or {}
    out = table_console()
    print_line(out, f"🧪 A/B {for_rich(r['experiment_id'])} of {for_rich(r['pattern_id'])}: {for_rich(r['status'])} "
               f"(since {for_rich(r['started_at'])})", hang=3)
    print_line(out, f"  Section {for_rich(r['config_section'])}, commit {_short(r.get('start_sha'))}")
    _arms_table(out, r)
    if v:
        omni = v.get("p_omnibus")
        print_line(out, f"  Omnibus chi-square {format_p(omni)}; error rate = failed calls of the pattern / calls of "
                   "the tool")
        icon = {"winner": "✅", "drop": "❌", "extend": "⏳"}.get(str(v.get("verdict")), "•")
        print_line(out, f"{icon} Verdict: {for_rich(str(v.get('verdict')))} — {for_rich(str(v.get('reason') or ''))}",
                   hang=3)  # under the text, past the icon
    if r["status"] == "running":  # extend: wait for runs, never drop an experiment that has not had them
        step = {"winner": "promote", "drop": "drop"}.get(str(v.get("verdict")), "status")
        print_line(out, f"  Next: agent self-heal ab {step} {for_rich(r['experiment_id'])}"
                   + (" (when more runs have been measured)" if step == "status" else ""))


@click.group("ab", cls=WholeSummaries)
def ab_group() -> None:
    """A/B experiments: several fixes of one pattern, each on a share of runs, beside a control."""


@ab_group.command("start")
@click.argument("pattern_id")
@click.option("--arms", default=None, help="Comma-separated improvement ids of the pattern (default: the "
                                           "candidates its strategies offer).")
@click.option("--fraction", type=float, default=None,
              help="Each arm's share of runs (default: equal shares for every arm and the control).")
@common_options
def start_command(pattern_id: str, home: str | None, db: str | None, as_json: bool, arms: str | None = None,
                  fraction: float | None = None) -> None:
    """Start an A/B experiment of PATTERN_ID: writes [ab."ID"] to config.toml (a git commit)."""
    with open_service(home, db) as sh:
        r = sh.ab_start(pattern_id, arms.split(",") if arms is not None else None, fraction=fraction)
    if as_json:
        echo_json(r)
        return
    out = table_console()  # a long line wraps under its indent at the terminal's width
    print_line(out, f"🧪 Started A/B {for_rich(r['experiment_id'])} of {for_rich(r['pattern_id'])} with "
                    f"{len(r['arms'])} arms, commit {_short(r.get('start_sha'))}", hang=3)
    for arm in r["arms"]:
        print_line(out, f"  {for_rich(arm['improvement_id'])} on {arm['fraction'] * 100:.0f}% of runs: "
                        f"{for_rich(str(arm.get('description') or ''))}")
    if r.get("diff"):
        click.echo(r["diff"].rstrip("\n"))
    click.echo(f"  Next: agent self-heal ab status {r['experiment_id']}")


@ab_group.command("status")
@click.argument("experiment_id", required=False)
@common_options
def status_command(experiment_id: str | None, home: str | None, db: str | None, as_json: bool) -> None:
    """One experiment with its verdict so far, or every experiment."""
    with open_service(home, db) as sh:
        r = sh.ab_list(experiment_id)
    if as_json:  # {"experiments": [...]} either way, as the MCP tool ab_status answers
        echo_json(r)
        return
    if experiment_id:
        print_experiment(r["experiments"][0])
        return
    if not r["experiments"]:
        click.echo("No A/B experiments (start one: agent self-heal ab start PATTERN_ID)")
        return
    print_experiments(r["experiments"])


def print_experiments(experiments: list[dict[str, Any]]) -> None:
    """The list: an experiment's id with its pattern under it, the winner's id under the verdict,
    so each id is whole (never folded) and the table fits 80 columns."""
    table = Table(box=None, pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("Experiment / pattern", no_wrap=True)
    table.add_column("Status", no_wrap=True)
    table.add_column("Arms", justify="right", no_wrap=True)
    table.add_column("Verdict", no_wrap=True)
    for e in experiments:
        v = e.get("verdict") or {}
        table.add_row(f"{for_rich(e['experiment_id'])}\n{for_rich(e['pattern_id'])}", for_rich(e["status"]),
                      str(len(e["arms"])), for_rich(str(v.get("verdict") or "-"))
                      + (f"\n{for_rich(e['winner'])}" if e.get("winner") else ""))
    table_console().print(table)


def _confirm(sh: Any, experiment_id: str, question: str, *, yes: bool, as_json: bool) -> None:
    exp = sh.ab_status(experiment_id)  # an unknown id fails before any question
    ask(f"A/B {exp['experiment_id']} of {for_terminal(exp['pattern_id'])} ({exp['status']})", question, yes=yes,
        as_json=as_json)


@ab_group.command("promote")
@click.argument("experiment_id")
@click.option("--force", is_flag=True, help="Promote the best observed arm without a significant winner "
                                            "(recorded).")
@yes_option
@common_options
def promote_command(experiment_id: str, home: str | None, db: str | None, as_json: bool, force: bool = False,
                    yes: bool = False) -> None:
    """End the experiment and apply its winner to every run (two commits). Refused without a
    significant winner unless --force. Asks first unless --yes."""
    with open_service(home, db) as sh:
        _confirm(sh, experiment_id, "Promote its winner to every run (two commits)?", yes=yes, as_json=as_json)
        r = sh.ab_promote(experiment_id, force=force)
    if as_json:
        echo_json(r)
        return
    click.echo(f"⬆️  Promoted {r['winner']} from A/B {r['experiment_id']}" + (" (forced)" if r.get("forced") else ""))
    if r.get("end_commit_sha"):
        click.echo(f"  Section removed: commit {_short(r['end_commit_sha'])}")
    applied = r.get("applied") or {}
    click.echo(f"  Applied: commit {_short(applied.get('commit_sha'))}; verification scheduled "
               f"{applied.get('verification_scheduled')}")
    others = [a["improvement_id"] for a in r["arms"] if a["improvement_id"] != r["winner"]]
    if others:
        click.echo(f"  Other arms kept in history as ab_lost: {', '.join(others)}")


@ab_group.command("drop")
@click.argument("experiment_id")
@yes_option
@common_options
def drop_command(experiment_id: str, home: str | None, db: str | None, as_json: bool, yes: bool = False) -> None:
    """End the experiment without applying anything (a commit removing its section); every
    arm goes back to what it was. Asks first unless --yes."""
    with open_service(home, db) as sh:
        _confirm(sh, experiment_id, "Drop this experiment (a commit removing its section)?", yes=yes,
                 as_json=as_json)
        r = sh.ab_drop(experiment_id)
    if as_json:
        echo_json(r)
        return
    click.echo(f"🗑️  Dropped A/B {r['experiment_id']}")
    if r.get("end_commit_sha"):
        click.echo(f"  Commit: {_short(r['end_commit_sha'])}")
        click.echo((r.get("diff") or "").rstrip("\n"))


COMMANDS = [ab_group]
