"""``agent self-heal learn``: what got better without us and why, and the fix rules learned
(``--rules`` lists them, ``--disable RULE`` / ``--enable RULE`` turn one off or on)."""
from __future__ import annotations

import textwrap
from typing import Any

import click

from selfheal_plugin.cli.common import common_options, echo_json, open_service, p_cell, pct, table_console
from selfheal_plugin.cli.options import setting_option
from selfheal_plugin.history.text import for_rich, for_terminal
from selfheal_plugin.lifecycle.learning import change_target, overlay_label
from selfheal_plugin.steps import step

WIDTH = 80


def _echo_wrapped(text: str, indent: str = "  ") -> None:
    click.echo(textwrap.fill(for_terminal(text), width=WIDTH, initial_indent=indent, subsequent_indent=indent + "  ",
                             break_long_words=True, break_on_hyphens=False))


def _table(title: str, *columns: str, ids: tuple[str, ...] = ()) -> Any:
    """A table whose ``ids`` columns (and rule ids, commits) are never cut; the others wrap."""
    from rich import box
    from rich.table import Table

    t = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
              padding=(0, 1, 0, 0))
    for col in columns:
        t.add_column(col, overflow="fold", no_wrap=col in ("rule", "commit", *ids))
    return t


def _setting(path: list[str]) -> str:
    """``tools.X.timeout_ms`` as ``X: timeout_ms`` (``server Y: health_check``), so a narrow
    column wraps after the name instead of cutting it; a key set in an overlay says which
    (``(A/B arm IMP)``, ``(canary)``)."""
    target = change_target(path)
    head = f"server {target[1]}" if target[0] == "servers" else target[1]
    label = overlay_label(path)
    return f"{head}: {'.'.join(str(p) for p in target[2:])}{f' ({label})' if label else ''}"


def _console() -> Any:
    out = table_console()
    if out.width > WIDTH:
        out.width = WIDTH
    return out


def print_learn(r: dict[str, Any]) -> None:
    w = r["windows"]
    click.echo(f"Before {w['before'][0][:16]} .. {w['before'][1][:16]}")
    click.echo(f"After  {w['after'][0][:16]} .. {w['after'][1][:16]}")
    _echo_wrapped(f"{r['tested']} subject(s) tested, {len(r['improved'])} improved ({r['test']}; "
                  f"{r['correction']} at {r['significance_level']:g})", indent="")
    out = _console()
    if r["improved"]:
        t = _table("What improved", "what", "before", "after", "p", "why", ids=("what",))
        for e in r["improved"]:  # the subject (a pattern id, tool or workflow) whole, its kind under it
            t.add_row(f"{for_rich(e['subject'])}\n{e['kind']}", pct(e["before_rate"]), pct(e["after_rate"]),
                      p_cell(e["p_value"]), for_rich(e["explanation"]))
        out.print(t)
    else:
        click.echo("Nothing improved significantly between the two windows.")
    if r["commits"]:
        t = _table("config.toml commits in the windows", "commit", "when", "by", "changed", ids=("when", "by"))
        for c in r["commits"]:  # one key per line; selfheal's improvement id under its name
            changed = "\n".join(for_rich(_setting(ch["path"])) for ch in c["changes"]) \
                or for_rich(c.get("note") or "no tool/server key")
            by = f"selfheal\n{for_rich(c['improvement'])}" if c.get("improvement") else for_rich(c["author"])
            t.add_row(c["sha"][:12], c["at"][:16], by, changed)
        out.print(t)
    if r["learned_rules"]:
        t = _table("Rules learned" + ("" if r.get("recorded", True) else " (not stored)"),
                   "rule", "kind", "change", "from", "effect", ids=("from",))
        for lr in r["learned_rules"]:
            t.add_row(lr["rule"]["id"], lr["failure_kind"], for_rich(lr["change"]), for_rich(lr["tool"]),
                      f"-{lr['reduction']:.0%} errors")
        out.print(t)
    if r["applicable"]:
        t = _table("Where enabled rules could apply now", "rule", "tool", "kind", "failures", "rule's record",
                   ids=("tool",))
        for a in r["applicable"]:
            t.add_row(a["rule_id"], for_rich(a["tool"]), a["failure_kind"], str(a["occurrences"]),
                      for_rich(a["summary"]))
        out.print(t)
    for line in r["suggestions"]:
        _echo_wrapped("💡 " + line[:1].upper() + line[1:], indent="")
    if r["applicable"]:
        # detect is what proposes from the CLI (one pattern alone: the MCP tool propose_improvement)
        _echo_wrapped(f"Propose one with: {step('detect')} (it proposes for each pattern at or above its "
                      "--confidence; a rule is a prior, or the proposal when the strategy has no config change; "
                      "nothing is applied by itself)", indent="")


def print_rules(rules: list[dict[str, Any]]) -> None:
    if not rules:
        click.echo("No rules stored yet (agent self-heal learn finds them; import adds other homes').")
        return
    t = _table("Fix rules", "rule", "kind", "change", "record", "on")
    for rule in rules:
        change = ", ".join(f"{'.'.join(c['path'][2:])}={c.get('value', '(removed)')}" for c in rule["template"])
        t.add_row(rule["id"], rule["failure_kind"], for_rich(change),
                  f"{for_rich(rule['summary'])}; {', '.join(rule['sources'])}", "yes" if rule["enabled"] else "no")
    _console().print(t)


@click.command("learn")
@setting_option("lookback", "--since", help="Start of the window after (the one before it is as long)")
@click.option("--until", default=None, help="End of the window after (default: now): -2d or an ISO date/time.")
@click.option("--rules", "list_rules", is_flag=True, help="List the stored fix rules instead.")
@click.option("--disable", "disable", default=None, metavar="RULE", help="Turn a rule off (never a prior or proposal).")
@click.option("--enable", "enable", default=None, metavar="RULE", help="Turn a rule back on.")
@common_options
def learn_command(home: str | None, db: str | None, as_json: bool, since: str | None = None,
                  until: str | None = None, list_rules: bool = False, disable: str | None = None,
                  enable: str | None = None) -> None:
    """What got better without selfheal, and why: signatures, tools and workflows whose error
    rate fell significantly from the window before --since to the window since it, each
    credited to a person's own config.toml commit when its timing fits (or "no config change
    explains it"). Credited fixes become rules (failure kind + change template + measured
    effect) proposed for other tools of the same kind."""
    chosen = [name for name, v in (("--rules", list_rules), ("--disable", disable), ("--enable", enable)) if v]
    if len(chosen) > 1:
        raise click.UsageError(f"use one of {', '.join(chosen)} at a time")
    windows = [flag for flag, v in (("--since", since), ("--until", until)) if v is not None]
    if chosen and windows:  # a flag that would be ignored is refused, not dropped
        raise click.UsageError(f"{' and '.join(windows)} set the windows learn compares; {chosen[0]} has none")
    with open_service(home, db, lookback=since) as sh:
        if disable or enable:
            result: Any = sh.set_rule_enabled(disable or enable or "", enabled=bool(enable))
        elif list_rules:
            result = sh.rules()
        else:
            result = sh.learn(since=since, until=until)
    if as_json:
        echo_json(result)
    elif disable or enable:
        rule = result["rule"]
        state = ("" if result["changed"] else "was already ") + ("enabled" if rule["enabled"] else "disabled")
        click.echo(f"{rule['id']} {state}: {for_terminal(rule['description'])}")
    elif list_rules:
        print_rules(result["rules"])
    else:
        print_learn(result)


COMMANDS = [learn_command]
