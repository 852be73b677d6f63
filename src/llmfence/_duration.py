"""Budget durations: `"30s"`, `"30m"`, `"30h"`, `"30d"`, `"2w"`, `"3mo"` and the named periods.

A budget's period rolls on first touch, with no sweeper job: when a request arrives after the
period's end, the spend starts again from zero and a new period begins. A period is either

* **rolling** (the default, as LiteLLM's proxy and BudgetManager do it): periods follow one
  another from the budget's creation (`created_at + k × duration`) when the budget has one
  (keys, users, teams); the whole-app and end-user budgets have none, so each of their periods
  begins at the first request after the previous one ended; or
* **calendar-aligned** in UTC: it ends at the next boundary of the duration's unit — midnight for
  days, Monday 00:00 for weeks, the 1st of the month, 1 January — after `count` units counted from
  the start of the current unit.

Stores only ever compare the current time with a period's stored end and, when it has passed,
start a new period ending at `Duration.period_end(now)`; all calendar arithmetic lives here.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from .exceptions import ConfigurationError

__all__ = ["MAX_YEARS", "Duration", "parse_duration"]

Unit = Literal["s", "m", "h", "d", "w", "mo", "y"]

_SECONDS: dict[str, int] = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
_NAMED: dict[str, tuple[int, Unit]] = {
    "daily": (1, "d"),
    "weekly": (1, "w"),
    "monthly": (1, "mo"),
    "yearly": (1, "y"),
}
_PATTERN = re.compile(r"(\d{1,6})\s*(mo|s|m|h|d|w|y)")
MAX_YEARS = 100
"""The longest duration accepted: a period or a key lifetime must end within the calendar
`datetime` can name, and a budget that resets once a century in effect never resets."""
_MAX_SECONDS = MAX_YEARS * 366 * 86_400


@dataclass(frozen=True, slots=True)
class Duration:
    """A budget period length.

    Attributes:
        count: How many units.
        unit: `"s"`, `"m"`, `"h"`, `"d"`, `"w"`, `"mo"` or `"y"`.
        aligned: Whether periods are aligned to UTC calendar boundaries.
    """

    count: int
    unit: Unit
    aligned: bool = False

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"

    @property
    def seconds(self) -> int | None:
        """The fixed length in seconds, or `None` for months and years."""
        per_unit = _SECONDS.get(self.unit)
        return None if per_unit is None else per_unit * self.count

    def period_end(self, now: float, anchor: float | None = None) -> float:
        """When the period a budget is in at `now` ends (Unix seconds).

        Args:
            now: The current time.
            anchor: When the budget was created. Rolling periods then follow one another from
                it (`anchor + k × duration`); without one, a period starts at `now`.
        """
        if not self.aligned:
            if anchor is not None and anchor <= now:
                return self._anchored_end(now, anchor)
            seconds = self.seconds
            if seconds is not None:
                return now + seconds
            return _add_months(datetime.fromtimestamp(now, UTC), self._months()).timestamp()
        start = _unit_start(datetime.fromtimestamp(now, UTC), self.unit)
        if self.unit in ("mo", "y"):
            return _add_months(start, self._months()).timestamp()
        return (start + timedelta(seconds=_SECONDS[self.unit] * self.count)).timestamp()

    def _months(self) -> int:
        return self.count * (12 if self.unit == "y" else 1)

    def _anchored_end(self, now: float, anchor: float) -> float:
        """The first end of a period `anchor + k × duration` that is after `now`."""
        seconds = self.seconds
        if seconds is not None:
            return anchor + ((now - anchor) // seconds + 1) * seconds
        start, months = datetime.fromtimestamp(anchor, UTC), self._months()
        moment = datetime.fromtimestamp(now, UTC)
        # Whole periods elapsed, by the calendar, then stepped past `now` (month ends clamp).
        elapsed = (moment.year - start.year) * 12 + moment.month - start.month
        periods = max(0, elapsed // months - 1)
        end = _add_months(start, periods * months)
        while end.timestamp() <= now:
            periods += 1
            end = _add_months(start, periods * months)
        return end.timestamp()


def _unit_start(moment: datetime, unit: Unit) -> datetime:
    """The start of the calendar unit that contains `moment` (UTC)."""
    if unit == "s":
        return moment.replace(microsecond=0)
    if unit == "m":
        return moment.replace(second=0, microsecond=0)
    if unit == "h":
        return moment.replace(minute=0, second=0, microsecond=0)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if unit == "d":
        return day
    if unit == "w":
        return day - timedelta(days=day.weekday())
    if unit == "mo":
        return day.replace(day=1)
    return day.replace(month=1, day=1)


def _add_months(moment: datetime, months: int) -> datetime:
    # Clamp the day: one month after 31 January is the last day of February.
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def parse_duration(value: str | Duration, *, aligned: bool = False) -> Duration:
    """Parse a budget duration.

    Args:
        value: `"30s"`, `"30m"`, `"30h"`, `"30d"`, `"2w"`, `"3mo"`, `"1y"`, or `"daily"`,
            `"weekly"`, `"monthly"`, `"yearly"`. A `Duration` is returned as is.
        aligned: Align periods to UTC calendar boundaries instead of rolling from first use.

    Raises:
        ConfigurationError: The value is none of the forms above; the message names it.
    """
    if isinstance(value, Duration):
        return value
    if not isinstance(value, str):
        raise ConfigurationError(f"Invalid budget duration {value!r}: expected a string.")
    text = value.strip().lower()
    if text in _NAMED:
        count, unit = _NAMED[text]
        return Duration(count, unit, aligned)
    match = _PATTERN.fullmatch(text)
    if match is None or int(match[1]) == 0:
        raise ConfigurationError(
            f"Invalid budget duration {value!r}: use e.g. '30s', '30m', '30h', '30d', '2w', "
            "'3mo', '1y', or 'daily', 'weekly', 'monthly', 'yearly'."
        )
    duration = Duration(int(match[1]), match[2], aligned)  # type: ignore[arg-type]
    seconds = duration.seconds
    if (duration._months() if seconds is None else seconds) > (
        MAX_YEARS * 12 if seconds is None else _MAX_SECONDS
    ):
        raise ConfigurationError(
            f"Invalid budget duration {value!r}: at most {MAX_YEARS} years ('{MAX_YEARS}y')."
        )
    return duration
