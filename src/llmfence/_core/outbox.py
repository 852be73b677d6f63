"""The outbox: settlements the store did not take, sent again until it does.

A settlement is the end of a request: it refunds or tops up the reservation, frees the
request's leases and appends its spend record. One lost to a store outage would leave the
reservation charged and the leases held until they expire (a `max_parallel_requests=1` key
refused for the whole lease TTL), and the record missing. So a settlement the store does not
take goes here, and is sent again, oldest first, with exponential backoff, until the store
answers: by a background task that runs for the app's lifespan, after a later request's own
settlement proves the store is back, and at shutdown.

Sending one again is safe because settlements are exactly once per request id in the store
(`llmfence.stores`, "Settlement"): one that the store applied before its reply was lost is a
no-op the second time. That promise holds for the store's tombstone TTL (ten minutes), so a
settlement still pending after `max_age` (half of it) is dropped, logged and counted instead of
risking a second application: its reservation then ends with the store's reservation TTL and
its leases with their lease TTL.

The outbox is bounded (`capacity`): past it, the oldest entries are dropped the same way.
A hand-written deque rather than a queue library: the entries never leave the process, and
what matters is the bound, the order and the counters.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable

import anyio

from llmfence.exceptions import StoreError
from llmfence.stores import Settlement

__all__ = ["Outbox"]

logger = logging.getLogger("llmfence.outbox")

_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 2.0


class Outbox:
    """A bounded queue of settlements to send again, with the counters metrics read.

    Args:
        capacity: The most settlements kept; past it the oldest are dropped (logged, counted).
        max_age: Seconds a settlement may wait; past it, it is dropped (logged, counted).
        clock: A monotonic clock.
    """

    def __init__(
        self,
        *,
        capacity: int = 10_000,
        max_age: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.max_age = max_age
        self.clock = clock
        self._pending: deque[tuple[Settlement, float]] = deque()
        self._failures = 0
        self._next_try = 0.0
        self._wake: anyio.Event | None = None
        self._lock: anyio.Lock | None = None  # made on first use, inside the event loop
        self.running = False
        """Whether a background task drains this outbox (then requests leave it alone)."""
        self.queued = 0
        """How many settlements were ever put here."""
        self.delivered = 0
        """How many of them the store took on a later try."""
        self.dropped = 0
        """How many were given up (too old, or over capacity): each logged as an error."""

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def depth(self) -> int:
        """Settlements waiting to be sent again."""
        return len(self._pending)

    def put(self, settlements: Iterable[Settlement]) -> None:
        """Queue settlements the store did not take; they go out oldest first."""
        now = self.clock()
        pending = self._pending
        for settlement in settlements:
            pending.append((settlement, now))
            self.queued += 1
            if len(pending) > self.capacity:
                self._drop(pending.popleft()[0], "the outbox is full")
        if self._wake is not None:
            self._wake.set()

    def due(self) -> bool:
        """Whether something waits and its backoff has passed."""
        return bool(self._pending) and self.clock() >= self._next_try

    async def drain(
        self,
        send: Callable[[Settlement], Awaitable[object]],
        *,
        limit: int | None = None,
        wait: bool = False,
    ) -> bool:
        """Send waiting settlements, oldest first, until the store fails or `limit` were sent.

        Args:
            send: Sends one settlement; raises `StoreError` when the store does not take it.
            limit: The most to send in this call (a request's drain stays short).

            wait: Wait for a drain under way to end, then drain; else leave it to that one.

        Returns:
            Whether the outbox is empty (False while another drain is under way and `wait`
            is not set).
        """
        if self._lock is None:
            self._lock = anyio.Lock()
        if self._lock.locked() and not wait:
            return False
        async with self._lock:
            return await self._drain(send, limit)

    async def _drain(
        self, send: Callable[[Settlement], Awaitable[object]], limit: int | None
    ) -> bool:
        pending = self._pending
        sent = 0
        while pending and (limit is None or sent < limit):
            settlement, since = pending[0]
            if self.clock() - since > self.max_age:
                pending.popleft()
                self._drop(settlement, f"it waited over {self.max_age:g} s")
                continue
            try:
                await send(settlement)
            except StoreError:
                self._failures += 1
                backoff = min(_MAX_BACKOFF, _FIRST_BACKOFF * 2 ** (self._failures - 1))
                # Jitter, so the workers of one host do not all retry at the same instant.
                self._next_try = self.clock() + backoff * random.uniform(0.5, 1.0)
                return False
            # Not popped before the send: a cancelled send (shutdown) leaves it queued.
            if pending and pending[0][0] is settlement:
                pending.popleft()
            self.delivered += 1
            self._failures = 0
            sent += 1
        return not pending

    async def run(self, send: Callable[[Settlement], Awaitable[object]]) -> None:
        """Drain whenever something is due, until cancelled (the app's lifespan)."""
        self.running = True
        try:
            while True:
                if not self._pending:
                    self._wake = anyio.Event()
                    await self._wake.wait()
                    self._wake = None
                await anyio.sleep(max(0.0, self._next_try - self.clock()))
                if self._next_try > self.clock():  # the backoff grew meanwhile: wait again
                    continue
                await self.drain(send, wait=True)  # after any drain under way (a flush)
        finally:
            self.running = False
            self._wake = None

    def _drop(self, settlement: Settlement, why: str) -> None:
        self.dropped += 1
        logger.error(
            "llmfence dropped the settlement of request %s: %s (its reservation ends with "
            "the store's reservation TTL, its leases with theirs)",
            settlement.request_id,
            why,
        )
