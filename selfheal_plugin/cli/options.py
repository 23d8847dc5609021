"""Click options built from :mod:`selfheal_plugin.history.schema`: the same ranges, defaults
and descriptions as ``config.toml`` and the MCP tools, and a bad value is one line and exit 2::

    @setting_option("min_occurrences", "--min-occurrences")
    @setting_option("limit", "--limit")   # a flag with no setting: its default comes from the schema

A ``[self_heal]`` setting's option defaults to None (the command's settings then come from
config.toml, else the schema's default, which the help text shows); a flag with no setting
behind it defaults to the schema's default. Values are checked while click parses, so nothing
has been read or written when one is wrong.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import IO, Any

import click

from selfheal_plugin.errors import UsageError
from selfheal_plugin.history import schema

_UNSET: Any = object()
_METAVARS = {"int": "integer", "float": "float", "window": "window", "interval": "duration", "bool": "boolean"}


class OneLineBadParameter(click.BadParameter):
    """A bad option value: ``Error: <reason>`` on one line, exit code 2 (no usage block)."""

    def format_message(self) -> str:
        return self.message

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"Error: {self.format_message()}", file=file, err=True)


class OneLineUsageError(click.UsageError):
    """A usage error the service finds (a window that starts in the future, say): one line,
    exit code 2, like a bad flag value."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"Error: {self.format_message()}", file=file, err=True)


class WholeSummaries(click.Group):
    """A group whose help lists each command's first sentence whole, wrapped under it at the
    terminal's width, where click cuts it to one line with "..." ("Roll back an applied
    improvement (git revert, or the...")."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, cmd.get_short_help_str(limit=10_000)) for name in self.list_commands(ctx)
                if (cmd := self.get_command(ctx, name)) is not None and not cmd.hidden]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


class SettingType(click.ParamType):
    """A value checked against one schema entry (a setting or a flag) by its model."""

    def __init__(self, name: str) -> None:
        self.setting = name
        self.spec = schema.spec(name)
        self.name = _METAVARS.get(self.spec.kind, "text")

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        label = (param.opts[0] if param is not None and param.opts else None) or self.setting
        shown = value if isinstance(value, str) else None
        if isinstance(value, str) and self.spec.kind in ("int", "float"):
            try:
                value = int(value) if self.spec.kind == "int" else float(value)
            except ValueError:  # also int() of a number with more than 4300 digits
                raise OneLineBadParameter(f"{label} must be {self.spec.what()}, got {schema.short_text(value)}",
                                          ctx=ctx, param=param) from None
        try:
            return schema.check(self.setting, value, label=label, shown=shown)
        except UsageError as exc:
            raise OneLineBadParameter(str(exc), ctx=ctx, param=param) from None


def setting_option(name: str, *param_decls: str, help: str | None = None, default: Any = _UNSET,
                   **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``click.option`` for schema entry ``name``: its type checks the range, its help text is
    ``help`` (default: the schema's description) with the range and the schema's default."""
    sp = schema.spec(name)
    if default is _UNSET:
        from_settings = name in schema.SELF_HEAL or sp.setting is not None
        default = None if from_settings or sp.default is schema.REQUIRED else sp.default
    return click.option(*(param_decls or (f"--{name.replace('_', '-')}",)), type=SettingType(name),
                        default=default, help=schema.help_text(name, help), **kwargs)
