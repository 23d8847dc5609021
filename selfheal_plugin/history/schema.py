"""The one schema of what a user can set: the ``[self_heal]``, ``[tools."NAME"]`` (with its
``circuit_breaker``) and ``[servers."NAME"]`` tables of ``config.toml``, and the command-line
flags that have no setting behind them (``--limit``, ``--interval``, ``--fraction``, ``--runs``).

Each table is declared once below as a mapping of :class:`Spec`; the pydantic models
(:data:`SelfHealConfig`, :data:`ToolConfig`, :data:`CircuitBreakerConfig`,
:data:`ServerConfig`, :data:`FlagValues`) are built from those declarations and do every
validation, whether a value comes from ``config.toml``, a CLI flag or an MCP call. The small
API the shells use for help texts and schema defaults::

    schema.default("min_occurrences")    # 3
    schema.describe("lookback")          # the description, for help texts
    schema.bounds("measurement_window_days")  # (1, 3650)
    schema.help_text("min_occurrences")  # description + "(default: 3)"
    schema.check("min_occurrences", 0, label="--min-occurrences")  # UsageError, one line
    schema.field_kwargs("confidence_threshold")  # ge/le/description for a pydantic Field

Startup: importing pydantic and building the models costs about as much as the rest of
``history.settings`` (see the measurements in the commit that introduced this module), and
``agent --version`` must stay fast. So the declarations, the defaults and the bounds are plain
Python, and pydantic is imported in :func:`models` the first time something is validated: a
``config.toml`` that has one of these tables, a flag, an override. That lazy import is for
start-up time only; it does not dodge an import cycle.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import TYPE_CHECKING, Annotated, Any

from selfheal_plugin.errors import ConfigError, SelfHealError, UsageError
from selfheal_plugin.history.times import parse_since

if TYPE_CHECKING:
    from pydantic import BaseModel

REQUIRED: Any = ...  # a Spec default: the key must be present in its table

PREFLIGHT_CHECKS = ("path_exists",)


@dataclass(frozen=True)
class Spec:
    """One key: its kind, default, description and the closed range ``[lo, hi]`` it must fall in
    (``lo_open``/``hi_open``: that end itself is excluded)."""

    kind: str  # "int" | "float" | "bool" | "window" | "checks" | "interval"
    default: Any
    description: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    unit: str = ""  # shown after the default in help texts
    setting: str | None = None  # a flag whose default is this [self_heal] setting

    @property
    def bounds(self) -> tuple[float, float] | None:
        return None if self.lo is None or self.hi is None else (self.lo, self.hi)

    def what(self) -> str:
        """What a valid value is, for messages: ``an integer between 1 and 1000000``."""
        if self.kind == "bool":
            return "true or false"
        if self.kind == "window":
            return "a time window such as -7d, -24h, -30m, -1w or an ISO date/datetime"
        if self.kind == "checks":
            return f"a list of check names ({', '.join(PREFLIGHT_CHECKS)})"
        if self.kind == "interval":
            return f"a duration such as 90s, 30m, 1h or 1d, at most {_g(self.hi)} seconds"
        noun = "an integer" if self.kind == "int" else "a number"
        return f"{noun} {self.range_text()}"

    def range_text(self) -> str:
        text = f"between {_g(self.lo)} and {_g(self.hi)}"
        if self.lo_open and self.hi_open:
            return text + " (exclusive)"
        return text + (f" (excluding {_g(self.lo)})" if self.lo_open else f" (excluding {_g(self.hi)})"
                       if self.hi_open else "")


def _g(x: float | None) -> str:
    return "" if x is None else format(x, "g") if isinstance(x, float) else str(x)


# ------------------------------------------------------------------ the declarations

SELF_HEAL: dict[str, Spec] = {
    "min_occurrences": Spec("int", 3, "Minimum failed calls with one signature (error type, tool) to make a pattern.",
                            1, 1_000_000),
    "confidence_threshold": Spec("float", 0.75, "Minimum pattern confidence.", 0.0, 1.0),
    "lookback": Spec("window", "-7d", "How far back detection looks: -30m, -24h, -7d, -1w, or an ISO "
                     "date/datetime."),
    "measurement_window_days": Spec("int", 7, "Days before and after an apply that verification compares.",
                                    1, 3650, unit="days"),
    "min_sample_size": Spec("int", 30, "Finished runs each side of an apply needs before verification concludes.",
                            1, 10_000_000),
    "significance_level": Spec("float", 0.05, "Significance level of verification's tests.", 1e-9, 0.5),
    "auto_apply_enabled": Spec("bool", False, "Let the daemon apply low-risk proposals whose simulation says "
                               "safe."),
    "auto_apply_confidence_threshold": Spec("float", 0.9, "Minimum pattern confidence for auto-apply.",
                                            0.0, 1.0),
    "notify_patterns": Spec("bool", True, "Inbox entry when detection finds patterns."),
    "notify_applied": Spec("bool", True, "Inbox entry when an improvement is applied."),
    "notify_verified": Spec("bool", True, "Inbox entry when an improvement is verified."),
    "notify_rolled_back": Spec("bool", True, "Inbox entry when an improvement is rolled back."),
    "cooldown_minutes": Spec("int", 60, "Minutes before the same pattern is notified again.", 0, 525_600,
                             unit="minutes"),
    "plugin_timeout_seconds": Spec("float", 60.0, "Deadline of each call into a plugin (hook, strategy method, "
                                   "import); past it the plugin is reported and skipped.", 0.1, 86_400, unit="s"),
}

TOOL: dict[str, Spec] = {
    "timeout_ms": Spec("int", None, "Call timeout in milliseconds (absent: the runtime's own).", 1, 86_400_000),
    "retry_attempts": Spec("int", 0, "Retries after a failed call.", 0, 100),
    "retry_backoff_ms": Spec("int", 0, "Milliseconds before the first retry (doubling after each).", 0, 3_600_000),
    "preflight": Spec("checks", (), "Checks run before the call: " + ", ".join(PREFLIGHT_CHECKS) + "."),
    # "circuit_breaker" is the nested CIRCUIT_BREAKER table
}

CIRCUIT_BREAKER: dict[str, Spec] = {
    "failure_threshold": Spec("int", REQUIRED, "Consecutive failures that open the breaker.", 1, 1_000_000),
    "timeout_duration_sec": Spec("float", REQUIRED, "Seconds the breaker stays open before a trial call.",
                                 0, 31_536_000, unit="s"),
    "half_open_requests": Spec("int", 1, "Trial calls let through while half open.", 1, 1_000_000),
}

SERVER: dict[str, Spec] = {
    "health_check": Spec("bool", False, "Check the server's health before each call."),
    "auto_restart": Spec("bool", False, "Restart the server when its health check fails."),
}

# Flags with no setting behind them: same validation, same messages.
FLAGS: dict[str, Spec] = {
    "limit": Spec("int", 20, "Maximum rows.", 1, 1_000_000),
    "interval": Spec("interval", "1h", "Time between rounds of detection and verification: 90s, 30m, 1h, 1d.",
                     0, 30 * 86_400, lo_open=True),
    "fraction": Spec("float", 0.5, "Canary mode: share of runs that get the change.", 0.0, 1.0,
                     lo_open=True, hi_open=True),
    "window_days": Spec("float", None, "Measurement window in days.", *SELF_HEAL["measurement_window_days"].bounds,
                        setting="measurement_window_days"),
    "runs": Spec("int", None, "Runs per simulated week.", 40, 10_000),  # default: the testbed's DEMO_RUNS
}

TABLES: dict[str, dict[str, Spec]] = {"self_heal": SELF_HEAL, "tool": TOOL, "circuit_breaker": CIRCUIT_BREAKER,
                                      "server": SERVER, "flags": FLAGS}
_LOOKUP_ORDER = ("self_heal", "flags", "tool", "circuit_breaker", "server")


# ------------------------------------------------------------------ the small API (no pydantic)


def spec(name: str) -> Spec:
    """The declaration of a setting, a flag, or a tool/server key (``"timeout_ms"``,
    ``"circuit_breaker.failure_threshold"``, ``"server.auto_restart"``)."""
    table, _, key = name.rpartition(".")
    if table:
        found = TABLES.get({"tools": "tool", "servers": "server"}.get(table, table), {}).get(key)
        if found is not None:
            return found
    for t in _LOOKUP_ORDER:
        if name in TABLES[t]:
            return TABLES[t][name]
    raise KeyError(f"no setting or flag named {name!r}")


def default(name: str) -> Any:
    """The default of a setting or flag (``None``: none; :data:`REQUIRED`: must be given)."""
    return spec(name).default


def describe(name: str) -> str:
    """The one-sentence description of a setting or flag, for help texts and schemas."""
    return spec(name).description


def bounds(name: str) -> tuple[float, float] | None:
    """``(lo, hi)`` a numeric setting or flag must fall in (``None`` for the others)."""
    return spec(name).bounds


def format_default(name: str) -> str:
    sp = spec(name)
    d = sp.default
    if isinstance(d, bool):
        return "true" if d else "false"
    text = _g(d) if isinstance(d, (int, float)) else str(d)
    return f"{text} {sp.unit}".strip() if sp.unit and sp.kind != "interval" else text


def help_text(name: str, text: str | None = None) -> str:
    """``text`` (default: the description) with the range and the default from the schema, e.g.
    ``Minimum pattern confidence (0-1; default: [self_heal] confidence_threshold, else 0.75).``"""
    sp = spec(name)
    parts = []
    if sp.bounds and sp.kind in ("int", "float"):
        parts.append(f"{_g(sp.lo)}-{_g(sp.hi)}" + (" exclusive" if sp.lo_open or sp.hi_open else ""))
    elif sp.kind == "interval":
        parts.append(f"at most {_g(sp.hi / 86400)} days")
    setting = sp.setting or (name if name in SELF_HEAL else None)
    shown = sp.setting or name
    if default(shown) not in (None, REQUIRED):
        where = f"[self_heal] {setting}, else " if setting else ""
        parts.append(f"default: {where}{format_default(shown)}")
    base = (text or sp.description).rstrip(".")
    return f"{base} ({'; '.join(parts)})." if parts else base + "."


def defaults(table: str = "self_heal") -> dict[str, Any]:
    """Every key of a table with its default (required keys left out)."""
    return {k: s.default for k, s in TABLES[table].items() if s.default is not REQUIRED}


def field_kwargs(name: str, text: str | None = None) -> dict[str, Any]:
    """``description`` (:func:`help_text` of ``text``), ``ge``/``gt`` and ``le`` for a pydantic
    ``Field`` of that setting: what an MCP tool parameter needs to publish the same range
    (``Field(None, **field_kwargs(n))``)."""
    sp = spec(name)
    out: dict[str, Any] = {"description": help_text(name, text)}
    if sp.bounds and sp.kind in ("int", "float"):
        out["gt" if sp.lo_open else "ge"] = sp.lo
        out["lt" if sp.hi_open else "le"] = sp.hi
    return out


def check(name: str, value: Any, *, label: str | None = None, shown: str | None = None) -> Any:
    """``value`` validated against the setting or flag ``name`` (through its model): returned
    converted (an int for a float setting becomes a float, an interval text becomes seconds),
    or :class:`UsageError` with one line naming ``label`` (default: the name) and the value as
    ``shown`` (default: its repr; a CLI passes the text the user typed)."""
    table = "self_heal" if name in SELF_HEAL else "flags"
    if name not in TABLES[table]:
        raise KeyError(f"no setting or flag named {name!r}")
    plain = _plainly_valid(TABLES[table][name], value)
    if plain is not _UNDECIDED:  # spares a command line of plain values the import of pydantic
        return plain
    model = models()[table]
    try:
        checked = model.model_validate({name: value})
    except _validation_error() as exc:
        raise UsageError(_message(exc, label or name, TABLES[table], prefix_key=False, shown=shown)) from None
    return getattr(checked, name)


_UNDECIDED = object()


def _plainly_valid(sp: Spec, value: Any) -> Any:
    """What the model would return for a value that is plainly valid (an int in range for an
    int, a float in range for a float, a well-formed window); :data:`_UNDECIDED` for anything
    else, which the model then checks (and words the error for)."""
    if sp.kind == "window" and type(value) is str:
        try:
            return _window(value)
        except ValueError:
            return _UNDECIDED
    if (sp.kind == "int" and type(value) is int) or (sp.kind == "float" and type(value) is float
                                                     and value - value == 0):  # finite: not inf or NaN
        if sp.bounds is None:
            return value
        lo, hi = sp.bounds
        above = value > lo if sp.lo_open else value >= lo
        below = value < hi if sp.hi_open else value <= hi
        if above and below:  # False for NaN
            return value
    return _UNDECIDED


def validate_self_heal(section: Mapping[str, Any], where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values, unknown keys) of a ``[self_heal]`` table; :class:`ConfigError` (one line,
    ``where`` + key) when a value is wrong."""
    m = validate("self_heal", section, where)
    return _set_values(m, SELF_HEAL), dict(m.model_extra or {})


# What a person calls a setting when a command gives it: the lookback is a command's `since`
# (--since, the MCP argument).
OVERRIDE_NAMES = {"lookback": "since"}


def validate_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Setting overrides (flags, MCP arguments) validated like the table: :class:`UsageError`
    ``invalid value: KEY must be ...`` when one is wrong."""
    unknown = set(overrides) - set(SELF_HEAL)
    if unknown:  # a caller's mistake, not a user's
        raise TypeError(f"unknown setting {min(unknown)!r}")
    plain = {k: _plainly_valid(SELF_HEAL[k], v) for k, v in overrides.items()}
    if _UNDECIDED not in plain.values():  # plain flag values: no pydantic import for them
        return plain
    m = validate("self_heal", overrides, "invalid value:", error=UsageError, names=OVERRIDE_NAMES)
    return _set_values(m, SELF_HEAL)


def _set_values(m: BaseModel, table: dict[str, Spec]) -> dict[str, Any]:
    """The declared keys the validated data actually set (not the defaults, not unknown keys)."""
    return {k: getattr(m, k) for k in table if k in m.model_fields_set}


def validate(table: str, data: Any, where: str, error: type[SelfHealError] = ConfigError,
             names: Mapping[str, str] | None = None) -> BaseModel:
    """``data`` as an instance of the table's model, or ``error`` with one line:
    ``<where> <key> must be <what>, got <value>`` (``names``: a key's name there, when not its own)."""
    if not isinstance(data, Mapping):
        raise error(f"{where} must be a table")
    try:
        return models()[table].model_validate(dict(data))
    except _validation_error() as exc:
        raise error(_message(exc, where, TABLES[table], names=names)) from None


# ------------------------------------------------------------------ the pydantic models


def _window(value: str) -> str:
    """The syntax of a lookback window (whether it starts in the future depends on the clock of
    the command that uses it)."""
    try:
        parse_since(value, datetime.max.replace(tzinfo=UTC))
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    return value


def _checks(value: list[str]) -> tuple[str, ...]:
    unknown = [v for v in value if v not in PREFLIGHT_CHECKS]
    if unknown:
        raise ValueError(f"unknown preflight check {unknown[0]!r} (known: {', '.join(PREFLIGHT_CHECKS)})")
    return tuple(value)


_INTERVAL = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d)?\s*$", re.IGNORECASE)
_INTERVAL_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, None: 1}


def interval_seconds(value: Any) -> float:
    """``"1h"`` → 3600.0; ``90``/``"90s"``, ``"30m"``, ``"1.5h"``, ``"1d"``; longer than zero and
    at most the ``interval`` flag's upper bound (30 days)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = _INTERVAL.match(value) if isinstance(value, str) else None
        if not m:
            raise ValueError(f"invalid interval {value!r}: use e.g. 90s, 30m, 1h, 1d")
        seconds = float(m.group(1)) * _INTERVAL_UNITS[m.group(2).lower() if m.group(2) else None]
    if not seconds > 0:  # `not` so that NaN fails too
        raise ValueError(f"invalid interval {value!r}: it must be longer than zero")
    hi = FLAGS["interval"].hi
    if not seconds <= hi:
        raise ValueError(f"invalid interval {value!r}: it must be at most {hi / 86400:g} days")
    return seconds


def _field(sp: Spec) -> tuple[Any, Any]:
    """(annotation, FieldInfo) of one declaration."""
    from pydantic import AfterValidator, BeforeValidator, Field

    default = sp.default
    kwargs: dict[str, Any] = {"description": sp.description}
    if sp.bounds and sp.kind in ("int", "float"):
        kwargs["gt" if sp.lo_open else "ge"] = sp.lo
        kwargs["lt" if sp.hi_open else "le"] = sp.hi
    if sp.kind == "int":
        ann: Any = Annotated[int, Field(strict=True, **kwargs)]
    elif sp.kind == "float":
        ann = Annotated[float, Field(strict=True, allow_inf_nan=False, **kwargs)]
    elif sp.kind == "bool":
        ann = Annotated[bool, Field(strict=True, **kwargs)]
    elif sp.kind == "window":
        ann = Annotated[str, Field(strict=True, **kwargs), AfterValidator(_window)]
    elif sp.kind == "checks":
        ann = Annotated[list[str], Field(strict=True, **kwargs), AfterValidator(_checks)]
    elif sp.kind == "interval":
        ann = Annotated[float, BeforeValidator(interval_seconds), Field(**kwargs)]
    else:  # pragma: no cover - a declaration error
        raise ValueError(f"unknown kind {sp.kind!r}")
    if default is None:
        ann = ann | None
    return ann, (... if default is REQUIRED else default)


@functools.cache
def models() -> dict[str, type[BaseModel]]:
    """The pydantic models, built once from the declarations above (imports pydantic)."""
    from pydantic import ConfigDict, create_model

    def build(name: str, table: dict[str, Spec], extra: str, doc: str, **more: Any) -> type[BaseModel]:
        fields = {k: _field(s) for k, s in table.items()}
        fields.update(more)
        return create_model(name, __config__=ConfigDict(extra=extra, frozen=True), __doc__=doc, **fields)

    breaker = build("CircuitBreakerConfig", CIRCUIT_BREAKER, "allow",
                    '``[tools."NAME".circuit_breaker]``: open after consecutive failures, try again later.')
    tool = build("ToolConfig", TOOL, "allow", '``[tools."NAME"]``: how ToolPolicy calls one tool.',
                 circuit_breaker=(breaker | None, None))
    return {
        "self_heal": build("SelfHealConfig", SELF_HEAL, "allow",
                           "``[self_heal]`` of config.toml: detection, verification, auto-apply, notifications."),
        "tool": tool,
        "circuit_breaker": breaker,
        "server": build("ServerConfig", SERVER, "ignore",
                        '``[servers."NAME"]``: the keys selfheal reads (the runtime owns the others).'),
        "flags": build("FlagValues", FLAGS, "forbid", "Command-line flags with no setting behind them."),
    }


_MODEL_NAMES = {"SelfHealConfig": "self_heal", "ToolConfig": "tool", "CircuitBreakerConfig": "circuit_breaker",
                "ServerConfig": "server", "FlagValues": "flags"}


def __getattr__(name: str) -> Any:  # PEP 562: the models, built on first use
    if name in _MODEL_NAMES:
        return models()[_MODEL_NAMES[name]]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _validation_error() -> type[Exception]:
    from pydantic import ValidationError

    return ValidationError


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


def _cut(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to 80 characters: a message stays one readable line. A TOML date,
    time or datetime is shown as ISO text, the way config.toml writes it, not as Python's
    ``datetime.datetime(1979, ...)``."""
    if isinstance(value, (date, time)):  # datetime is a date
        return _cut(value.isoformat())
    return _cut(repr(value))


def short_text(text: str) -> str:
    """What a user typed, control characters escaped, cut to 80 characters."""
    return _cut(repr(str(text))[1:-1])


def _message(exc: Any, where: str, table: dict[str, Spec], *, prefix_key: bool = True,
             shown: str | None = None, names: Mapping[str, str] | None = None) -> str:
    """One line for the first error of a pydantic ValidationError."""
    err = exc.errors(include_url=False)[0]
    loc = [str(part) for part in err["loc"]]
    specs, key, head = table, loc[0] if loc else "", where
    if table is TOOL and key == "circuit_breaker":
        specs, head = CIRCUIT_BREAKER, where[:-1] + ".circuit_breaker]" if where.endswith("]") else where
        if err["type"] in ("model_type", "dict_type", "model_attributes_type"):
            return f"{head} must be a table"
        key = loc[1] if len(loc) > 1 else ""
        if err["type"] == "missing":
            needed = [k for k, s in CIRCUIT_BREAKER.items() if s.default is REQUIRED]
            return f"{head} needs {' and '.join(needed)}"
    name = f"{head} {(names or {}).get(key, key)}" if prefix_key else head
    sp = specs.get(key)
    value = err.get("input")
    got = short_repr(value) if shown is None else short_text(shown)
    if err["type"] == "missing":
        return f"{head} needs {key}"
    if err["type"] == "extra_forbidden" or sp is None:
        return f"{head} unknown key {key!r}"
    if err["type"] == "value_error":  # the validator's own reason (a window, a check name, an interval)
        reason = str(err.get("ctx", {}).get("error", err["msg"]))
        return f"{name}: {reason}" if prefix_key else reason
    if err["type"] in _RANGE_ERRORS and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{name} must be {sp.range_text()}, got {got}"
    return f"{name} must be {sp.what()}, got {got}"
