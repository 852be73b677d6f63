"""`MemoryStore`'s ledger: budget counters, rate buckets, leases and reservations.

The state lives in plain dicts of small `__slots__` objects, and every operation runs to
completion without awaiting, so on one event loop each is atomic by construction. `admit` is
the hot path of every metered request: it looks each counter up once, checks and reserves in a
few flat loops, and builds no object beyond the states its result must carry.

Memory grows with what the operator created, not with what clients send: a sweep, run every
`SWEEP_EVERY` admissions or every as many admissions as there are entries (whichever is more,
so its cost is amortized O(1) per admission), drops every entry a missing one would stand in
for (see `MemoryLedger._sweep`): idle rate buckets, empty lease sets, expired reservations, and
the budget counters that clients create and nobody needs any more (`Budget.droppable`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

from . import _window
from ._memory_state import (
    CLIENT_LEVELS,
    CLIENT_PREFIX,
    SWEEP_EVERY,
    TOMBSTONE_TTL,
    Bucket,
    Budget,
    Leases,
    Reservation,
    budget_room,
    budget_state,
    rate_refusal,
    slot_refusal,
    unhold,
)
from ._types import (
    Admission,
    AdmissionResult,
    BudgetScope,
    BudgetState,
    Refusal,
    Settlement,
)

__all__ = ["MemoryLedger"]

_ABSENT: Final = -1.0  # no tombstone (a stamped one expires at a caller's time, never < 0)


class MemoryLedger:
    """The ledger half of `MemoryStore`: every `LedgerStore` method but `settle`'s record.

    `MemoryStore.settle` appends the spend record, then calls `_settle` for the rest.
    """

    def __init__(self) -> None:
        self._budgets: dict[str, Budget] = {}
        self._buckets: dict[str, Bucket] = {}
        self._leases: dict[str, Leases] = {}
        self._reservations: OrderedDict[str, Reservation] = OrderedDict()
        # Request ids refunded or released before their admission, each until when it turns a
        # late admission into a no-op; `None` until the next sweep stamps it (a release
        # carries no time), so it lives at least `TOMBSTONE_TTL` of the callers' time.
        self._tombstones: dict[str, float | None] = {}
        self._until_sweep = 1  # the first admission sweeps (there is nothing to sweep yet)

    # -- the hot path ------------------------------------------------------------------------

    async def admit(self, admission: Admission) -> AdmissionResult:
        """Apply every check of one request atomically: all reserved, or nothing changed."""
        now = admission.now
        self._until_sweep -= 1
        if not self._until_sweep:
            self._sweep(now)
        now_ms = _window.to_ms(now)
        cost = admission.cost
        rates = admission.rates
        scopes = admission.budgets
        request_id = admission.request_id
        # A retried or duplicated admission, or one whose refund or release came first: it is
        # answered as admitted and takes nothing (see `_idle`).
        idle = self._idle(request_id, now)

        # Budgets roll whatever the verdict: a roll is what any later call would do first, so
        # a refusal changes nothing seen. Buckets are only read here (draining depends on the
        # limit, so a refusal writes none). Every check reads the state before any
        # reservation, so one pass finds the first refusing request and token buckets.
        seen: list[tuple[Bucket, int]] = []  # (bucket, window ms)
        refused_requests = refused_tokens = -1
        buckets = self._buckets
        drained = _window.drained
        for i, hit in enumerate(rates):
            size = int(hit.window * 1000)
            bucket = buckets.get(hit.key)
            if bucket is None:
                bucket = buckets[hit.key] = Bucket(size)
            seen.append((bucket, size))
            # _window: a hit fits iff level_now + cost × W ≤ limit × W.
            level = drained(bucket.level, bucket.t, now_ms, size, hit.limit)
            if level + hit.cost * size > hit.limit * size:
                if hit.kind == "requests":
                    if refused_requests < 0:
                        refused_requests = i
                elif refused_tokens < 0:
                    refused_tokens = i

        budgets: list[Budget] = []
        table = self._budgets
        for scope in scopes:
            budget = table.get(scope.key)
            if budget is None:
                budget = table[scope.key] = Budget(client=scope.level in CLIENT_LEVELS)
            budget.roll(scope.period_end, now)
            budgets.append(budget)

        # The checks, in order: request buckets, token buckets, leases, budgets.
        refusal: Refusal | None = None
        if idle:
            leases: list[Leases] = []
        else:
            if refused_requests >= 0 or refused_tokens >= 0:
                first = refused_requests if refused_requests >= 0 else refused_tokens
                bucket, size = seen[first]
                refusal = rate_refusal(rates[first], bucket, size, now_ms)
            leases = [self._live_leases(slot.key, now) for slot in admission.slots]
            if refusal is None:
                for slot, held in zip(admission.slots, leases, strict=True):
                    if len(held.held) >= slot.limit:
                        refusal = slot_refusal(slot, len(held.held))
                        break
        headroom, refusal = budget_room(scopes, budgets, cost, now, refusal, idle)

        if refusal is None and not idle:
            tokens: list[tuple[str, int, int, int]] = []
            requests: list[tuple[str, int, int, int]] = []
            for hit, (bucket, size) in zip(rates, seen, strict=True):
                # Hit by hit, so a key named twice takes both, as in admit.lua.
                bucket.level = (
                    drained(bucket.level, bucket.t, now_ms, size, hit.limit) + hit.cost * size
                )
                if now_ms > bucket.t:  # never backwards: a caller behind counts at `t`
                    bucket.t = now_ms
                entry = (hit.key, size, hit.limit, hit.cost)
                if hit.kind == "tokens":
                    tokens.append(entry)
                else:
                    requests.append(entry)
            for slot, held in zip(admission.slots, leases, strict=True):
                held.add(request_id, now + slot.ttl)
            for budget in budgets:
                budget.spent += cost
                budget.held += 1
            self._reservations[request_id] = Reservation(
                now + admission.ttl,
                cost,
                [(budget, budget.epoch) for budget in budgets],
                tokens,
                requests,
                [slot.key for slot in admission.slots],
            )

        # The states after the step (a key named twice shows both hits).
        rate_states = [
            _window.rate_state(hit, drained(bucket.level, bucket.t, now_ms, size, hit.limit), size)
            for hit, (bucket, size) in zip(rates, seen, strict=True)
        ]
        budget_states = [
            BudgetState(
                scope.key,
                scope.level,
                scope.label,
                scope.limit,
                budget.spent,
                budget.end,
                budget.total,
            )
            for scope, budget in zip(scopes, budgets, strict=True)
        ]
        return AdmissionResult(refusal, tuple(rate_states), tuple(budget_states), headroom)

    def _idle(self, request_id: str, now: float) -> bool:
        """Whether an admission of `request_id` must take nothing.

        True while the id holds a live reservation (a retried or duplicated admission) or a
        live tombstone (its refund or release came first). An expired reservation is dropped
        here, as a sweep would drop it, so the admission takes a new one.
        """
        reservation = self._reservations.get(request_id)
        if reservation is not None:
            if reservation.expires > now:
                return True
            del self._reservations[request_id]
            unhold(reservation)
        if self._tombstones:
            expires = self._tombstones.get(request_id, _ABSENT)
            return expires is None or expires > now
        return False

    def _settle(self, settlement: Settlement) -> bool | None:
        """Replace a reservation with the actual cost and free its leases (not the record).

        Returns:
            True if a live reservation was settled; False if none was (the settlement's
            `charges` took the cost instead); None if a tombstone stood for the id (nothing
            changes, no record is appended).
        """
        request_id = settlement.request_id
        reservation = self._reservations.pop(request_id, None)
        if reservation is not None:
            unhold(reservation)
            if reservation.expires > settlement.now:
                self._apply(reservation, settlement)
                # No tombstone: this store never loses a reply, so nothing sends it again.
                return True
        elif self._tombstones:
            expires = self._tombstones.get(request_id, _ABSENT)
            if expires is None or expires > settlement.now:
                return None
        # No reservation (its admission never reached the store, or there was none): the
        # cost lands where the caller says. Only a refund leaves a tombstone here: this store
        # never loses a reply, so no settlement is sent twice and no admission arrives late
        # but one a caller gave up on (a tombstone per request would grow with the traffic).
        if settlement.refund_requests:
            self._tombstones[request_id] = settlement.now + TOMBSTONE_TTL
        if settlement.charges:
            self._charge(settlement.charges, settlement.cost, settlement.now)
        return False

    def _apply(self, reservation: Reservation, settlement: Settlement) -> None:
        cost = settlement.cost
        delta = cost - reservation.cost
        for budget, epoch in reservation.budgets:
            if budget.epoch == epoch:
                budget.spent = max(0, budget.spent + delta)
            else:
                budget.spent += cost
            budget.total += cost
        now_ms = _window.to_ms(settlement.now)
        tokens = settlement.tokens
        if tokens is not None:
            for key, size, limit, units in reservation.tokens:
                self._adjust(key, size, limit, tokens - units, now_ms)
        if settlement.refund_requests:
            for key, size, limit, units in reservation.requests:
                self._adjust(key, size, limit, -units, now_ms)
        for key in reservation.slots:
            self._release(key, settlement.request_id)

    async def release(self, request_id: str, slot_keys: Sequence[str]) -> None:
        """Free a request's leases without settling anything.

        A release ahead of its admission leaves a tombstone: the late admission takes nothing.
        """
        for key in slot_keys:
            self._release(key, request_id)
        if request_id not in self._reservations and request_id not in self._tombstones:
            self._tombstones[request_id] = None

    # -- budgets outside a request -----------------------------------------------------------

    async def charge(self, scopes: Sequence[BudgetScope], cost: int, now: float) -> None:
        """Add spend at every level unconditionally."""
        self._charge(scopes, cost, now)

    def _charge(self, scopes: Sequence[BudgetScope], cost: int, now: float) -> None:
        table = self._budgets
        for scope in scopes:
            budget = table.get(scope.key)
            if budget is None:
                budget = table[scope.key] = Budget(client=scope.level in CLIENT_LEVELS)
            budget.roll(scope.period_end, now)
            budget.spent += cost
            budget.total += cost

    async def budgets(self, scopes: Sequence[BudgetScope], now: float) -> list[BudgetState]:
        """Read budget levels; a period that has ended reads as zero spent."""
        budgets = self._budgets
        return [budget_state(scope, budgets.get(scope.key, Budget()), now) for scope in scopes]

    async def reset_budget(self, key: str, period_end: float | None, now: float) -> None:
        """Start a new period for one budget counter now."""
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = Budget(client=key.startswith(CLIENT_PREFIX))
        budget.spent = 0
        budget.end = period_end
        budget.epoch += 1

    # -- internals ---------------------------------------------------------------------------

    def _adjust(self, key: str, size: int, limit: int, change: int, now_ms: int) -> None:
        """Move a bucket's level by `change` units now (never below empty).

        It drains by the limit the hit was admitted under: a settlement names no limit.
        """
        if not change:
            return
        bucket = self._buckets.get(key)
        if bucket is None:
            if change < 0:
                return  # a swept bucket was empty: nothing to give back
            bucket = self._buckets[key] = Bucket(size)
        level = _window.drained(bucket.level, bucket.t, now_ms, size, limit) + change * size
        bucket.level = level if level > 0 else 0
        if now_ms > bucket.t:
            bucket.t = now_ms

    def _live_leases(self, key: str, now: float) -> Leases:
        leases = self._leases.get(key)
        if leases is None:
            leases = self._leases[key] = Leases()
        leases.expire(now)
        return leases

    def _release(self, key: str, request_id: str) -> None:
        leases = self._leases.get(key)
        if leases is not None:
            leases.held.pop(request_id, None)

    def _sweep(self, now: float) -> None:
        """Drop what reads exactly as missing, and schedule the next sweep.

        Expired reservations (a settlement of one answers False either way) and tombstones
        (a release's, stamped at its first sweep, expire `TOMBSTONE_TTL` later); rate buckets
        that are empty whatever their limit (a missing one reads as empty); lease sets with no
        live lease; budget counters `Budget.droppable` says a missing one would stand in for.
        What is kept is bounded by the operator's keys, users and teams, and by the clients
        active within a period (or within a bucket's window). The next sweep comes after as
        many admissions as there are entries left (at least `SWEEP_EVERY`), so each
        admission pays O(1) for sweeps, and at most a constant factor of dead entries waits
        between two of them (an admission adds a bounded number).
        """
        reservations = self._reservations
        while reservations:
            request_id, reservation = next(iter(reservations.items()))
            if reservation.expires > now:
                break
            del reservations[request_id]
            unhold(reservation)
        now_ms = _window.to_ms(now)
        stale = [k for k, b in self._buckets.items() if b.idle(now_ms)]
        for key in stale:
            del self._buckets[key]
        for key in [k for k in self._leases if not self._live_leases(k, now).held]:
            del self._leases[key]
        for key in [k for k, b in self._budgets.items() if b.droppable(now)]:
            del self._budgets[key]
        tombstones = self._tombstones
        for request_id, expires in list(tombstones.items()):
            if expires is None:
                tombstones[request_id] = now + TOMBSTONE_TTL
            elif expires <= now:
                del tombstones[request_id]
        entries = (
            len(self._budgets)
            + len(self._buckets)
            + len(self._leases)
            + len(reservations)
            + len(tombstones)
        )
        self._until_sweep = max(SWEEP_EVERY, entries)

    def entry_counts(self) -> dict[str, int]:
        """How many entries each table holds now (for soaks and tests; nothing is swept)."""
        return {
            "budgets": len(self._budgets),
            "buckets": len(self._buckets),
            "leases": len(self._leases),
            "reservations": len(self._reservations),
            "tombstones": len(self._tombstones),
        }
