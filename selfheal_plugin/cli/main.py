"""``agent self-heal ...``: a thin shell over the library.

Every command takes ``--home``/``--db`` and ``--json``. Domain errors become one line and
exit code 1; bad option values exit 2 (click's usage errors). The commands live in one
module per area; this module holds the groups and registers them.
"""
from __future__ import annotations

import importlib
from typing import Any

import click

from selfheal_plugin import __version__
from selfheal_plugin.cli.common import (common_options, echo_json, open_service, pct, print_line, scan_progress,
                                        table_console, warn_bad_rows)
from selfheal_plugin.cli.options import WholeSummaries, setting_option
from selfheal_plugin.helptext import WholeWordsContext
from selfheal_plugin.history.settings import configure_logging
from selfheal_plugin.history.text import for_rich

# Commands defined in other modules of this package, by name → module (each lists them in its
# COMMANDS). A module is imported when one of its commands runs or help lists them, so
# `agent --version` and `detect` do not pay for the others (rich, the HTML report, the demo).
LAZY_COMMANDS = {
    "dashboard": "health", "health": "health",
    "improvements": "plugins", "plugins": "plugins",
    "test": "lifecycle", "apply": "lifecycle", "rollback": "lifecycle", "verify": "lifecycle", "reject": "lifecycle",
    "canary": "canary", "demo": "demo",
    "export": "sharing", "import": "sharing", "sync": "sharing",
    "ab": "ab",
    "learn": "learn",
}
LAZY_AGENT_COMMANDS = {"self-heal-daemon": "daemon"}


def _with_version(command: click.Command) -> click.Command:
    """``--version`` at every level (``-h`` comes from the groups' context settings), and help
    pages that wrap at spaces only (never inside an option or a command)."""
    command.context_class = WholeWordsContext
    if not any(isinstance(p, click.Option) and "--version" in p.opts for p in command.params):
        click.version_option(__version__, prog_name="selfheal")(command)
    for sub in getattr(command, "commands", {}).values():
        _with_version(sub)
    return command


class LazyGroup(WholeSummaries):
    """A click group whose commands from :data:`LAZY_COMMANDS`-style tables load on first use."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is None and name in self.lazy:
            module = importlib.import_module(f"selfheal_plugin.cli.{self.lazy[name]}")
            command = _with_version(next(c for c in module.COMMANDS if c.name == name))
            self.add_command(command)
        return command


# ------------------------------------------------------------------ commands


CONTEXT = {"help_option_names": ["-h", "--help"]}


@click.group(cls=LazyGroup, lazy=LAZY_AGENT_COMMANDS, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="selfheal")
def agent() -> None:
    """Agent runtime commands provided by the selfheal plugin."""
    configure_logging()


@agent.group("self-heal", cls=LazyGroup, lazy=LAZY_COMMANDS, invoke_without_command=True,
             context_settings=CONTEXT)
@click.option("--home", type=click.Path(file_okay=False), default=None,
              help="Runtime home (default: $BINKS_HOME or ~/.binks).")
@click.option("--db", type=click.Path(dir_okay=False), default=None,
              help="Run-history database (default: HOME/conversations.db).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text (every subcommand).")
@click.version_option(__version__, prog_name="selfheal")
@click.pass_context
def self_heal(ctx: click.Context, home: str | None, db: str | None, as_json: bool) -> None:
    """Find recurring failures, propose, test, apply and verify fixes.

    Start with `agent self-heal detect`. The options below may also follow the command
    (`detect --json`, `ab status --json`), not come between a group and its command;
    `demo` takes --dir instead. Exit codes: 0 ok, 1 failure, 2 bad usage; with --check, 3
    and 4 for verdicts (see `test --help`, `verify --help`).
    """
    ctx.obj = {"home": home, "db": db, "json": as_json}
    if ctx.invoked_subcommand is None:  # help, and nothing read or written
        click.echo(ctx.get_help())
        ctx.exit(0)


@self_heal.command()
@setting_option("lookback", "--since", help="Window start: -7d, -24h, -30m, -1w, or an ISO date/datetime.")
@setting_option("min_occurrences", "--min-occurrences")
@setting_option("confidence_threshold", "--confidence")
@setting_option("limit", "--limit", help="Affected runs listed per pattern in --json, the latest first kept "
                "(affected_run_count is the total; `show PATTERN` lists them all).")
@common_options
def detect(home: str | None, db: str | None, as_json: bool, since: str | None = None,
           min_occurrences: int | None = None, confidence: float | None = None, limit: int = 20) -> None:
    """Detect recurring failure patterns."""
    with open_service(home, db, lookback=since, min_occurrences=min_occurrences,
                      confidence_threshold=confidence) as sh:
        s = sh.settings
        if not as_json:
            print_line(table_console(), f"🔍 Detecting failure patterns (last {for_rich(s.lookback)}, min "
                       f"{s.min_occurrences} occurrences, confidence >= {pct(s.confidence_threshold)})...", hang=3)
        with scan_progress(not as_json) as progress:
            result = sh.detect(propose=True, notify=True, progress=progress, runs_limit=limit)
    warn_bad_rows(result["skipped_rows"], result.get("skipped_runs", 0))
    if as_json:
        echo_json(result)
        return
    importlib.import_module("selfheal_plugin.cli.plugins").print_detection(result, s)


@self_heal.command()
@click.argument("pattern_id")
@setting_option("lookback", "--since", help="Window start")
@common_options
def show(pattern_id: str, home: str | None, db: str | None, as_json: bool, since: str | None = None) -> None:
    """Show one pattern: affected runs, message templates, context."""
    from selfheal_plugin.analysis.patterns import split_pattern_id

    split_pattern_id(pattern_id)  # a malformed id is bad usage, refused before the history is opened
    with open_service(home, db, lookback=since) as sh:
        details = sh.show(pattern_id)
    if as_json:
        echo_json(details)
        return
    _print_pattern(details)


def _print_pattern(d: dict[str, Any]) -> None:
    from rich.table import Table

    from selfheal_plugin.history.improvements import IN_FORCE, already_fixed

    out = table_console()
    out.print(f"Pattern {for_rich(d['id'])}")
    print_line(out, f"  Error: {for_rich(d['error_type'])} on {for_rich(d['tool_name'])}")
    print_line(out, "  Failure kind: "
               f"{for_rich((d.get('evidence') or {}).get('summary') or d.get('failure_kind') or 'unknown')}")
    for reason in (d.get("evidence") or {}).get("reasons", []):
        print_line(out, f"    because: {for_rich(reason)}")
    print_line(out, f"  Occurrences: {d['occurrences']} in {len(d['affected_runs'])} run(s); "
               f"{pct(d['failure_rate'])} of the tool's calls")
    print_line(out, f"  Correlation: {pct(d['correlation_score'])}   Confidence: {pct(d['confidence'])}")
    print_line(out, f"  First seen: {d['first_seen']}")
    print_line(out, f"  Last seen:  {d['last_seen']}")
    if d.get("suggested_fix") and d.get("improvement_status") in IN_FORCE:  # said as detect and the inbox say it
        print_line(out, f"  {already_fixed(d['improvement_id'], d['improvement_status'], d['suggested_fix'], for_rich)}")
    elif d.get("suggested_fix"):
        print_line(out, f"  Suggested fix: {for_rich(d['suggested_fix'])}")
        if d.get("same_change_undone"):  # the open proposal's: said where a person decides, as detect does
            print_line(out, f"  ⚠ Note: {for_rich(d['same_change_undone']['note'])}")
    elif d.get("no_fix_reason"):
        print_line(out, f"  Suggested fix: none — {for_rich(d['no_fix_reason'])}")
    t = Table(title="Message templates (context similarity)", title_justify="left")
    t.add_column("count", justify="right")
    t.add_column("kind")
    t.add_column("template", overflow="fold")
    t.add_column("example", overflow="fold")
    for tpl in d["templates"]:
        t.add_row(str(tpl["count"]), for_rich(tpl.get("kind", "")), for_rich(tpl["template"]), for_rich(tpl["example"]))
    out.print(t)
    ctx = d["context"]
    print_line(out, "  Workflows: " + ", ".join(f"{for_rich(k)} ({v})" for k, v in ctx["workflows"].items()))
    print_line(out, "  Steps: " + ", ".join(f"{k} ({v})" for k, v in ctx["steps"].items()))
    if ctx["argument_keys"]:
        print_line(out, "  Argument keys: " + ", ".join(f"{for_rich(k)} ({v})" for k, v in ctx["argument_keys"].items()))
    print_line(out, "  error_type as written: "
               + ", ".join(f"{for_rich(k)} ({v})" for k, v in ctx["error_type_spellings"].items()))
    ev = d.get("evidence") or {}
    for path in ev.get("paths", [])[:5]:
        exists = {True: "exists now", False: "does not exist now"}.get(path.get("exists_now"), "not checked")
        print_line(out, f"  Path named: {for_rich(path['path'])} ({path['count']}×, {exists})")
    det = ev.get("determinism") or {}
    if det:
        print_line(out, f"  Repeats: {det['verdict']} — same arguments failed again {det['same_args_failed_again']}×, "
                   f"succeeded later {det['same_args_succeeded_later']}×; next call in the same run succeeded "
                   f"{det['follow_up_succeeded']} of {det['followed_in_run']}")
    # a row a line at 80 columns: whole run ids (what `health` takes), starts to the minute (--json: to the µs)
    r = Table(title="Affected runs (started: UTC; errs: failures of the pattern in the run)", title_justify="left",
              box=None, pad_edge=False, padding=(0, 1, 0, 0))
    r.add_column("run", no_wrap=True)
    r.add_column("workflow", overflow="fold")
    r.add_column("started", no_wrap=True)
    r.add_column("status", overflow="fold")
    r.add_column("errs", justify="right")
    for run in d["runs"]:
        started = run["started_at"][:16].replace("T", " ") if run["started_at"][16:17] == ":" else run["started_at"]
        r.add_row(*(for_rich(v) for v in (run["run_id"], run["workflow"], started, run["status"])), str(run["errors"]))
    out.print(r)


def main() -> None:
    agent(prog_name="agent")


def main_self_heal() -> None:
    """``python -m selfheal_plugin``: the same as ``agent self-heal``."""
    self_heal(prog_name="python -m selfheal_plugin")


_with_version(agent)
