"""`SQLiteStore`'s ledger: admissions, settlements, leases and budget counters.

Each operation is one job on the store's thread and one write transaction (`BEGIN IMMEDIATE`):
it loads the rows it touches into `MemoryStore`'s state objects (`_sqlite_state`), runs
`MemoryLedger`'s steps on them in the same order, and writes back what changed. Every worker
process on the host takes the same write lock on the same file, so an admission reserves at
every level or at none, and no two processes ever admit against the same stale read.

Settlement follows the rules for a store whose calls can lose a reply (it does not set
`never_suspends`): a settled reservation leaves a tombstone, so the same settlement sent again
is a no-op; a settlement of an id with no live reservation charges its `charges`, appends its
record and leaves a tombstone; one of a tombstoned id changes nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from . import _window
from ._memory_state import (
    CLIENT_LEVELS,
    CLIENT_PREFIX,
    SWEEP_EVERY,
    Budget,
    budget_room,
    budget_state,
    rate_refusal,
    slot_refusal,
)
from ._sqlite_base import SQLiteBase, db_int, dumps, loads
from ._sqlite_records import append_record
from ._sqlite_state import (
    Buckets,
    Budgets,
    delete_leases,
    entry_counts,
    live_tombstone,
    sweep,
    tombstone,
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

__all__ = ["SQLiteLedger"]


class SQLiteLedger(SQLiteBase):
    """The ledger half of `SQLiteStore`: every `LedgerStore` method."""

    _max_records: int
    _until_sweep: int = 1  # a process's first admission sweeps

    async def admit(self, admission: Admission) -> AdmissionResult:
        """Apply every check of one request atomically: all reserved, or nothing changed."""
        self._until_sweep -= 1
        sweeping = self._until_sweep <= 0
        if sweeping:
            self._until_sweep = SWEEP_EVERY  # until the sweep says how many rows are left
        result, left = await self._write("admit", _admit, admission, sweeping)
        if left is not None:
            self._until_sweep = max(SWEEP_EVERY, left)
        return result

    async def settle(self, settlement: Settlement) -> bool:
        """Settle a reservation with the actual cost, release its leases, append its record.

        Exactly once per request id: see the settlement rules in `llmfence.stores`.
        """
        return await self._write("settle", _settle, settlement, self._max_records)

    async def release(self, request_id: str, slot_keys: Sequence[str]) -> None:
        """Free a request's leases without settling anything.

        A release ahead of its admission leaves a tombstone: the late admission takes nothing.
        """
        await self._write("release", _release, request_id, tuple(slot_keys))

    async def charge(self, scopes: Sequence[BudgetScope], cost: int, now: float) -> None:
        """Add spend at every level unconditionally."""
        await self._write("charge", _charge, tuple(scopes), cost, now)

    async def budgets(self, scopes: Sequence[BudgetScope], now: float) -> list[BudgetState]:
        """Read budget levels; a period that has ended reads as zero spent."""
        return await self._read("budgets", _budgets, tuple(scopes), now)

    async def reset_budget(self, key: str, period_end: float | None, now: float) -> None:
        """Start a new period for one budget counter now."""
        await self._write("reset_budget", _reset_budget, key, period_end)

    # -- for tests and soaks -----------------------------------------------------------------

    async def _sweep(self, now: float) -> None:
        """Sweep now, as of `now` (admissions sweep on their own; this is for tests)."""
        left = await self._write("sweep", sweep, now, _window.to_ms(now))
        self._until_sweep = max(SWEEP_EVERY, left)

    async def entry_counts(self) -> dict[str, int]:
        """How many rows each ledger table holds now (nothing is swept)."""
        return await self._read("entry_counts", entry_counts)


# -- the jobs: each runs inside one transaction on the store's thread ------------------------


def _admit(
    db: sqlite3.Connection, admission: Admission, sweeping: bool
) -> tuple[AdmissionResult, int | None]:
    """`MemoryLedger.admit`, step for step, over the rows the admission names."""
    now = admission.now
    now_ms = _window.to_ms(now)
    left = sweep(db, now, now_ms) if sweeping else None
    cost = admission.cost
    rates = admission.rates
    scopes = admission.budgets
    request_id = admission.request_id
    budgets = Budgets(db)
    idle = _idle(db, budgets, request_id, now)
    budgets.load(scope.key for scope in scopes)

    # Budgets roll whatever the verdict; buckets are only read until everything fits.
    buckets = Buckets(db)
    buckets.load(hit.key for hit in rates)
    seen = []  # (bucket, window ms)
    refused_requests = refused_tokens = -1
    drained = _window.drained
    for i, hit in enumerate(rates):
        size = int(hit.window * 1000)
        bucket = buckets.get(hit.key, size)
        seen.append((bucket, size))
        level = drained(bucket.level, bucket.t, now_ms, size, hit.limit)
        if level + hit.cost * size > hit.limit * size:
            if hit.kind == "requests":
                if refused_requests < 0:
                    refused_requests = i
            elif refused_tokens < 0:
                refused_tokens = i

    counters: list[Budget] = []
    for scope in scopes:
        budget = budgets.get(scope.key, scope.level in CLIENT_LEVELS)
        budget.roll(scope.period_end, now)
        counters.append(budget)

    # The checks, in order: request buckets, token buckets, leases, budgets.
    refusal: Refusal | None = None
    if not idle:
        if refused_requests >= 0 or refused_tokens >= 0:
            first = refused_requests if refused_requests >= 0 else refused_tokens
            bucket, size = seen[first]
            refusal = rate_refusal(rates[first], bucket, size, now_ms)
        if refusal is None:
            for slot in admission.slots:
                held = db.execute(
                    "SELECT count(*) FROM leases WHERE key = ? AND expires > ?", (slot.key, now)
                ).fetchone()[0]
                if held >= slot.limit:
                    refusal = slot_refusal(slot, held)
                    break
    headroom, refusal = budget_room(scopes, counters, cost, now, refusal, idle)

    if refusal is None and not idle:
        tokens: list[list[Any]] = []
        requests: list[list[Any]] = []
        for hit, (bucket, size) in zip(rates, seen, strict=True):
            # Hit by hit, so a key named twice takes both.
            bucket.level = (
                drained(bucket.level, bucket.t, now_ms, size, hit.limit) + hit.cost * size
            )
            if now_ms > bucket.t:  # never backwards: a caller behind counts at `t`
                bucket.t = now_ms
            buckets.written(hit.key, bucket)
            entry = [hit.key, size, hit.limit, hit.cost]
            if hit.kind == "tokens":
                tokens.append(entry)
            else:
                requests.append(entry)
        buckets.save()
        db.executemany(
            "INSERT OR REPLACE INTO leases VALUES (?, ?, ?)",
            [(slot.key, request_id, now + slot.ttl) for slot in admission.slots],
        )
        for budget in counters:
            budget.spent += cost
            budget.held += 1
        data = {
            "budgets": [[s.key, b.epoch] for s, b in zip(scopes, counters, strict=True)],
            "tokens": tokens,
            "requests": requests,
            "slots": [slot.key for slot in admission.slots],
        }
        db.execute(
            "INSERT OR REPLACE INTO reservations VALUES (?, ?, ?, ?)",
            (request_id, now + admission.ttl, db_int(cost), dumps(data)),
        )
    budgets.save()

    # The states after the step (a key named twice shows both hits).
    rate_states = [
        _window.rate_state(hit, drained(bucket.level, bucket.t, now_ms, size, hit.limit), size)
        for hit, (bucket, size) in zip(rates, seen, strict=True)
    ]
    budget_states = [
        BudgetState(
            scope.key, scope.level, scope.label, scope.limit, budget.spent, budget.end, budget.total
        )
        for scope, budget in zip(scopes, counters, strict=True)
    ]
    return AdmissionResult(refusal, tuple(rate_states), tuple(budget_states), headroom), left


def _idle(db: sqlite3.Connection, budgets: Budgets, request_id: str, now: float) -> bool:
    """Whether an admission of `request_id` must take nothing (`MemoryLedger._idle`).

    True while the id holds a live reservation or a live tombstone; an expired reservation
    is dropped here, so the admission takes a new one.
    """
    row = db.execute(
        "SELECT expires, data FROM reservations WHERE request_id = ?", (request_id,)
    ).fetchone()
    if row is not None:
        if row[0] > now:
            return True
        db.execute("DELETE FROM reservations WHERE request_id = ?", (request_id,))
        unhold(budgets, loads(row[1]))
    return live_tombstone(db, request_id, now)


def _settle(db: sqlite3.Connection, settlement: Settlement, keep: int) -> bool:
    request_id = settlement.request_id
    now = settlement.now
    budgets = Budgets(db)
    settled = False
    # fetchall: a write statement must run to its end before the transaction can commit.
    rows = db.execute(
        "DELETE FROM reservations WHERE request_id = ? RETURNING expires, cost, data",
        (request_id,),
    ).fetchall()
    if rows:
        row = rows[0]
        data = loads(row[2])
        unhold(budgets, data)
        if row[0] > now:
            _apply(db, budgets, data, int(row[1]), settlement)
            settled = True
    elif live_tombstone(db, request_id, now):
        return False  # settled (or given up) already: nothing changes, nothing is appended
    if not settled:
        # No live reservation (its admission never reached the store, or it expired): the
        # cost lands where the caller says.
        _charge_into(budgets, settlement.charges, settlement.cost, now)
    budgets.save()
    # This reply may be lost (a timeout): the same settlement sent again must find this, as
    # must a late admission of the id.
    tombstone(db, request_id, now)
    if settlement.record is not None:
        append_record(db, settlement.record, keep)
    return settled


def _apply(
    db: sqlite3.Connection,
    budgets: Budgets,
    data: dict[str, Any],
    reserved: int,
    settlement: Settlement,
) -> None:
    """Replace a live reservation with the actual cost (`MemoryLedger._settle`'s arithmetic)."""
    cost = settlement.cost
    delta = cost - reserved
    for key, epoch in data["budgets"]:
        budget = budgets.get(key)
        if budget.epoch == epoch:
            budget.spent = max(0, budget.spent + delta)
        else:
            budget.spent += cost
        budget.total += cost
    now_ms = _window.to_ms(settlement.now)
    buckets = Buckets(db)
    tokens = settlement.tokens
    buckets.load(entry[0] for entry in (*data["tokens"], *data["requests"]))
    if tokens is not None:
        for key, size, limit, units in data["tokens"]:
            _adjust(buckets, key, size, limit, tokens - units, now_ms)
    if settlement.refund_requests:
        for key, size, limit, units in data["requests"]:
            _adjust(buckets, key, size, limit, -units, now_ms)
    buckets.save()
    delete_leases(db, settlement.request_id, data["slots"])


def _adjust(buckets: Buckets, key: str, size: int, limit: int, change: int, now_ms: int) -> None:
    """Move a bucket's level by `change` units now, never below empty (`MemoryLedger._adjust`).

    It drains by the limit the hit was admitted under: a settlement names no limit.
    """
    if not change:
        return
    bucket = buckets.find(key)
    if bucket is None:
        if change < 0:
            return  # a swept bucket was empty: nothing to give back
        bucket = buckets.get(key, size)
    level = _window.drained(bucket.level, bucket.t, now_ms, size, limit) + change * size
    bucket.level = level if level > 0 else 0
    if now_ms > bucket.t:
        bucket.t = now_ms
    buckets.written(key, bucket)


def _release(db: sqlite3.Connection, request_id: str, slot_keys: tuple[str, ...]) -> None:
    delete_leases(db, request_id, slot_keys)
    reserved = db.execute(
        "SELECT 1 FROM reservations WHERE request_id = ?", (request_id,)
    ).fetchone()
    if reserved is None:
        # Ahead of its admission: the late admission takes nothing. A release carries no
        # time, so the next sweep stamps it (as `MemoryStore` does); one already there stays.
        db.execute("INSERT OR IGNORE INTO tombstones VALUES (?, NULL)", (request_id,))


def _charge_into(budgets: Budgets, scopes: Sequence[BudgetScope], cost: int, now: float) -> None:
    budgets.load(scope.key for scope in scopes)
    for scope in scopes:
        budget = budgets.get(scope.key, scope.level in CLIENT_LEVELS)
        budget.roll(scope.period_end, now)
        budget.spent += cost
        budget.total += cost


def _charge(db: sqlite3.Connection, scopes: tuple[BudgetScope, ...], cost: int, now: float) -> None:
    budgets = Budgets(db)
    _charge_into(budgets, scopes, cost, now)
    budgets.save()


def _budgets(
    db: sqlite3.Connection, scopes: tuple[BudgetScope, ...], now: float
) -> list[BudgetState]:
    loaded = Budgets(db)
    loaded.load(scope.key for scope in scopes)
    return [budget_state(scope, loaded.find(scope.key) or Budget(), now) for scope in scopes]


def _reset_budget(db: sqlite3.Connection, key: str, period_end: float | None) -> None:
    budgets = Budgets(db)
    budget = budgets.get(key, key.startswith(CLIENT_PREFIX))
    budget.spent = 0
    budget.end = period_end
    budget.epoch += 1
    budgets.save()
