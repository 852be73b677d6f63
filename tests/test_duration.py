from __future__ import annotations

from datetime import UTC, datetime

import pytest

from llmfence._duration import Duration, parse_duration
from llmfence.exceptions import ConfigurationError


def ts(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc, arg-type]


@pytest.mark.parametrize(
    ("text", "count", "unit", "seconds"),
    [
        ("30s", 30, "s", 30),
        ("30m", 30, "m", 1800),
        ("30h", 30, "h", 108_000),
        ("30d", 30, "d", 2_592_000),
        ("2w", 2, "w", 1_209_600),
        ("3mo", 3, "mo", None),
        ("1y", 1, "y", None),
        (" 10S ", 10, "s", 10),
        ("daily", 1, "d", 86_400),
        ("weekly", 1, "w", 604_800),
        ("monthly", 1, "mo", None),
        ("Yearly", 1, "y", None),
    ],
)
def test_parse(text: str, count: int, unit: str, seconds: int | None) -> None:
    duration = parse_duration(text)
    assert (duration.count, duration.unit, duration.seconds) == (count, unit, seconds)
    assert not duration.aligned
    assert parse_duration(duration) is duration


@pytest.mark.parametrize(
    "bad", ["", "30", "d", "30x", "-5d", "0d", "1.5h", "thirty days", "30 days", "1000000d"]
)
def test_bad_durations_name_the_value(bad: str) -> None:
    with pytest.raises(ConfigurationError, match=repr(bad).replace("(", r"\(")) as info:
        parse_duration(bad)
    assert isinstance(info.value, ValueError)


def test_non_string() -> None:
    with pytest.raises(ConfigurationError, match="30"):
        parse_duration(30)  # type: ignore[arg-type]


def test_rolling_period_ends() -> None:
    now = ts(2026, 1, 31, 15, 30)
    assert parse_duration("30s").period_end(now) == now + 30
    assert parse_duration("daily").period_end(now) == now + 86_400
    # One month after 31 January is the last day of February, same time of day.
    assert parse_duration("monthly").period_end(now) == ts(2026, 2, 28, 15, 30)
    assert parse_duration("2mo").period_end(now) == ts(2026, 3, 31, 15, 30)
    assert parse_duration("yearly").period_end(ts(2024, 2, 29)) == ts(2025, 2, 28)
    assert parse_duration("13mo").period_end(now) == ts(2027, 2, 28, 15, 30)


def test_aligned_period_ends() -> None:
    now = ts(2026, 11, 22, 6, 24, 13)  # a Sunday
    aligned = {
        text: parse_duration(text, aligned=True)
        for text in ("daily", "weekly", "monthly", "yearly", "30m", "2h", "30d", "10s")
    }
    assert aligned["daily"].period_end(now) == ts(2026, 11, 23)
    assert aligned["weekly"].period_end(now) == ts(2026, 11, 23)  # next Monday
    assert aligned["weekly"].period_end(ts(2026, 11, 23)) == ts(2026, 11, 30)
    assert aligned["monthly"].period_end(now) == ts(2026, 12, 1)
    assert aligned["monthly"].period_end(ts(2026, 12, 31, 23, 59)) == ts(2027, 1, 1)
    assert aligned["yearly"].period_end(now) == ts(2027, 1, 1)
    assert aligned["30m"].period_end(now) == ts(2026, 11, 22, 6, 54)
    assert aligned["2h"].period_end(now) == ts(2026, 11, 22, 8)
    assert aligned["30d"].period_end(now) == ts(2026, 12, 22)
    assert aligned["10s"].period_end(now) == ts(2026, 11, 22, 6, 24, 23)
    # A period that starts exactly on a boundary lasts the whole unit.
    assert aligned["daily"].period_end(ts(2026, 11, 22)) == ts(2026, 11, 23)


def test_str() -> None:
    assert str(Duration(30, "d")) == "30d"
    assert str(parse_duration("monthly")) == "1mo"


def test_rolling_periods_follow_one_another_from_the_anchor() -> None:
    created = ts(2026, 1, 31, 12)
    week = parse_duration("7d")
    assert week.period_end(created + 2 * 86_400, created) == created + 7 * 86_400
    assert week.period_end(created + 7 * 86_400, created) == created + 14 * 86_400
    assert week.period_end(created + 20 * 86_400, created) == created + 21 * 86_400
    monthly = parse_duration("monthly")
    assert monthly.period_end(ts(2026, 2, 10), created) == ts(2026, 2, 28, 12)
    assert monthly.period_end(ts(2026, 2, 28, 12), created) == ts(2026, 3, 31, 12)
    assert monthly.period_end(ts(2026, 5, 1), created) == ts(2026, 5, 31, 12)
    assert parse_duration("yearly").period_end(ts(2028, 3, 1), created) == ts(2029, 1, 31, 12)
    # An anchor in the future (a clock step back) starts the period now.
    assert week.period_end(created - 10, created) == created - 10 + 7 * 86_400
    # Calendar-aligned periods ignore the anchor.
    aligned = parse_duration("daily", aligned=True)
    assert aligned.period_end(ts(2026, 2, 10, 5), created) == ts(2026, 2, 11)
