"""Plumbing every ``agent self-heal`` command shares: options, settings, output helpers."""
from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import sys
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import click

from selfheal_plugin.errors import SelfHealError, UsageError
from selfheal_plugin.cli.options import OneLineUsageError
from selfheal_plugin.history.connection import (
    BUSY_MESSAGE, is_busy_error, is_corrupt_error, is_readonly_error, one_line, readonly_message,
)
from selfheal_plugin.history.improvements import ImprovementStore
from selfheal_plugin.history.text import for_terminal, format_p, percent
from selfheal_plugin.history.settings import Settings, db_path_for, load_settings
from selfheal_plugin.lazy import lazy_module

if TYPE_CHECKING:
    from selfheal_plugin.service import SelfHeal

# rich is imported when something is printed through it, not by `--json` or `--version`
rich_console, rich_progress = lazy_module("rich.console"), lazy_module("rich.progress")


class _ErrConsole:
    """A rich console on stderr, created on first use."""

    _console: Any = None

    def get(self) -> Any:
        if self._console is None:
            type(self)._console = rich_console.Console(stderr=True)
        return self._console

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return getattr(self.get(), attr)


err_console = _ErrConsole()


# Exit codes for verdicts, with --check (0 otherwise): see docs/cli.md.
EXIT_VERDICT_BAD = 3   # test: risky or reject; verify: rollback
EXIT_VERDICT_WAIT = 4  # verify: extend (inconclusive so far)


def table_console() -> Any:
    """A console as wide as the terminal (``COLUMNS`` when set; 80 when not a terminal):
    tables shrink their wrapping columns to fit, ids are declared ``no_wrap``."""
    return rich_console.Console(highlight=False)


# A command in a hint, as steps.step writes it: `agent self-heal verify imp-…`, `agent self-heal
# canary promote|drop imp-…`, `agent self-heal detect --since -30d`, `agent self-heal --home H
# improvements`, `agent self-heal-daemon --once`. A value is a token that is not a plain
# lower-case word (an id, a pattern, a placeholder such as ID or <improvement-id>), so the
# prose after a command is not taken for part of it.
_VALUE = r"(?![a-z]+[.,;:]*(?:[\s)`'\"]|$))[^\s,;()`'\"]+"
_COMMAND = re.compile(
    rf"\bagent (?:self-heal-daemon|self-heal(?: --(?:home|db) {_VALUE}| --json)*"
    r"(?: (?:ab|canary) [a-z]+(?:\|[a-z]+)*| [a-z][a-z-]*)?"
    rf"(?: (?!-){_VALUE})?)"
    rf"(?: --[a-z][a-z-]*(?: (?!--)(?:{_VALUE}|canary|shadow|simulation))?)*")
_GLUE = "\ue000"  # a private-use character, one cell wide and no space: holds a command's words together


def print_line(out: Any, markup: str, hang: int = 2) -> None:
    """One line of Rich markup on the console ``out``, its leading spaces its indent: where it
    wraps, the rest continues ``hang`` columns further in, never at column 0, and never inside a
    command (``agent self-heal apply imp-…`` is pasted whole: the line breaks before it). Piped
    output without ``COLUMNS`` is not wrapped (a line stays one line for grep)."""
    if not out.is_terminal and not os.environ.get("COLUMNS"):
        out.print(markup, soft_wrap=True, highlight=False)
        return
    body = markup.lstrip(" ")
    indent = len(markup) - len(body)
    text = lazy_module("rich.text").Text.from_markup(body)
    text.plain = _COMMAND.sub(lambda m: m.group(0).replace(" ", _GLUE), text.plain)  # same length: styles stay
    for i, line in enumerate(text.wrap(out, max(20, out.width - indent - hang))):
        line.plain = line.plain.replace(_GLUE, " ")
        out.print(" " * (indent + (hang if i else 0)), line, sep="", highlight=False)


def yes_option(func: Callable) -> Callable:
    return click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")(func)


def check_option(func: Callable) -> Callable:
    return click.option("--check", is_flag=True,
                        help="Exit 3 when the verdict is bad (test: risky or reject; verify: rollback) and 4 when "
                             "verify says extend; without it the exit code is 0 whatever the verdict.")(func)


def exit_for_verdict(check: bool, recommendation: str | None) -> None:
    """With ``--check``, end with the verdict's exit code (documented in docs/cli.md)."""
    if not check:
        return
    code = {"risky": EXIT_VERDICT_BAD, "reject": EXIT_VERDICT_BAD, "rollback": EXIT_VERDICT_BAD,
            "extend": EXIT_VERDICT_WAIT}.get(recommendation or "", 0)
    if code:
        raise SystemExit(code)


def confirm_or_abort(sh: SelfHeal, improvement_id: str, question: str, *, yes: bool, as_json: bool) -> None:
    """Ask before a state change unless ``--yes``; an unknown id fails before any question."""
    imp = ImprovementStore(sh.conn).get(improvement_id)
    ask(f"Improvement {imp.id} ({imp.status}): {for_terminal(imp.description or '')}", question, yes=yes,
        as_json=as_json)


def ask(about: str, question: str, *, yes: bool, as_json: bool) -> None:
    """Show ``about`` (already escaped) and ask ``question`` unless ``--yes``."""
    if asking(yes=yes, as_json=as_json):
        click.echo(about)
        confirm(question)


def asking(*, yes: bool, as_json: bool) -> bool:
    """Whether a state change asks first: not with ``--yes``; ``--json`` without ``--yes`` is a
    usage error (there is no prompt in JSON mode)."""
    if yes:
        return False
    if as_json:
        raise click.UsageError("--json needs --yes (there is no prompt in JSON mode)")
    return True


def confirm(question: str) -> None:
    """Ask ``question``; a no (or Ctrl-D) ends the command with exit code 1, saying that
    nothing was changed."""
    try:
        if click.confirm(question):
            return
    except click.Abort:
        pass
    click.echo("Aborted: nothing was changed.", err=True)
    raise SystemExit(1)


def p_cell(p: float | None) -> str:
    """A p-value for a table cell under a "p" heading: ``<0.001``, ``0.034`` or ``n/a``."""
    return format_p(p).replace("p = ", "").replace("p < ", "<").replace("p ", "")


def common_options(func: Callable) -> Callable:
    """``--home``, ``--db`` and ``--json`` for a command (also accepted before the subcommand,
    on ``agent self-heal``)."""
    @click.option("--home", type=click.Path(file_okay=False), default=None,
                  help="Runtime home (default: $BINKS_HOME or ~/.binks).")
    @click.option("--db", type=click.Path(dir_okay=False), default=None,
                  help="Run-history database (default: HOME/conversations.db).")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
    @functools.wraps(func)
    def wrapper(*args: Any, home: str | None, db: str | None, as_json: bool, **kwargs: Any) -> Any:
        parent = click.get_current_context().find_object(dict) or {}
        home = home or parent.get("home")
        db = db or parent.get("db")
        as_json = as_json or bool(parent.get("json"))
        try:
            return func(*args, home=home, db=db, as_json=as_json, **kwargs)
        except UsageError as exc:
            raise OneLineUsageError(str(exc)) from None
        except SelfHealError as exc:
            code = getattr(exc, "exit_code", 1)
            if code != 1:  # done, with something left to say (docs/cli.md: exit codes)
                warning(str(exc))
                raise SystemExit(code) from None
            raise click.ClickException(str(exc)) from None
        except sqlite3.DatabaseError as exc:
            if is_busy_error(exc):
                raise click.ClickException(BUSY_MESSAGE) from None
            if is_readonly_error(exc):
                raise click.ClickException(readonly_message(db_path_for(home, db))) from None
            if is_corrupt_error(exc):  # damage past what connect's quick_check looked at
                raise click.ClickException(f"the run-history database is damaged ({one_line(exc)}); "
                                           "restore a backup or run sqlite3's .recover") from None
            raise
    return wrapper


def settings_for(home: str | None, db: str | None, **overrides: Any) -> Settings:
    return load_settings(home, db, **overrides)


def open_service(home: str | None, db: str | None, **overrides: Any) -> SelfHeal:
    """The service over the command's home and database (crash recovery runs as it opens;
    what it recovered is one warning line each on stderr)."""
    # The engine is imported here, when a command opens it, so that `agent --version` and
    # `--help` start without it (not to dodge a cycle: the service never imports the CLI).
    from selfheal_plugin.service import SelfHeal

    return SelfHeal(home, db, warn=warning,
                    **{k: v for k, v in overrides.items() if v is not None})


def echo_json(data: Any) -> None:
    """``data`` as JSON on stdout: indented for a person at a terminal, one line otherwise
    (a pipe or a file: the C encoder writes it, several times faster than the indenting one)."""
    click.echo(json.dumps(data, indent=2 if sys.stdout.isatty() else None, default=str))


@contextmanager
def working(enabled: bool, label: str) -> Iterator[None]:
    """A live status line on stderr (a terminal only) while a step runs that can take
    seconds (a simulation, a verification); transient: nothing of it stays on screen."""
    if not (enabled and sys.stderr.isatty()):
        yield
        return
    with err_console.status(label):
        yield


@contextmanager
def scan_progress(enabled: bool, label: str = "Indexing run history") -> Iterator[Callable[[int, int], None]]:
    """A progress callback that shows a bar only once a scan has taken over a second."""
    started = time.monotonic()
    state: dict[str, Any] = {"progress": None, "task": None}

    def update(done: int, total: int) -> None:
        if not enabled:
            return
        if state["progress"] is None:
            if time.monotonic() - started < 1.0:
                return
            rp = rich_progress
            progress = rp.Progress(rp.TextColumn(label), rp.BarColumn(),
                                   rp.TextColumn("{task.completed:,}/{task.total:,} rows"),
                                   rp.TimeElapsedColumn(), console=err_console.get(),
                                   transient=True)
            progress.start()
            state["progress"], state["task"] = progress, progress.add_task(label, total=total)
        state["progress"].update(state["task"], completed=done, total=total)

    try:
        yield update
    finally:
        if state["progress"] is not None:
            state["progress"].stop()


def warn_bad_rows(count: int, runs: int = 0) -> None:
    """One line on stderr, once per command however many scans skipped rows: ``count``
    malformed ``run_events`` rows, ``runs`` malformed ``runs`` rows."""
    if not count and not runs:
        return
    ctx = click.get_current_context(silent=True)
    meta = ctx.find_root().meta if ctx is not None else {}
    if meta.get("selfheal.warned_bad_rows"):
        return
    meta["selfheal.warned_bad_rows"] = True
    parts = [f"{count} malformed run_events row(s) (invalid JSON or UTF-8, missing tool name, "
             "unparsable timestamp, absurd duration or size)"] if count else []
    if runs:
        parts.append(f"{runs} malformed runs row(s) (an id, workflow, status or start that is not text, "
                     "or a start that is not a timestamp)")
    warning("skipped " + " and ".join(parts))


def warning(message: str) -> None:
    """One warning line on stderr, plain text (click, not rich: a warning must not cost rich's
    import, and carries no escape sequence of its own; never wrapped)."""
    click.echo(f"warning: {message}", err=True)


pct = percent  # the one rate format (history.text.percent)
