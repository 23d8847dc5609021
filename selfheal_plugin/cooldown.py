"""Notify once per pattern per cooldown, across processes.

The auto-analysis hook (after a failed run) and the daemon's periodic detection both
tell the user about recurring patterns; a burst of failures, or detection every hour,
must not repeat the same news. The last-notified instant of each pattern is kept in
``selfheal_state`` under ``notified:pattern:<pattern id>``; checking and recording it
share one write transaction, so two processes reacting to the same burst notify once.
"""
from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta

from .history import get_state, set_state, write_transaction
from .times import format_timestamp, parse_timestamp

STATE_PREFIX = "notified:pattern:"


def claim_notification(conn: sqlite3.Connection, pattern_id: str, now: datetime, cooldown_minutes: float) -> bool:
    """True, with ``now`` recorded, when ``pattern_id`` was not notified in the
    ``cooldown_minutes`` before ``now``; False (nothing changed) otherwise.

    Instants are compared, not strings. A recorded instant later than ``now`` (an older
    run analysed after a newer one) counts as within the cooldown.
    """
    key = STATE_PREFIX + pattern_id
    with write_transaction(conn):
        last = get_state(conn, key)
        if last is not None:
            try:
                if now - parse_timestamp(last) < timedelta(minutes=cooldown_minutes):
                    return False
            except ValueError:
                pass  # a damaged value: notify and overwrite it
        set_state(conn, key, format_timestamp(now))
    return True


def last_notified(conn: sqlite3.Connection, pattern_id: str) -> datetime | None:
    value = get_state(conn, STATE_PREFIX + pattern_id)
    try:
        return parse_timestamp(value) if value else None
    except ValueError:
        return None
