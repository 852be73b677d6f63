"""The state `MemoryStore`'s ledger keeps, as small `__slots__` objects, and the refusals it
answers with: budget counters (and when one may be dropped), rate buckets, lease sets and
reservations."""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import _window
from ._types import BudgetScope, BudgetState, RateHit, Refusal, SlotRequest

__all__ = [
    "CLIENT_LEVELS",
    "CLIENT_PREFIX",
    "ENDED_GRACE",
    "PARALLEL_RETRY",
    "SWEEP_EVERY",
    "TOMBSTONE_TTL",
    "Bucket",
    "Budget",
    "Leases",
    "Reservation",
    "budget_refusal",
    "budget_room",
    "budget_state",
    "rate_refusal",
    "slot_refusal",
    "unhold",
]


SWEEP_EVERY = 4096
# A counter whose period ended is dropped only this long after the end: an admission may carry
# a `now` taken a little before the call (a request's start), and until its `now` has passed
# the end too, the old period's spend is still what it must read.
ENDED_GRACE = 60.0
# Levels whose counters the clients name (a body's `user`, a caller's address): their
# all-time `total` is not kept once they are idle. Counters of every other level are the
# operator's (global, team, user, key, models, projects) and keep their totals for ever.
CLIENT_LEVELS = frozenset({"end_user", "ip"})
CLIENT_PREFIX = "end_user:"
# A lease ends when its request does, which no store can predict: suggest a short retry.
PARALLEL_RETRY = 1.0
# How long a tombstone (a refund or release that came before its admission) turns a late
# admission of its request id into a no-op: as long as the default lease TTL, far past any
# store timeout, so an admission queued behind a stall still finds it.
TOMBSTONE_TTL = 600.0


@dataclass(slots=True)
class Budget:
    spent: int = 0
    total: int = 0
    end: float | None = None
    epoch: int = 0  # bumped at every roll, so settlement can tell the period changed
    held: int = 0  # live reservations holding this counter: it is never dropped while any do
    client: bool = False  # a client-named level (see `CLIENT_LEVELS`)

    def droppable(self, now: float) -> bool:
        """Whether a missing counter would answer every call exactly as this one does.

        A missing counter reads as zero spent, zero total, in a period that starts at the
        next touch. Kept: anything a live reservation holds (its settlement must land here);
        a period still running (or ended less than `ENDED_GRACE` ago); spend that never
        resets; and the all-time `total` of the operator's levels (key, user, team, global:
        the admin API shows it). Dropped: a counter that reads as zero in every respect (a
        refused request's roll, say), and an idle client-named counter (an end user) whose
        period has ended or whose spend without a period is zero: the only thing lost is its
        `total`, which no answer about an end user shows (the spend log keeps its records).
        """
        if self.held:
            return False
        if self.end is None:
            return not self.spent and (not self.total or self.client)
        return now >= self.end + ENDED_GRACE and (not self.total or self.client)

    def roll(self, period_end: float | None, now: float) -> None:
        if self.end is None:
            # First touch, or a duration configured since: the first period starts now.
            self.end = period_end
        elif now >= self.end:
            self.spent = 0
            self.end = period_end
            self.epoch += 1


@dataclass(slots=True)
class Bucket:
    """A rate counter (see `_window`): its level in units × window ms, written at `t` ms."""

    size_ms: int
    level: int = 0
    t: int = 0

    def idle(self, now_ms: int) -> bool:
        """Whether it is empty whatever the limit (it reads as full at most: one window)."""
        return now_ms - self.t >= self.size_ms


@dataclass(slots=True)
class Leases:
    """Leases held on one key: who holds one until when, and a heap to find the expired."""

    held: dict[str, float] = field(default_factory=dict)
    heap: list[tuple[float, str]] = field(default_factory=list)

    def add(self, lease_id: str, expires: float) -> None:
        self.held[lease_id] = expires
        heapq.heappush(self.heap, (expires, lease_id))

    def expire(self, now: float) -> None:
        # Only leases due by now are looked at, so a key with many requests in flight does not
        # pay for all of them on every admission.
        heap = self.heap
        while heap and heap[0][0] <= now:
            expires, lease_id = heapq.heappop(heap)
            if self.held.get(lease_id) == expires:
                del self.held[lease_id]
        if len(heap) > 2 * len(self.held) + 64:
            # Released leases leave stale heap entries; rebuild before they pile up.
            self.heap = [(e, lid) for lid, e in self.held.items()]
            heapq.heapify(self.heap)


@dataclass(slots=True)
class Reservation:
    expires: float
    cost: int
    # A counter a live reservation holds is never dropped (`Budget.held` counts them), so a
    # reservation holds its counters directly, each with its epoch at reservation time.
    budgets: list[tuple[Budget, int]]
    tokens: list[tuple[str, int, int, int]]  # (counter key, window ms, limit, units)
    requests: list[tuple[str, int, int, int]]  # the same, for request buckets
    slots: list[str]


def unhold(reservation: Reservation) -> None:
    for budget, _ in reservation.budgets:
        budget.held -= 1


# -- refusals: built only when a check fails -------------------------------------------------


def rate_refusal(hit: RateHit, bucket: Bucket, size: int, now_ms: int) -> Refusal:
    level = _window.drained(bucket.level, bucket.t, now_ms, size, hit.limit)
    retry = _window.retry_after_ms(level, size, hit.limit, hit.cost)
    used = hit.limit - _window.remaining(level, size, hit.limit)
    return Refusal(
        hit.kind, hit.level, hit.label, hit.limit, used, hit.cost,
        None if retry is None else retry / 1000,
    )  # fmt: skip


def slot_refusal(slot: SlotRequest, held: int) -> Refusal:
    return Refusal(
        "parallel_requests", slot.level, slot.label, slot.limit, held, 1,
        PARALLEL_RETRY if slot.limit > 0 else None,
    )  # fmt: skip


def budget_refusal(scope: BudgetScope, budget: Budget, cost: int, now: float) -> Refusal:
    assert scope.limit is not None  # only a limited level refuses
    resets_at = budget.end
    return Refusal(
        "budget", scope.level, scope.label, scope.limit, budget.spent, cost,
        None if resets_at is None else max(0.0, resets_at - now), resets_at,
    )  # fmt: skip


def budget_state(scope: BudgetScope, budget: Budget, now: float) -> BudgetState:
    """What a read of one budget level answers: a period that has ended reads as zero spent."""
    ended = budget.end is not None and now >= budget.end
    return BudgetState(
        scope.key,
        scope.level,
        scope.label,
        scope.limit,
        0 if ended else budget.spent,
        scope.period_end if ended or budget.end is None else budget.end,
        budget.total,
    )


def budget_room(
    scopes: Sequence[BudgetScope],
    budgets: Sequence[Budget],
    cost: int,
    now: float,
    refusal: Refusal | None,
    idle: bool,
) -> tuple[int | None, Refusal | None]:
    """The tightest room left under the levels' limits, and the first level `cost` does not
    fit (unless an earlier check refused already, or the admission takes nothing)."""
    headroom: int | None = None
    for scope, budget in zip(scopes, budgets, strict=True):
        limit = scope.limit
        if limit is not None:
            room = limit - budget.spent
            if headroom is None or room < headroom:
                headroom = room
            if refusal is None and not idle and cost > room:
                refusal = budget_refusal(scope, budget, cost, now)
    return headroom, refusal
