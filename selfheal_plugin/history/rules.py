"""Fix rules: a fix that worked, kept so it can be proposed again elsewhere.

A rule is a failure kind, a change template and the measured effect behind it::

    kind      timeout-like failures ("slow_tail"), from analysis.evidence
    template  [{"path": ["tools", "{tool}", "timeout_ms"], "op": "set", "value": 90000}]
    evidence  {"<home>:<subject>": {"source": "learned", "before": 0.31, "after": 0.02,
               "n_before": 900, "n_after": 870, "p_value": 1e-40, "worked": true, ...}, ...}

Rules come from three places (``source`` of each evidence entry): ``learned`` (a person's own
change to config.toml that was followed by a significant fall in errors, see
``agent self-heal learn``), ``verified`` (a selfheal improvement whose verification said
keep) and ``imported`` (entries read from a fix pack of another home). A rule's id is a hash
of its kind and template, so the same fix found in two homes is one rule, and evidence is
kept per origin (``home id : subject``): merging packs (import, sync) is a union per origin
where the newer measurement wins (``measured_at`` compared as instants), so importing a pack
twice counts nothing twice. An origin is ``<home id>:<tool>`` (:data:`HOME_ID`, the form
:func:`home_id` makes); an entry's ``home`` and ``subject`` say the same, its text is short and
holds no control character, its ``measured_at`` is an RFC 3339 instant (stored in selfheal's
one form). An entry passed on by another home's pack (*relayed*) never replaces one we hold:
only the home itself updates its measurements (:func:`merge_evidence`).

Templates hold only ``tools."{tool}"`` / ``servers."{server}"`` keys that the runtime's
schema knows, with values that schema accepts (``timeout_ms = -1`` or a ``preflight`` that
is a shell line is refused, as ToolPolicy and apply refuse them in config.toml): never a
path, a command or a secret, so a rule read from another home cannot choose what is written
where (``validate_template``).

``enabled`` is local to a home (``agent self-heal learn --disable RULE``): a disabled rule is
kept, listed, merged, and never used as a prior or proposed.
"""
from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import statistics
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping

from selfheal_plugin.errors import NotFoundError, UsageError
from selfheal_plugin.history import schema
from selfheal_plugin.history.connection import load_json, server_of, write_transaction
from selfheal_plugin.history.settings import change_key_problem
from selfheal_plugin.history.text import first_control
from selfheal_plugin.history.times import format_timestamp, parse_timestamp, utcnow
from selfheal_plugin.steps import step

SOURCES = ("learned", "verified", "imported")
TOOL = "{tool}"
SERVER = "{server}"
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_TEMPLATE_CHANGES = 8
MAX_ORIGINS = 1000
# the numbers an evidence entry may carry, and its text fields (all bounded)
EVIDENCE_NUMBERS = ("before", "after", "n_before", "n_after", "reduction", "p_value")
EVIDENCE_TEXT = ("source", "subject", "home", "measured_at", "note")
MAX_TEXT = 200
# a home's id as home_id() makes it (16 hex digits of a uuid4): an origin's first part, a
# pack's "home", the name of its file on a sync remote
HOME_ID = re.compile(r"^[0-9a-f]{16}$")
UNNAMED_HOME = "0" * 16  # the origin's home in rules a dry run shows before this home has an id


class RuleError(UsageError):
    """A rule or its template is not valid (one line, names what is wrong)."""


def _is_value(value: Any) -> bool:
    if isinstance(value, bool) or isinstance(value, int):
        return True
    if isinstance(value, float):
        return value == value and abs(value) != float("inf")
    if isinstance(value, str):
        return len(value) <= MAX_TEXT
    if isinstance(value, list):
        return len(value) <= 32 and all(_is_value(v) and not isinstance(v, list) for v in value)
    return False


def validate_template(template: Any) -> list[dict[str, Any]]:
    """The template as plain data, or :class:`RuleError`.

    Each entry is ``{"path": ["tools", "{tool}", KEY], "op": "set", "value": V}`` (or
    ``["servers", "{server}", KEY]``, or ``["tools", "{tool}", "circuit_breaker", KEY]``),
    or ``op = "delete"`` without a value. KEY is a key the runtime's schema declares."""
    if not isinstance(template, list) or not 1 <= len(template) <= MAX_TEMPLATE_CHANGES:
        raise RuleError(f"a rule's template must be a list of 1-{MAX_TEMPLATE_CHANGES} changes")
    out = []
    for i, entry in enumerate(template):
        if not isinstance(entry, dict) or set(entry) - {"path", "op", "value"}:
            raise RuleError(f"template change {i}: must be a table of path, op and value")
        path, op = entry.get("path"), entry.get("op", "set")
        if not isinstance(path, list) or not all(isinstance(p, str) for p in path):
            raise RuleError(f"template change {i}: path must be a list of keys")
        # what any change from outside our own commands may write (settings.change_key_problem), for a name
        # the rule leaves open ({tool} under [tools], {server} under [servers])
        if change_key_problem(path, op, entry.get("value")) is not None or \
                path[1] != {"tools": TOOL, "servers": SERVER}.get(path[0]):
            raise RuleError(f"template change {i}: {'.'.join(path)!r} is not a tool or server setting")
        if op == "set":
            if "value" not in entry or not _is_value(entry["value"]):
                raise RuleError(f"template change {i}: value must be a number, boolean, short string or list")
            _check_value(path, entry["value"], f"template change {i}:")
            out.append({"path": list(path), "op": "set", "value": entry["value"]})
        elif op == "delete" and "value" not in entry:
            out.append({"path": list(path), "op": "delete"})
        else:
            raise RuleError(f"template change {i}: op must be set (with a value) or delete")
    return out


def _check_value(path: list[str], value: Any, where: str) -> None:
    """The value as the runtime's schema checks it in config.toml (the model ToolPolicy and
    apply validate ``[tools."NAME"]`` / ``[servers."NAME"]`` with): :class:`RuleError` naming
    the key and what it must be. A circuit-breaker key is checked in a table whose other
    required keys hold valid values: the template sets one key, the file may hold the rest."""
    if path[0] == "servers":
        table, data = "server", {path[2]: value}
    elif len(path) == 4:
        table = "circuit_breaker"
        data = {k: sp.lo for k, sp in schema.CIRCUIT_BREAKER.items() if sp.default is schema.REQUIRED}
        data[path[3]] = value
    else:
        table, data = "tool", {path[2]: value}
    schema.validate(table, data, where, error=RuleError)


def template_from_changes(changes: list[Mapping[str, Any]], tool_name: str) -> list[dict[str, Any]] | None:
    """The template of an improvement's config changes for ``tool_name`` (None when a change
    is manual, touches another file, or names a table other than this tool's or its server's)."""
    server = server_of(tool_name)
    out = []
    for change in changes:
        if change.get("kind", "config") != "config" or change.get("file", "config.toml") != "config.toml":
            return None
        path = list(change.get("path") or [])
        if len(path) >= 3 and path[0] == "tools" and path[1] == tool_name:
            path[1] = TOOL
        elif len(path) >= 3 and path[0] == "servers" and server is not None and path[1] == server:
            path[1] = SERVER
        else:
            return None
        entry = {"path": path, "op": change.get("op", "set")}
        if entry["op"] == "set":
            entry["value"] = change.get("value")
        out.append(entry)
    try:
        return validate_template(out)
    except RuleError:
        return None


def instantiate(template: list[Mapping[str, Any]], tool_name: str) -> list[dict[str, Any]]:
    """The config changes (``Change.from_dict`` shape) of a template for one tool."""
    server = server_of(tool_name)
    out = []
    for entry in validate_template(list(template)):
        path = list(entry["path"])
        if path[1] == SERVER:
            if server is None:
                raise RuleError(f"rule sets a server setting but {tool_name!r} names no server")
            path[1] = server
        else:
            path[1] = tool_name
        change = {"kind": "config", "file": "config.toml", "path": path, "op": entry["op"]}
        if entry["op"] == "set":
            change["value"] = entry["value"]
        out.append(change)
    return out


def rule_id(failure_kind: str, template: list[Mapping[str, Any]]) -> str:
    key = json.dumps([failure_kind, validate_template(list(template))], sort_keys=True, separators=(",", ":"))
    return "rule-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def split_origin(origin: Any) -> tuple[str, str]:
    """(home id, tool) of an evidence origin ``<home id>:<tool>``, or :class:`RuleError`."""
    if isinstance(origin, str) and 0 < len(origin) <= MAX_TEXT and first_control(origin) is None:
        home, sep, tool = origin.partition(":")
        if sep and HOME_ID.match(home) and tool.strip():
            return home, tool
    shown = repr(origin[:40]) if isinstance(origin, str) else type(origin).__name__
    raise RuleError(f"evidence origin {shown} is not <home id>:<tool> (a home id is 16 hex digits; "
                    f"at most {MAX_TEXT} characters, no control characters)")


def _clean_entry(entry: Any, where: str, origin: tuple[str, str] | None = None) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise RuleError(f"{where}: evidence must be a table")
    out: dict[str, Any] = {}
    for k in EVIDENCE_NUMBERS:
        v = entry.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
            raise RuleError(f"{where}: {k} must be a number")
        out[k] = v
    for k in EVIDENCE_TEXT:
        v = entry.get(k)
        if v is None:
            continue
        if not isinstance(v, str) or len(v) > MAX_TEXT or first_control(v) is not None:
            raise RuleError(f"{where}: {k} must be text of at most {MAX_TEXT} characters without control "
                            "characters")
        out[k] = v
    if "measured_at" in out:
        try:
            out["measured_at"] = format_timestamp(parse_timestamp(out["measured_at"]))
        except ValueError:
            raise RuleError(f"{where}: measured_at {out['measured_at'][:40]!r} is not an RFC 3339 "
                            "timestamp") from None
    if origin is not None:
        for k, want in zip(("home", "subject"), origin):
            if k in out and out[k] != want:
                raise RuleError(f"{where}: its {k} {out[k][:40]!r} is not its origin's ({want[:40]!r})")
    if out.get("source") not in SOURCES:
        raise RuleError(f"{where}: source must be one of {', '.join(SOURCES)}")
    worked = entry.get("worked")
    if not isinstance(worked, bool):
        raise RuleError(f"{where}: worked must be true or false")
    out["worked"] = worked
    return out


_NEVER = datetime.min.replace(tzinfo=timezone.utc)


def measured_at(entry: Mapping[str, Any]) -> datetime:
    """When an evidence entry was measured, as an instant; the earliest instant when it does
    not say (or a stored row says something else: any real measurement replaces it)."""
    try:
        return parse_timestamp(entry.get("measured_at"))
    except (ValueError, AttributeError):
        return _NEVER


def merge_evidence(ours: Mapping[str, Any], theirs: Mapping[str, Any],
                   relayed: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """Union per origin; where both have an origin, the later ``measured_at`` wins (compared
    as instants). ``relayed``: origins of ``theirs`` passed on by a home other than the
    origin's own; such an entry is added where we have none and never replaces ours (only
    a home's own pack updates its measurements, so no pack can overwrite another home's)."""
    merged = dict(ours)
    for origin, entry in theirs.items():
        mine = merged.get(origin)
        if mine is None or (origin not in relayed and measured_at(entry) > measured_at(mine)):
            merged[origin] = entry
    return merged


def evidence_summary(evidence: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What evidence entries (one per origin) say together: places, worked, the median
    reduction where it worked, sources, and the one-line ``summary``
    ("worked in 3 of 4 places (median -88% errors)")."""
    worked = [e for e in evidence.values() if e.get("worked")]
    reductions = [e["reduction"] for e in worked if isinstance(e.get("reduction"), (int, float))]
    med = statistics.median(reductions) if reductions else None
    places = len(evidence)
    text = f"worked in {len(worked)} of {places} place{'s' if places != 1 else ''}"
    return {"places": places, "worked": len(worked), "median_reduction": med,
            "sources": sorted({str(e.get("source", "")) for e in evidence.values()}),
            "summary": text + (f" (median -{med:.0%} errors)" if med is not None else "")}


@dataclass
class Rule:
    id: str
    failure_kind: str
    description: str
    template: list[dict[str, Any]]
    evidence: dict[str, dict[str, Any]] = field(default_factory=dict)
    error_type: str | None = None
    enabled: bool = True
    created_at: str | None = None
    updated_at: str | None = None
    # origins of ``evidence`` a pack passed on for another home (see merge_evidence); not stored
    relayed: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    @property
    def places(self) -> int:
        return len(self.evidence)

    @property
    def worked(self) -> int:
        return evidence_summary(self.evidence)["worked"]

    @property
    def median_reduction(self) -> float | None:
        return evidence_summary(self.evidence)["median_reduction"]

    @property
    def sources(self) -> list[str]:
        return evidence_summary(self.evidence)["sources"]

    def summary(self) -> str:
        """"worked in 3 of 4 places (median -88% errors)"."""
        return evidence_summary(self.evidence)["summary"]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "failure_kind": self.failure_kind, "error_type": self.error_type,
                "description": self.description, "template": self.template, "evidence": self.evidence,
                "enabled": self.enabled, "created_at": self.created_at, "updated_at": self.updated_at,
                **evidence_summary(self.evidence)}

    @classmethod
    def build(cls, failure_kind: str, template: Any, description: str, evidence: Mapping[str, Any],
              error_type: str | None = None) -> Rule:
        """A validated rule (:class:`RuleError` names what is wrong). Used for rules found here
        and for every rule read from a pack: nothing unvalidated reaches the table."""
        if not isinstance(failure_kind, str) or not _KIND.match(failure_kind):
            raise RuleError(f"failure kind {str(failure_kind)[:40]!r} is not a kind name")
        if error_type is not None and (not isinstance(error_type, str) or not _KIND.match(error_type.lower())):
            raise RuleError(f"error type {str(error_type)[:40]!r} is not an error type name")
        if not isinstance(description, str) or not description.strip() or len(description) > MAX_TEXT:
            raise RuleError(f"a rule's description must be one line of at most {MAX_TEXT} characters")
        tmpl = validate_template(template)
        if not isinstance(evidence, Mapping) or len(evidence) > MAX_ORIGINS:
            raise RuleError(f"a rule's evidence must be a table of at most {MAX_ORIGINS} origins")
        ev = {}
        for origin, entry in evidence.items():
            ev[origin] = _clean_entry(entry, f"evidence {origin[:40]!r}", split_origin(origin))
        return cls(id=rule_id(failure_kind, tmpl), failure_kind=failure_kind,
                   description=" ".join(description.split()), template=tmpl, evidence=ev, error_type=error_type)


def home_id(conn: sqlite3.Connection) -> str:
    """This home's stable, random id (origin of its evidence in shared packs); made once."""
    row = conn.execute("SELECT value FROM selfheal_state WHERE key = 'home_id'").fetchone()
    if row:
        return row[0]
    with write_transaction(conn):
        conn.execute("INSERT OR IGNORE INTO selfheal_state (key, value) VALUES ('home_id', ?)",
                     (uuid.uuid4().hex[:16],))
    return conn.execute("SELECT value FROM selfheal_state WHERE key = 'home_id'").fetchone()[0]


class RuleStore:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn  # the table is created with selfheal's others (history.connection)

    @staticmethod
    def _row(row: sqlite3.Row | tuple) -> Rule:
        (rid, kind, error_type, description, template, evidence, enabled, created, updated) = tuple(row)
        return Rule(id=rid, failure_kind=kind, error_type=error_type, description=description,
                    template=load_json(template) or [], evidence=load_json(evidence) or {},
                    enabled=bool(enabled), created_at=created, updated_at=updated)

    _COLS = "id, failure_kind, error_type, description, template, evidence, enabled, created_at, updated_at"

    def get(self, rid: str) -> Rule:
        row = self.conn.execute(f"SELECT {self._COLS} FROM selfheal_rules WHERE id = ?", (rid,)).fetchone()
        if row is None:
            raise NotFoundError(f"no rule {rid!r} (see: {step('learn --rules')})")
        return self._row(row)

    def list(self, failure_kind: str | None = None, enabled_only: bool = False) -> list[Rule]:
        sql, params = f"SELECT {self._COLS} FROM selfheal_rules WHERE 1", []
        if failure_kind is not None:
            sql += " AND failure_kind = ?"
            params.append(failure_kind)
        if enabled_only:
            sql += " AND enabled = 1"
        return [self._row(r) for r in self.conn.execute(sql + " ORDER BY created_at, id", params)]

    def merge(self, rule: Rule) -> tuple[Rule, bool]:
        """Insert the rule or merge its evidence into the stored one (per origin, newer wins);
        ``enabled`` and ``created_at`` of a stored rule are kept. Returns the stored rule and
        whether anything changed."""
        now = format_timestamp(utcnow())
        with write_transaction(self.conn):
            row = self.conn.execute(f"SELECT {self._COLS} FROM selfheal_rules WHERE id = ?", (rule.id,)).fetchone()
            if row is None:
                self.conn.execute(
                    f"INSERT INTO selfheal_rules ({self._COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (rule.id, rule.failure_kind, rule.error_type, rule.description, json.dumps(rule.template),
                     json.dumps(rule.evidence, sort_keys=True), 1, now, now))
                changed = True
            else:
                stored = self._row(row)
                merged = merge_evidence(stored.evidence, rule.evidence, rule.relayed)
                changed = merged != stored.evidence
                if changed:
                    self.conn.execute("UPDATE selfheal_rules SET evidence = ?, updated_at = ? WHERE id = ?",
                                      (json.dumps(merged, sort_keys=True), now, rule.id))
        return self.get(rule.id), changed

    def set_enabled(self, rid: str, enabled: bool) -> tuple[Rule, bool]:
        """Turn the rule on or off; (the rule, whether it changed). A rule that already is so
        is left as it is, ``updated_at`` included."""
        self.get(rid)
        with write_transaction(self.conn):
            changed = self.conn.execute("UPDATE selfheal_rules SET enabled = ?, updated_at = ? WHERE id = ? "
                                        "AND enabled != ?", (int(enabled), format_timestamp(utcnow()), rid,
                                                             int(enabled))).rowcount == 1
        return self.get(rid), changed

    def merge_many(self, rules: list[Rule]) -> list[tuple[Rule, str]]:
        """:meth:`merge` for many rules in ONE transaction (all or nothing: an error rolls every
        one back). Returns each rule with ``added``, ``updated`` or ``unchanged``."""
        now = format_timestamp(utcnow())
        out: list[tuple[Rule, str]] = []
        with write_transaction(self.conn):
            for rule in rules:
                row = self.conn.execute(f"SELECT {self._COLS} FROM selfheal_rules WHERE id = ?",
                                        (rule.id,)).fetchone()
                if row is None:
                    self.conn.execute(
                        f"INSERT INTO selfheal_rules ({self._COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (rule.id, rule.failure_kind, rule.error_type, rule.description, json.dumps(rule.template),
                         json.dumps(rule.evidence, sort_keys=True), 1, now, now))
                    out.append((rule, "added"))
                    continue
                stored = self._row(row)
                merged = merge_evidence(stored.evidence, rule.evidence, rule.relayed)
                if merged == stored.evidence:
                    out.append((stored, "unchanged"))
                    continue
                self.conn.execute("UPDATE selfheal_rules SET evidence = ?, updated_at = ? WHERE id = ?",
                                  (json.dumps(merged, sort_keys=True), now, rule.id))
                stored.evidence = merged
                out.append((stored, "updated"))
        return out
