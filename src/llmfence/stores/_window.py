"""Sliding-window counter arithmetic, shared by the stores (the Lua scripts mirror it).

A counter keeps the count of the current fixed window (`cur`, window number `index`) and of the
one before (`prev`). The usage seen through a window of length `W` that ends now is
`cur + prev × (W − elapsed) / W`, where `elapsed` is how far into the current window now is.
Everything is computed in integer milliseconds and scaled by `W`, so the test is exact.

The `limits` library implements the same strategy, but its counters are keyed by the limit's
amount (a changed limit starts from zero), it cannot refund or top up a hit after the response,
and its storage cannot join the budget reservation in one atomic step; so the stores own the
arithmetic, and this module keeps it in one place.
"""

from __future__ import annotations

__all__ = ["fits", "remaining", "reset_after_ms", "retry_after_ms"]


def fits(cur: int, prev: int, elapsed: int, window: int, limit: int, cost: int) -> bool:
    """Whether `cost` more units fit under `limit` now."""
    # Every check of every admission comes here, so the weighted usage
    # `cur × window + prev × (window − elapsed)` is written out rather than called.
    return cur * window + prev * (window - elapsed) + cost * window <= limit * window


def remaining(cur: int, prev: int, elapsed: int, window: int, limit: int) -> int:
    """Whole units still available now."""
    left = (limit * window - cur * window - prev * (window - elapsed)) // window
    return left if left > 0 else 0


def reset_after_ms(cur: int, prev: int, elapsed: int, window: int) -> int:
    """Milliseconds until none of the current usage is seen through the window any more."""
    if cur > 0:
        return 2 * window - elapsed
    if prev > 0:
        return window - elapsed
    return 0


def retry_after_ms(
    cur: int, prev: int, elapsed: int, window: int, limit: int, cost: int
) -> int | None:
    """Milliseconds until `cost` units fit, or `None` if they never can (`cost > limit`)."""
    if cost > limit:
        return None
    excess = cur * window + prev * (window - elapsed) + (cost - limit) * window
    if excess <= 0:
        return 0
    left = window - elapsed
    # Still in this window: the previous window's weight decays by `prev` per millisecond.
    if prev > 0 and -(-excess // prev) < left:
        return -(-excess // prev)
    # In the next window, `cur` becomes the decaying previous count.
    excess_next = (cur + cost - limit) * window
    if excess_next <= 0:
        return left
    wait = -(-excess_next // cur)
    return left + wait if wait < window else left + window
