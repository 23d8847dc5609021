"""Plumbing every ``agent self-heal`` command shares: options, settings, output helpers."""
from __future__ import annotations

import functools
import json
import sqlite3
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import click

from selfheal_plugin.errors import SelfHealError, UsageError
from selfheal_plugin.history.connection import BUSY_MESSAGE, is_busy_error, is_corrupt_error, one_line
from selfheal_plugin.history.settings import Settings, load_settings
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


def common_options(func: Callable) -> Callable:
    """``--home``, ``--db`` and ``--json`` for a command."""
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
        try:
            return func(*args, home=home, db=db, as_json=as_json, **kwargs)
        except UsageError as exc:
            raise click.UsageError(str(exc)) from None
        except SelfHealError as exc:
            raise click.ClickException(str(exc)) from None
        except sqlite3.DatabaseError as exc:
            if is_busy_error(exc):
                raise click.ClickException(BUSY_MESSAGE) from None
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
    click.echo(json.dumps(data, indent=2, default=str))


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


def warn_bad_rows(count: int) -> None:
    if count:
        warning(f"skipped {count} malformed run_events row(s) "
                "(invalid JSON or UTF-8, missing tool name, unparsable timestamp, absurd duration or size)")


def warning(message: str) -> None:
    """One warning line on stderr, plain text (click, not rich: a warning must not cost rich's
    import, and carries no escape sequence of its own)."""
    click.echo(f"warning: {message}", err=True)


def pct(x: float) -> str:
    return f"{x * 100:.0f}%"
