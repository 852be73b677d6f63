"""Global budget slices and the sharded spend log on a real 3-master Redis Cluster.

Several `RedisStore`s on one cluster stand for several app instances, each leasing slices of
the global budget (`_redis_slices`): spend never passes the budget, returned slices leave the
counter equal to the spend records, a period roll carries nothing into the wrong period, a
dead instance's lease expires and counts in full. Then the log's shards (`_redis_spendlog`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from llmfence import Fence, RedisStore
from llmfence.exceptions import ConfigurationError
from llmfence.stores import Admission, BudgetScope, Settlement, SpendRecord
from llmfence.stores._redis_spendlog import SHARDS, spend_tags
from llmfence.testing import RedisClusterServers

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000.0
COUNTER = "{llmfence:global}:budget:global"


def open_stores(url: str, n: int, **options: Any) -> list[RedisStore]:
    return [RedisStore.from_url(url, cluster=True, timeout=10.0, **options) for _ in range(n)]


@pytest.fixture
async def three(redis_cluster_url: str) -> AsyncIterator[list[RedisStore]]:
    """Three app instances on one cluster."""
    stores = open_stores(redis_cluster_url, 3)
    yield stores
    for store in stores:
        await store.aclose()


def scope(limit: int | None, end: float | None = None) -> BudgetScope:
    return BudgetScope("global", "global", "global", limit, end)


def key(name: str) -> BudgetScope:
    return BudgetScope(f"key:{name}", "key", name, None, None)


def counter(servers: RedisClusterServers) -> dict[str, str]:
    with redis.RedisCluster(host="127.0.0.1", port=servers.ports[0], decode_responses=True) as c:
        return c.hgetall(COUNTER)  # type: ignore[no-any-return]


async def serve(
    store: RedisStore, request_id: str, now: float, cost: int, actual: int, g: BudgetScope
) -> bool:
    """One request: admitted at the global level and a key's, then settled with a record."""
    result = await store.admit(Admission(request_id, now, budgets=(g, key("k")), cost=cost))
    if not result.admitted:
        return False
    await asyncio.sleep(0)  # other requests run while this one is "upstream"
    record = SpendRecord(request_id=request_id, timestamp=now, model="m", cost=actual)
    await store.settle(Settlement(request_id, now, actual, None, record))
    return True


async def spent_after_return(stores: list[RedisStore], g: BudgetScope, now: float) -> int:
    """The global level's spend once every instance returned its slices, as any reads it."""
    for store in stores:
        await store.return_slices()
    states = [(await store.budgets([g], now))[0] for store in stores]
    assert len({(state.spent, state.total) for state in states}) == 1  # every instance alike
    return states[0].spent


@settings(max_examples=4)
@given(seed=st.integers(0, 2**32 - 1), limit=st.integers(20_000, 200_000))
async def test_spend_never_passes_a_tight_global_budget(
    redis_cluster_servers: RedisClusterServers, seed: int, limit: int
) -> None:
    redis_cluster_servers.flush()
    stores = open_stores(redis_cluster_servers.url, 3)
    rng = random.Random(seed)
    g = scope(limit)
    try:
        costs = [rng.randint(100, 3000) for _ in range(300)]
        actuals = [rng.randint(0, cost) for cost in costs]  # usage never passes the reservation
        done = asyncio.Event()
        highest = 0

        async def watch() -> None:
            # What the counter holds (spend, reservations and slices) never passes the limit.
            nonlocal highest
            watcher = redis.asyncio.RedisCluster.from_url(redis_cluster_servers.url)
            try:
                while not done.is_set():
                    highest = max(highest, int(await watcher.hget(COUNTER, "spent") or 0))
                    await asyncio.sleep(0.002)
            finally:
                await watcher.aclose()

        async def load() -> list[bool]:
            try:
                return await asyncio.gather(
                    *(
                        serve(stores[i % 3], f"r{i}", T0, costs[i], actuals[i], g)
                        for i in range(len(costs))
                    )
                )
            finally:
                done.set()

        served, _ = await asyncio.gather(load(), watch())
        assert 0 < highest <= limit
        assert not all(served)  # some were refused: the budget is tight
        charged = sum(a for a, ok in zip(actuals, served, strict=True) if ok)
        assert charged <= limit
        assert int(counter(redis_cluster_servers).get("spent", 0)) <= limit
        spent = await spent_after_return(stores, g, T0)
        records = await stores[0].spend_records(limit=10_000)
        assert spent == charged == sum(record.cost for record in records)
        assert (await stores[1].spend_totals("global")).cost == charged
        assert int(counter(redis_cluster_servers).get("leased", 0)) == 0
    finally:
        for store in stores:
            await store.aclose()


async def test_slices_are_leased_once_and_admitted_locally(
    three: list[RedisStore], redis_cluster_servers: RedisClusterServers
) -> None:
    g = scope(10**9)
    store = three[0]
    assert all([await serve(store, f"r{i}", T0, 1000, 900, g) for i in range(50)])
    stats = counter(redis_cluster_servers)
    leased = int(stats["leased"])
    assert leased == 1024 * 1000  # one slice: 1024 requests like the first (< room / 16)
    assert int(stats["spent"]) == leased  # the slice in full; nothing per request
    # The reading store adds what its own slice holds; another sees the counter only.
    assert (await store.budgets([g], T0))[0].spent == 50 * 900
    assert (await three[1].budgets([g], T0))[0].spent == 0
    await store.return_slices()
    assert (await three[1].budgets([g], T0))[0].spent == 50 * 900
    assert (await three[1].budgets([g], T0))[0].total == 50 * 900
    assert int(counter(redis_cluster_servers).get("leased", 0)) == 0


async def test_idle_slices_are_returned_on_their_own(
    three: list[RedisStore], redis_cluster_servers: RedisClusterServers
) -> None:
    g = scope(10**9)
    for i, store in enumerate(three):
        assert await serve(store, f"r{i}", T0, 1000, 700, g)
    assert int(counter(redis_cluster_servers)["leased"]) > 0
    await asyncio.sleep(2.0)  # past the idle time, on the real clock the keeper reads
    assert int(counter(redis_cluster_servers).get("leased", 0)) == 0
    fresh = open_stores(redis_cluster_servers.url, 1)[0]
    try:
        state = (await fresh.budgets([g], T0))[0]
        assert (state.spent, state.total) == (2100, 2100)
        assert sum(r.cost for r in await fresh.spend_records()) == 2100
    finally:
        await fresh.aclose()


async def test_fence_flush_returns_the_slices(
    three: list[RedisStore], redis_cluster_servers: RedisClusterServers
) -> None:
    store = three[0]
    fence = Fence(store=store, max_budget=1.0)
    assert await serve(store, "r", T0, 5000, 4000, scope(10**9))
    assert int(counter(redis_cluster_servers)["leased"]) > 0
    assert await fence.flush() == 0
    assert int(counter(redis_cluster_servers).get("leased", 0)) == 0
    assert (await three[1].budgets([scope(10**9)], T0))[0].spent == 4000


async def test_a_period_roll_with_outstanding_slices(
    three: list[RedisStore], redis_cluster_servers: RedisClusterServers
) -> None:
    end = T0 + 60
    first, second = scope(10**9, end), scope(10**9, end + 60)
    a, b = three[0], three[1]
    # Period 1: both instances lease and spend; one request of a's is still in flight.
    assert await serve(a, "a1", T0, 1000, 600, first)
    assert await serve(b, "b1", T0, 1000, 500, first)
    assert (await a.admit(Admission("late", T0, budgets=(first,), cost=1000))).admitted
    # Period 2: a new lease rolls the counter; the old slices add nothing to it.
    later = end + 1
    assert await serve(b, "b2", later, 1000, 300, second)
    assert await serve(a, "a2", later, 1000, 200, second)
    # The request admitted in period 1 and settled in period 2 is charged there in full, as
    # a reservation that outlived its period is.
    await a.settle(Settlement("late", later, 50))
    await a.return_slices()
    await b.return_slices()
    state = (await three[2].budgets([second], later))[0]
    assert state.spent == 300 + 200 + 50
    assert state.total == 600 + 500 + 300 + 200 + 50
    assert state.resets_at == end + 60
    assert int(counter(redis_cluster_servers).get("leased", 0)) == 0


async def test_a_dead_instance_lease_expires_and_counts_in_full(
    three: list[RedisStore], redis_cluster_servers: RedisClusterServers
) -> None:
    limit = 1_600_000
    g = scope(limit)
    dying, other = three[0], three[1]
    assert await serve(dying, "d1", T0, 1000, 800, g)
    slice_size = int(counter(redis_cluster_servers)["leased"])
    assert slice_size == limit // 16
    # The instance dies: nothing returns its slice (no flush, no aclose, no keeper).
    assert dying._keeper is not None
    dying._keeper.cancel()
    dying._current, dying._retired = None, []
    # Before the lease expires it holds its slice; afterwards the next lease sweeps it: the
    # whole slice counts as spent, in the period and in the all-time total.
    assert await serve(other, "o1", T0 + 10, 1000, 700, g)
    assert int(counter(redis_cluster_servers)["leased"]) > slice_size
    await other.return_slices()
    assert await serve(other, "o2", T0 + 200, 1000, 700, g)  # past the lease's 120 s
    await other.return_slices()
    stats = counter(redis_cluster_servers)
    assert int(stats.get("leased", 0)) == 0
    assert int(stats["spent"]) == slice_size + 700 + 700
    state = (await three[2].budgets([g], T0 + 200))[0]
    assert state.spent == slice_size + 1400 <= limit
    assert state.total == slice_size + 1400


async def test_near_the_end_slices_shrink_then_requests_go_one_by_one(
    three: list[RedisStore], redis_cluster_servers: RedisClusterServers
) -> None:
    limit = 100_000
    g = scope(limit)
    store = three[0]
    admitted = 0
    for i in range(200):
        if await serve(store, f"r{i}", T0, 1000, 1000, g):
            admitted += 1
    # Every nano-dollar of the budget is spent, none past it: the last requests went per
    # request on the global slot once no slice could hold four of them.
    assert admitted == 100
    await store.return_slices()
    assert (await three[1].budgets([g], T0))[0].spent == limit


async def test_a_limit_set_under_an_unlimited_slice(three: list[RedisStore]) -> None:
    store, g = three[0], scope(64_000)
    assert await serve(store, "r1", T0, 1000, 1000, scope(None))  # no limit: spend only
    # A limit now: the slice leased without one is retired, and until it is returned (a tick
    # later) the limited level, which counts it, refuses rather than passes its limit.
    served = [await serve(store, f"a{i}", T0, 1000, 1000, g) for i in range(5)]
    await asyncio.sleep(0.6)
    served += [await serve(store, f"b{i}", T0, 1000, 1000, g) for i in range(100)]
    assert served[-1] is False  # the limit was reached
    await store.return_slices()
    assert (await three[1].budgets([g], T0))[0].spent == 1000 * (1 + sum(served)) == 64_000


def test_options_are_checked() -> None:
    with pytest.raises(ConfigurationError):
        RedisStore.from_url("redis://localhost", global_slices=True)  # not a cluster
    with pytest.raises(ConfigurationError):
        RedisStore.from_url("redis://localhost", cluster=True, slice_divisor=0)
    with pytest.raises(ConfigurationError):
        RedisStore.from_url("redis://localhost", cluster=True, spend_log_shards=0)
    single = RedisStore.from_url("redis://localhost")
    assert not single._slicing
    assert len(single._spend_tags) == 1
    off = RedisStore.from_url("redis://localhost", cluster=True, global_slices=False)
    assert not off._slicing
    assert len(off._spend_tags) == SHARDS


# -- the spend log's shards ------------------------------------------------------------------


def test_spend_shards_spread_evenly_over_the_slot_space() -> None:
    tags = spend_tags("llmfence", SHARDS)
    slots = [key_slot(t[1:-2].encode()) for t in tags]
    # Shard i in the i-th twelfth of the slots: four on each of three even masters.
    assert [slot * SHARDS // 16_384 for slot in slots] == list(range(SHARDS))


async def test_spend_shards_land_on_every_master(
    redis_cluster_servers: RedisClusterServers,
) -> None:
    with redis.RedisCluster(host="127.0.0.1", port=redis_cluster_servers.ports[0]) as cluster:
        nodes = [cluster.get_node_from_key(t + "log") for t in spend_tags("llmfence", SHARDS)]
    ports = [node.port for node in nodes if node is not None]
    assert sorted(ports.count(port) for port in set(ports)) == [4, 4, 4]


async def test_records_of_the_unsharded_log_are_still_read(redis_cluster_url: str) -> None:
    older = RedisStore.from_url(redis_cluster_url, cluster=True, spend_log_shards=1)
    newer = RedisStore.from_url(redis_cluster_url, cluster=True)
    try:
        for i in range(3):
            record = SpendRecord(request_id=f"old{i}", timestamp=T0 + i, model="m", cost=10)
            await older.settle(Settlement(f"old{i}", T0 + i, 10, None, record))
        for i in range(3):
            record = SpendRecord(request_id=f"new{i}", timestamp=T0 + 10 + i, model="m", cost=1)
            await newer.settle(Settlement(f"new{i}", T0 + 10 + i, 1, None, record))
        ids = [record.request_id for record in await newer.spend_records()]
        assert ids == ["new2", "new1", "new0", "old2", "old1", "old0"]
        totals = await newer.spend_totals("global")
        assert (totals.cost, totals.requests) == (33, 6)
    finally:
        await older.aclose()
        await newer.aclose()


async def test_sharded_log_keeps_the_newest_in_order(redis_cluster_url: str) -> None:
    store = RedisStore.from_url(redis_cluster_url, cluster=True, max_spend_records=100)
    try:
        # Equal timestamps: the sequence number keeps the order they came in.
        for i in range(300):
            record = SpendRecord(request_id=f"r{i}", timestamp=T0, model="m", cost=1)
            await store.settle(Settlement(f"r{i}", T0, 1, None, record))
        records = await store.spend_records(limit=1000)
        assert [r.request_id for r in records] == [f"r{i}" for i in range(299, 199, -1)]
        assert (await store.spend_totals("global")).requests == 300
        filtered = await store.spend_records(request_id="r150")
        assert filtered == []  # past the bound: not shown, as one log would not show it
    finally:
        await store.aclose()


async def test_a_refusal_elsewhere_gives_the_take_back(three: list[RedisStore]) -> None:
    store, other = three[0], three[1]
    g = scope(10**9)
    assert await serve(store, "r1", T0, 1000, 1000, g)
    tight = BudgetScope("key:tight", "key", "tight", 500, None)
    refused = await store.admit(Admission("r2", T0, budgets=(g, tight), cost=1000))
    assert refused.refusal is not None
    assert refused.refusal.level == "key"
    assert "r2" not in store._tickets
    await store.return_slices()
    assert (await other.budgets([g], T0))[0].spent == 1000


async def test_a_settlement_sent_again_settles_the_slice_once(three: list[RedisStore]) -> None:
    store, other = three[0], three[1]
    g = scope(10**9)
    assert (await store.admit(Admission("r", T0, budgets=(g, key("k")), cost=1000))).admitted
    record = SpendRecord(request_id="r", timestamp=T0, model="m", cost=400)
    assert await store.settle(Settlement("r", T0, 400, None, record))
    await store.settle(Settlement("r", T0, 400, None, record))  # its reply was lost, say
    await store.return_slices()
    state = (await other.budgets([g], T0))[0]
    assert (state.spent, state.total) == (400, 400)
    assert len(await other.spend_records()) == 1


async def test_a_global_reset_returns_the_stores_own_slices_first(
    three: list[RedisStore], redis_cluster_servers: RedisClusterServers
) -> None:
    store = three[0]
    g = scope(10**9)
    assert await serve(store, "r1", T0, 1000, 900, g)
    await store.reset_budget("global", None, T0)
    stats = counter(redis_cluster_servers)
    assert "leased" not in stats
    state = (await store.budgets([g], T0))[0]
    assert (state.spent, state.total) == (0, 900)
    assert await serve(store, "r2", T0, 1000, 800, g)
    await store.return_slices()
    state = (await three[1].budgets([g], T0))[0]
    assert (state.spent, state.total) == (800, 1700)


async def test_a_lease_whose_caller_left_is_kept_and_returned(
    three: list[RedisStore], redis_cluster_servers: RedisClusterServers
) -> None:
    store = three[0]
    g = scope(10**9)
    await store.ping()  # connected: the admission's first wait is its lease
    admitting = asyncio.ensure_future(
        store.admit(Admission("gone", T0, budgets=(g, key("k")), cost=1000))
    )
    await asyncio.sleep(0)
    admitting.cancel()  # the client disconnected while the slice was being leased
    with pytest.raises(asyncio.CancelledError):
        await admitting
    for _ in range(40):  # the keeper returns the kept slice within a tick or two
        await asyncio.sleep(0.05)
        if not store._retired and store._current is None:
            break
    stats = counter(redis_cluster_servers)
    assert int(stats.get("leased", 0)) == 0
    assert int(stats["spent"]) == 0
