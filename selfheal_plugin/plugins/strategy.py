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

What a strategy receives, ``pattern`` (:class:`selfheal_plugin.plugins.pattern.Pattern`)::

    id                 "error_type:tool_name", e.g. "timeout:mcp__k8s__pods_list"
    error_type         normalised type ("timeout", "Unknown" when the runtime gave none)
    tool_name          the failing tool
    occurrences        failed calls with this signature in the window
    correlation_score  0..1, Jaccard similarity of the occurrences' contexts
    confidence         0..1, from sample size, correlation and frequency
    affected_runs      run ids, oldest first
    first_seen, last_seen   ISO-8601 UTC instants
    failure_rate       0..1, failed calls / all calls of the tool in the window
    suggested_fix      the pattern's one suggested fix: its open proposal's description when
                       there is one, else that of the proposal its strategy makes now
                       (None while proposing)
    suggested_by       "proposal" or "strategy": where suggested_fix came from
    improvement_id     the open proposal behind suggested_fix, if any (or the rejected one
                       that withholds it)
    improvement_status its status (applied: the fix is in force already, being verified;
                       verified: in force and kept, until the pattern keeps failing after
                       it; rejected: a person's rejection still stands, no fix is suggested)
    no_fix_reason      why suggested_fix is None: that rejection, or the strategy's error
    same_change_undone the open proposal's note when the same change was rolled back before
    failure_kind       what the failures are, from the evidence (one of FAILURE_KINDS)
    evidence           the evidence behind it (JSON data, see selfheal_plugin.analysis.evidence):
                       kind, reasons, templates, codes (errno, http_status, jsonrpc), paths
                       (exists_now), determinism (verdict, same_args_*, retried_in_run,
                       followed_in_run, follow_up_succeeded), server (streak_share),
                       spacing_s, retry_after_s, reset_in_s, durations
    occurrences_detail one dict per failure: event_id, run_id, step_index, ts (epoch s),
                       timestamp, tool_name, error_type, raw_error_type, message,
                       template (numbers, paths, ids masked), duration_ms, arg_keys,
                       workflow, run_started_at, run_status

and ``history`` (:class:`HistoryWindow`): ``since``/``until`` (aware datetimes, never
None), ``settings``, ``config`` (the parsed config.toml), ``tool_calls(tool)`` (every
:class:`ToolCall` of a tool in the window) and ``tool_setting(tool, *keys)``.

Risk levels (:data:`RISK_LEVELS`): ``low`` — a value that only widens what already works
(a longer timeout, a retry); the daemon may auto-apply it when enabled and simulated
safe; ``medium`` — changes behaviour a user may notice (a circuit breaker, preflight
checks); ``high`` — may hide failures or needs a person; never applied automatically.

Plugin calls are contained: a strategy method that raises, returns something that is not
a valid :class:`Proposal` (see :func:`validate_proposal`; its changes are also checked
against what ``apply`` would refuse: a key other than the ``[tools]``/``[servers]`` settings
above, see :func:`~selfheal_plugin.history.settings.change_key_problem`, or a value ToolPolicy
refuses) or runs past
``[self_heal] plugin_timeout_seconds`` costs that pattern its proposal, with one line
naming the strategy and its plugin; the other patterns go on.
"""
from __future__ import annotations

import abc
import json
import math
import re
import sqlite3
import tomllib
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar

from selfheal_plugin.errors import SelfHealError
from selfheal_plugin.history.connection import last_event_id, normalize_error_type, scan_id_range
from selfheal_plugin.history.connection import server_of  # noqa: F401  (for strategies)
from selfheal_plugin.history.settings import read_config, warn_tool_tables
from selfheal_plugin.history.text import first_control, percent
from selfheal_plugin.history.times import utcnow
from selfheal_plugin.history.errorindex import refresh

if TYPE_CHECKING:
    from selfheal_plugin.plugins.pattern import Pattern
    from selfheal_plugin.history.settings import Settings

# What a failure is, read from its evidence (selfheal_plugin.analysis.evidence); a strategy
# may register for kinds as well as error types (see plugins.manager.resolve_strategy).
FAILURE_KINDS = ("missing_resource", "permission", "rate_limited", "transient_upstream", "slow_tail", "hang",
                 "server_down", "invalid_arguments", "unknown")
CHANGE_KINDS = ("config", "manual")
CHANGE_OPS = ("set", "delete")
RISK_LEVELS = ("low", "medium", "high")
ALLOWED_CONFIG_FILES = ("config.toml",)
CHANGE_FIELDS = ("kind", "file", "path", "op", "value", "text")
MAX_EVIDENCE_DEPTH = 16
MAX_EVIDENCE_BYTES = 256 * 1024
# A proposal's description: the first line says the fix (the pattern's suggested_fix, the
# commit subject, the inbox line), at most MAX_SUMMARY_CHARS; lines after it may give
# detail, the whole at most MAX_DESCRIPTION_CHARS; lines are separated by "\n" only.
MAX_SUMMARY_CHARS = 300
MAX_DESCRIPTION_CHARS = 2000


class StrategyError(SelfHealError):
    """A strategy could not give a proposal for a pattern: it failed to load, raised, ran
    past its deadline or returned something invalid. One line, naming the strategy."""


def _is_toml_value(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str)):
        return not (isinstance(value, float) and not math.isfinite(value))
    if isinstance(value, list):
        return all(_is_toml_value(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_toml_value(v) for k, v in value.items())
    return False


def parse_key_path(path: Any) -> list[str]:
    """A config key path as a list of keys.

    Accepts a list or tuple of non-empty strings (``["tools", TOOL, "timeout_ms"]``,
    what :func:`tool_path` returns: the safe form, any tool name works), or a string
    read as a TOML dotted key, exactly as it would be written in config.toml:
    ``'tools."mcp__k8s__pods_list".timeout_ms'``, ``"tools.x.y"``. A dot inside a bare
    key separates keys, so a tool name holding dots or other characters must be quoted
    in the string (or the list form used). Anything else raises ValueError.
    """
    if isinstance(path, str):
        try:
            parsed = tomllib.loads(f"{path} = 0")
        except tomllib.TOMLDecodeError:
            raise ValueError(f"config change path {path!r} is not a TOML dotted key (e.g. 'tools.\"NAME\".timeout_ms'); "
                             "or pass a list of keys") from None
        keys: list[str] = []
        node: Any = parsed
        while isinstance(node, dict):
            if len(node) != 1:
                raise ValueError(f"config change path {path!r} is not a single dotted key")
            (key, node), = node.items()
            keys.append(key)
        if node != 0 or not all(keys):
            raise ValueError(f"config change path {path!r} is not a single dotted key")
        return keys
    if isinstance(path, (list, tuple)) and path and all(isinstance(p, str) and p for p in path):
        return list(path)
    raise ValueError(f"config change path must be a non-empty list of keys or a dotted key string, got {path!r}")


@dataclass
class Change:
    """One edit a proposal needs: a config value to set or delete, or a step for a person.

    ``kind`` is ``config``: ``file`` (only ``config.toml`` in BINKS_HOME), ``path`` (keys
    from the top of the file, see :func:`parse_key_path`), ``op`` (``set`` with a TOML
    ``value``, or ``delete``); or ``manual``: ``text`` says what a person must do;
    ``apply`` never performs it. Build one with :meth:`config`, :meth:`delete`,
    :meth:`manual` or from data with :meth:`from_dict` (a proposal's ``changes`` may also
    hold such dicts). Invalid input raises ValueError with the reason.
    """

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
        f = PurePosixPath(self.file if isinstance(self.file, str) else "")
        if f.is_absolute() or ".." in f.parts or str(f) not in ALLOWED_CONFIG_FILES:
            raise ValueError(f"config changes may only touch {ALLOWED_CONFIG_FILES} in BINKS_HOME, not {self.file!r}")
        self.path = parse_key_path(self.path)
        if self.op == "set" and not _is_toml_value(self.value):
            raise ValueError(f"config change value is not a TOML value: {self.value!r}")

    @classmethod
    def config(cls, path: list[str] | tuple[str, ...] | str, value: Any, file: str = "config.toml") -> Change:
        """Set ``path`` (a list of keys, or a TOML dotted key string) to ``value``."""
        return cls(kind="config", file=file, path=path, op="set", value=value)  # type: ignore[arg-type]

    @classmethod
    def delete(cls, path: list[str] | tuple[str, ...] | str, file: str = "config.toml") -> Change:
        """Remove the key at ``path``."""
        return cls(kind="config", file=file, path=path, op="delete")  # type: ignore[arg-type]

    @classmethod
    def manual(cls, text: str) -> Change:
        """A step for a person (``apply`` lists it, never performs it)."""
        return cls(kind="manual", text=text)

    @classmethod
    def from_dict(cls, data: Any) -> Change:
        """A change given as data, as stored: ``{"kind": "config", "file": "config.toml",
        "path": [...], "op": "set", "value": 90000}`` or ``{"kind": "manual", "text": ...}``.
        ``file`` defaults to config.toml and ``op`` to ``set`` (``delete`` when no value)."""
        if isinstance(data, Change):
            return data
        if not isinstance(data, dict):
            raise ValueError(f"a change must be a Change or a dict, got {type(data).__name__}")  # noqa: TRY004
        unknown = sorted(set(map(str, data)) - set(CHANGE_FIELDS))
        if unknown:
            raise ValueError(f"unknown change field(s) {', '.join(unknown)}; fields: {', '.join(CHANGE_FIELDS)}")
        values = {k: data.get(k) for k in CHANGE_FIELDS}
        if values["kind"] == "config":
            values["file"] = values["file"] if "file" in data else "config.toml"
            if values["op"] is None:
                values["op"] = "set" if "value" in data else "delete"
        return cls(**values)

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
        keys = ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else json.dumps(p, ensure_ascii=False) for p in self.path or [])
        if self.op == "delete":
            return f"{self.file}: remove {keys}"
        value = str(self.value).lower() if isinstance(self.value, bool) else repr(self.value).replace("'", '"')
        return f"{self.file}: {keys} = {value}"


def as_changes(changes: Any) -> list[Change]:
    """A list of :class:`Change` from Change objects and/or dicts; ValueError otherwise."""
    if not isinstance(changes, (list, tuple)):
        raise ValueError(f"changes must be a list, got {type(changes).__name__}")  # noqa: TRY004
    out = []
    for i, c in enumerate(changes):
        try:
            out.append(Change.from_dict(c))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"change {i + 1}: {exc}") from None
    return out


@dataclass
class Proposal:
    """A strategy's answer for one pattern.

    ``description`` (its first line: what the fix is; maybe lines of detail after it, see
    :func:`check_description`), ``expected_impact`` (one line, with its
    basis), ``risk_level`` (one of :data:`RISK_LEVELS`), ``changes`` (at least one
    :class:`Change`, or dicts as :meth:`Change.from_dict` reads them),
    ``changes_required`` (a line per change; :meth:`Strategy.make_proposal` fills it),
    ``evidence`` (JSON data: what the numbers came from, shown by ``show`` and stored).
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
    failure_kind: str | None = None  # the pattern's kind when proposed (make_proposal fills it)

    def __post_init__(self) -> None:
        if self.risk_level not in RISK_LEVELS:
            raise ValueError(f"risk_level must be one of {RISK_LEVELS}, got {self.risk_level!r}")
        self.changes = as_changes(self.changes)
        if not self.changes:
            raise ValueError("a proposal needs at least one change")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["changes"] = [c.to_dict() for c in self.changes]
        return d


def _json_depth_ok(value: Any, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list, tuple)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return True


def check_description(text: str) -> None:
    """ValueError (one line) unless ``text`` is a description as :data:`MAX_SUMMARY_CHARS`
    says: a first line that says the fix, at most that long; maybe detail lines after it, the
    whole at most :data:`MAX_DESCRIPTION_CHARS`; no control character but ``\\n`` (no ``\\r``,
    escape sequence or Unicode line separator)."""
    if (control := first_control(text, allowed="\n")) is not None:
        raise ValueError(f"description holds the control character {control}; only \\n may separate its lines")
    first = text.split("\n", 1)[0]
    if not first.strip():
        raise ValueError("description's first line is empty; it must say the fix")
    if len(first) > MAX_SUMMARY_CHARS:
        raise ValueError(f"description's first line is {len(first)} characters, more than {MAX_SUMMARY_CHARS} "
                         "(the fix in one line; detail goes on the lines after it)")
    if len(text) > MAX_DESCRIPTION_CHARS:
        raise ValueError(f"description is {len(text)} characters, more than {MAX_DESCRIPTION_CHARS}")


def validate_proposal(proposal: Any, pattern_id: str | None = None) -> Proposal:
    """Check what a strategy returned before anything is stored; returns it or raises
    ValueError with the first problem (one line).

    A proposal must be a :class:`Proposal` for ``pattern_id`` with a ``description`` whose
    first line says the fix (:func:`check_description`: its length, the whole's, no control
    character but ``\\n``), a non-empty ``expected_impact`` of one line (at most
    :data:`MAX_DESCRIPTION_CHARS`), a known ``risk_level``, at least one
    change, each a :class:`Change`, ``changes_required`` a list of strings, numbers in
    range, and ``evidence`` a JSON object (str keys, finite numbers, at most
    :data:`MAX_EVIDENCE_DEPTH` levels deep and :data:`MAX_EVIDENCE_BYTES` when encoded).
    """
    if not isinstance(proposal, Proposal):
        raise ValueError(f"returned {type(proposal).__name__}, not a Proposal")  # noqa: TRY004
    if pattern_id is not None and proposal.pattern_id != pattern_id:
        raise ValueError(f"returned a proposal for {proposal.pattern_id!r}, not {pattern_id!r}")
    for name in ("description", "expected_impact", "strategy", "error_type", "tool_name"):
        value = getattr(proposal, name)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    check_description(proposal.description)
    if (control := first_control(proposal.expected_impact)) is not None:
        raise ValueError(f"expected_impact holds the control character {control}; it is one line")
    if len(proposal.expected_impact) > MAX_DESCRIPTION_CHARS:
        raise ValueError(f"expected_impact is {len(proposal.expected_impact)} characters, more than "
                         f"{MAX_DESCRIPTION_CHARS}")
    if proposal.risk_level not in RISK_LEVELS:
        raise ValueError(f"risk_level must be one of {RISK_LEVELS}, got {proposal.risk_level!r}")
    if not isinstance(proposal.changes, list) or not proposal.changes:
        raise ValueError("a proposal needs at least one change")
    for i, change in enumerate(proposal.changes):
        if not isinstance(change, Change):
            raise ValueError(f"change {i + 1} is a {type(change).__name__}, not a Change")  # noqa: TRY004
        Change.from_dict(change.to_dict())  # re-validates a Change edited after it was made
    if not isinstance(proposal.changes_required, list) or not all(isinstance(c, str) for c in proposal.changes_required):
        raise ValueError("changes_required must be a list of strings")
    for name in ("confidence", "expected_reduction"):
        value = getattr(proposal, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0.0 <= value <= 1.0):
            raise ValueError(f"{name} must be a number between 0 and 1 or None, got {value!r}")
    if not isinstance(proposal.evidence, dict):
        raise ValueError(f"evidence must be a dict, got {type(proposal.evidence).__name__}")  # noqa: TRY004
    if not _json_depth_ok(proposal.evidence, MAX_EVIDENCE_DEPTH):
        raise ValueError(f"evidence is nested more than {MAX_EVIDENCE_DEPTH} levels deep")
    try:
        encoded = json.dumps(proposal.evidence, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"evidence is not JSON data ({detail})") from None
    if len(encoded) > MAX_EVIDENCE_BYTES:
        raise ValueError(f"evidence is {len(encoded)} bytes when encoded, more than {MAX_EVIDENCE_BYTES}")
    return proposal


@dataclass(slots=True)  # one per call in the window: no per-instance __dict__
class ToolCall:
    """One finished call of a tool (a ``tool_complete`` event) in the window.

    ``event_id`` (the ``run_events`` row id), ``run_id``, ``ts`` (epoch seconds),
    ``ok`` (False when ``is_error``), ``duration_ms`` (None when absent or invalid),
    ``error_type`` (normalised, None on success)."""

    event_id: int
    run_id: str
    ts: float  # epoch seconds
    ok: bool
    duration_ms: int | None
    error_type: str | None  # normalised; None on success


def read_tool_calls(conn: sqlite3.Connection, since: datetime, until: datetime | None = None,
                    tool: str | None = None) -> dict[str, list[ToolCall]]:
    """Every finished call with its event timestamp in [since, until) (``until`` None: no
    end), per tool, oldest first; only ``tool``'s when given. Read from the index of calls
    (:mod:`selfheal_plugin.history.errorindex`, whose rules skip malformed rows), brought
    up to date first. What :meth:`HistoryWindow.tool_calls` and the duration model read."""
    refresh(conn)
    params: list[Any] = [since.timestamp() / 86400 + 2440587.5,
                         until.timestamp() / 86400 + 2440587.5 if until else 1e12]
    if tool is not None:
        params.append(tool)
    sql = ("SELECT event_id, run_id, (jd - 2440587.5) * 86400.0, tool_name, ok, duration, error_type "
           "FROM selfheal_calls WHERE event_id > ? AND event_id <= ? AND jd >= ? AND jd < ?"
           + (" AND tool_name = ?" if tool is not None else "") + " ORDER BY event_id")
    out: dict[str, list[ToolCall]] = {}
    for eid, run_id, ts, name, ok, duration, etype in scan_id_range(conn, sql, 0, last_event_id(conn), *params):
        out.setdefault(name, []).append(
            ToolCall(eid, run_id, ts, bool(ok), None if duration is None else int(duration), etype))
    for calls in out.values():
        calls.sort(key=lambda c: (c.ts, c.event_id))
    return out


@dataclass
class HistoryWindow:
    """What a strategy may read: the connection, the analysis window and the settings.

    ``since`` and ``until`` are the window's start and end (aware datetimes; ``until`` is
    never None: it defaults to the moment the window is made). Reads are lazy and cached:
    a tool's calls are read when a strategy first asks for them (by the index on tool and
    id), so several strategies proposing in one command read each tool's calls once, and a
    command about one pattern reads only its tool's, from the index of calls the history's
    ingest keeps (:mod:`selfheal_plugin.history.errorindex`).
    """

    conn: sqlite3.Connection
    since: datetime
    until: datetime = field(default_factory=utcnow)
    settings: Settings | None = None
    _calls: dict[str, list[ToolCall]] = field(default_factory=dict, repr=False)
    _config: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.until is None:  # older callers passed None for "now"
            self.until = utcnow()

    def tool_calls(self, tool_name: str) -> list[ToolCall]:
        """Every call of ``tool_name`` in the window, oldest first."""
        calls = self._calls.get(tool_name)
        if calls is None:
            calls = self._calls[tool_name] = read_tool_calls(self.conn, self.since, self.until, tool_name).get(
                tool_name, [])
        return calls

    @property
    def config(self) -> dict[str, Any]:
        """The parsed ``config.toml`` of the home (empty without settings or file), read as the
        runtime reads its ``[tools]`` and ``[servers]``: a value it would refuse is left out,
        with a warning that names it (:func:`~selfheal_plugin.history.settings.warn_tool_tables`)."""
        if self._config is None:
            path = self.settings.config_path if self.settings else None
            self._config = warn_tool_tables(read_config(path), path) if path else {}
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
    ``error_types`` (canonical names, e.g. ``("timeout",)``; any spelling normalises),
    optionally ``kinds`` (failure kinds from :data:`FAILURE_KINDS` the strategy fixes,
    whatever the runtime's label; at least one of the two must be non-empty; see
    :func:`selfheal_plugin.plugins.manager.resolve_strategy` for the precedence) and
    ``summary`` (one line: what the fix does), and implement :meth:`propose`; optionally
    :meth:`simulate`. The first line of a proposal's description is the pattern's
    ``suggested_fix`` wherever it is asked, stored or not. Every method is called in a worker thread with
    a deadline (``plugin_timeout_seconds``): keep them free of global side effects.
    """

    name: ClassVar[str] = ""
    error_types: ClassVar[tuple[str, ...]] = ()
    kinds: ClassVar[tuple[str, ...]] = ()
    summary: ClassVar[str] = ""

    @abc.abstractmethod
    def propose(self, pattern: Pattern, history: HistoryWindow) -> Proposal:
        """The fix for ``pattern``, with changes and an expected impact from ``history``;
        build it with :meth:`make_proposal`. Raise (anything) when there is no fix: the
        pattern then gets no proposal and the error is reported with this strategy's name."""

    def simulate(self, proposal: Proposal, history: HistoryWindow) -> Any | None:
        """Replay ``history`` with ``proposal`` applied; None means "no model". Else a
        ``Simulation`` or a dict with the fields of
        :data:`selfheal_plugin.lifecycle.simulation.PLUGIN_SIMULATION_FIELDS`, checked by
        :func:`selfheal_plugin.lifecycle.simulation.plugin_simulation`: the baseline is the
        history's, never this method's (see docs/plugin-tutorial.md)."""
        return None

    def candidates(self, pattern: Pattern, history: HistoryWindow) -> list[Proposal]:
        """Alternative fixes for ``pattern`` to compare in an A/B experiment (``agent self-heal
        ab start``), best first; each is validated like a proposal and stored as its own
        improvement. Default: ``[self.propose(pattern, history)]`` (one candidate)."""
        return [self.propose(pattern, history)]

    def make_proposal(self, pattern: Pattern, *, description: str, expected_impact: str, risk_level: str,
                      changes: list[Change | dict[str, Any]], expected_reduction: float | None = None,
                      evidence: dict[str, Any] | None = None,
                      changes_required: list[str] | None = None) -> Proposal:
        """A :class:`Proposal` for ``pattern`` with this strategy's name filled in.

        ``changes`` may mix :class:`Change` objects and dicts (:meth:`Change.from_dict`);
        ``risk_level`` is one of :data:`RISK_LEVELS`; ``changes_required`` defaults to one
        :meth:`Change.describe` line per change. Raises ValueError on invalid input."""
        parsed = as_changes(changes)
        return Proposal(
            pattern_id=pattern.id, error_type=normalize_error_type(pattern.error_type),
            tool_name=pattern.tool_name, strategy=self.name, description=description,
            expected_impact=expected_impact, risk_level=risk_level,
            changes_required=changes_required or [c.describe() for c in parsed], changes=parsed,
            confidence=pattern.confidence,
            expected_reduction=None if expected_reduction is None else round(float(expected_reduction), 4),
            evidence=evidence or {}, failure_kind=getattr(pattern, "failure_kind", None),
        )


# ---------------------------------------------------------------- helpers strategies share


def tool_path(tool_name: str, *keys: str) -> list[str]:
    return ["tools", tool_name, *keys]


def server_path(server: str, *keys: str) -> list[str]:
    return ["servers", server, *keys]


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
ABSENT = "(absent)"


def dotted_key(path: tuple[str, ...] | list[str]) -> str:
    """``["tools", "a.b:c", "timeout_ms"]`` → ``tools."a.b:c".timeout_ms`` (TOML spelling)."""
    return ".".join(p if _BARE_KEY.match(p) else '"' + p.replace("\\", "\\\\").replace('"', '\\"') + '"'
                    for p in path)


def format_value(value: Any) -> str:
    """A config value as config.toml spells it; ``None`` is :data:`ABSENT`."""
    if value is None:
        return ABSENT
    import tomlkit

    return tomlkit.item(value).as_string() if not isinstance(value, str) else '"' + value + '"'


def config_change_text(path: tuple[str, ...] | list[str], old: Any, new: Any, *, existed: bool | None = None,
                       removed: bool = False) -> str:
    """``tools.x.timeout_ms: 60000 → 90000``: one config.toml key's edit, as a proposal's
    ``changes_required``, apply's plan and result, and the commit describe it. The from value
    is what config.toml holds, :data:`ABSENT` for a key it does not set (``existed`` False, or
    ``old`` None), never the runtime's default or a limit inferred from the calls (that is
    evidence, e.g. the timeout strategy's ``old_timeout_ms``)."""
    before = format_value(old) if (old is not None if existed is None else existed) else ABSENT
    return f"{dotted_key(path)}: {before} → {'(removed)' if removed else format_value(new)}"


def nice_ceil_ms(ms: float) -> int:
    """Round a duration up to a step a person would pick: 100 ms under 1 s, 1 s under
    10 s, 5 s under 1 min, 10 s under 5 min, 30 s above."""
    for limit, step in ((1_000, 100), (10_000, 1_000), (60_000, 5_000), (300_000, 10_000)):
        if ms <= limit:
            return int(math.ceil(ms / step) * step)
    return int(math.ceil(ms / 30_000) * 30_000)


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


def recovered_in_run(pattern: Pattern, history: HistoryWindow) -> tuple[int, list[float]]:
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
    """Retries sized from history, by the first model that the evidence supports:

    * ``deterministic`` — the same arguments failed again every time they were repeated
      (``pattern.evidence["determinism"]``): a retry would fail too; no retries
      (``attempts = 0``, ``reduction = 0``, :meth:`changes` is empty);
    * ``observed`` — at least :data:`MIN_FOLLOW_UPS` failures were followed by another call
      of the tool in the same run: ``p = (s + 1) / (n + 2)`` of those succeeded (as the
      simulation's retry model), ``attempts`` the fewest with ``(1 − p)^attempts <= 1 %``
      (at most 5) and ``reduction = 1 − (1 − p)^attempts``;
    * ``independence`` — no such evidence: the attempts are sized as if failures were
      independent at the observed rate (``rate ** (attempts + 1) <= 1 %``), but nothing in
      the history says a retry succeeds, so ``reduction`` is None (unknown), not
      ``1 − rate^attempts``; ``independent_reduction`` keeps that figure for reference.

    ``backoff_ms`` makes the total wait ``backoff · (2^attempts − 1)`` cover the median
    in-run recovery delay."""

    attempts: int
    backoff_ms: int
    reduction: float | None  # failures the retries would have turned into successes; None: unknown
    failure_rate: float
    recovery_delay_ms: float | None
    model: str = "independence"
    p_retry_succeeds: float | None = None
    independent_reduction: float | None = None  # 1 − rate^attempts, what independence would give

    def changes(self, tool_name: str) -> list[Change]:
        if self.attempts <= 0:
            return []
        return [Change.config(tool_path(tool_name, "retry_attempts"), self.attempts),
                Change.config(tool_path(tool_name, "retry_backoff_ms"), self.backoff_ms)]

    def evidence(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_BACKOFF_MS = 1000
MIN_FOLLOW_UPS = 3


def retry_plan(pattern: Pattern, history: HistoryWindow) -> RetryPlan:
    rate = float(pattern.failure_rate)
    det = (getattr(pattern, "evidence", None) or {}).get("determinism") or {}
    _, delays = recovered_in_run(pattern, history)
    median = sorted(delays)[len(delays) // 2] if delays else None
    if det.get("verdict") == "deterministic":
        return RetryPlan(0, 0, 0.0, rate, median, "deterministic", 0.0)
    follow, follow_ok = int(det.get("followed_in_run") or 0), int(det.get("follow_up_succeeded") or 0)
    p = None
    if follow >= MIN_FOLLOW_UPS:
        p = (follow_ok + 1) / (follow + 2)
        attempts = next((n for n in range(1, 6) if (1 - p) ** n <= 0.01), 5)
        reduction, model = 1 - (1 - p) ** attempts, "observed"
    else:
        attempts = retries_needed(rate)
        reduction, model = None, "independence"
    backoff = min(30_000, max(250, nice_ceil_ms(median / (2 ** attempts - 1)))) if median is not None \
        else DEFAULT_BACKOFF_MS
    return RetryPlan(attempts, backoff, None if reduction is None else round(reduction, 4), rate, median, model,
                     None if p is None else round(p, 4), round(1 - rate ** attempts, 4))


class ModeledStrategy(Strategy):
    """A strategy whose config changes the built-in models can replay.

    When its ``simulate`` returns None, ``test`` replays the proposal's changes with the
    built-in models of :mod:`selfheal_plugin.lifecycle.simulation` (censored duration fits
    for timeouts, observed retry success for retries), which say "no model" for any change
    they do not cover."""

    replays_with_builtin_models: ClassVar[bool] = True
