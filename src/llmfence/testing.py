"""Helpers for testing code that uses llmfence: a fake clock."""

from __future__ import annotations

import time

__all__ = ["FakeClock"]


class FakeClock:
    """A clock that moves only when told to; pass `clock.now` where llmfence takes a clock.

    Args:
        start: The initial Unix time; defaults to the real current time.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start

    def now(self) -> float:
        """The current fake Unix time."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward and return the new time."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
        return self._now

    def set(self, moment: float) -> None:
        """Jump to a Unix time (forward only)."""
        self.advance(moment - self._now)
