"""Instants and time windows.

The runtime writes RFC 3339 with 0, 3, 6 or 9 fraction digits and any offset (``Z``,
``+00:00``, ``+02:00``). Strings with different offsets do not sort as instants, so every
comparison goes through :func:`parse_timestamp` (to an aware UTC datetime) or epoch seconds.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from selfheal_plugin.errors import UsageError

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?$"
)
_RELATIVE = re.compile(r"^([+-]?)(\d+)\s*([mhdw])$")
_UNIT = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_timestamp(text: str) -> datetime:
    """Parse an RFC 3339 timestamp into an aware UTC datetime (microsecond precision).

    A timestamp without an offset is taken as UTC. Raises ``ValueError`` on anything else.
    """
    if not isinstance(text, str):
        raise ValueError(f"not a timestamp: {text!r}")
    m = _RFC3339.match(text.strip())
    if not m:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    y, mo, d, h, mi, s, frac, z, sign, oh, om = m.groups()
    micro = int((frac or "0").ljust(6, "0")[:6])
    tz = timezone.utc
    if sign:
        delta = timedelta(hours=int(oh), minutes=int(om))
        if delta >= timedelta(hours=24):
            raise ValueError(f"offset out of range: {text!r}")
        tz = timezone(delta if sign == "+" else -delta)
    second = int(s)
    leap = second == 60  # RFC 3339 allows a leap second; fold it into the next second
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), 59 if leap else second, micro, tzinfo=tz)
        if leap:
            dt += timedelta(seconds=1)
        return dt.astimezone(timezone.utc)
    except (ValueError, OverflowError) as exc:  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValueError(f"timestamp out of range: {text!r}") from exc


def utc_text(text: str) -> str:
    """A runtime timestamp as UTC RFC 3339 text; the raw text when it does not parse."""
    try:
        return format_timestamp(parse_timestamp(text))
    except ValueError:
        return text


def to_epoch(text: str) -> float:
    return parse_timestamp(text).timestamp()


def format_timestamp(dt: datetime) -> str:
    """RFC 3339 in UTC with microseconds and ``Z``, the way selfheal writes its own rows."""
    utc = dt.astimezone(timezone.utc)
    # the year by hand: strftime's %Y writes year 1 as "1" on glibc, not "0001"
    return f"{utc.year:04d}" + utc.strftime("-%m-%dT%H:%M:%S.%fZ")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """Turn a window start into an instant.

    Accepts ``-7d``/``7d`` (days ago), ``-24h``, ``-30m``, ``-1w``, an ISO date
    (``2026-01-30``, midnight UTC) or an ISO/RFC 3339 datetime (``2026-01-30T14:00``,
    seconds and offset optional, UTC without one). Anything else raises
    :class:`UsageError` with one line saying what is accepted.
    """
    now = now or utcnow()
    text = (value or "").strip() if isinstance(value, str) else ""
    start: datetime | None = None
    m = _RELATIVE.match(text)
    if m:
        if m.group(1) == "+":
            raise UsageError(f"invalid time window {value!r}: a window reaches back, use -{m.group(2)}{m.group(3)}")
        try:
            start = now - timedelta(**{_UNIT[m.group(3)]: int(m.group(2))})
        except OverflowError:
            raise UsageError(f"invalid time window {value!r}: reaches back before year 1") from None
    if start is None:
        try:
            start = parse_timestamp(text)
        except ValueError:
            pass
    if start is None:  # what a person types: a date (midnight), minutes without seconds, a space for T
        try:
            start = datetime.fromisoformat(text)
            start = start.replace(tzinfo=timezone.utc) if start.tzinfo is None else start.astimezone(timezone.utc)
        except (ValueError, OverflowError):
            start = None
    if start is None:
        raise UsageError(
            f"invalid time window {value!r}: use -30m, -24h, -7d, -1w, 7d, an ISO date (2026-01-30) or datetime")
    if start > now:
        raise UsageError(f"invalid time window {value!r}: it starts in the future ({format_timestamp(start)})")
    return start
