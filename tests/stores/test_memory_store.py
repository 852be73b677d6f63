"""What only `MemoryStore` promises: bounded memory, and sweeping never loses live state."""

from __future__ import annotations

import gc

import pytest

from llmfence.stores import Admission, MemoryStore, RateHit, Settlement, SlotRequest, SpendRecord
from llmfence.stores._memory_state import SWEEP_EVERY as _SWEEP_EVERY

pytestmark = pytest.mark.anyio
T0 = 1_795_000_000.0


def rpm(key: str, limit: int) -> RateHit:
    return RateHit(key, "requests", "key", key, limit, 1)


async def test_sweeps_keep_live_buckets_and_drop_empty_ones() -> None:
    store = MemoryStore()
    for i in range(5):
        assert (await store.admit(Admission(f"r{i}", T0, rates=(rpm("rpm:live", 5),)))).admitted
    # Enough other admissions at the same instant to run a sweep.
    for i in range(_SWEEP_EVERY + 10):
        await store.admit(Admission(f"o{i}", T0, rates=(rpm(f"rpm:other{i % 7}", 10**9),)))
    refused = await store.admit(Admission("x", T0, rates=(rpm("rpm:live", 5),)))
    assert refused.refusal is not None  # the live bucket survived the sweep
    assert len(store._buckets) == 8
    # A window later every bucket is empty, whatever its limit, and the next sweep drops them.
    later = T0 + 60
    for i in range(_SWEEP_EVERY):
        await store.admit(Admission(f"l{i}", later, rates=(rpm("rpm:new", 10**9),)))
    assert set(store._buckets) == {"rpm:new"}


async def test_sweeps_drop_expired_reservations_and_empty_lease_sets() -> None:
    store = MemoryStore()
    for i in range(10):
        await store.admit(
            Admission(f"r{i}", T0, slots=(SlotRequest(f"p{i}", "key", "k", 1, 5),), ttl=10)
        )
    for i in range(_SWEEP_EVERY):
        await store.admit(Admission(f"s{i}", T0 + 60))
    assert not any(key.startswith("r") for key in store._reservations)
    assert not any(key.startswith("p") for key in store._leases)
    assert not await store.settle(Settlement("r1", T0 + 60, cost=0))


async def test_spend_log_is_a_ring_buffer() -> None:
    store = MemoryStore(max_spend_records=3)
    for i in range(5):
        record = SpendRecord(request_id=f"r{i}", timestamp=T0, model="m", cost=1)
        await store.settle(Settlement(f"r{i}", T0, 0, record=record))
    assert [r.request_id for r in await store.spend_records()] == ["r4", "r3", "r2"]
    assert (await store.spend_totals("global")).requests == 5


async def test_kept_records_are_not_tracked_by_the_garbage_collector() -> None:
    store = MemoryStore()
    for i in range(100):
        record = SpendRecord(request_id=f"r{i}", timestamp=T0, model="m", cost=i, user_id="u")
        await store.settle(Settlement(f"r{i}", T0, 0, record=record))
    gc.collect()
    assert not any(gc.is_tracked(kept) for kept in store._log)
    [newest] = await store.spend_records(limit=1)
    assert newest == SpendRecord(request_id="r99", timestamp=T0, model="m", cost=99, user_id="u")
