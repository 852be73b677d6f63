"""Admission and settlement are idempotent per request id, and a settlement or release
ahead of its admission leaves a tombstone that turns the late admission into a no-op (issue 11,
items 2 and 3): on every store, rule for rule."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
import redis.asyncio

from llmfence.stores import (
    Admission,
    BudgetScope,
    MemoryStore,
    RateHit,
    Settlement,
    SlotRequest,
    SpendRecord,
    Store,
)
from llmfence.stores._memory_state import SWEEP_EVERY, TOMBSTONE_TTL
from llmfence.stores.redis import RedisStore

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC).timestamp()
SCOPES = (BudgetScope("key:h", "key", "h", 100, None),)


def rid() -> str:
    return uuid.uuid4().hex


def admission(request_id: str, now: float = T0, cost: int = 60) -> Admission:
    return Admission(
        request_id,
        now,
        rates=(RateHit("rpm:key:k1", "requests", "key", "sk-...k1", 2, 1, 60.0),),
        slots=(SlotRequest("parallel:key:k1", "key", "sk-...k1", 1, 600.0),),
        budgets=SCOPES,
        cost=cost,
    )


async def spent(store: Store, now: float = T0) -> int:
    return (await store.budgets(SCOPES, now))[0].spent


async def assert_untouched(store: Store) -> None:
    """Nothing reserved, no bucket hit, no lease: a fresh request takes all of it."""
    assert await spent(store) == 0
    fresh = rid()
    result = await store.admit(admission(fresh, cost=100))
    assert result.refusal is None
    assert result.rates[0].remaining == 1  # only this request's hit
    assert result.budgets[0].spent == 100
    assert await store.settle(Settlement(fresh, T0, cost=0, refund_requests=True))


async def test_a_duplicated_admission_reserves_once(store: Store) -> None:
    request = admission(rid())
    first = await store.admit(request)
    assert first.refusal is None
    assert first.budgets[0].spent == 60
    # Again: it would not fit a second time (60 + 60 > 100, one lease of one), yet it is
    # answered as admitted with the states as they are, and takes nothing.
    again = await store.admit(request)
    assert again.refusal is None
    assert again.budgets[0].spent == 60
    assert again.rates[0].remaining == 1
    assert again.headroom == 40
    assert await spent(store) == 60
    # The one lease is held once: a release of it frees the slot for another request.
    other = await store.admit(admission(rid(), cost=0))
    assert other.refusal is not None
    assert other.refusal.reason == "parallel_requests"
    assert other.refusal.current == 1
    # One settlement settles the one reservation; a second is a no-op.
    assert await store.settle(Settlement(request.request_id, T0, cost=10))
    assert not await store.settle(Settlement(request.request_id, T0, cost=10))
    assert await spent(store) == 10


async def test_refund_before_admission_makes_the_late_admission_a_no_op(store: Store) -> None:
    late = rid()
    # The client gave up (the admission timed out in a stall) and refunded first.
    assert not await store.settle(Settlement(late, T0, cost=0, refund_requests=True))
    result = await store.admit(admission(late))
    assert result.refusal is None  # answered as admitted: the caller already gave up on it
    assert result.budgets[0].spent == 0
    assert result.rates[0].remaining == 2
    assert result.headroom == 100
    await assert_untouched(store)
    # A duplicate of the late admission is a no-op too, and its settlement settles nothing.
    assert (await store.admit(admission(late))).budgets[0].spent == 0
    assert not await store.settle(Settlement(late, T0, cost=0, refund_requests=True))
    await assert_untouched(store)


def spend(request_id: str, cost: int = 7) -> SpendRecord:
    return SpendRecord(request_id=request_id, timestamp=T0, model="gpt-4o", cost=cost)


async def record_ids(store: Store) -> list[str]:
    return [record.request_id for record in await store.spend_records(limit=100)]


async def test_a_settlement_without_a_reservation_charges_its_levels_and_logs_once(
    store: Store,
) -> None:
    # Its admission never reached the store (the store was down and the checks failed open):
    # the cost lands at the levels the settlement names, with its record.
    request_id = rid()
    orphan = Settlement(request_id, T0, cost=7, record=spend(request_id), charges=SCOPES)
    assert not await store.settle(orphan)
    assert await spent(store) == 7
    assert await record_ids(store) == [request_id]
    assert (await store.spend_totals("global")).cost == 7


async def test_charges_are_ignored_while_the_reservation_is_live(store: Store) -> None:
    request_id = rid()
    assert (await store.admit(admission(request_id))).refusal is None
    other = (BudgetScope("user:u", "user", "u", 100, None),)
    assert await store.settle(Settlement(request_id, T0, cost=9, charges=SCOPES + other))
    assert await spent(store) == 9  # the reservation's level, once
    assert (await store.budgets(other, T0))[0].spent == 0


async def test_a_settlement_after_its_tombstone_changes_nothing(store: Store) -> None:
    # A refund came first (the client gave up): a later settlement of the same id, with a
    # cost, a record and levels to charge, is that request settled again. Nothing changes.
    request_id = rid()
    assert not await store.settle(Settlement(request_id, T0, cost=0, refund_requests=True))
    again = Settlement(request_id, T0, cost=7, record=spend(request_id), charges=SCOPES)
    assert not await store.settle(again)
    assert await spent(store) == 0
    assert await record_ids(store) == []
    await assert_untouched(store)


async def test_a_settlement_sent_again_after_a_lost_reply_is_a_no_op(lossy_store: Store) -> None:
    store = lossy_store
    request_id = rid()
    assert (await store.admit(admission(request_id))).refusal is None
    settlement = Settlement(request_id, T0, cost=7, record=spend(request_id), charges=SCOPES)
    assert await store.settle(settlement)
    # The reply was lost (a timeout): the outbox sends the same settlement again.
    assert not await store.settle(settlement)
    assert await spent(store) == 7
    assert await record_ids(store) == [request_id]
    # So is a late duplicate of its admission: it takes nothing.
    assert (await store.admit(admission(request_id))).budgets[0].spent == 7
    await store.release(request_id, ["parallel:key:k1"])
    assert await spent(store) == 7


async def test_an_admission_after_its_settlement_takes_nothing(lossy_store: Store) -> None:
    # The checks failed open while the admission was stuck; the request was served and
    # settled against its levels; then the stuck admission ran. It must take nothing.
    store = lossy_store
    late = rid()
    assert not await store.settle(Settlement(late, T0, cost=7, charges=SCOPES))
    result = await store.admit(admission(late))
    assert result.refusal is None
    assert result.budgets[0].spent == 7
    assert await spent(store) == 7
    fresh = rid()
    assert (await store.admit(admission(fresh, cost=10))).rates[0].remaining == 1
    assert await store.settle(Settlement(fresh, T0, cost=0, refund_requests=True))


async def test_memory_tombstones_only_refunds() -> None:
    # MemoryStore never loses a reply, so it keeps no tombstone per settled request: its
    # state does not grow with the traffic.
    store = MemoryStore()
    settled, orphan = rid(), rid()
    assert (await store.admit(admission(settled))).refusal is None
    assert await store.settle(Settlement(settled, T0, cost=1))
    assert not await store.settle(Settlement(orphan, T0, cost=1, charges=SCOPES))
    assert store.entry_counts()["tombstones"] == 0
    assert await spent(store) == 2


async def test_release_before_admission_makes_the_late_admission_a_no_op(store: Store) -> None:
    late = rid()
    await store.release(late, ["parallel:key:k1"])
    result = await store.admit(admission(late))
    assert result.refusal is None
    assert result.budgets[0].spent == 0
    await assert_untouched(store)  # the slot (limit 1) is free for the next request
    # A release with no slots leaves a tombstone as well.
    bare = rid()
    await store.release(bare, [])
    assert (await store.admit(admission(bare))).budgets[0].spent == 0
    await assert_untouched(store)


async def test_release_after_admission_frees_the_lease_and_keeps_the_reservation(
    store: Store,
) -> None:
    request_id = rid()
    assert (await store.admit(admission(request_id))).refusal is None
    await store.release(request_id, ["parallel:key:k1"])
    # The lease is free; the reservation stands until its settlement.
    other = rid()
    assert (await store.admit(admission(other, cost=0))).refusal is None
    assert await spent(store) == 60
    assert await store.settle(Settlement(request_id, T0, cost=5))
    assert await spent(store) == 5


async def test_memory_sweeps_tombstones() -> None:
    store = MemoryStore()
    refunded, released = rid(), rid()
    await store.settle(Settlement(refunded, T0, cost=0, refund_requests=True))
    await store.release(released, ["parallel:key:k1"])
    assert store.entry_counts()["tombstones"] == 2

    async def sweep_at(now: float) -> None:
        # Admissions of nothing: each counts toward the next sweep, none holds anything.
        for _ in range(max(SWEEP_EVERY, sum(store.entry_counts().values())) + 1):
            await store.admit(Admission(rid(), now))

    await sweep_at(T0 + 1)  # stamps the release's tombstone (it carries no time)
    assert store.entry_counts()["tombstones"] == 2
    # Still live within the TTL: the late admissions take nothing.
    assert (await store.admit(admission(refunded, T0 + 2))).budgets[0].spent == 0
    assert (await store.admit(admission(released, T0 + 2))).budgets[0].spent == 0
    await sweep_at(T0 + 1 + TOMBSTONE_TTL)
    assert store.entry_counts()["tombstones"] == 0
    # Once gone, the id is an ordinary new admission again.
    later = T0 + 2 + TOMBSTONE_TTL
    assert (await store.admit(admission(refunded, later))).budgets[0].spent == 60


async def test_memory_tombstone_expires_by_the_callers_clock() -> None:
    store = MemoryStore()
    request_id = rid()
    await store.settle(Settlement(request_id, T0, cost=0, refund_requests=True))
    after = T0 + TOMBSTONE_TTL
    assert (await store.admit(admission(request_id, after))).budgets[0].spent == 60


async def test_redis_tombstones_expire(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    try:
        refunded, released, admitted = rid(), rid(), rid()
        await store.settle(Settlement(refunded, T0, cost=0, refund_requests=True))
        await store.release(released, ["parallel:key:k1"])
        assert (await store.admit(admission(admitted))).refusal is None
        await store.release(admitted, ["parallel:key:k1"])  # held a reservation: none
        await store.settle(Settlement(admitted, T0, cost=0, refund_requests=True))
        tag = store._tag
        ttl_ms = TOMBSTONE_TTL * 1000
        for request_id in (refunded, released):
            pttl = await client.pttl(tag + "tombstone:" + request_id)
            assert 0 < pttl <= ttl_ms
        # The admitted request was released, then settled: its tombstone expires as well.
        assert 0 < await client.pttl(tag + "tombstone:" + admitted) <= ttl_ms
        # Gone, the id admits as new (a shortened TTL stands in for ten minutes of waiting).
        await client.pexpire(tag + "tombstone:" + refunded, 1)
        while await client.exists(tag + "tombstone:" + refunded):
            pass
        assert (await store.admit(admission(refunded))).budgets[0].spent == 60
    finally:
        await client.aclose()
        await store.aclose()
