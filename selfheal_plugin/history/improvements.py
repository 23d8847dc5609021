"""The ``improvements`` table: proposals and their lifecycle.

The table is the runtime's older shape migrated in place (see ``history``): its rows keep
``category``/``impact``/``related_runs``; ours fill the design document's columns plus the
ones in :data:`history.IMPROVEMENT_COLUMNS`. Rows written by the runtime load as
:class:`Improvement` too (``pattern_id`` None, ``category`` set).

States: proposed → (tested) → applied → verified | rolled_back; proposed → rejected;
proposed/tested → canary | shadow (an experiment section in config.toml) → applied
(promote) or back to proposed/tested (drop).
"""
from __future__ import annotations

import json
import secrets
import sqlite3
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable

from selfheal_plugin.errors import NotFoundError, SelfHealError
from selfheal_plugin.history.connection import load_json, table_columns, write_transaction
from selfheal_plugin.history.times import format_timestamp, utcnow
from selfheal_plugin.steps import step

STATUSES = ("proposed", "tested", "canary", "shadow", "applied", "verified", "rejected", "rolled_back", "superseded",
            "candidate", "ab", "ab_lost")
# "candidate": another fix for a pattern that already has its open proposal, kept for an A/B
# experiment; "ab": an arm of a running experiment; "ab_lost": an arm that lost (history).
OPEN_STATUSES = ("proposed", "tested", "canary", "shadow", "applied", "ab")
IN_FORCE = ("applied", "verified")  # a fix whose change config.toml holds now


def already_fixed(improvement_id: str | None, status: str | None, fix: str | None,
                  escape: Callable[[str], str] = str) -> str:
    """How every surface says that a pattern's fix is in force (:data:`IN_FORCE`) rather than
    suggesting it: ``Already fixed: imp-… applied (Increase the timeout …)`` — the inbox,
    ``detect``, ``show``, ``health``, auto-analysis. ``escape`` is where it lands (Markdown,
    the terminal)."""
    return f"Already fixed: {escape(str(improvement_id))} {escape(str(status))} ({escape(str(fix or ''))})"
REPLACEABLE = ("proposed", "tested")  # an open row not yet acted on: a new proposal may supersede it
# When a row last changed status: the instant its status has a column for (applied, verified,
# rolled back), else when the row was last written (a test stored, a rejection, a canary
# started or dropped, a proposal made); the runtime's older rows fall back on created_at. Not
# updated_at for an applied row: verification bookkeeping (a rescheduled check, an "extend")
# writes it without a change of status.
CHANGED_AT = ("coalesce(CASE status WHEN 'applied' THEN applied_at WHEN 'verified' THEN verified_at "
              "WHEN 'rolled_back' THEN rolled_back_at ELSE updated_at END, updated_at, proposed_at, created_at)")
_JSON_FIELDS = ("changes_required", "changes", "test_result", "metrics", "pending_op", "related_runs", "impact",
                "apply_record", "evidence", "experiment")


class StatusChangedError(SelfHealError):
    """A conditional update found the row in another status than the one it read (another
    command changed it meanwhile); nothing was written."""

    def __init__(self, improvement_id: str, expected: tuple[str, ...], actual: str):
        self.improvement_id, self.expected, self.actual = improvement_id, expected, actual
        super().__init__(f"{improvement_id} changed meanwhile (now {actual}); nothing was changed")


@dataclass
class Improvement:
    id: str
    status: str
    description: str
    pattern_id: str | None = None
    error_type: str | None = None
    tool_name: str | None = None
    strategy: str | None = None
    risk_level: str | None = None
    confidence: float | None = None
    expected_impact: str | None = None
    actual_impact: str | None = None
    changes_required: list[str] = field(default_factory=list)
    changes: list[dict[str, Any]] = field(default_factory=list)
    changes_made: str | None = None
    test_result: dict[str, Any] | None = None
    commit_sha: str | None = None
    verification_scheduled: str | None = None
    metrics: dict[str, Any] | None = None
    pending_op: dict[str, Any] | None = None
    rollback_sha: str | None = None
    proposed_at: str | None = None
    applied_at: str | None = None
    verified_at: str | None = None
    rolled_back_at: str | None = None
    evidence: dict[str, Any] | None = None
    apply_record: dict[str, Any] | None = None
    experiment: dict[str, Any] | None = None  # a canary/shadow test: section, fraction, start, commits
    created_at: str | None = None
    updated_at: str | None = None
    category: str | None = None
    related_runs: list[str] | None = None
    impact: Any = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Improvement":
        data = dict(row)
        kwargs: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if name not in data:
                continue
            value = data[name]
            if name in _JSON_FIELDS:
                value = load_json(value, default=None if name not in ("changes_required", "changes") else [])
                if name in ("changes_required", "changes") and not isinstance(value, list):
                    value = []
            kwargs[name] = value
        kwargs.setdefault("status", data.get("status") or "proposed")
        kwargs.setdefault("description", data.get("description") or "")
        return cls(**kwargs)


@dataclass(frozen=True)
class Replacement:
    """The open row a new proposal takes the place of: it becomes ``superseded`` (kept in
    history, ``evidence`` added to its own) in the write transaction that stores the new row,
    and only then. A row acted on meanwhile (no longer :data:`REPLACEABLE`) stands, and the
    new one is not stored."""

    improvement_id: str
    evidence: dict[str, Any]


def new_improvement_id() -> str:
    return f"imp-{utcnow().strftime('%Y%m%d')}-{secrets.token_hex(4)}"


class ImprovementStore:
    """Reads and writes ``improvements`` rows; every write is one short transaction."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.columns = set(table_columns(conn, "improvements"))

    def get(self, improvement_id: str) -> Improvement:
        row = self.conn.execute("SELECT * FROM improvements WHERE id = ?", (improvement_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no improvement {improvement_id!r} (see: {step('improvements')})")
        return Improvement.from_row(row)

    def list(self, status: str | None = None, limit: int | None = 20) -> list[Improvement]:
        """Rows, the latest status change first (:data:`CHANGED_AT`): the order of
        ``improvements`` and of the dashboard's recent improvements."""
        sql = "SELECT * FROM improvements"
        params: list[Any] = []
        if status:
            sql += " WHERE status = ?"
            params.append(status)
        # instants, not strings; julianday() keeps ~40 µs, so rows a detect proposed together fall back on the
        # text (ours all UTC to the µs) before the id
        sql += f" ORDER BY julianday({CHANGED_AT}) DESC NULLS LAST, {CHANGED_AT} DESC, id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [Improvement.from_row(r) for r in self.conn.execute(sql, params)]

    def open_for_pattern(self, pattern_id: str) -> Improvement | None:
        row = self._open_row(pattern_id)
        return Improvement.from_row(row) if row else None

    def open_for_patterns(self, pattern_ids: list[str]) -> dict[str, Improvement]:
        """:meth:`open_for_pattern` of each id that has one, read in one query per 500 ids."""
        return {pid: Improvement.from_row(row) for pid, row in self._open_rows(pattern_ids).items()}

    def in_force_for_patterns(self, pattern_ids: list[str]) -> dict[str, Improvement]:
        """Each pattern's latest fix in force (:data:`IN_FORCE`: applied or verified), for the
        ids that have one."""
        return {pid: Improvement.from_row(row) for pid, row in self._open_rows(pattern_ids, IN_FORCE).items()}

    def _open_row(self, pattern_id: str | None) -> sqlite3.Row | None:
        return self._open_rows([pattern_id]).get(pattern_id)

    def _open_rows(self, pattern_ids: list[str | None], statuses: tuple[str, ...] = OPEN_STATUSES
                   ) -> dict[str | None, sqlite3.Row]:
        """Each pattern's open row: of its rows in an open status (``statuses``), the latest proposed."""
        out: dict[str | None, sqlite3.Row] = {}
        for i in range(0, len(pattern_ids), 500):
            part = pattern_ids[i:i + 500]
            for row in self.conn.execute(
                    f"SELECT * FROM improvements WHERE pattern_id IN ({','.join('?' * len(part))}) "
                    f"AND status IN ({','.join('?' * len(statuses))}) "
                    "ORDER BY julianday(proposed_at) DESC", (*part, *statuses)):
                out.setdefault(row["pattern_id"], row)
        return out

    def _insert_row(self, imp: Improvement) -> None:
        """Stamp a new row's times and category and insert it (inside the caller's transaction)."""
        now = format_timestamp(utcnow())
        imp.proposed_at = imp.proposed_at or now
        imp.created_at = imp.created_at or now
        imp.updated_at = now
        imp.category = imp.category or "tool"
        values = self._row_values(imp)
        self.conn.execute(f"INSERT INTO improvements ({','.join(values)}) VALUES ({','.join('?' * len(values))})",
                          list(values.values()))

    def insert(self, imp: Improvement) -> Improvement:
        with write_transaction(self.conn):
            self._insert_row(imp)
        return imp

    def insert_unless_open(self, imp: Improvement, replaces: Replacement | None = None
                           ) -> tuple[Improvement, bool]:
        """Insert ``imp`` unless its pattern already has an open improvement; returns
        (the stored row, created). Check and insert share one write transaction, so two
        processes proposing for the same pattern at once still make one row. ``replaces``:
        the open row ``imp`` takes the place of, superseded in that same transaction (see
        :class:`Replacement`)."""
        return self.insert_many_unless_open([imp], [replaces])[0]

    def insert_many_unless_open(self, imps: list[Improvement], replaces: list[Replacement | None] | None = None
                                ) -> list[tuple[Improvement, bool]]:
        """:meth:`insert_unless_open` for several improvements in one write transaction (one
        commit, not one per row); results in order. ``replaces[i]``, when given, is the open
        row ``imps[i]`` replaces."""
        if not imps:
            return []
        out: list[tuple[Improvement, bool]] = []
        with write_transaction(self.conn):
            for imp, replaced in zip(imps, replaces or [None] * len(imps)):
                row = self._open_row(imp.pattern_id)
                if row is not None and replaced is not None and row["id"] == replaced.improvement_id \
                        and row["status"] in REPLACEABLE:
                    evidence = load_json(row["evidence"], default=None)
                    self.conn.execute(
                        "UPDATE improvements SET status = 'superseded', evidence = ?, updated_at = ? WHERE id = ?",
                        (json.dumps({**(evidence if isinstance(evidence, dict) else {}), **replaced.evidence}),
                         format_timestamp(utcnow()), row["id"]))
                    row = self._open_row(imp.pattern_id)
                if row is not None:
                    out.append((Improvement.from_row(row), False))
                else:
                    self._insert_row(imp)
                    out.append((imp, True))
        return out

    def update(self, improvement_id: str, *, expect_status: str | tuple[str, ...] | None = None,
               **fields_: Any) -> Improvement:
        """Set some fields of one row (JSON fields take Python values).

        With ``expect_status`` the update is a compare-and-set: it is made only while the
        row is still in that status (one, or any of a tuple), else nothing is written and
        :class:`StatusChangedError` says what the row is now.
        """
        fields_["updated_at"] = format_timestamp(utcnow())
        values = {k: self._encode(k, v) for k, v in fields_.items() if k in self.columns}
        expected = (expect_status,) if isinstance(expect_status, str) else tuple(expect_status or ())
        where, params = "id = ?", [improvement_id]
        if expect_status is not None:
            where += f" AND status IN ({','.join('?' * len(expected))})" if expected else " AND 0"
            params += list(expected)
        with write_transaction(self.conn):
            cur = self.conn.execute(
                f"UPDATE improvements SET {', '.join(f'{k} = ?' for k in values)} WHERE {where}",
                [*values.values(), *params])
            if cur.rowcount == 0:
                row = self.conn.execute("SELECT status FROM improvements WHERE id = ?", (improvement_id,)).fetchone()
                if row is None:
                    raise NotFoundError(f"no improvement {improvement_id!r}")
                raise StatusChangedError(improvement_id, expected, row[0])
        return self.get(improvement_id)

    def _row_values(self, imp: Improvement) -> dict[str, Any]:
        # The fields as they are (JSON ones are encoded here): asdict's deep copy of each
        # row's evidence cost 0.045 s for the 202 proposals of a first detect (0.009 s now).
        return {f.name: self._encode(f.name, getattr(imp, f.name)) for f in fields(imp) if f.name in self.columns}

    @staticmethod
    def _encode(key: str, value: Any) -> Any:
        if key in _JSON_FIELDS and value is not None and not isinstance(value, str):
            return json.dumps(value)
        return value
