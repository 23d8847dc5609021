"""The ``selfheal_ab`` table: A/B experiments of fix strategies (see :mod:`selfheal_plugin.lifecycle.ab`).

One row per experiment: its pattern, its arms (improvement ids, fractions and the status
each had before), when it started, its status (``starting`` while its section is being
committed, then ``running``, ``ending`` while its section is being removed, then
``promoted`` or ``dropped``), the winner, the last verdict, the commits and the intent of an
edit in progress (``pending_op``, for crash recovery). Every status change is a
compare-and-set on the status read; an experiment's arm rows in ``improvements`` change in
the same transaction as the experiment's row, so the two never disagree.
"""
from __future__ import annotations

import json
import secrets
import sqlite3
from dataclasses import asdict, dataclass
from typing import Any

from selfheal_plugin.errors import NotFoundError, SelfHealError
from selfheal_plugin.history.connection import load_json, write_transaction
from selfheal_plugin.history.times import format_timestamp, utcnow
from selfheal_plugin.steps import step

AB_SCHEMA = """
CREATE TABLE IF NOT EXISTS selfheal_ab (
    id TEXT PRIMARY KEY,
    pattern_id TEXT NOT NULL,
    arms TEXT NOT NULL,
    started_at TEXT NOT NULL,
    status TEXT NOT NULL,
    winner TEXT,
    verdict TEXT,
    start_sha TEXT,
    end_sha TEXT,
    ended_at TEXT,
    forced INTEGER NOT NULL DEFAULT 0,
    notified TEXT,
    pending_op TEXT,
    updated_at TEXT NOT NULL
)
"""
AB_STATUSES = ("starting", "running", "ending", "promoted", "dropped")
ACTIVE = ("starting", "running", "ending")
_JSON = ("arms", "verdict", "pending_op")


class AbChangedError(SelfHealError):
    """The experiment (or one of its arms) is no longer in the status read; nothing was written."""


@dataclass
class AbExperiment:
    id: str
    pattern_id: str
    arms: list[dict[str, Any]]  # {"improvement_id", "fraction", "status_before"}
    started_at: str
    status: str
    winner: str | None = None
    verdict: dict[str, Any] | None = None
    start_sha: str | None = None
    end_sha: str | None = None
    ended_at: str | None = None
    forced: int = 0
    notified: str | None = None  # the verdict last notified (once per verdict)
    pending_op: dict[str, Any] | None = None
    updated_at: str = ""

    @property
    def arm_ids(self) -> list[str]:
        return [str(a.get("improvement_id")) for a in self.arms if isinstance(a, dict)]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("pending_op")
        return d

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "AbExperiment":
        data = dict(row)
        for k in _JSON:
            data[k] = load_json(data.get(k), default=None)
        if not isinstance(data.get("arms"), list):
            data["arms"] = []
        if not isinstance(data.get("verdict"), dict):
            data["verdict"] = None
        if not isinstance(data.get("pending_op"), dict):
            data["pending_op"] = None
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def new_ab_id() -> str:
    return f"ab-{utcnow().strftime('%Y%m%d')}-{secrets.token_hex(4)}"


def ensure_ab_schema(conn: sqlite3.Connection) -> None:
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='selfheal_ab'").fetchone():
        return
    with write_transaction(conn):
        conn.execute(AB_SCHEMA)


def has_ab_table(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='selfheal_ab'").fetchone() is not None


def _enc(key: str, value: Any) -> Any:
    return json.dumps(value) if key in _JSON and value is not None and not isinstance(value, str) else value


class AbStore:
    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        ensure_ab_schema(conn)

    def get(self, ab_id: str) -> AbExperiment:
        row = self.conn.execute("SELECT * FROM selfheal_ab WHERE id = ?", (ab_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no A/B experiment {ab_id!r} (see: {step('ab status')})")
        return AbExperiment.from_row(row)

    def list(self, status: str | tuple[str, ...] | None = None) -> list[AbExperiment]:
        sql, params = "SELECT * FROM selfheal_ab", []
        if status:
            wanted = (status,) if isinstance(status, str) else tuple(status)
            sql += f" WHERE status IN ({','.join('?' * len(wanted))})"
            params = list(wanted)
        sql += " ORDER BY julianday(started_at) DESC, id"
        return [AbExperiment.from_row(r) for r in self.conn.execute(sql, params)]

    def insert(self, exp: AbExperiment) -> AbExperiment:
        exp.updated_at = format_timestamp(utcnow())
        values = {k: _enc(k, v) for k, v in asdict(exp).items()}
        with write_transaction(self.conn):
            self.conn.execute(f"INSERT INTO selfheal_ab ({','.join(values)}) VALUES ({','.join('?' * len(values))})",
                              list(values.values()))
        return exp

    def delete(self, ab_id: str, expect_status: str) -> None:
        with write_transaction(self.conn):
            self.conn.execute("DELETE FROM selfheal_ab WHERE id = ? AND status = ?", (ab_id, expect_status))

    def update(self, ab_id: str, expect_status: str | tuple[str, ...], *,
               arms: list[tuple[str, tuple[str, ...], dict[str, Any]]] = (),  # type: ignore[assignment]
               **fields_: Any) -> AbExperiment:
        """Compare-and-set the experiment's row (and, in the same transaction, each arm
        ``(improvement id, expected statuses, improvement fields)``); any row not in the
        status expected: :class:`AbChangedError` and nothing is written."""
        expected = (expect_status,) if isinstance(expect_status, str) else tuple(expect_status)
        now = format_timestamp(utcnow())
        fields_["updated_at"] = now
        values = {k: _enc(k, v) for k, v in fields_.items()}
        with write_transaction(self.conn):
            cur = self.conn.execute(
                f"UPDATE selfheal_ab SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ? "
                f"AND status IN ({','.join('?' * len(expected))})", [*values.values(), ab_id, *expected])
            if cur.rowcount == 0:
                row = self.conn.execute("SELECT status FROM selfheal_ab WHERE id = ?", (ab_id,)).fetchone()
                if row is None:
                    raise NotFoundError(f"no A/B experiment {ab_id!r}")
                raise AbChangedError(f"{ab_id} changed meanwhile (now {row[0]}); nothing was changed")
            for imp_id, statuses, imp_fields in arms:
                imp_values = {k: (json.dumps(v) if isinstance(v, (dict, list)) else v)
                              for k, v in {**imp_fields, "updated_at": now}.items()}
                cur = self.conn.execute(
                    f"UPDATE improvements SET {', '.join(f'{k} = ?' for k in imp_values)} WHERE id = ? "
                    f"AND status IN ({','.join('?' * len(statuses))})", [*imp_values.values(), imp_id, *statuses])
                if cur.rowcount == 0:
                    row = self.conn.execute("SELECT status FROM improvements WHERE id = ?", (imp_id,)).fetchone()
                    raise AbChangedError(f"{imp_id} changed meanwhile (now {row[0] if row else 'gone'}); "
                                         "nothing was changed")
        return self.get(ab_id)
