"""Token-bucket arithmetic for RPM and TPM, shared by the stores (the Lua scripts mirror it).

A rate counter is a bucket: a `level` and the millisecond `t` it was last written at. A unit
(one request, one token) adds the window's length in milliseconds `W` to the level, and the
bucket drains at `limit` per millisecond, so a unit drains in `W / limit` ms, the rate's
interval, and a full bucket (`limit × W`, the burst) drains in one window. At `now`:

    level_now = max(0, min(level, limit × W) − (now − t) × limit)     (now < t reads as now = t)
    a hit of `cost` fits  iff  level_now + cost × W ≤ limit × W

This is GCRA in integers: a client at or under its rate (hits at least `W / limit` apart) is
never refused, a burst of up to `limit` is allowed, and a refused hit fits again after exactly
`ceil((level_now + cost × W − limit × W) / limit)` ms, never more than `W` since
`cost ≤ limit`. The level is kept in units × ms, not in the limit's terms (GCRA's theoretical
arrival time is), so a counter keyed by scope keeps what was used when its limit changes: the
current limit decides the drain and the bucket's size. A level above the size (a settlement's
top-up, a lowered limit) reads as a full bucket, so a wait is never longer than a window.
Times are integer milliseconds and levels integers, so both stores agree to the unit; the Lua
scripts, whose numbers are doubles, stay exact while `limit × W` is under 2^53 (150 billion a
minute, 104 million a day).

The `limits` library offers fixed, moving and sliding windows, but no bucket, and its counters
are keyed by the limit's amount (a changed limit starts from zero), a hit cannot be refunded or
topped up after the response, and its storage cannot join the budget reservation in one atomic
step; so the stores own the arithmetic, and this module keeps it in one place.
"""

from __future__ import annotations

from ._types import RateHit, RateState

__all__ = ["drained", "rate_state", "remaining", "reset_after_ms", "retry_after_ms", "to_ms"]


def to_ms(now: float) -> int:
    """A Unix time in integer milliseconds, rounded to the nearest.

    Rounding, not truncating: `t + wait / 1000` may land a hair under the millisecond it
    names, and must still count as that millisecond.
    """
    return int(now * 1000 + 0.5)


def drained(level: int, t: int, now: int, window: int, limit: int) -> int:
    """The level at `now` (ms) of a bucket written at `t` with `level`."""
    # Every check of every admission comes here, so it stays a few integer operations.
    size = limit * window
    if level > size:
        level = size
    if now > t:
        level -= (now - t) * limit
    return level if level > 0 else 0


def remaining(level: int, window: int, limit: int) -> int:
    """Whole units that fit now in a bucket at `level`."""
    left = (limit * window - level) // window
    return left if left > 0 else 0


def reset_after_ms(level: int, limit: int) -> int:
    """Milliseconds until a bucket at `level` is empty again."""
    return -(-level // limit) if level > 0 else 0


def retry_after_ms(level: int, window: int, limit: int, cost: int) -> int | None:
    """Milliseconds until `cost` units fit, or `None` if they never can (`cost > limit`)."""
    if cost > limit:
        return None
    excess = level + (cost - limit) * window
    # `excess > 0` implies `limit > 0`: with `limit` 0, `cost` and the drained level are 0.
    return -(-excess // limit) if excess > 0 else 0


def rate_state(hit: RateHit, level: int, window: int) -> RateState:
    """A window's state for the headers, from its bucket's drained `level` (both stores)."""
    return RateState(
        hit.key,
        hit.kind,
        hit.level,
        hit.limit,
        remaining(level, window, hit.limit),
        reset_after_ms(level, hit.limit) / 1000,
        hit.window,
    )
