"""``agent self-heal export|import|sync``: fix packs between homes (cross-project learning)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from selfheal_plugin.cli.common import common_options, echo_json, open_service, print_line, table_console
from selfheal_plugin.history.text import for_rich, for_terminal
from selfheal_plugin.lifecycle.sharing import MAX_PACK_BYTES


def _read(source: str) -> tuple[bytes, str]:
    """The pack's bytes (at most one byte past the limit, so an oversized pack is refused
    without reading it all) and how to name it."""
    try:
        if source == "-":
            return sys.stdin.buffer.read(MAX_PACK_BYTES + 1), "stdin"
        with open(source, "rb") as fh:
            return fh.read(MAX_PACK_BYTES + 1), source
    except OSError as exc:
        raise click.ClickException(f"cannot read {source}: {exc.strerror or exc}") from None


def _rule_line(r: dict[str, Any], mark: str) -> str:
    return (f"  {mark} {for_rich(r['id'])}  {for_rich(r['failure_kind'])}: {for_rich(r['description'])} — "
            f"{for_rich(r['summary'])}")


def _print_merge(out: Any, r: dict[str, Any]) -> None:
    print_line(out, f"  {len(r['added'])} added, {len(r['updated'])} updated, {len(r['unchanged'])} unchanged")
    for key, mark in (("added", "+"), ("updated", "~")):
        for rule in r[key]:
            print_line(out, _rule_line(rule, mark))
    if r.get("own_entries_ignored"):
        print_line(out, f"  {r['own_entries_ignored']} evidence entr{'y' if r['own_entries_ignored'] == 1 else 'ies'} "
                   "claimed for this home ignored (our own measurement wins)")


@click.command("export")
@click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write the pack to FILE (default: print it on stdout).")
@common_options
def export_command(home: str | None, db: str | None, as_json: bool, output: str | None = None) -> None:
    """Write this home's fix rules as a portable fix pack (JSON): failure kind, change template,
    description and measured evidence with sample sizes; never paths, secrets or local flags."""
    with open_service(home, db) as sh:
        pack = sh.export_pack()
    text = json.dumps(pack, indent=1, sort_keys=True) + "\n"
    if output is None:
        click.echo(text, nl=False)
        return
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror or exc}") from None
    if as_json:
        echo_json({"output": output, "home": pack["home"], "rules": len(pack["rules"])})
        return
    click.echo(f"📦 Wrote {len(pack['rules'])} rule(s) of home {pack['home']} to {for_terminal(output)}")


@click.command("import")
@click.argument("source", metavar="FILE")
@common_options
def import_command(source: str, home: str | None, db: str | None, as_json: bool) -> None:
    """Merge a fix pack (FILE, or - for stdin) into this home's rules: the whole pack is checked
    first and merged in one step; evidence it claims for this home is ignored. Imported rules
    only inform proposals; nothing is applied."""
    data, where = _read(source)
    with open_service(home, db) as sh:
        r = sh.import_pack(data, where)
    if as_json:
        echo_json(r)
        return
    out = table_console()
    print_line(out, f"📥 Imported {for_rich(where)}: {r['rules']} rule(s) from home {for_rich(r['home'])}", hang=3)
    _print_merge(out, r)


@click.command("sync")
@click.option("--remote", default=None, metavar="URL",
              help="A git remote every home can push to (file://, ssh://, user@host:path, git://, https://); "
                   "remembered, so later syncs can leave it out.")
@common_options
def sync_command(home: str | None, db: str | None, as_json: bool, remote: str | None = None) -> None:
    """Share fix packs with other homes through a git remote: fetch, read every other home's
    pack, push ours (packs/<home-id>.json), then merge theirs. A remote that refuses changes
    nothing here."""
    with open_service(home, db) as sh:
        r = sh.sync(remote)
    if as_json:
        echo_json(r)
        return
    pushed = "pushed our pack" if r["pushed"] else "our pack was already up to date"
    retry = " (after one retry)" if r["attempts"] > 1 else ""
    out = table_console()
    print_line(out, f"🔄 Synced with {for_rich(r['remote'])}: {len(r['packs_read'])} other home(s) read, "
               f"{pushed}{retry}", hang=3)
    for refused in r["packs_refused"]:
        print_line(out, f"  skipped {for_rich(refused['pack'])}: {for_rich(refused['reason'])}")
    _print_merge(out, r)


COMMANDS = [export_command, import_command, sync_command]
