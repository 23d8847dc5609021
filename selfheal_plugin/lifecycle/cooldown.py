"""Cooldowns: notify once per pattern per cooldown, and do not re-apply an undone change.

*Notifications.* The auto-analysis hook (after a failed run) and the daemon's periodic
detection both tell the user about recurring patterns; a burst of failures, or detection
every hour, must not repeat the same news. The last-notified instant of each pattern is
kept in ``selfheal_state`` under ``notified:pattern:<pattern id>``; checking and recording
it share one write transaction, so two processes reacting to the same burst notify once.

*Undone changes.* After a rollback the pattern comes back, and detection proposes the
same fix again (often with a slightly different value: the history moved on).
:func:`undone_same_change` finds an earlier improvement of the same pattern that changed
the same settings (the same keys and operations, whatever the values, plus the same
manual steps) and was rolled back (or rejected) within :data:`REAPPLY_COOLDOWN_DAYS`:
the daemon does not auto-apply such a proposal (a person still may), and a new proposal
carries a note saying so.
"""
from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timedelta
from typing import Any

from selfheal_plugin.history.connection import get_state, set_state, write_transaction
from selfheal_plugin.history.improvements import Improvement
from selfheal_plugin.history.times import format_timestamp, parse_timestamp, utcnow

STATE_PREFIX = "notified:pattern:"
REAPPLY_COOLDOWN_DAYS = 30  # no automatic re-apply of a change rolled back / rejected this recently


def claim_notification(conn: sqlite3.Connection, pattern_id: str, now: datetime, cooldown_minutes: float) -> bool:
    """True, with ``now`` recorded, when ``pattern_id`` was not notified in the
    ``cooldown_minutes`` before ``now``; False (nothing changed) otherwise.

    Instants are compared, not strings. A recorded instant later than ``now`` (an older
    run analysed after a newer one) counts as within the cooldown.
    """
    return claim_once(conn, STATE_PREFIX + pattern_id, now, timedelta(minutes=cooldown_minutes))


def claim_notifications(conn: sqlite3.Connection, pattern_ids: list[str], now: datetime,
                        cooldown_minutes: float) -> list[str]:
    """:func:`claim_notification` for several patterns in one write transaction (one commit,
    not one per pattern); returns the ids claimed, in order."""
    cooldown = timedelta(minutes=cooldown_minutes)
    if not pattern_ids:
        return []
    with write_transaction(conn):
        return [pid for pid in pattern_ids if _claim(conn, STATE_PREFIX + pid, now, cooldown)]


def release_notifications(conn: sqlite3.Connection, pattern_ids: list[str], now: datetime) -> None:
    """Undo :func:`claim_notifications` of ``now`` for ``pattern_ids`` when their notification
    was delivered nowhere (an inbox that cannot be written): the next detection tells them.
    A mark another process wrote since (another instant) is left alone."""
    if not pattern_ids:
        return
    with write_transaction(conn):
        conn.executemany("DELETE FROM selfheal_state WHERE key = ? AND value = ?",
                         [(STATE_PREFIX + pid, format_timestamp(now)) for pid in pattern_ids])


def claim_once(conn: sqlite3.Connection, key: str, now: datetime, cooldown: timedelta | None = None) -> bool:
    """True, with ``now`` recorded under ``key``, when nothing was recorded there within
    ``cooldown`` before ``now`` (``None``: ever); False (nothing changed) otherwise."""
    with write_transaction(conn):
        return _claim(conn, key, now, cooldown)


def _claim(conn: sqlite3.Connection, key: str, now: datetime, cooldown: timedelta | None) -> bool:
    last = get_state(conn, key)
    if last is not None:
        if cooldown is None:
            return False
        try:
            if now - parse_timestamp(last) < cooldown:
                return False
        except ValueError:
            pass  # a damaged value: notify and overwrite it
    set_state(conn, key, format_timestamp(now))
    return True


def forget(conn: sqlite3.Connection, key: str) -> None:
    with write_transaction(conn):
        conn.execute("DELETE FROM selfheal_state WHERE key = ?", (key,))


def last_notified(conn: sqlite3.Connection, pattern_id: str) -> datetime | None:
    value = get_state(conn, STATE_PREFIX + pattern_id)
    try:
        return parse_timestamp(value) if value else None
    except ValueError:
        return None


def change_key(changes: list[Any]) -> str:
    """What a change set touches, canonically: each config change's file, key path and
    operation (not its value), and each manual step's text; order does not matter."""
    out = []
    for raw in changes or []:
        ch = raw.to_dict() if hasattr(raw, "to_dict") else raw
        if isinstance(ch, dict) and ch.get("kind", "config") == "config":
            ch = {"kind": "config", "file": ch.get("file") or "config.toml", "path": ch.get("path"),
                  "op": ch.get("op") or "set"}
        out.append(json.dumps(ch, sort_keys=True, default=str))
    return json.dumps(sorted(out))


def undone_same_change(conn: sqlite3.Connection, pattern_id: str | None, changes: list[Any], now: datetime,
                       days: float = REAPPLY_COOLDOWN_DAYS, exclude: str | None = None) -> Improvement | None:
    """The latest improvement of ``pattern_id`` that changed the same settings (see
    :func:`change_key`) as ``changes`` and was rolled
    back (at ``rolled_back_at``) or rejected (last updated) less than ``days`` before
    ``now``; None when there is none. A moment that does not parse counts as recent."""
    if not pattern_id or not changes:
        return None
    key = change_key(changes)
    found: tuple[datetime | None, Improvement] | None = None
    rows = conn.execute("SELECT * FROM improvements WHERE pattern_id = ? AND status IN ('rolled_back', 'rejected')",
                        (pattern_id,)).fetchall()
    for row in rows:
        imp = Improvement.from_row(row)
        if imp.id == exclude or change_key(imp.changes) != key:
            continue
        stamp = imp.rolled_back_at if imp.status == "rolled_back" else imp.updated_at
        try:
            when = parse_timestamp(stamp) if stamp else None
        except ValueError:
            when = None
        if when is not None and now - when >= timedelta(days=days):
            continue
        if found is None or (when is not None and found[0] is not None and when > found[0]):
            found = (when, imp)
    return found[1] if found else None


def undone_note(imp: Improvement) -> str:
    """The evidence note a new proposal gets when the same change was undone before."""
    when = imp.rolled_back_at if imp.status == "rolled_back" else imp.updated_at
    verb = "rolled back" if imp.status == "rolled_back" else "rejected"
    return (f"a fix with the same changes ({imp.id}) was {verb} on {when or 'an unknown date'}; the daemon will not "
            f"apply it automatically for {REAPPLY_COOLDOWN_DAYS} days after that")


def mark_if_undone(conn: sqlite3.Connection, imp: Improvement, now: datetime | None = None) -> Improvement:
    """Before a new proposal is stored: when the same change was rolled back or rejected
    within the cooldown, say so in its evidence (``same_change_undone``: note and id); a
    person can still decide to apply it."""
    earlier = undone_same_change(conn, imp.pattern_id, imp.changes, now or utcnow(), exclude=imp.id)
    if earlier is not None:
        imp.evidence = {**(imp.evidence or {}), "same_change_undone": {
            "improvement_id": earlier.id, "status": earlier.status, "note": undone_note(earlier)}}
    return imp


def undone_before(imp: Improvement) -> dict[str, Any] | None:
    """What :func:`mark_if_undone` noted on ``imp`` when it was proposed (``improvement_id``,
    ``status``, ``note``), or None: shown where a person decides (detect's proposal line, the
    apply prompt, the proposal's result)."""
    found = (imp.evidence or {}).get("same_change_undone")
    return found if isinstance(found, dict) and isinstance(found.get("note"), str) else None
