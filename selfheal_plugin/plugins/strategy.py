"""What a fix strategy is: the interface plugins implement and the data they return.

A strategy answers for one or more error types. ``propose(pattern, history)`` reads the
pattern (its occurrences, message templates, durations) and the history window, and
returns a :class:`Proposal` whose ``changes`` are data, never code::

    {"kind": "config", "file": "config.toml", "path": ["tools", TOOL, "timeout_ms"],
     "op": "set", "value": 90000}
    {"kind": "manual", "text": "Grant the agent read access to /srv/data"}

``simulate(proposal, history)`` estimates what the history would have looked like with
the change, or returns None when the strategy has no model for it.

Config keys written by the built-in strategies (and read by ``ToolPolicy``)::

    [tools."NAME"]  timeout_ms, retry_attempts (retries after the first call),
                    retry_backoff_ms (first delay, doubled per retry), preflight = ["path_exists"]
    [tools."NAME".circuit_breaker]  failure_threshold, timeout_duration_sec, half_open_requests
    [servers."NAME"]  health_check, auto_restart
"""
from __future__ import annotations

import abc
import math
import re
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

from selfheal_plugin.history.connection import normalize_error_type, server_of  # noqa: F401  (server_of: for strategies)
from selfheal_plugin.history.settings import read_config
from selfheal_plugin.history.errorindex import wellformed_sql
from selfheal_plugin.history.text import Undecodable

if TYPE_CHECKING:
    from selfheal_plugin.analysis.patterns import Pattern
    from selfheal_plugin.history.settings import Settings

CHANGE_KINDS = ("config", "manual")
CHANGE_OPS = ("set", "delete")
RISK_LEVELS = ("low", "medium", "high")
ALLOWED_CONFIG_FILES = ("config.toml",)

def _is_toml_value(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)):
        return not (isinstance(value, float) and not math.isfinite(value))
    if isinstance(value, list):
        return all(_is_toml_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_toml_value(v) for k, v in value.items())
    return False


@dataclass
class Change:
    """One edit a proposal needs: a config value to set, or a step for a person."""

    kind: str
    file: str | None = None
    path: list[str] | None = None
    op: str | None = None
    value: Any = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in CHANGE_KINDS:
            raise ValueError(f"change kind must be one of {CHANGE_KINDS}, got {self.kind!r}")
        if self.kind == "manual":
            if not isinstance(self.text, str) or not self.text.strip():
                raise ValueError("a manual change needs its text")
            return
        if self.op not in CHANGE_OPS:
            raise ValueError(f"config change op must be one of {CHANGE_OPS}, got {self.op!r}")
        f = PurePosixPath(self.file or "")
        if f.is_absolute() or ".." in f.parts or str(f) not in ALLOWED_CONFIG_FILES:
            raise ValueError(f"config changes may only touch {ALLOWED_CONFIG_FILES} in BINKS_HOME, not {self.file!r}")
        if not self.path or not all(isinstance(p, str) and p for p in self.path):
            raise ValueError(f"config change path must be a non-empty list of keys, got {self.path!r}")
        self.path = list(self.path)
        if self.op == "set" and not _is_toml_value(self.value):
            raise ValueError(f"config change value is not a TOML value: {self.value!r}")

    @classmethod
    def config(cls, path: list[str], value: Any, file: str = "config.toml") -> "Change":
        return cls(kind="config", file=file, path=list(path), op="set", value=value)

    @classmethod
    def manual(cls, text: str) -> "Change":
        return cls(kind="manual", text=text)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Change":
        return cls(**{k: data.get(k) for k in ("kind", "file", "path", "op", "value", "text")})

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "manual":
            return {"kind": "manual", "text": self.text}
        d = {"kind": "config", "file": self.file, "path": list(self.path or []), "op": self.op}
        if self.op == "set":
            d["value"] = self.value
        return d

    def describe(self) -> str:
        """One human-readable line: ``config.toml: tools."x".timeout_ms = 90000``."""
        if self.kind == "manual":
            return str(self.text)
        keys = ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else f'"{p}"' for p in self.path or [])
        if self.op == "delete":
            return f"{self.file}: remove {keys}"
        value = str(self.value).lower() if isinstance(self.value, bool) else repr(self.value).replace("'", '"')
        return f"{self.file}: {keys} = {value}"


@dataclass
class Proposal:
    """A strategy's answer for one pattern.

    ``expected_reduction`` is the share (0..1) of the pattern's failures in the window
    the change would have avoided, estimated from history; None when the strategy
    cannot estimate it (``expected_impact`` then says "unknown").
    """

    pattern_id: str
    error_type: str
    tool_name: str
    strategy: str
    description: str
    expected_impact: str
    risk_level: str
    changes_required: list[str]
    changes: list[Change]
    confidence: float | None = None
    expected_reduction: float | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.risk_level not in RISK_LEVELS:
            raise ValueError(f"risk_level must be one of {RISK_LEVELS}, got {self.risk_level!r}")
        self.changes = [c if isinstance(c, Change) else Change.from_dict(c) for c in self.changes]
        if not self.changes:
            raise ValueError("a proposal needs at least one change")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["changes"] = [c.to_dict() for c in self.changes]
        return d


@dataclass
class ToolCall:
    """One finished call of a tool (a ``tool_complete`` event)."""

    event_id: int
    run_id: str
    ts: float  # epoch seconds
    ok: bool
    duration_ms: int | None
    error_type: str | None  # normalised; None on success


@dataclass
class HistoryWindow:
    """What a strategy may read: the connection, the analysis window and the settings.

    Reads are lazy and cached, so several strategies proposing in one command scan the
    ``tool_complete`` rows of the window once.
    """

    conn: sqlite3.Connection
    since: datetime
    until: datetime | None = None
    settings: "Settings | None" = None
    _calls: dict[str, list[ToolCall]] | None = field(default=None, repr=False)
    _config: dict[str, Any] | None = field(default=None, repr=False)

    def tool_calls(self, tool_name: str) -> list[ToolCall]:
        """Every call of ``tool_name`` in the window, oldest first."""
        if self._calls is None:
            self._calls = self._load_calls()
        return self._calls.get(tool_name, [])

    def _load_calls(self) -> dict[str, list[ToolCall]]:
        lo = self.since.timestamp() / 86400 + 2440587.5
        hi = self.until.timestamp() / 86400 + 2440587.5 if self.until else 1e12
        # malformed rows are skipped by the rules of the error index (errorindex.wellformed_sql)
        sql = f"""
        SELECT id, run_id, (julianday(timestamp) - 2440587.5) * 86400.0 AS ts,
               json_extract(event_data, '$.name'), json_extract(event_data, '$.is_error'),
               json_extract(event_data, '$.duration'), json_extract(event_data, '$.error_type'),
               CASE WHEN json_extract(event_data, '$.is_error') = 1 THEN event_data END
        FROM run_events
        WHERE event_type = 'tool_complete' AND {wellformed_sql('event_data')}
          AND julianday(timestamp) >= ? AND julianday(timestamp) < ?
        """
        out: dict[str, list[ToolCall]] = {}
        for eid, run_id, ts, name, is_error, duration, etype, failed_text in self.conn.execute(sql, (lo, hi)):
            if (not isinstance(name, str) or not name or isinstance(name, Undecodable)
                    or isinstance(failed_text, Undecodable)):
                continue
            ok = is_error != 1
            dur = int(duration) if isinstance(duration, (int, float)) and duration >= 0 else None
            out.setdefault(name, []).append(
                ToolCall(eid, run_id, ts, ok, dur, None if ok else normalize_error_type(etype)))
        for calls in out.values():
            calls.sort(key=lambda c: (c.ts, c.event_id))
        return out

    @property
    def config(self) -> dict[str, Any]:
        """The parsed ``config.toml`` of the home (empty without settings or file)."""
        if self._config is None:
            self._config = read_config(self.settings.config_path) if self.settings else {}
        return self._config

    def tool_setting(self, tool_name: str, *keys: str) -> Any:
        """The configured ``[tools."NAME"]`` value at ``keys``, or None."""
        node: Any = self.config.get("tools", {}).get(tool_name, {})
        for k in keys:
            if not isinstance(node, dict):
                return None
            node = node.get(k)
        return node


class Strategy(abc.ABC):
    """Base class for fix strategies; register instances through ``register_strategies``.

    Subclasses set ``name`` (unique, shown in ``plugins`` and stored on proposals),
    ``error_types`` (canonical names, e.g. ``("timeout",)``) and ``summary`` (one line:
    what the fix does), and implement :meth:`propose`.
    """

    name: ClassVar[str] = ""
    error_types: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""

    def suggest(self, pattern: "Pattern") -> str:
        """A one-line fix for ``detect`` results, from the pattern alone (no history reads)."""
        return f"{self.summary} ({pattern.tool_name})" if self.summary else f"See: agent self-heal show {pattern.id}"

    @abc.abstractmethod
    def propose(self, pattern: "Pattern", history: HistoryWindow) -> Proposal:
        """The fix for ``pattern``, with changes and an expected impact from ``history``."""

    def simulate(self, proposal: Proposal, history: HistoryWindow) -> Any | None:
        """Replay ``history`` with ``proposal`` applied; None means "no model"."""
        return None

    def make_proposal(self, pattern: "Pattern", *, description: str, expected_impact: str, risk_level: str,
                      changes: list[Change], expected_reduction: float | None = None,
                      evidence: dict[str, Any] | None = None,
                      changes_required: list[str] | None = None) -> Proposal:
        """A :class:`Proposal` for ``pattern`` with this strategy's name filled in."""
        return Proposal(
            pattern_id=pattern.id, error_type=normalize_error_type(pattern.error_type),
            tool_name=pattern.tool_name, strategy=self.name, description=description,
            expected_impact=expected_impact, risk_level=risk_level,
            changes_required=changes_required or [c.describe() for c in changes], changes=changes,
            confidence=pattern.confidence,
            expected_reduction=None if expected_reduction is None else round(float(expected_reduction), 4),
            evidence=evidence or {},
        )


# ---------------------------------------------------------------- helpers strategies share


def tool_path(tool_name: str, *keys: str) -> list[str]:
    return ["tools", tool_name, *keys]


def server_path(server: str, *keys: str) -> list[str]:
    return ["servers", server, *keys]


def nice_ceil_ms(ms: float) -> int:
    """Round a duration up to a step a person would pick: 100 ms under 1 s, 1 s under
    10 s, 5 s under 1 min, 10 s under 5 min, 30 s above."""
    for limit, step in ((1_000, 100), (10_000, 1_000), (60_000, 5_000), (300_000, 10_000)):
        if ms <= limit:
            return int(math.ceil(ms / step) * step)
    return int(math.ceil(ms / 30_000) * 30_000)


def percent(x: float) -> str:
    return f"{x * 100:.0f}%"


def impact_text(reduction: float | None, what: str, basis: str) -> str:
    """``"~62% fewer timeout failures on X (basis)"`` or ``"unknown (basis)"``."""
    if reduction is None:
        return f"unknown reduction in {what} ({basis})"
    return f"~{percent(reduction)} fewer {what} ({basis})"


def retries_needed(failure_rate: float, target: float = 0.01, max_retries: int = 5) -> int:
    """Fewest retries ``n`` with ``failure_rate ** (n + 1) <= target`` (independent failures)."""
    r = min(max(failure_rate, 0.0), 0.999)
    for n in range(1, max_retries + 1):
        if r ** (n + 1) <= target:
            return n
    return max_retries


def recovered_in_run(pattern: "Pattern", history: HistoryWindow) -> tuple[int, list[float]]:
    """How many of the pattern's failures were followed by a successful call of the same
    tool in the same run, and the delays (ms) until that success."""
    calls = history.tool_calls(pattern.tool_name)
    by_run: dict[str, list[ToolCall]] = {}
    for c in calls:
        by_run.setdefault(c.run_id, []).append(c)
    recovered, delays = 0, []
    for occ in pattern.occurrences_detail:
        later = [c for c in by_run.get(occ["run_id"], ()) if c.ok and c.event_id > occ["event_id"]]
        if later:
            recovered += 1
            delays.append(max(0.0, (later[0].ts - occ["ts"]) * 1000))
    return recovered, delays


@dataclass
class RetryPlan:
    """Retries sized from history: ``attempts`` so that, with failures independent at the
    observed rate, ``rate ** (attempts + 1) <= 1 %``; ``backoff_ms`` so that the total wait
    ``backoff · (2^attempts − 1)`` covers the median in-run recovery delay."""

    attempts: int
    backoff_ms: int
    reduction: float  # 1 - rate ** attempts: failures a retry would have turned into successes
    failure_rate: float
    recovery_delay_ms: float | None

    def changes(self, tool_name: str) -> list[Change]:
        return [Change.config(tool_path(tool_name, "retry_attempts"), self.attempts),
                Change.config(tool_path(tool_name, "retry_backoff_ms"), self.backoff_ms)]

    def evidence(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_BACKOFF_MS = 1000


def retry_plan(pattern: "Pattern", history: HistoryWindow) -> RetryPlan:
    rate = float(pattern.failure_rate)
    attempts = retries_needed(rate)
    _, delays = recovered_in_run(pattern, history)
    if delays:
        delays.sort()
        median = delays[len(delays) // 2]
        backoff = min(30_000, max(250, nice_ceil_ms(median / (2 ** attempts - 1))))
    else:
        median, backoff = None, DEFAULT_BACKOFF_MS
    return RetryPlan(attempts, backoff, round(1 - rate ** attempts, 4), rate, median)


class ModeledStrategy(Strategy):
    """A strategy whose config changes the built-in models can replay.

    When its ``simulate`` returns None, ``test`` replays the proposal's changes with the
    built-in models of :mod:`selfheal_plugin.lifecycle.simulation` (censored duration fits
    for timeouts, observed retry success for retries), which say "no model" for any change
    they do not cover."""

    replays_with_builtin_models: ClassVar[bool] = True
