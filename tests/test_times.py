from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, strategies as st

from selfheal_plugin.errors import UsageError
from selfheal_plugin.history.times import format_timestamp, parse_since, parse_timestamp

NOW = datetime(2026, 1, 30, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize("text, expected", [
    ("2026-01-30T12:00:00.123456789+00:00", datetime(2026, 1, 30, 12, 0, 0, 123456, tzinfo=timezone.utc)),
    ("2026-01-30T12:00:00Z", datetime(2026, 1, 30, 12, tzinfo=timezone.utc)),
    ("2026-01-30T14:00:00+02:00", datetime(2026, 1, 30, 12, tzinfo=timezone.utc)),
    ("2026-01-30T07:00:00.5-05:00", datetime(2026, 1, 30, 12, 0, 0, 500000, tzinfo=timezone.utc)),
    ("2026-01-30T12:00:00.123+00:00", datetime(2026, 1, 30, 12, 0, 0, 123000, tzinfo=timezone.utc)),
    ("2026-01-30 12:00:00", datetime(2026, 1, 30, 12, tzinfo=timezone.utc)),
])
def test_parse_timestamp_variants(text, expected):
    assert parse_timestamp(text) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01T00:00:00Z", "2026-01-30T12:00:00+24:00",
                                  "2026-01-30T12:00", "2026-01-30T12:00:00.1234567890Z", None, 17,
                                  "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_parse_timestamp_rejects(text):
    with pytest.raises(ValueError):
        parse_timestamp(text)


def test_instants_not_strings():
    # As strings these sort the wrong way round; as instants the +02:00 one is earlier.
    a, b = "2026-01-30T13:00:00+02:00", "2026-01-30T12:00:00Z"
    assert a > b and parse_timestamp(a) < parse_timestamp(b)


@given(
    st.datetimes(min_value=datetime(1971, 1, 2), max_value=datetime(9998, 12, 30), timezones=st.just(timezone.utc)),
    st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59),
    st.sampled_from([0, 3, 6, 9]),
    st.integers(min_value=0, max_value=999),
    st.booleans(),
)
def test_parse_roundtrip_any_runtime_shape(instant, offset_min, digits, nanos, use_z):
    """Whatever shape the runtime writes an instant in, it parses back to that instant
    (to the microsecond; nanoseconds are truncated)."""
    offset = timedelta(minutes=offset_min)
    local = instant.astimezone(timezone(offset))
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{local.microsecond:06d}{nanos:03d}"[:digits]
    if use_z and offset_min == 0:
        text += "Z"
    else:
        sign = "+" if offset_min >= 0 else "-"
        text += f"{sign}{abs(offset_min) // 60:02d}:{abs(offset_min) % 60:02d}"
    truncated = instant.replace(microsecond=int(f"{instant.microsecond:06d}"[:min(digits, 6)].ljust(6, "0")))
    assert parse_timestamp(text) == truncated


@given(st.datetimes(min_value=datetime(1971, 1, 2), max_value=datetime(9998, 12, 30), timezones=st.just(timezone.utc)))
def test_format_parse_roundtrip(instant):
    assert parse_timestamp(format_timestamp(instant)) == instant


def test_format_writes_a_four_digit_year():
    """strftime's %Y writes year 1 as "1" on glibc: not an RFC 3339 timestamp, nor re-readable."""
    early = datetime(1, 1, 1, tzinfo=timezone.utc)
    assert format_timestamp(early) == "0001-01-01T00:00:00.000000Z"
    assert parse_timestamp(format_timestamp(early)) == early
    assert format_timestamp(datetime(999, 3, 4, 5, 6, 7, 8, tzinfo=timezone.utc)) == "0999-03-04T05:06:07.000008Z"


@pytest.mark.parametrize("value, delta", [
    ("-7d", timedelta(days=7)), ("7d", timedelta(days=7)), ("-24h", timedelta(hours=24)),
    ("-30m", timedelta(minutes=30)), ("-1w", timedelta(weeks=1)), ("-0d", timedelta(0)),
])
def test_relative_windows(value, delta):
    assert parse_since(value, NOW) == NOW - delta


def test_absolute_windows():
    assert parse_since("2026-01-01", NOW) == datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_since("2026-01-01T06:00:00+02:00", NOW) == datetime(2026, 1, 1, 4, tzinfo=timezone.utc)
    # as a person types them: minutes without seconds, a space for T, an offset or none (UTC)
    assert parse_since("2026-01-01T06:00", NOW) == datetime(2026, 1, 1, 6, tzinfo=timezone.utc)
    assert parse_since("2026-01-01 06:00+02:00", NOW) == datetime(2026, 1, 1, 4, tzinfo=timezone.utc)


@pytest.mark.parametrize("value", ["-7x", "seven days", "", "+7d", "-d", "7 days ago", "2026-02-30",
                                   "-99999999d", "-9999999999999999999999h", "2030-01-01", "2026-01-30T12:00:01Z"])
def test_bad_windows_are_usage_errors(value):
    with pytest.raises(UsageError, match="invalid time window"):
        parse_since(value, NOW)


@given(st.one_of(st.text(max_size=12),
                 st.builds(lambda n, u: f"-{n}{u}", st.integers(min_value=0, max_value=10**30), st.sampled_from("mhdw")),
                 st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())))
def test_parse_since_never_crashes(text):
    try:
        result = parse_since(text, NOW)
    except UsageError:
        return
    assert result.tzinfo is not None
