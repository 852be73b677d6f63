"""What only `RedisStore` promises: round trips, package data, exact money, hash tags, errors.

The behaviour every store shares is in `test_contract.py`; `test_matches_memory_store` below
also drives both stores through the same random history and compares every answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib import resources
from typing import Any, ClassVar, TypeVar

import anyio
import pytest
import redis.asyncio
from redis.crc import key_slot

from llmfence.exceptions import ConfigurationError, StoreError
from llmfence.stores import (
    Admission,
    BudgetScope,
    KeyRecord,
    MemoryStore,
    RateHit,
    Settlement,
    SlotRequest,
    SpendGroup,
    SpendRecord,
    UserRecord,
    hash_key,
    mask_key,
)
from llmfence.stores._types import RateKind
from llmfence.stores.redis import RedisStore
from llmfence.testing import RedisServer

pytestmark = pytest.mark.anyio

T0 = 1_795_000_000.0
_R = TypeVar("_R")
SCRIPTS = (
    "admit",
    "settle",
    "charge",
    "budgets",
    "reset_budget",
    "release",
    "record_create",
    "record_update",
    "record_delete",
    "list_keys",
    "budget",
)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    redis_store = RedisStore.from_url(redis_url)
    yield redis_store
    await redis_store.aclose()


@pytest.fixture
async def inspector(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    """A plain client to look at what the store wrote."""
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def busy_admission(request_id: str, now: float = T0) -> Admission:
    """An admission that touches every kind of state at two levels."""
    return Admission(
        request_id,
        now,
        rates=(
            RateHit("rpm:key:h", "requests", "key", "sk-...h", 100, 1),
            RateHit("rpm:user:u", "requests", "user", "u", 100, 1),
            RateHit("tpm:key:h", "tokens", "key", "sk-...h", 100_000, 500),
        ),
        slots=(SlotRequest("parallel:key:h", "key", "sk-...h", 10),),
        budgets=(
            BudgetScope("global", "global", "global", None, now + 3600),
            BudgetScope("user:u", "user", "u", 10**12, now + 60),
            BudgetScope("key:h", "key", "sk-...h", 10**12),
        ),
        cost=5_000,
    )


def spend_record(request_id: str, *, cost: int = 4_000, key_hash: str = "h") -> SpendRecord:
    return SpendRecord(
        request_id=request_id, timestamp=T0, model="gpt-4o", cost=cost, input_tokens=300,
        output_tokens=100, key_hash=key_hash, key_masked="sk-...h", user_id="u", team_id="t",
        end_user="eu",
    )  # fmt: skip


async def client_commands(url: str, action: Callable[[], Awaitable[Any]]) -> list[str]:
    """The commands clients sent while `action` ran, as MONITOR saw them (scripts' own excluded)."""
    done = f"llmfence-done-{uuid.uuid4().hex}"
    watcher = redis.asyncio.Redis.from_url(url, decode_responses=True)
    other = redis.asyncio.Redis.from_url(url)
    try:
        await other.ping()  # connected before watching, so its handshake is not counted
        async with watcher.monitor() as monitor:
            await action()
            await other.echo(done)
            commands: list[str] = []
            while True:
                seen = await monitor.next_command()
                if done in seen["command"]:
                    return commands
                if seen["client_type"] != "lua":
                    commands.append(seen["command"].split()[0].upper())
    finally:
        await other.aclose()
        await watcher.aclose()


def asyncio_gather(calls: Sequence[Awaitable[_R]]) -> asyncio.Future[list[_R]]:
    return asyncio.gather(*calls)


async def evalsha_calls(client: redis.asyncio.Redis) -> int:
    stats = await client.info("commandstats")
    calls: int = stats.get("cmdstat_evalsha", {}).get("calls", 0)
    return calls


# -- round trips -----------------------------------------------------------------------------


async def test_admit_and_settle_are_one_round_trip_each(
    store: RedisStore, redis_url: str, inspector: redis.asyncio.Redis
) -> None:
    # The first calls load the scripts (NOSCRIPT, SCRIPT LOAD); steady state is what counts.
    await store.admit(busy_admission("warm-up"))
    await store.settle(Settlement("warm-up", T0, cost=1, tokens=1, record=spend_record("w")))

    before = await evalsha_calls(inspector)
    commands = await client_commands(redis_url, lambda: store.admit(busy_admission("r1")))
    assert commands == ["EVALSHA"]
    settlement = Settlement("r1", T0 + 1, cost=4_000, tokens=400, record=spend_record("r1"))
    commands = await client_commands(redis_url, lambda: store.settle(settlement))
    assert commands == ["EVALSHA"]
    assert await evalsha_calls(inspector) - before == 2

    # A refusal is one round trip too, and so is settling an unknown request.
    refused = Admission("r2", T0, budgets=(BudgetScope("user:x", "user", "x", 0),), cost=1)
    commands = await client_commands(redis_url, lambda: store.admit(refused))
    assert commands == ["EVALSHA"]
    commands = await client_commands(redis_url, lambda: store.settle(Settlement("?", T0, 0)))
    assert commands == ["EVALSHA"]


async def test_scripts_are_package_data_called_by_sha(
    store: RedisStore, inspector: redis.asyncio.Redis
) -> None:
    lua = resources.files("llmfence.stores").joinpath("lua")
    for name in SCRIPTS:
        assert lua.joinpath(f"{name}.lua").is_file(), name
    assert (await store.admit(busy_admission("a"))).admitted
    # Scripts flushed (a Redis restart, a failover): they are loaded again on NOSCRIPT.
    await inspector.script_flush()
    assert (await store.admit(busy_admission("b"))).admitted
    assert await store.settle(Settlement("b", T0, cost=1))
    await store.release("c", [])
    source = lua.joinpath("release.lua").read_text(encoding="utf-8")
    sha = hashlib.sha1(source.encode()).hexdigest()
    assert (await inspector.script_exists(sha)) == [True]


# -- exact money -----------------------------------------------------------------------------


@pytest.mark.parametrize("big", [10**15, 10**15 + 1, 2**53 - 1, 9 * 10**15 + 7])
async def test_money_above_1e15_is_exact(
    store: RedisStore, inspector: redis.asyncio.Redis, big: int
) -> None:
    # Lua formats numbers with %.14g: 1e15 would reach HINCRBY as "1e+15" if it passed
    # through a Lua number unformatted.
    scope = BudgetScope("global", "global", "global", 2**53)
    half = big // 2
    assert (await store.admit(Admission("r", T0, budgets=(scope,), cost=half))).admitted
    record = spend_record("r", cost=big)
    assert await store.settle(Settlement("r", T0, cost=big, record=record))  # a top-up
    [state] = await store.budgets([scope], T0)
    assert (state.spent, state.total) == (big, big)
    assert await inspector.hget("{llmfence:global}:budget:global", "spent") == str(big)
    assert (await store.spend_totals("global")).cost == big
    assert (await store.spend_records())[0].cost == big

    # A reservation that fills the budget to 2**53 exactly, then a refund of all of it.
    rest = 2**53 - big
    assert (await store.admit(Admission("s", T0, budgets=(scope,), cost=rest))).admitted
    assert not (await store.admit(Admission("x", T0, budgets=(scope,), cost=1))).admitted
    assert await store.settle(Settlement("s", T0, cost=0))
    assert (await store.budgets([scope], T0))[0].spent == big

    other = BudgetScope("key:c", "key", "c", None)
    await store.charge([other], big, T0)
    await store.charge([other], 1, T0)
    [state] = await store.budgets([other], T0)
    assert (state.spent, state.total) == (big + 1, big + 1)

    record_limit = KeyRecord(key_hash="k", key_masked="sk-...k", max_budget=big)
    assert await store.create_key(record_limit)
    updated = await store.update_key("k", {"model_max_budget": {"gpt-4o": big + 2}})
    assert updated is not None
    assert updated.max_budget == big
    assert updated.model_max_budget == {"gpt-4o": big + 2}


@pytest.mark.parametrize(
    "costs",
    [
        [1, 2, 3],
        [10**15 - 1, 10**15 - 1, 1],  # the shortcut's edge, then past it
        [2**53 - 1, 1, 2**53],
        [2**63 - 1, 2**63 - 1, 5],  # past what HINCRBY could hold
        [10**30 + 7, -(10**30), -8, 10**15],  # signs, and a sum back down to a short number
        [0, -3, 1],
    ],
)
async def test_spend_totals_are_exact_at_any_size(store: RedisStore, costs: list[int]) -> None:
    memory = MemoryStore()
    for i, cost in enumerate(costs):
        record = SpendRecord(
            request_id=f"r{i}", timestamp=T0, model="m", cost=cost, input_tokens=cost * 3,
            output_tokens=i, user_id="u",
        )  # fmt: skip
        for each in (store, memory):
            await each.settle(Settlement(f"r{i}", T0, 0, record=record))
        groups: list[tuple[SpendGroup, str]] = [("global", ""), ("user", "u"), ("model", "m")]
        for group, name in groups:
            assert await store.spend_totals(group, name) == await memory.spend_totals(group, name)
    totals = await store.spend_totals("user", "u")
    assert (totals.cost, totals.input_tokens, totals.requests) == (
        sum(costs),
        3 * sum(costs),
        len(costs),
    )


async def test_settle_writes_all_totals_in_one_command(
    store: RedisStore, inspector: redis.asyncio.Redis
) -> None:
    # A record counted in all six groups: one read and one write of the totals, however many.
    record = SpendRecord(
        request_id="r", timestamp=T0, model="m", cost=5, key_hash="h", user_id="u",
        team_id="t", end_user="e",
    )  # fmt: skip
    await store.settle(Settlement("warm-up", T0, 0, record=record))  # scripts loaded

    async def watch() -> list[str]:
        seen: list[str] = []
        async with inspector.monitor() as monitor:
            await store.settle(Settlement("r", T0, 0, record=record))
            await inspector.echo("llmfence-done")
            while "llmfence-done" not in (command := await monitor.next_command())["command"]:
                if command["client_type"] == "lua" and "spend}:totals" in command["command"]:
                    seen.append(command["command"].split()[0].upper())
        return seen

    assert await watch() == ["HMGET", "HSET"]
    assert (await store.spend_totals("end_user", "e")).requests == 2


async def test_headroom_and_refusal_amounts_are_exact(store: RedisStore) -> None:
    limit = 2**53 - 1
    scope = BudgetScope("key:h", "key", "sk-...h", limit)
    await store.charge([scope], limit - 3, T0)
    refused = await store.admit(Admission("r", T0, budgets=(scope,), cost=4))
    assert refused.refusal is not None
    assert refused.refusal.current == limit - 3
    assert refused.headroom == 3
    assert (await store.admit(Admission("r", T0, budgets=(scope,), cost=3))).admitted


# -- persistence, ownership and errors -------------------------------------------------------


async def test_a_new_store_sees_what_another_wrote(redis_url: str) -> None:
    first = RedisStore.from_url(redis_url)
    key = KeyRecord(key_hash="h", key_masked="sk-...h", user_id="u")
    assert await first.create_key(key)
    assert (await first.admit(busy_admission("open"))).admitted
    await first.settle(Settlement("other", T0, cost=0, record=spend_record("other")))
    await first.aclose()

    second = RedisStore.from_url(redis_url)  # another worker, or this one restarted
    try:
        assert await second.get_key("h") == key
        assert [k.key_hash for k in await second.list_keys(user_id="u")] == ["h"]
        assert [r.request_id for r in await second.spend_records()] == ["other"]
        states = await second.budgets(busy_admission("x").budgets, T0)
        assert [s.spent for s in states] == [5_000, 5_000, 5_000]
        # The reservation made through the first store settles through the second.
        assert await second.settle(Settlement("open", T0, cost=1_000))
        states = await second.budgets(busy_admission("x").budgets, T0)
        assert [s.spent for s in states] == [1_000, 1_000, 1_000]
    finally:
        await second.aclose()


async def test_spend_records_are_json_arrays_and_older_objects_still_read(
    store: RedisStore, inspector: redis.asyncio.Redis
) -> None:
    record = spend_record("new")
    await store.settle(Settlement("new", T0, 0, record=record))
    [stored] = await inspector.lrange("{llmfence:spend}:log", 0, -1)
    assert json.loads(stored) == list(record)
    # Records an earlier version wrote: an object, and an array without the last fields.
    older = spend_record("object")
    await inspector.rpush("{llmfence:spend}:log", json.dumps(older.to_dict()))
    await inspector.rpush("{llmfence:spend}:log", json.dumps(["short", T0, "m", 3]))
    short = SpendRecord(request_id="short", timestamp=T0, model="m", cost=3)
    assert await store.spend_records() == [record, older, short]


async def test_aclose_closes_only_a_client_the_store_opened(
    redis_url: str, inspector: redis.asyncio.Redis
) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        lent = RedisStore(client)
        await lent.ping()
        await lent.aclose()
        assert await client.ping()  # still the caller's, still open
        await lent.ping()
    finally:
        await client.aclose()

    async def named_clients() -> int:
        return sum(c["name"] == "llmfence-owned" for c in await inspector.client_list())

    owned = RedisStore.from_url(redis_url, client_name="llmfence-owned")
    assert await named_clients() == 0  # nothing connected before the first call
    await owned.ping()
    assert await named_clients() == 1
    await owned.aclose()
    for _ in range(200):  # the server notices a closed socket on its own time
        if not await named_clients():
            break
        await anyio.sleep(0.01)
    else:
        pytest.fail("aclose() left the store's connection open")


async def test_decode_responses_clients_work(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, decode_responses=True)
    store = RedisStore(client, prefix="decoded")
    try:
        key = KeyRecord(key_hash="h", key_masked="sk-...h", team_id="t", models=("a",))
        assert await store.create_key(key)
        assert await store.list_keys(team_id="t") == [key]
        assert (await store.admit(busy_admission("r"))).admitted
        assert await store.settle(Settlement("r", T0, cost=7, record=spend_record("r")))
        assert (await store.spend_totals("team", "t")).requests == 1
        await store.set_access_group("g", ["a", "b"])
        assert await store.access_groups() == {"g": ("a", "b")}
    finally:
        await client.aclose()


def test_a_sync_caller_may_use_a_new_event_loop_per_call(redis_url: str) -> None:
    # What a sync facade does without a loop of its own: anyio.run per call, closing after.
    store = RedisStore.from_url(redis_url)
    scope = [BudgetScope("global", "global", "global")]

    async def charge_and_read() -> int:
        try:
            await store.charge(scope, 5, T0)
            [state] = await store.budgets(scope, T0)
            return state.spent
        finally:
            await store.aclose()

    assert [anyio.run(charge_and_read) for _ in range(3)] == [5, 10, 15]


def test_construction_does_no_io(closed_port: int) -> None:
    # Outside any event loop and with nothing listening: building a store must still work.
    RedisStore.from_url(f"redis://127.0.0.1:{closed_port}/0")


def test_options_are_checked() -> None:
    with pytest.raises(ConfigurationError):
        RedisStore.from_url("redis://localhost", prefix="{bad}")
    with pytest.raises(ConfigurationError):
        RedisStore.from_url("redis://localhost", timeout=0)
    with pytest.raises(ConfigurationError):
        RedisStore.from_url("redis://localhost", max_spend_records=-1)


async def test_unreachable_server_raises_store_error(closed_port: int) -> None:
    store = RedisStore.from_url(f"redis://127.0.0.1:{closed_port}/0", timeout=0.3)
    calls: list[Callable[[], Awaitable[object]]] = [
        store.ping,
        lambda: store.admit(busy_admission("r")),
        lambda: store.settle(Settlement("r", T0, cost=1)),
        lambda: store.get_key("h"),
        lambda: store.spend_totals("global"),
        lambda: store.budgets([BudgetScope("global", "global", "global")], T0),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StoreError) as caught:
            await call()
        assert time.monotonic() - started < 1.5
        assert caught.value.__cause__ is not None
        assert caught.value.status_code == 503
    await store.aclose()


async def test_a_silent_server_times_out_as_store_error() -> None:
    # A socket that accepts connections into its backlog and never answers.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        store = RedisStore.from_url(f"redis://127.0.0.1:{port}/0", timeout=0.2)
        started = time.monotonic()
        with pytest.raises(StoreError) as caught:
            await store.admit(busy_admission("r"))
        assert time.monotonic() - started < 1.0
        assert caught.value.__cause__ is not None
        await store.aclose()


async def test_recovers_after_a_timeout(redis_url: str, inspector: redis.asyncio.Redis) -> None:
    store = RedisStore.from_url(redis_url, timeout=0.2)
    scope = [BudgetScope("global", "global", "global")]
    try:
        await store.charge(scope, 5, T0)
        await inspector.client_pause(700)  # Redis stops answering for 0.7 s
        with pytest.raises(StoreError) as caught:
            await store.charge(scope, 1, T0)
        assert isinstance(caught.value.__cause__, TimeoutError)
        await anyio.sleep(0.8)
        # The cancelled call's connection was dropped, so no late reply is read as the next
        # call's. Whether the timed-out charge ran is unknown to the caller; it ran at most
        # once (no retry sends it again).
        [state] = await store.budgets(scope, T0)
        assert state.spent in (5, 6)
        await store.ping()
    finally:
        await store.aclose()


async def test_a_burst_of_first_calls_waits_for_the_bounded_pool(
    redis_url: str, inspector: redis.asyncio.Redis
) -> None:
    # A cold start: many requests at once on a store that has no connection yet. They share
    # a bounded pool (waiting for a free connection within their deadline) instead of each
    # opening its own, and every one of them succeeds.
    store = RedisStore.from_url(redis_url, timeout=30.0, max_connections=4, client_name="burst")
    scope = BudgetScope("global", "global", "global")

    async def request(i: int) -> None:
        assert await store.get_key(f"h{i}") is None
        assert (await store.admit(Admission(f"r{i}", T0, budgets=(scope,), cost=1))).admitted
        assert await store.settle(Settlement(f"r{i}", T0, cost=1))

    try:
        async with anyio.create_task_group() as tg:
            for i in range(300):
                tg.start_soon(request, i)
        clients = [c for c in await inspector.client_list() if c["name"] == "burst"]
        assert 1 <= len(clients) <= 4
        assert (await store.budgets([scope], T0))[0].spent == 300
    finally:
        await store.aclose()


async def test_calls_after_a_redis_restart_succeed() -> None:
    # Every pooled connection is broken after a restart: a call that meets one is tried once
    # more on a fresh connection, so none of them fails.
    with RedisServer() as server:
        store = RedisStore.from_url(server.url)
        scope = BudgetScope("global", "global", "global")

        async def burst(tag: str) -> None:
            async def request(i: int) -> None:
                await store.ping()
                assert await store.get_key(f"h{i}") is None
                admission = Admission(f"{tag}{i}", T0, budgets=(scope,), cost=1)
                assert (await store.admit(admission)).admitted
                assert await store.settle(Settlement(f"{tag}{i}", T0, cost=2))
                await store.release(f"{tag}{i}", ["parallel:k"])
                assert (await store.spend_totals("global")).requests == 0

            async with anyio.create_task_group() as tg:
                for i in range(20):
                    tg.start_soon(request, i)

        try:
            await burst("before")  # the pool holds several connections now
            server.stop()
            server.start()  # the same port, an empty Redis
            await burst("after")
            assert (await store.budgets([scope], T0))[0].spent == 40
        finally:
            await store.aclose()


@pytest.mark.parametrize(("script", "repeated"), [("admit", True), ("charge", False)])
async def test_only_repeatable_calls_are_retried_after_a_connection_error(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch, script: str, repeated: bool
) -> None:
    await store.ping()
    connection = store._connect()
    sent: list[str] = []
    execute = connection.execute

    async def flaky(*args: Any) -> Any:
        sent.append(str(args[0]))
        if len(sent) == 1:
            raise redis.ConnectionError("Connection closed by server.")
        return await execute(*args)

    monkeypatch.setattr(connection, "execute", flaky)
    scope = BudgetScope("global", "global", "global")
    if script == "admit":
        assert (await store.admit(Admission("r", T0, budgets=(scope,), cost=3))).admitted
    else:
        with pytest.raises(StoreError) as caught:
            await store.charge([scope], 3, T0)
        assert isinstance(caught.value.__cause__, redis.ConnectionError)
    assert len(sent) == (2 if repeated else 1)
    assert (await store.budgets([scope], T0))[0].spent == (3 if repeated else 0)


async def test_a_burst_of_reads_of_one_record_is_one_read(
    store: RedisStore, inspector: redis.asyncio.Redis
) -> None:
    # A cold start: every request misses the key-record cache at once. They share one read.
    record = KeyRecord(key_hash="h", key_masked="sk-...h", rpm_limit=5)
    assert await store.create_key(record)
    await inspector.config_resetstat()
    found = await asyncio_gather([store.get_key("h") for _ in range(200)])
    assert found == [record] * 200
    stats = await inspector.info("commandstats")
    assert 1 <= stats["cmdstat_hgetall"]["calls"] < 200
    # A caller that wrote a record reads what it wrote, shared reads or not.
    for limit in range(6, 10):
        reads = [store.get_key("h") for _ in range(5)]
        pending = asyncio_gather(reads)
        updated = await store.update_key("h", {"rpm_limit": limit})
        assert updated is not None
        assert updated.rpm_limit == limit
        assert await store.get_key("h") == updated
        await pending


def test_redis_is_imported_lazily() -> None:
    code = (
        "import sys; import llmfence.stores.redis; "
        "assert 'redis' not in sys.modules, 'redis imported at module import'; "
        "sys.modules['redis'] = None\n"
        "try:\n"
        "    llmfence.stores.redis.RedisStore.from_url('redis://localhost')\n"
        "except ImportError as exc:\n"
        "    assert 'llmfence[redis]' in str(exc), exc\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# -- keys ------------------------------------------------------------------------------------


async def exercise(store: RedisStore, plain_key: str) -> None:
    """Write every kind of state once."""
    key_hash = hash_key(plain_key)
    record = KeyRecord(key_hash=key_hash, key_masked=mask_key(plain_key), user_id="u", team_id="t")
    await store.create_key(record)
    await store.update_key(key_hash, {"team_id": "t2"})
    await store.create_user(UserRecord(user_id="u"))
    await store.set_access_group("g", ["m"])
    await store.set_project("p", {"u": {"total_budget": 1.0}})
    admission = busy_admission("kept")
    await store.admit(admission)
    await store.admit(busy_admission("settled"))
    await store.settle(
        Settlement("settled", T0, cost=10, tokens=5, record=spend_record("s", key_hash=key_hash))
    )
    await store.charge([BudgetScope(f"key:{key_hash}", "key", record.key_masked)], 5, T0)


async def dump(client: redis.asyncio.Redis) -> dict[str, str]:
    """Every key and a text rendering of its value."""
    values: dict[str, str] = {}
    async for key in client.scan_iter("*"):
        kind = await client.type(key)
        if kind == "string":
            value: object = await client.get(key)
        elif kind == "hash":
            value = await client.hgetall(key)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = await client.smembers(key)
        else:
            raise AssertionError(f"unexpected {kind!r} at {key!r}")
        values[key] = repr(value)
    return values


@pytest.mark.parametrize("prefix", ["llmfence", "tenant-a:prod"])
async def test_keys_are_tagged_by_scope(
    redis_url: str, inspector: redis.asyncio.Redis, prefix: str
) -> None:
    # One hash tag per scope (a cluster spreads them), one for the spend log and its totals,
    # and the registry's: every key is one of those, under the store's prefix.
    store = RedisStore.from_url(redis_url, prefix=prefix)
    try:
        await exercise(store, "sk-" + "x" * 40)
    finally:
        await store.aclose()
    keys = list(await dump(inspector))
    assert len(keys) > 15
    tags = {key[: key.index("}") + 1] for key in keys}
    scopes = {"global", "user:u", "key:h", "h", "u"}  # busy_admission names no windows
    scopes |= {f"key:{hash_key('sk-' + 'x' * 40)}"}
    expected = {"{" + prefix + "}", "{" + prefix + ":spend}"}
    expected |= {"{" + prefix + ":" + scope + "}" for scope in scopes}
    assert tags <= expected, tags - expected
    assert {"{" + prefix + "}", "{" + prefix + ":spend}", "{" + prefix + ":user:u}"} <= tags
    assert f"{{{prefix}:key:h}}:budget:key:h" in keys
    assert f"{{{prefix}:key:h}}:lease:parallel:key:h" in keys  # with the key's budget
    assert len({key_slot(tag.encode()) for tag in tags}) == len(tags)  # all on their own slots


async def test_the_plain_key_is_never_stored(
    store: RedisStore, inspector: redis.asyncio.Redis
) -> None:
    plain = "sk-" + "Zq9" * 12
    await exercise(store, plain)
    for name, value in (await dump(inspector)).items():
        assert plain not in name
        assert plain not in value
        assert plain[3:] not in value


async def test_buckets_and_leases_expire_on_their_own(
    store: RedisStore, inspector: redis.asyncio.Redis
) -> None:
    admission = Admission(
        "r", T0,
        rates=(RateHit("rpm:k", "requests", "key", "k", 5, 1, window=3600.0),),
        slots=(SlotRequest("parallel:k", "key", "k", 2, ttl=7200.0),),
    )  # fmt: skip
    assert (await store.admit(admission)).admitted
    # A bucket is empty one window after its last write; its key outlives it.
    assert 3600 * 1000 < await inspector.pttl("{llmfence:rpm:k}:bucket:rpm:k") <= 2 * 3600 * 1000
    assert 3600 * 1000 < await inspector.pttl("{llmfence:k}:lease:parallel:k") <= 7200 * 1000
    assert 0 < await inspector.pttl("{llmfence}:reservation:r") <= 86_400 * 1000
    assert await store.settle(Settlement("r", T0, cost=0))
    assert await inspector.exists("{llmfence}:reservation:r") == 0
    assert await inspector.zcard("{llmfence:k}:lease:parallel:k") == 0


async def test_key_indexes_follow_updates_and_deletes(
    store: RedisStore, inspector: redis.asyncio.Redis
) -> None:
    for i in range(4):
        await store.create_key(
            KeyRecord(key_hash=f"h{i}", key_masked="sk-...", user_id=f"u{i % 2}", team_id="t")
        )
    assert [k.key_hash for k in await store.list_keys(user_id="u0")] == ["h0", "h2"]
    await store.update_key("h0", {"user_id": None, "team_id": "t2"})
    await store.update_key("h1", {"user_id": "u0"})
    await store.delete_key("h2")
    assert [k.key_hash for k in await store.list_keys(user_id="u0")] == ["h1"]
    assert [k.key_hash for k in await store.list_keys(team_id="t")] == ["h1", "h3"]
    assert [k.key_hash for k in await store.list_keys()] == ["h0", "h1", "h3"]
    assert sorted(await inspector.zrange("{llmfence}:keys:by_user", 0, -1)) == [
        "u0\0h1",
        "u1\0h3",
    ]
    assert sorted(await inspector.zrange("{llmfence}:keys:by_team", 0, -1)) == [
        "t\0h1",
        "t\0h3",
        "t2\0h0",
    ]
    # A user id that is a prefix of another, or holds the separator, stays apart.
    await store.create_key(KeyRecord(key_hash="h9", key_masked="sk-...", user_id="u0\0h1"))
    assert [k.key_hash for k in await store.list_keys(user_id="u0")] == ["h1"]
    assert [k.key_hash for k in await store.list_keys(user_id="u0\0h1")] == ["h9"]


# -- the same answers as MemoryStore ---------------------------------------------------------


class History:
    """A random sequence of store calls, replayed on two stores."""

    RATE_KEYS: ClassVar[dict[str, float]] = {
        "rpm:a": 1.0,
        "rpm:b": 60.0,
        "tpm:a": 10.0,
        "tpm:b": 60.0,
    }
    SLOT_KEYS = ("parallel:a", "parallel:b")
    BUDGET_KEYS: ClassVar[dict[str, float | None]] = {
        "global": None,
        "user:u": 10.0,
        "key:k": 30.0,
        "team:t": 3600.0,
    }

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = T0 + self.rng.random() * 100
        self.admitted: list[Admission] = []
        self.count = 0

    def tick(self) -> None:
        self.now += self.rng.choice([0.0, 0.001, 0.25, 1.5, 4.75, 11.0, 31.3, 61.0])

    def admission(self) -> Admission:
        rng = self.rng
        self.count += 1
        rates = []
        for key in rng.sample(sorted(self.RATE_KEYS), rng.randint(0, 3)):
            kind: RateKind = "requests" if key.startswith("rpm") else "tokens"
            limit = rng.randint(0, 6) if kind == "requests" else rng.randint(0, 3000)
            cost = 1 if kind == "requests" else rng.randint(0, 1500)
            rates.append(RateHit(key, kind, "key", key, limit, cost, self.RATE_KEYS[key]))
        if rates and rng.random() < 0.1:
            rates.append(rates[0])  # a key named twice
        slots = [
            SlotRequest(key, "key", key, rng.randint(0, 3), rng.choice([2.0, 30.0, 600.0]))
            for key in rng.sample(self.SLOT_KEYS, rng.randint(0, 2))
        ]
        budgets = []
        for key in rng.sample(sorted(self.BUDGET_KEYS), rng.randint(0, 4)):
            period = self.BUDGET_KEYS[key]
            budget: int | None = rng.choice([None, rng.randint(0, 5000), rng.randint(0, 50_000)])
            end = None if period is None else self.now + period
            budgets.append(BudgetScope(key, key.split(":")[0], key, budget, end))
        if budgets and rng.random() < 0.1:
            budgets.append(budgets[-1])
        return Admission(
            f"r{self.count}", self.now, tuple(rates), tuple(slots), tuple(budgets),
            cost=rng.randint(0, 3000), ttl=rng.choice([86_400.0, 5.0, 40.0]),
        )  # fmt: skip

    def settlement(self) -> Settlement:
        # Each id is settled once: a settled id is tombstoned in RedisStore (its replies can
        # be lost) and not in MemoryStore (it never loses one), so a second settlement of it
        # is no test of sameness. Unknown ids charge the levels the settlement names.
        rng = self.rng
        if self.admitted and rng.random() < 0.9:
            request_id = self.admitted.pop(rng.randrange(len(self.admitted))).request_id
        else:
            self.count += 1
            request_id = f"unknown{self.count}"
        record = None
        if rng.random() < 0.5:
            record = SpendRecord(
                request_id=request_id, timestamp=self.now, model=rng.choice(["m1", "m2"]),
                cost=rng.randint(0, 5000), input_tokens=rng.randint(0, 100),
                output_tokens=rng.randint(0, 100), key_hash=rng.choice(["k1", None]),
                user_id=rng.choice(["u", None]), end_user=rng.choice(["e", "", None]),
                latency_ms=rng.random() * 100,
            )  # fmt: skip
        tokens = rng.choice([None, rng.randint(0, 2000)])
        charges = tuple(rng.sample(self.scopes(), rng.randint(0, 3)))
        return Settlement(
            request_id, self.now, rng.randint(0, 6000), tokens, record, charges=charges
        )

    def scopes(self) -> list[BudgetScope]:
        return [
            BudgetScope(key, key, key, 1000, None if p is None else self.now + p)
            for key, p in self.BUDGET_KEYS.items()
        ]


@pytest.mark.parametrize("seed", range(6))
async def test_matches_memory_store(redis_url: str, seed: int) -> None:
    memory = MemoryStore(max_spend_records=20)
    store = RedisStore.from_url(redis_url, max_spend_records=20)
    history = History(seed)
    rng = history.rng

    async def both(method: str, *args: Any, **kwargs: Any) -> Any:
        expected = await getattr(memory, method)(*args, **kwargs)
        assert await getattr(store, method)(*args, **kwargs) == expected
        return expected

    try:
        for _ in range(400):
            history.tick()
            roll = rng.random()
            if roll < 0.55:
                admission = history.admission()
                result = await both("admit", admission)
                if result.admitted:
                    history.admitted.append(admission)
            elif roll < 0.8:
                settlement = history.settlement()
                await both("settle", settlement)
            elif roll < 0.87 and history.admitted:
                chosen = rng.choice(history.admitted)
                slot_keys = [slot.key for slot in chosen.slots]
                await both("release", chosen.request_id, slot_keys)
            elif roll < 0.93:
                scopes = rng.sample(history.scopes(), 2)
                cost = rng.randint(0, 4000)
                await both("charge", scopes, cost, history.now)
            elif roll < 0.96:
                key = rng.choice(sorted(History.BUDGET_KEYS))
                end = rng.choice([None, history.now + 20])
                await both("reset_budget", key, end, history.now)
            await both("budgets", history.scopes(), history.now)
        await both("spend_records", limit=1000)
        await both("spend_records", user_id="u", limit=5)
        for group, name in [("global", ""), ("model", "m1"), ("key", "k1"), ("end_user", "e")]:
            await both("spend_totals", group, name)
    finally:
        await store.aclose()


async def test_concurrent_admissions_from_many_stores(redis_url: str) -> None:
    # Several app instances, each with its own connections, share one budget exactly.
    # A generous deadline: the test is about exactness, not speed, on a shared machine.
    stores = [RedisStore.from_url(redis_url, timeout=30.0) for _ in range(4)]
    scope = BudgetScope("global", "global", "global", 100_000)
    admitted: list[int] = []

    async def reserve(store: RedisStore, cost: int) -> None:
        result = await store.admit(Admission(uuid.uuid4().hex, T0, budgets=(scope,), cost=cost))
        if result.admitted:
            admitted.append(cost)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(400):
                tg.start_soon(reserve, stores[i % 4], 100 + i)
        [state] = await stores[0].budgets([scope], T0)
        assert state.spent == sum(admitted) <= 100_000
    finally:
        for store in stores:
            await store.aclose()


# -- settlement rules ------------------------------------------------------------------------


async def test_a_settlement_leaves_a_tombstone_with_a_ttl(
    store: RedisStore, inspector: redis.asyncio.Redis
) -> None:
    assert (await store.admit(busy_admission("r"))).admitted
    assert await store.settle(Settlement("r", T0, cost=1))
    assert 0 < await inspector.pttl("{llmfence}:tombstone:r") <= 600_000
    # An unknown id charges the levels it names (an end user's expires when idle, as a
    # charge's does), and is tombstoned too.
    end_user = BudgetScope("end_user:e", "end_user", "e", None, T0 + 60)
    assert not await store.settle(Settlement("u", T0, cost=5, charges=(end_user,)))
    assert 0 < await inspector.pttl("{llmfence}:tombstone:u") <= 600_000
    assert 0 < await inspector.pttl("{llmfence:end_user:e}:budget:end_user:e") <= 120_000
    assert not await store.settle(Settlement("u", T0, cost=5, charges=(end_user,)))
    assert (await store.budgets([end_user], T0))[0].spent == 5
