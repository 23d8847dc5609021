"""``agent self-heal improvements`` and ``agent self-heal plugins``, and the text of ``detect``."""
from __future__ import annotations

from typing import Any

import click

from selfheal_plugin.lazy import lazy_module

from selfheal_plugin.cli.common import common_options, echo_json, open_service, pct, print_line, table_console
from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.cli.options import setting_option
from selfheal_plugin.history.improvements import IN_FORCE, STATUSES, already_fixed
from selfheal_plugin.history.settings import Settings
from selfheal_plugin.history.text import for_rich, for_terminal

# rich is imported when a table is printed, not by `--json` or `--version`
rich_box, rich_table, rich_text = (lazy_module(m) for m in ("rich.box", "rich.table", "rich.text"))


WIDE_PLUGINS = 120  # columns from which `plugins` lists the plugins as a table
KIND_TITLE = "Strategy for each failure kind (see docs/detection.md: Which strategy answers)"


def _console() -> Any:
    return table_console()


def print_detection(result: dict[str, Any], settings: Settings) -> None:
    """The text of ``detect``: each pattern with its one suggested fix, the proposals made,
    whether the inbox was told (the cooldown may have held it back), and the next steps. A long
    line wraps under its indent at the terminal's width (print_line)."""
    out = _console()
    patterns = result["patterns"]
    out.print()
    if not patterns:
        if not result.get("failing_signatures"):  # only a longer window can find something
            print_line(out, f"✅ No recurring failure patterns (no failed tool call since {for_rich(result['since'])}). "
                       "Try --since -30d.", hang=3)
            return
        if not result["candidates"]:
            why = (f"{result['failing_signatures']} signature(s) failed, none {settings.min_occurrences} "
                   "or more times")
        else:
            why = f"{result['candidates']} signature(s) below the confidence threshold"
        print_line(out, f"✅ No recurring failure patterns ({why}). Try --since -30d, --min-occurrences or "
                   "--confidence.", hang=3)
        return
    print_line(out, f"📊 Found {len(patterns)} pattern(s):", hang=3)
    out.print()
    for p in patterns:
        print_line(out, f"  Pattern {for_rich(p['id'])}")
        print_line(out, f"    Error: {for_rich(p['error_type'])} on {for_rich(p['tool_name'])}")
        print_line(out, f"    Occurrences: {p['occurrences']}")
        print_line(out, f"    Correlation: {pct(p['correlation_score'])}")
        print_line(out, f"    Confidence: {pct(p['confidence'])}")
        print_line(out, "    Failure kind: "
                   f"{for_rich((p.get('evidence') or {}).get('summary') or p.get('failure_kind') or 'unknown')}")
        if p.get("suggested_fix") and p.get("improvement_status") in IN_FORCE:  # said as the inbox says it
            print_line(out, f"    {already_fixed(p['improvement_id'], p['improvement_status'], p['suggested_fix'], for_rich)}")
        elif p.get("suggested_fix"):
            print_line(out, f"    Suggested fix: {for_rich(p['suggested_fix'])}")
        elif p.get("no_fix_reason"):
            print_line(out, f"    Suggested fix: none — {for_rich(p['no_fix_reason'])}")
        out.print()
    print_line(out, "💡 Generating improvement proposals...", hang=3)
    out.print()
    for res in result["proposals"]:
        if res.get("error"):
            print_line(out, f"  ✗ No proposal for pattern {for_rich(res['pattern_id'])}: {for_rich(res['error'])}",
                       hang=2)
        elif res.get("skipped"):
            print_line(out, f"  – No new proposal for pattern {for_rich(res['pattern_id'])}: "
                       f"{for_rich(res['skipped'])}")
        elif res.get("status") in IN_FORCE:  # the fix of record is in config.toml already: nothing new to do
            fixed = already_fixed(res["improvement_id"], res["status"], res["description"], for_rich)
            print_line(out, f"  – No new proposal for pattern {for_rich(res['pattern_id'])}: {fixed}")
        else:
            note = "" if res["created"] else " (already open)"
            print_line(out, f"  ✓ Proposal {for_rich(res['improvement_id'])} for pattern "
                       f"{for_rich(res['pattern_id'])}{note}")
            print_line(out, f"      {for_rich(res['description'])}")
            if res.get("same_change_undone"):
                print_line(out, f"      ⚠ Note: {for_rich(res['same_change_undone']['note'])}")
    out.print()
    if not settings.notify_patterns:
        print_line(out, "📭 Inbox summary off (notify_patterns = false)", hang=3)
    elif result["notified"]:
        print_line(out, "📬 Writing summary to inbox...", hang=3)
    elif result.get("undelivered"):
        print_line(out, "📭 Inbox summary not written (see the warning above): the next detect tries again", hang=3)
    else:
        print_line(out, f"📭 Inbox already told about these patterns in the last {settings.cooldown_minutes:g} "
                   "minutes", hang=3)
    out.print()
    out.print("📋 Next steps:")
    if any(p.get("suggested_fix") and p.get("improvement_status") not in IN_FORCE for p in patterns):
        print_line(out, "  - Test: agent self-heal test <improvement-id>")  # not for a fix in force already
        print_line(out, "  - Apply: agent self-heal apply <improvement-id>")
    print_line(out, "  - View: agent self-heal show <pattern-id>")


@click.command()
@click.option("--status", type=click.Choice(STATUSES), default=None, metavar="STATUS",
              help=f"Only improvements in this state: {', '.join(STATUSES)}.")
@setting_option("limit", "--limit")
@common_options
def improvements(home: str | None, db: str | None, as_json: bool, status: str | None = None,
                 limit: int = 20) -> None:
    """List improvements: id, status, description, expected vs actual impact, applied date.

    The latest status change comes first (applied, verified, rolled back, tested, rejected or
    proposed, whichever happened last), as in the dashboard's recent improvements."""
    with open_service(home, db) as sh:
        rows = sh.improvements(status=status, limit=limit)
    if as_json:
        echo_json({"improvements": rows, "status": status, "limit": limit})
        return
    if not rows:
        click.echo(f"No improvements{' with status ' + status if status else ''}. "
                   "Run `agent self-heal detect` to propose some.")
        return
    # Ids and states never wrap (an id is pasted into the next command); the texts wrap at
    # word boundaries into what the terminal has left.
    t = rich_table.Table(title=f"Improvements{' (' + status + ')' if status else ''}", title_justify="left",
              box=rich_box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    t.add_column("id", no_wrap=True, min_width=21)
    t.add_column("status", no_wrap=True)
    t.add_column("applied", no_wrap=True, min_width=10)
    t.add_column("description and impact (expected → measured)", ratio=1)
    for r in rows:
        desc = r["description"] if not r["legacy"] else f"{r['description']} (runtime: {r['category']})"
        text = rich_text.Text(for_terminal(desc))
        text.append(f"\nexpected: {for_terminal(r['expected_impact'] or '-')}", style="dim")
        if r["actual_impact"]:
            text.append(f"\nmeasured: {for_terminal(r['actual_impact'])}", style="dim")
        if r.get("same_change_undone"):  # the note in full: show PATTERN, or --json
            undone = r["same_change_undone"]
            text.append(f"\n⚠ same change {for_terminal(str(undone.get('status')).replace('_', ' '))} before "
                        f"({for_terminal(undone.get('improvement_id'))})")
        t.add_row(*(rich_text.Text(for_terminal(v)) for v in (r["id"], r["status"], (r["applied_at"] or "-")[:10])),
                  text)  # a row of the file: a tampered one may hold control characters anywhere
    _console().print(t)


@click.command("plugins")
@common_options
def plugins_command(home: str | None, db: str | None, as_json: bool) -> None:
    """List loaded plugins, their hooks, the strategy for each error type, and load errors."""
    with open_service(home, db) as sh:
        info = sh.plugins()
        info["plugins_dir"] = str(sh.settings.plugins_dir)
    if as_json:
        echo_json(info)
        return
    out = _console()
    if out.width >= WIDE_PLUGINS:
        _plugin_tables(out, info)
    else:  # tables would cut names, hooks and paths into pieces: a block a plugin, a line a strategy
        out.print("Plugins")
        for p in info["plugins"]:
            print_line(out, f"  {for_rich(p['name'])} ({for_rich(p['source'])}, version {for_rich(p.get('version') or '-')})")
            print_line(out, f"    hooks: {for_rich(', '.join(p['hooks']))}", hang=7)
            out.print(f"    path:  {for_rich(p.get('path') or '-')}", soft_wrap=True)  # a path is not cut
        out.print("Strategy for each error type")
        for row in info["strategies"]:
            print_line(out, f"  {for_rich(row['error_type'])} → {for_rich(row['strategy'])} "
                            f"({for_rich(row['plugin'])}): {for_rich(row['summary'] or '')}")
        if info.get("kind_strategies"):
            out.print(KIND_TITLE)
            for row in info["kind_strategies"]:
                print_line(out, f"  {for_rich(row['kind'])} → {for_rich(row['strategy'])} ({for_rich(row['plugin'])})")
    click.echo(f"User plugin folder: {info['plugins_dir']}")
    for f in info.get("failed_strategies", []):
        click.echo(f"✗ strategy for {for_terminal(f['error_type'])} failed to load (plugin {for_terminal(f['plugin'])}): "
                   "nothing is proposed "
                   "for it until it loads")
    for f in info.get("failed_kind_strategies", []):  # a plugin's name and error are its text: escaped
        click.echo(f"✗ strategy for failure kind {f['kind']} failed to load (plugin {for_terminal(f['plugin'])}: "
                   f"{for_terminal(f['error'])}): nothing is proposed for it until it loads")
    if info["errors"]:
        click.echo(f"{len(info['errors'])} plugin error(s) (this command's and the last "
                   f"{plugins.ERROR_RETENTION_DAYS} days'):")
        for e in info["errors"]:
            where = f" in {e['hook']}" if e.get("hook") else ""
            when = (e.get("last_seen") or "")[:19].replace("T", " ")
            seen = f" ({e['count']}×, last {when})" if (e.get("count") or 1) > 1 else (f" ({when})" if when else "")
            # a plugin's text, and the history's it quotes: escaped, as PluginError.line()
            click.echo("  ✗ " + for_terminal(f"{e['plugin']} ({e['phase']}{where}): {e['error']}"
                                             + (f" [{e['path']}]" if e.get("path") else "") + seen))


def _plugin_tables(out: Any, info: dict[str, Any]) -> None:
    t = rich_table.Table(title="Plugins", title_justify="left", box=rich_box.SIMPLE_HEAD, show_edge=False,
                         pad_edge=False)
    t.add_column("name", no_wrap=True)
    t.add_column("source", no_wrap=True)
    t.add_column("version", no_wrap=True)
    t.add_column("hooks", overflow="fold")
    t.add_column("path", overflow="fold")
    for p in info["plugins"]:
        t.add_row(*(rich_text.Text(for_terminal(v)) for v in (p["name"], p["source"], p.get("version") or "-",
                                                             ", ".join(p["hooks"]), p.get("path") or "-")))
    out.print(t)
    st = rich_table.Table(title="Strategy for each error type", title_justify="left", box=rich_box.SIMPLE_HEAD, show_edge=False,
               pad_edge=False)
    for col in ("error type", "strategy", "plugin"):
        st.add_column(col, no_wrap=True)
    st.add_column("what it does", overflow="fold")
    for row in info["strategies"]:
        st.add_row(*(rich_text.Text(for_terminal(v or "")) for v in (row["error_type"], row["strategy"], row["plugin"], row["summary"])))
    out.print(st)
    if info.get("kind_strategies"):
        kt = rich_table.Table(title=KIND_TITLE, title_justify="left")
        for col in ("failure kind", "strategy", "plugin"):
            kt.add_column(col, no_wrap=True)
        for row in info["kind_strategies"]:
            kt.add_row(*(rich_text.Text(for_terminal(v or "")) for v in (row["kind"], row["strategy"], row["plugin"])))
        out.print(kt)


COMMANDS = [improvements, plugins_command]
