"""``agent self-heal ...``: a thin shell over the library.

Every command takes ``--home``/``--db`` and ``--json``. Domain errors become one line and
exit code 1; bad option values exit 2 (click's usage errors). The commands live in one
module per area; this module holds the groups and registers them.
"""
from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from selfheal_plugin import __version__
from selfheal_plugin.analysis.patterns import get_pattern, pattern_details
from selfheal_plugin.cli import canary, daemon, demo, health, lifecycle, plugins
from selfheal_plugin.cli.common import common_options, echo_json, open_history, pct, scan_progress, settings_for, warn_bad_rows
from selfheal_plugin.history.settings import configure_logging
from selfheal_plugin.history.text import for_rich, for_terminal
from selfheal_plugin.history.times import parse_since


# ------------------------------------------------------------------ commands


@click.group()
@click.version_option(__version__, prog_name="selfheal")
def agent() -> None:
    """Agent runtime commands provided by the selfheal plugin."""
    configure_logging()


@agent.group("self-heal", invoke_without_command=True)
@click.option("--home", type=click.Path(file_okay=False), default=None, help="Runtime home (default: $BINKS_HOME).")
@click.option("--db", type=click.Path(dir_okay=False), default=None, help="Run-history database.")
@click.pass_context
def self_heal(ctx: click.Context, home: str | None, db: str | None) -> None:
    """Find recurring failures, propose, test, apply and verify fixes.

    Without a subcommand, runs `detect`.
    """
    ctx.obj = {"home": home, "db": db}
    if ctx.invoked_subcommand is None:
        ctx.invoke(detect)


@self_heal.command()
@click.option("--since", default=None, help="Window start: -7d, -24h, -30m, -1w, or an ISO date/datetime.")
@click.option("--min-occurrences", type=click.IntRange(min=1), default=None, help="Minimum occurrences (default 3).")
@click.option("--confidence", type=click.FloatRange(0.0, 1.0), default=None,
              help="Confidence threshold 0.0-1.0 (default 0.75).")
@common_options
def detect(home: str | None, db: str | None, as_json: bool, since: str | None = None,
           min_occurrences: int | None = None, confidence: float | None = None) -> None:
    """Detect recurring failure patterns."""
    s = settings_for(home, db, lookback=since, min_occurrences=min_occurrences, confidence_threshold=confidence)
    parse_since(s.lookback)  # a bad window is a usage error before anything is printed
    conn = open_history(s)
    if not as_json:
        click.echo(f"🔍 Detecting failure patterns (last {s.lookback}, min {s.min_occurrences} occurrences, "
                   f"confidence >= {pct(s.confidence_threshold)})...")
    from selfheal_plugin.lifecycle.proposals import detect_with_fixes  # the MCP tool's detection: patterns with their suggested_fix

    with scan_progress(not as_json) as progress:
        result = detect_with_fixes(conn, s, progress=progress)
    warn_bad_rows(result.scanned.total_bad_rows)
    detect_proposals = plugins.detect_proposals  # proposals, inbox summary, next steps

    if as_json:
        proposals = detect_proposals(conn, s, result.patterns, as_json=True) if result.patterns else []
        echo_json({"since": result.since, "patterns": [p.to_dict() for p in result.patterns],
                   "proposals": proposals, "skipped_rows": result.scanned.total_bad_rows})
        return
    click.echo()
    if not result.patterns:
        click.echo(f"✅ No recurring failure patterns ({result.candidates} signature(s) below the confidence "
                   "threshold). Try --since -30d, --min-occurrences or --confidence.")
        return
    click.echo(f"📊 Found {len(result.patterns)} pattern(s):")
    click.echo()
    for p in result.patterns:
        click.echo(f"  Pattern {for_terminal(p.id)}")
        click.echo(f"    Error: {for_terminal(p.error_type)} on {for_terminal(p.tool_name)}")
        click.echo(f"    Occurrences: {p.occurrences}")
        click.echo(f"    Correlation: {pct(p.correlation_score)}")
        click.echo(f"    Confidence: {pct(p.confidence)}")
        click.echo()
    detect_proposals(conn, s, result.patterns, as_json=False)


@self_heal.command()
@click.argument("pattern_id")
@click.option("--since", default=None, help="Window start (default: the lookback setting, -7d).")
@common_options
def show(pattern_id: str, home: str | None, db: str | None, as_json: bool, since: str | None = None) -> None:
    """Show one pattern: affected runs, message templates, context."""
    s = settings_for(home, db, lookback=since)
    conn = open_history(s)
    pattern = get_pattern(conn, pattern_id, since=s.lookback)
    from selfheal_plugin.lifecycle.proposals import attach_suggested_fixes

    attach_suggested_fixes([pattern], s)
    details = pattern_details(pattern)
    if as_json:
        echo_json(details)
        return
    _print_pattern(details)


def _print_pattern(d: dict[str, Any]) -> None:
    from rich.table import Table

    out = Console(width=max(120, Console().width))
    click.echo(f"Pattern {for_terminal(d['id'])}")
    click.echo(f"  Error: {for_terminal(d['error_type'])} on {for_terminal(d['tool_name'])}")
    click.echo(f"  Occurrences: {d['occurrences']} in {len(d['affected_runs'])} run(s); "
               f"{pct(d['failure_rate'])} of the tool's calls")
    click.echo(f"  Correlation: {pct(d['correlation_score'])}   Confidence: {pct(d['confidence'])}")
    click.echo(f"  First seen: {d['first_seen']}")
    click.echo(f"  Last seen:  {d['last_seen']}")
    if d.get("suggested_fix"):
        click.echo(f"  Suggested fix: {for_terminal(d['suggested_fix'])}")
    t = Table(title="Message templates (context similarity)", title_justify="left")
    t.add_column("count", justify="right")
    t.add_column("template")
    t.add_column("example", overflow="fold")
    for tpl in d["templates"]:
        t.add_row(str(tpl["count"]), for_rich(tpl["template"]), for_rich(tpl["example"]))
    out.print(t)
    ctx = d["context"]
    out.print("  Workflows: " + ", ".join(f"{for_rich(k)} ({v})" for k, v in ctx["workflows"].items()), highlight=False)
    out.print("  Steps: " + ", ".join(f"{k} ({v})" for k, v in ctx["steps"].items()), highlight=False)
    if ctx["argument_keys"]:
        out.print("  Argument keys: " + ", ".join(f"{for_rich(k)} ({v})" for k, v in ctx["argument_keys"].items()),
                  highlight=False)
    out.print("  error_type as written: " + ", ".join(f"{for_rich(k)} ({v})" for k, v in ctx["error_type_spellings"].items()),
              highlight=False)
    r = Table(title="Affected runs", title_justify="left")
    r.add_column("run", no_wrap=True)
    for col in ("workflow", "started (UTC)", "status", "errors"):
        r.add_column(col, no_wrap=True)
    for run in d["runs"]:
        r.add_row(*(for_rich(v) for v in (run["run_id"], run["workflow"], run["started_at"], run["status"])),
                  str(run["errors"]))
    out.print(r)


def main() -> None:
    agent(prog_name="agent")


def main_self_heal() -> None:
    """``python -m selfheal_plugin``: the same as ``agent self-heal``."""
    self_heal(prog_name="python -m selfheal_plugin")


for _command in (*health.COMMANDS, *plugins.COMMANDS, *lifecycle.COMMANDS, *canary.COMMANDS, *demo.COMMANDS):
    self_heal.add_command(_command)
agent.add_command(daemon.self_heal_daemon)
