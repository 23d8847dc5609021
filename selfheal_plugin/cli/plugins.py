"""``agent self-heal improvements`` and ``agent self-heal plugins``, and the proposal part
of ``detect`` (a thin shell over :mod:`selfheal_plugin.lifecycle.proposals` and ``plugins``)."""
from __future__ import annotations

from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from selfheal_plugin.plugins import manager as plugins
from selfheal_plugin.cli.common import common_options, echo_json, open_history, settings_for
from selfheal_plugin.history.improvements import STATUSES
from selfheal_plugin.lifecycle.proposals import StrategyError, attach_suggested_fixes, list_improvements, propose_all
from selfheal_plugin.analysis.patterns import Pattern
from selfheal_plugin.history.settings import Settings
from selfheal_plugin.history.text import for_terminal


def _console() -> Console:
    return Console(width=max(120, Console().width), highlight=False)


def detect_proposals(conn: Any, settings: Settings, patterns: list[Pattern], *, as_json: bool) -> list[dict]:
    """Propose for each pattern of :func:`lifecycle.detect_with_fixes` and fire
    ``patterns_detected`` (the inbox summary, when ``notify_patterns`` is on).

    Prints the design document's lines unless ``as_json``; returns the proposals as dicts
    (a failing strategy gives ``{"pattern_id", "error"}``). Each pattern keeps its
    strategy's ``suggested_fix``; the proposal's own description is its line here.
    """
    if any(p.suggested_fix is None for p in patterns):  # patterns not from detect_with_fixes
        attach_suggested_fixes(patterns, settings)
    if not as_json:
        click.echo("💡 Generating improvement proposals...")
        click.echo()
    results = propose_all(conn, settings, patterns, since=settings.lookback)
    out: list[dict] = []
    for pattern, res in zip(patterns, results):
        if isinstance(res, StrategyError):
            out.append({"pattern_id": pattern.id, "error": str(res)})
            if not as_json:
                click.echo(f"  ✗ No proposal for pattern {for_terminal(pattern.id)}: {for_terminal(res)}")
            continue
        out.append(res.to_dict())
        if not as_json:
            note = "" if res.created else " (already open)"
            click.echo(f"  ✓ Proposal {res.improvement.id} for pattern {for_terminal(pattern.id)}{note}")
            click.echo(f"      {for_terminal(res.improvement.description)}")
    if not as_json:
        click.echo()
        click.echo("📬 Writing summary to inbox..." if settings.notify_patterns
                   else "📭 Inbox summary off (notify_patterns = false)")
        click.echo()
    plugins.fire("patterns_detected", patterns=patterns, settings=settings)
    if not as_json:
        click.echo("📋 Next steps:")
        click.echo("  - Test: agent self-heal test <improvement-id>")
        click.echo("  - Apply: agent self-heal apply <improvement-id>")
        click.echo("  - View: agent self-heal show <pattern-id>")
    return out


@click.command()
@click.option("--status", type=click.Choice(STATUSES), default=None, help="Only improvements in this state.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True, help="Maximum rows.")
@common_options
def improvements(home: str | None, db: str | None, as_json: bool, status: str | None = None,
                 limit: int = 20) -> None:
    """List improvements: id, status, description, expected vs actual impact, applied date."""
    s = settings_for(home, db)
    rows = list_improvements(open_history(s), status=status, limit=limit)
    if as_json:
        echo_json({"improvements": rows, "status": status, "limit": limit})
        return
    if not rows:
        click.echo(f"No improvements{' with status ' + status if status else ''}. "
                   "Run `agent self-heal detect` to propose some.")
        return
    t = Table(title=f"Improvements{' (' + status + ')' if status else ''}", title_justify="left")
    t.add_column("id", no_wrap=True, min_width=21)
    t.add_column("status", no_wrap=True, min_width=11)
    t.add_column("description", overflow="fold", ratio=3)
    t.add_column("expected impact", overflow="fold", ratio=2)
    t.add_column("actual impact", overflow="fold", ratio=1)
    t.add_column("applied", no_wrap=True)
    for r in rows:
        desc = r["description"] if not r["legacy"] else f"{r['description']} (runtime: {r['category']})"
        t.add_row(*(Text(for_terminal(v)) for v in (r["id"], r["status"], desc, r["expected_impact"] or "-",
                                      r["actual_impact"] or "-", (r["applied_at"] or "-")[:19].replace("T", " "))))
    _console().print(t)


@click.command("plugins")
@common_options
def plugins_command(home: str | None, db: str | None, as_json: bool) -> None:
    """List loaded plugins, their hooks, the strategy for each error type, and load errors."""
    s = settings_for(home, db)
    info = plugins.describe(s)
    info["plugins_dir"] = str(s.plugins_dir)
    if as_json:
        echo_json(info)
        return
    out = _console()
    t = Table(title="Plugins", title_justify="left")
    t.add_column("name", no_wrap=True)
    t.add_column("source", no_wrap=True)
    t.add_column("hooks", overflow="fold")
    t.add_column("version / path", overflow="fold")
    for p in info["plugins"]:
        t.add_row(*(Text(v) for v in (p["name"], p["source"], ", ".join(p["hooks"]),
                                      p.get("version") or p.get("path") or "-")))
    out.print(t)
    st = Table(title="Strategy for each error type", title_justify="left")
    for col in ("error type", "strategy", "plugin"):
        st.add_column(col, no_wrap=True)
    st.add_column("what it does", overflow="fold")
    for row in info["strategies"]:
        st.add_row(*(Text(v or "") for v in (row["error_type"], row["strategy"], row["plugin"], row["summary"])))
    out.print(st)
    click.echo(f"User plugin folder: {info['plugins_dir']}")
    if info["errors"]:
        click.echo(f"{len(info['errors'])} plugin error(s):")
        for e in info["errors"]:
            where = f" in {e['hook']}" if e.get("hook") else ""
            click.echo(f"  ✗ {e['plugin']} ({e['phase']}{where}): {e['error']}"
                       + (f" [{e['path']}]" if e.get("path") else ""))


COMMANDS = [improvements, plugins_command]
