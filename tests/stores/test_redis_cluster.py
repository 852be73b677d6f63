"""What `RedisStore` promises on a Redis Cluster: state spread over the nodes, and admissions
and settlements that stay exact across slots.

Everything every store promises runs on the cluster too (the `store` fixture and the contract
suite have a `redis_cluster` case); this module covers what only a cluster can get wrong.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import pytest
import redis
import redis.asyncio
from redis.crc import key_slot

from llmfence.exceptions import StoreError
from llmfence.stores import (
    Admission,
    BudgetScope,
    MemoryStore,
    RateHit,
    Settlement,
    SlotRequest,
    SpendRecord,
)
from llmfence.stores.redis import RedisStore
from llmfence.testing import RedisClusterServers

from .test_redis_store import History

pytestmark = pytest.mark.anyio

T0 = 1_795_000_000.0
TEAM = BudgetScope("team:t", "team", "t", 1_000_000, T0 + 3600)
GLOBAL = BudgetScope("global", "global", "global", None, T0 + 86_400)


@pytest.fixture
async def store(redis_cluster_url: str) -> AsyncIterator[RedisStore]:
    # A generous deadline: a call costs a few round trips here, on a shared machine.
    cluster_store = RedisStore.from_url(redis_cluster_url, cluster=True, timeout=10.0)
    yield cluster_store
    await cluster_store.aclose()


def key_scope(name: str, limit: int | None = 200_000) -> BudgetScope:
    return BudgetScope(f"key:{name}", "key", f"sk-...{name}", limit, T0 + 3600)


def request(request_id: str, key: str, cost: int, *, team: BudgetScope = TEAM) -> Admission:
    """A gateway request: a global, team and key budget, the key's RPM, TPM and lease."""
    return Admission(
        request_id,
        T0,
        rates=(
            RateHit(f"rpm:60000:key:{key}", "requests", "key", key, 1000, 1),
            RateHit(f"tpm:60000:key:{key}", "tokens", "key", key, 10**9, 100),
            RateHit("rpm:60000:team:t", "requests", "team", "t", 10**6, 1),
        ),
        slots=(SlotRequest(f"parallel:key:{key}", "key", key, 1000),),
        budgets=(GLOBAL, team, key_scope(key)),
        cost=cost,
    )


def node_keys(cluster: RedisClusterServers) -> dict[str, int]:
    """Every key of the cluster, and the port of the node that holds it."""
    where: dict[str, int] = {}
    for port in cluster.ports:
        with redis.Redis(port=port, decode_responses=True) as client:
            for key in client.scan_iter(count=1000):
                where[key] = port
    return where


def where_is(cluster: RedisClusterServers, key: str) -> int:
    return node_keys(cluster)[key]


async def test_levels_land_on_different_nodes(
    store: RedisStore, redis_cluster_servers: RedisClusterServers
) -> None:
    assert (await store.admit(request("r", "alpha", 10))).admitted
    lease = where_is(redis_cluster_servers, "{llmfence:key:alpha}:lease:parallel:key:alpha")
    record = SpendRecord(request_id="r", timestamp=T0, model="m", cost=10, team_id="t")
    assert await store.settle(Settlement("r", T0, cost=10, record=record))
    await store.set_access_group("g", ["m"])
    where = node_keys(redis_cluster_servers)
    log = store._spend_tags[store._spend_shard("r")]  # the spend log's shard for "r"
    # Each scope's counters live together, on their scope's slot.
    nodes = {
        "global": where["{llmfence:global}:budget:global"],
        "team": where["{llmfence:team:t}:budget:team:t"],
        "key": where["{llmfence:key:alpha}:budget:key:alpha"],
        "spend": where[log + "log"],
        "registry": where["{llmfence}:access_groups"],
    }
    assert lease == nodes["key"]
    assert where["{llmfence:team:t}:bucket:rpm:60000:team:t"] == nodes["team"]
    assert where["{llmfence:key:alpha}:bucket:tpm:60000:key:alpha"] == nodes["key"]
    assert where[log + "totals"] == nodes["spend"]
    # …and the levels are spread over every node of the cluster.
    assert set(nodes.values()) == set(redis_cluster_servers.ports)
    slots = {key_slot(key.encode()) for key in where}
    assert len(slots) >= 6


async def test_a_refusal_on_one_slot_leaves_nothing_on_any(
    store: RedisStore, redis_cluster_servers: RedisClusterServers
) -> None:
    poor = BudgetScope("team:t", "team", "t", 5, T0 + 3600)
    refused = await store.admit(request("r", "alpha", 10, team=poor))
    assert refused.refusal is not None
    assert (refused.refusal.reason, refused.refusal.level) == ("budget", "team")
    assert refused.headroom == 5  # the team's, the tightest; measured before the request
    # The key's slot admitted its part, then gave it back: nothing reserved, nothing hit,
    # no lease, no reservation, tombstone or home left anywhere.
    states = await store.budgets([GLOBAL, poor, key_scope("alpha")], T0)
    assert [state.spent for state in states] == [0, 0, 0]
    assert [state.total for state in states] == [0, 0, 0]
    leftovers = [
        key
        for key in node_keys(redis_cluster_servers)
        if any(part in key for part in ("reservation:", "tombstone:", ":home", "lease:"))
    ]
    assert leftovers == []
    check = await store.admit(request("other", "alpha", 1))
    assert check.rates[0].remaining == 999  # only this request's hit
    # The refused id may be admitted again (with an allowance that fits, say).
    again = await store.admit(request("r", "alpha", 3, team=poor))
    assert again.refusal is None
    assert (await store.budgets([poor], T0))[0].spent == 1 + 3


async def test_the_refusal_reported_is_the_first_a_single_node_would_report(
    store: RedisStore,
) -> None:
    # Both the team's RPM (on the team's slot) and the key's budget (on the key's) refuse:
    # a single node reports the request bucket first, as MemoryStore does.
    memory = MemoryStore()
    tight = Admission(
        "r", T0,
        rates=(RateHit("rpm:60000:team:t", "requests", "team", "t", 0, 1),),
        budgets=(key_scope("alpha", 5), TEAM), cost=10,
    )  # fmt: skip
    assert await store.admit(tight) == await memory.admit(tight)


async def test_concurrent_admissions_across_slots_stay_within_every_budget(
    store: RedisStore, redis_cluster_servers: RedisClusterServers
) -> None:
    # A team budget every request shares, per-key budgets on other slots, all at once.
    rng = random.Random(12)
    team = BudgetScope("team:t", "team", "t", 150_000, T0 + 3600)
    keys = [f"k{i}" for i in range(6)]
    plan = [(uuid.uuid4().hex, rng.choice(keys), rng.randint(500, 4_000)) for _ in range(300)]
    admitted: list[tuple[str, str, int]] = []
    refused: list[str] = []

    async def send(request_id: str, key: str, cost: int) -> None:
        result = await store.admit(request(request_id, key, cost, team=team))
        if result.admitted:
            admitted.append((request_id, key, cost))
        else:
            refused.append(request_id)

    async with anyio.create_task_group() as tg:
        for request_id, key, cost in plan:
            tg.start_soon(send, request_id, key, cost)
    assert admitted
    assert refused  # the budgets did bind
    [spent_team] = [state.spent for state in await store.budgets([team], T0)]
    assert spent_team == sum(cost for _, _, cost in admitted) <= team.limit  # type: ignore[operator]
    for key in keys:
        [state] = await store.budgets([key_scope(key)], T0)
        expected = sum(cost for _, owner, cost in admitted if owner == key)
        assert state.spent == expected <= 200_000
    # A refused request left nothing on any slot: no reservation, no home, no lease.
    left = node_keys(redis_cluster_servers)
    for request_id in refused:
        assert not [key for key in left if request_id in key]
    # And every admitted one settles on each of its slots, once.
    for request_id, _, _ in admitted:
        assert await store.settle(Settlement(request_id, T0, cost=1))
        assert not await store.settle(Settlement(request_id, T0, cost=1))
    assert (await store.budgets([team], T0))[0].spent == len(admitted)


async def test_a_settlement_sent_again_finishes_what_a_failed_one_left(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (await store.admit(request("r", "alpha", 1_000))).admitted
    original = store._script
    failed: list[Sequence[str]] = []

    async def flaky(name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        # The key's slot is down while the first settlement goes out.
        if name == "settle" and keys[0].startswith("{llmfence:key:alpha}") and not failed:
            failed.append(keys)
            raise StoreError("The Redis store failed (settle): ConnectionError.")
        return await original(name, keys, args)

    monkeypatch.setattr(store, "_script", flaky)
    record = SpendRecord(request_id="r", timestamp=T0, model="m", cost=300, team_id="t")
    settlement = Settlement("r", T0, cost=300, record=record, charges=(GLOBAL, TEAM))
    with pytest.raises(StoreError):
        await store.settle(settlement)
    assert failed
    scopes = [GLOBAL, TEAM, key_scope("alpha")]
    assert [state.spent for state in await store.budgets(scopes, T0)] == [300, 300, 1_000]
    # Sent again (an outbox retries it): the key's part is settled now, nothing twice.
    assert not await store.settle(settlement)
    assert [state.spent for state in await store.budgets(scopes, T0)] == [300, 300, 300]
    assert not await store.settle(settlement)
    assert [state.spent for state in await store.budgets(scopes, T0)] == [300, 300, 300]
    assert [r.request_id for r in await store.spend_records()] == ["r"]
    assert (await store.spend_totals("team", "t")).cost == 300


async def test_a_settlement_ahead_of_its_admission_on_a_cluster(store: RedisStore) -> None:
    # The settlement (the checks failed open) charges its levels; the late admission takes
    # nothing on any slot; a release ahead of an admission tombstones it too.
    assert not await store.settle(Settlement("late", T0, cost=7, charges=(GLOBAL, TEAM)))
    late = await store.admit(request("late", "alpha", 1_000))
    assert late.refusal is None
    scopes = [GLOBAL, TEAM, key_scope("alpha")]
    assert [state.spent for state in await store.budgets(scopes, T0)] == [7, 7, 0]
    await store.release("early", ["parallel:key:alpha"])
    assert (await store.admit(request("early", "alpha", 1_000))).refusal is None
    assert [state.spent for state in await store.budgets(scopes, T0)] == [7, 7, 0]


async def test_round_trips_per_request(
    store: RedisStore, redis_cluster_servers: RedisClusterServers
) -> None:
    # A request over the global, team and key scopes plus the spend log's: the global level
    # comes from the slice the warm-up leased, so admit is the home, then the team's and
    # the key's slots at once; settle the home, then those slots and the log's shard at once
    # (a slot that is both is one call).
    async def evalsha() -> int:
        calls = 0
        for port in redis_cluster_servers.ports:
            with redis.Redis(port=port) as client:
                stats = client.info("commandstats")
                calls += stats.get("cmdstat_evalsha", {}).get("calls", 0)
        return calls

    await store.admit(request("warm-up", "alpha", 1))  # scripts loaded
    record = SpendRecord(request_id="r", timestamp=T0, model="m", cost=1)
    tags = {"{llmfence:team:t}", "{llmfence:key:alpha}"}
    slots = {key_slot(tag.encode()) for tag in tags}
    before = await evalsha()
    assert (await store.admit(request("r", "alpha", 1))).admitted
    assert await evalsha() - before == 1 + len(slots)
    before = await evalsha()
    assert await store.settle(Settlement("r", T0, cost=1, record=record))
    slots.add(key_slot(store._spend_tags[store._spend_shard("r")][1:-2].encode()))
    assert await evalsha() - before == 1 + len(slots)


async def test_a_cluster_client_passed_in(redis_cluster_url: str) -> None:
    client = redis.asyncio.RedisCluster.from_url(redis_cluster_url, decode_responses=True)
    store = RedisStore(client, prefix="lent", timeout=10.0)
    try:
        assert (await store.admit(request("r", "alpha", 10))).admitted
        assert await store.settle(Settlement("r", T0, cost=3))
        assert (await store.budgets([TEAM], T0))[0].spent == 3
        await store.aclose()  # the caller's client stays open
        assert await client.ping()
    finally:
        await client.aclose()


@pytest.mark.parametrize("seed", range(3))
async def test_matches_memory_store(redis_cluster_url: str, seed: int) -> None:
    # The random history of test_redis_store, on the cluster: every answer (refusals,
    # states, headroom, records, totals) as MemoryStore gives it, per request (no global
    # budget slices: their reads trail other instances' spend, see test_redis_slices) and
    # with one spend log.
    memory = MemoryStore(max_spend_records=20)
    store = RedisStore.from_url(
        redis_cluster_url, cluster=True, timeout=10.0, max_spend_records=20,
        global_slices=False, spend_log_shards=1,
    )  # fmt: skip
    history = History(seed)
    rng = history.rng

    async def both(method: str, *args: Any) -> Any:
        expected = await getattr(memory, method)(*args)
        assert await getattr(store, method)(*args) == expected, method
        return expected

    try:
        for _ in range(200):
            history.tick()
            roll = rng.random()
            if roll < 0.55:
                admission = history.admission()
                if (await both("admit", admission)).admitted:
                    history.admitted.append(admission)
            elif roll < 0.8:
                await both("settle", history.settlement())
            elif roll < 0.87 and history.admitted:
                chosen = rng.choice(history.admitted)
                await both("release", chosen.request_id, [slot.key for slot in chosen.slots])
            elif roll < 0.93:
                await both(
                    "charge", rng.sample(history.scopes(), 2), rng.randint(0, 4000), history.now
                )
            await both("budgets", history.scopes(), history.now)
        assert await store.spend_records(limit=1000) == await memory.spend_records(limit=1000)
    finally:
        await store.aclose()
