"""Clocks for the runtime side: the wall clock, and a simulated clock for workloads.

A clock is any callable returning an aware ``datetime``. :class:`RunRecorder` stamps
events with it and :class:`ToolPolicy` times its circuit breaker with it. When a clock
also has ``advance(seconds)`` (as :class:`SimulatedClock` does), the policy moves it on by
each call's duration and backoff, so a simulated week passes at the speed of the real
calls scaled by the policy's ``time_scale``.
"""
from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Callable

Clock = Callable[[], datetime]


def wall_clock() -> datetime:
    """Now, in UTC."""
    return datetime.now(timezone.utc)


class SimulatedClock:
    """A clock that only moves when told to (thread-safe).

    ``SimulatedClock(start)()`` returns the current simulated instant; ``advance`` moves it
    forward; ``set`` jumps forward to an instant (never back: time in a history is monotonic).
    """

    def __init__(self, start: datetime | None = None) -> None:
        start = start or wall_clock()
        if start.tzinfo is None:
            raise ValueError("SimulatedClock needs an aware datetime (with a timezone)")
        self._now = start.astimezone(timezone.utc)
        self._lock = threading.Lock()

    def __call__(self) -> datetime:
        return self._now

    def now(self) -> datetime:
        return self._now

    def advance(self, seconds: float | timedelta) -> datetime:
        delta = seconds if isinstance(seconds, timedelta) else timedelta(seconds=seconds)
        if delta < timedelta(0):
            raise ValueError(f"a clock cannot go back ({delta})")
        with self._lock:
            self._now += delta
            return self._now

    def set(self, when: datetime) -> datetime:
        """Jump to ``when`` if it is later than now; earlier instants leave the clock as it is."""
        if when.tzinfo is None:
            raise ValueError("SimulatedClock.set needs an aware datetime")
        with self._lock:
            when = when.astimezone(timezone.utc)
            if when > self._now:
                self._now = when
            return self._now

    def __repr__(self) -> str:
        return f"SimulatedClock({self._now.isoformat()})"


def runtime_timestamp(dt: datetime) -> str:
    """RFC 3339 the way the runtime writes it: UTC, nine fraction digits, ``+00:00``.

    ``2026-01-30T12:00:00.123456000+00:00`` (Python instants carry microseconds).
    """
    if dt.tzinfo is None:
        raise ValueError("timestamps need an aware datetime")
    utc = dt.astimezone(timezone.utc)
    return f"{utc:%Y-%m-%dT%H:%M:%S}.{utc.microsecond:06d}000+00:00"
