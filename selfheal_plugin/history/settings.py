"""Paths and ``[self_heal]`` settings.

Resolution order for every setting: explicit argument (a CLI flag) > ``[self_heal]`` in
``BINKS_HOME/config.toml`` > the defaults of :mod:`~selfheal_plugin.history.schema`, which also
validates both (types and ranges). ``BINKS_HOME`` defaults to
``~/.binks``; the database is ``BINKS_HOME/conversations.db`` unless ``--db`` says otherwise.
"""
from __future__ import annotations

import logging
import os
import stat
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from selfheal_plugin.errors import ConfigError
from selfheal_plugin.history import schema
from selfheal_plugin.history.text import TerminalFormatter

# Derived from the schema (kept for callers that read them; the schema is the source).
DEFAULTS: dict[str, Any] = schema.defaults("self_heal")


@dataclass(frozen=True)
class Settings:
    home: Path
    db_path: Path
    min_occurrences: int = DEFAULTS["min_occurrences"]
    confidence_threshold: float = DEFAULTS["confidence_threshold"]
    lookback: str = DEFAULTS["lookback"]
    measurement_window_days: int = DEFAULTS["measurement_window_days"]
    min_sample_size: int = DEFAULTS["min_sample_size"]
    significance_level: float = DEFAULTS["significance_level"]
    auto_apply_enabled: bool = DEFAULTS["auto_apply_enabled"]
    auto_apply_confidence_threshold: float = DEFAULTS["auto_apply_confidence_threshold"]
    notify_patterns: bool = DEFAULTS["notify_patterns"]
    notify_applied: bool = DEFAULTS["notify_applied"]
    notify_verified: bool = DEFAULTS["notify_verified"]
    notify_rolled_back: bool = DEFAULTS["notify_rolled_back"]
    cooldown_minutes: int = DEFAULTS["cooldown_minutes"]
    plugin_timeout_seconds: float = DEFAULTS["plugin_timeout_seconds"]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.home / "config.toml"

    @property
    def plugins_dir(self) -> Path:
        return self.home / "selfheal" / "plugins"

    @property
    def inbox_dir(self) -> Path:
        return inbox_dir()

    def with_overrides(self, **overrides: Any) -> "Settings":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


def inbox_dir() -> Path:
    """``$INBOX_PATH`` or ``~/.notes/inbox``."""
    env = os.environ.get("INBOX_PATH")
    return Path(env).expanduser() if env else Path.home() / ".notes" / "inbox"


LOCKS_GITIGNORE = "# selfheal: lock and pid files, never versioned (this file ignores itself too)\n*\n"


def lock_dir(home: str | os.PathLike) -> Path:
    """``BINKS_HOME/selfheal/locks`` (created), with the ``.gitignore`` that keeps it out of
    every git repository: selfheal's lock files never show up as untracked."""
    folder = Path(home) / "selfheal" / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    gi = folder / ".gitignore"
    if not gi.exists():
        gi.write_text(LOCKS_GITIGNORE, encoding="utf-8")
    return folder


def resolve_home(home: str | os.PathLike | None = None) -> Path:
    if home:
        return Path(home).expanduser()
    env = os.environ.get("BINKS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".binks"


def db_path_for(home: str | os.PathLike | None = None, db: str | os.PathLike | None = None) -> Path:
    """The history a command reads: ``db``, else ``HOME/conversations.db``."""
    return Path(db).expanduser() if db else resolve_home(home) / "conversations.db"


def read_config_text(path: Path) -> str | None:
    """``config.toml``'s text (None when absent), never blocking: opened non-blocking and
    refused unless it is a regular file (a FIFO there would hang every command); invalid
    UTF-8 is a :class:`ConfigError` like invalid TOML."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path} is not a regular file; config.toml must be a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: invalid UTF-8 at byte {exc.start}") from None


def read_config(path: Path) -> dict[str, Any]:
    """The parsed ``config.toml`` (empty when the file is absent).

    Raises :class:`ConfigError` with the parser's reason when the file does not parse.
    """
    text = read_config_text(path)
    if text is None:
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


RANGES: dict[str, tuple[float, float]] = {
    k: b for k in schema.SELF_HEAL if (b := schema.bounds(k)) is not None}


def check_range(key: str, value: Any, where: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` when a numeric setting is outside its range (NaN included)."""
    lo, hi = RANGES.get(key, (None, None))
    if lo is not None and not (lo <= value <= hi):  # `not` so that NaN fails too
        raise error(f"{where}: {key} must be between {lo:g} and {hi:g}, got {value!r}")


_WARNED: set[tuple[str, str]] = set()  # (config file, key or line): each mistake is told once a process


def _warn_misspelled(path: Path, extra: dict[str, Any]) -> None:
    """A key of ``[self_heal]`` we do not know is kept (a plugin may read its own), but one that
    reads like a setting of ours misspelled (``min_occurences``) is said: its default is in force."""
    import difflib

    for key in extra:
        close = difflib.get_close_matches(str(key), schema.SELF_HEAL, n=1, cutoff=0.8)
        if close and (str(path), str(key)) not in _WARNED:
            _WARNED.add((str(path), str(key)))
            logging.getLogger("selfheal.settings").warning(
                "%s: [self_heal] has no setting %r (did you mean %s? its default is in force)", path,
                schema.short_text(str(key)), close[0])


# The tables of config.toml the runtime's ToolPolicy reads per tool and per server, and the
# schema table that declares each (the runtime validates them through the same one).
TOOL_TABLES = {"tools": "tool", "servers": "server"}


def check_tool_tables(config: dict[str, Any], path: Path) -> tuple[dict[str, Any], list[str]]:
    """``config`` (a parsed config.toml) with every ``[tools."NAME"]`` and ``[servers."NAME"]``
    value the runtime's ToolPolicy would refuse left out (``timeout_ms = "abc"``, a negative
    limit, a bool for a number), and one line for each, naming the file, table and key in the
    schema's words, as for ``[self_heal]``. A command that only reads these values ignores the
    wrong ones with a warning (:func:`warn_tool_tables`); one that writes into the file refuses."""
    out, problems = dict(config), []
    for top, kind in TOOL_TABLES.items():
        if top not in config:
            continue
        tables = config[top]
        if not isinstance(tables, dict):
            problems.append(f"{path}: [{top}] must be a table")
            out[top] = {}
            continue
        kept: dict[str, Any] = {}
        for name, table in tables.items():
            where = f'{path}: [{top}."{name}"]'
            try:
                schema.validate(kind, table, where)
            except ConfigError as exc:
                if not isinstance(table, dict):
                    problems.append(str(exc))
                    continue
                kept[name] = {}
                for key, value in table.items():  # the first wrong key is not the only one
                    try:
                        schema.validate(kind, {key: value}, where)
                    except ConfigError as wrong:
                        problems.append(str(wrong))
                    else:
                        kept[name][key] = value
            else:
                kept[name] = table
        out[top] = kept
    return out, problems


# The tables of config.toml selfheal writes for itself, never a change from a proposal: its
# own settings, and the experiments that its canary, shadow and A/B commands start and end.
OWN_TABLES = ("self_heal", "canary", "shadow", "ab")


def _writable_keys_text() -> str:
    return (f'[tools."NAME"] {", ".join(schema.TOOL)}, circuit_breaker '
            f'({", ".join(schema.CIRCUIT_BREAKER)}) and [servers."NAME"] {", ".join(schema.SERVER)}')


def change_key_problem(path: list[str] | tuple[str, ...], op: str = "set", value: Any = None) -> str | None:
    """Why a config change may not ``op`` (``set`` to ``value``, or ``delete``) the key at
    ``path`` (keys from the top of config.toml), or None when it may: the one rule of what a
    change that comes from outside selfheal's own commands may write — a strategy's proposal,
    a fix rule's template (``{tool}``/``{server}`` stand for names), an A/B arm.

    Only the keys the runtime's schema declares and ToolPolicy reads:
    ``[tools."NAME"]`` ``timeout_ms``, ``retry_attempts``, ``retry_backoff_ms``, ``preflight``,
    its ``circuit_breaker`` table (the table as a whole, or one of its declared keys) and
    ``[servers."NAME"]`` ``health_check``, ``auto_restart``. Never ``[self_heal]`` (a proposal
    must not switch on auto-apply), ``[canary]``/``[shadow]``/``[ab]`` (written only by those
    commands, which track what they start) or anything else the runtime reads (a tool's or a
    server's ``command``, ``mcpServers``). Values are :func:`check_tool_tables`'s to judge.
    The reason reads after the key: ``tools.x.command is not …``."""
    keys = list(path)
    top = keys[0] if keys else None
    if top == "self_heal":
        return "is one of selfheal's own [self_heal] settings, which a proposal may not change"
    if top in OWN_TABLES:
        return f"is in [{top}], which only selfheal's own canary, shadow and A/B commands write, never a proposal"
    if len(keys) in (3, 4) and all(isinstance(k, str) and k for k in keys):
        if top == "servers" and len(keys) == 3 and keys[2] in schema.SERVER:
            return None
        if top == "tools" and len(keys) == 3 and keys[2] in schema.TOOL:
            return None
        if top == "tools" and keys[2] == "circuit_breaker":
            if len(keys) == 4 and keys[3] in schema.CIRCUIT_BREAKER:
                return None
            if len(keys) == 3 and (op == "delete" or (isinstance(value, dict)
                                                      and set(value) <= set(schema.CIRCUIT_BREAKER))):
                return None
    return f"is not a setting ToolPolicy reads; a proposal may change only {_writable_keys_text()}"


def warn_tool_tables(config: dict[str, Any], path: Path) -> dict[str, Any]:
    """:func:`check_tool_tables` for a command that only reads the values: the wrong ones are
    ignored, each said once a process in a warning."""
    checked, problems = check_tool_tables(config, path)
    for line in problems:
        if (str(path), line) not in _WARNED:
            _WARNED.add((str(path), line))
            logging.getLogger("selfheal.settings").warning(
                "%s (ignored; apply refuses to edit the file until it is fixed)", line)
    return checked


def load_settings(
    home: str | os.PathLike | None = None,
    db: str | os.PathLike | None = None,
    **overrides: Any,
) -> Settings:
    """Settings for one command: flags (``overrides`` that are not None) win over config."""
    home_path = resolve_home(home)
    db_path = db_path_for(home, db)
    section = read_config(home_path / "config.toml").get("self_heal", {})
    # Validated through the schema's model only when there is something to validate: the
    # common path (no table, no flag) does not import pydantic.
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if section != {}:
        values, extra = schema.validate_self_heal(section, f"{home_path / 'config.toml'}: [self_heal]")
        _warn_misspelled(home_path / "config.toml", extra)
    given = {k: v for k, v in overrides.items() if v is not None}
    if given:
        values.update(schema.validate_overrides(given))
    return Settings(home=home_path, db_path=db_path, extra=extra, **values)


def configure_logging() -> None:
    """Log level from ``SELFHEAL_LOG``, else ``RUST_LOG`` (error|warn|info|debug|trace); stderr only."""
    raw = (os.environ.get("SELFHEAL_LOG") or os.environ.get("RUST_LOG") or "warn").lower()
    raw = raw.split(",")[0].split("=")[-1]
    level = {"error": logging.ERROR, "warn": logging.WARNING, "warning": logging.WARNING,
             "info": logging.INFO, "debug": logging.DEBUG, "trace": logging.DEBUG}.get(raw, logging.WARNING)
    handler = logging.StreamHandler()  # stderr; history text in messages is neutralised
    handler.setFormatter(TerminalFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.getLogger("selfheal").setLevel(level)
