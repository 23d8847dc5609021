"""Paths and ``[self_heal]`` settings.

Resolution order for every setting: explicit argument (a CLI flag) > ``[self_heal]`` in
``BINKS_HOME/config.toml`` > the defaults in :data:`DEFAULTS`. ``BINKS_HOME`` defaults to
``~/.binks``; the database is ``BINKS_HOME/conversations.db`` unless ``--db`` says otherwise.
"""
from __future__ import annotations

import logging
import os
import tomllib
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from selfheal_plugin.errors import ConfigError, UsageError
from selfheal_plugin.history.text import TerminalFormatter

DEFAULTS: dict[str, Any] = {
    "min_occurrences": 3,
    "confidence_threshold": 0.75,
    "lookback": "-7d",
    "measurement_window_days": 7,
    "min_sample_size": 30,
    "significance_level": 0.05,
    "auto_apply_enabled": False,
    "auto_apply_confidence_threshold": 0.9,
    "notify_patterns": True,
    "notify_applied": True,
    "notify_verified": True,
    "notify_rolled_back": True,
    "cooldown_minutes": 60,
}


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


def read_config(path: Path) -> dict[str, Any]:
    """The parsed ``config.toml`` (empty when the file is absent).

    Raises :class:`ConfigError` with the parser's reason when the file does not parse.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


# The range each numeric setting must fall in, the same whether it comes from a flag,
# config.toml or an MCP call.
RANGES: dict[str, tuple[float, float]] = {
    "min_occurrences": (1, 1_000_000),
    "confidence_threshold": (0.0, 1.0),
    "measurement_window_days": (1, 3650),
    "min_sample_size": (1, 10_000_000),
    "significance_level": (1e-9, 0.5),
    "auto_apply_confidence_threshold": (0.0, 1.0),
    "cooldown_minutes": (0, 525_600),
}


def check_range(key: str, value: Any, where: str, error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` when a numeric setting is outside its range (NaN included)."""
    lo, hi = RANGES.get(key, (None, None))
    if lo is not None and not (lo <= value <= hi):  # `not` so that NaN fails too
        raise error(f"{where}: {key} must be between {lo:g} and {hi:g}, got {value!r}")


def _check_window(value: Any, error: type[Exception]) -> None:
    """The syntax of a lookback window (whether it starts in the future depends on the clock
    of the command that uses it)."""
    from selfheal_plugin.history.times import parse_since

    try:
        parse_since(value, datetime.max.replace(tzinfo=timezone.utc))
    except UsageError as exc:
        raise error(str(exc)) from None


def load_settings(
    home: str | os.PathLike | None = None,
    db: str | os.PathLike | None = None,
    **overrides: Any,
) -> Settings:
    """Settings for one command: flags (``overrides`` that are not None) win over config."""
    home_path = resolve_home(home)
    db_path = Path(db).expanduser() if db else home_path / "conversations.db"
    section = read_config(home_path / "config.toml").get("self_heal", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{home_path / 'config.toml'}: [self_heal] must be a table")
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in section.items():
        if key in DEFAULTS:
            expected = type(DEFAULTS[key])
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(
                    f"{home_path / 'config.toml'}: [self_heal] {key} must be {expected.__name__}, got {value!r}"
                )
            where = f"{home_path / 'config.toml'}: [self_heal]"
            check_range(key, value, where)
            if key == "lookback":
                _check_window(value, ConfigError)
            values[key] = value
        else:
            extra[key] = value
    for key, value in overrides.items():
        if value is not None:
            check_range(key, value, "invalid value", UsageError)
            if key == "lookback":
                _check_window(value, UsageError)
            values[key] = value
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
