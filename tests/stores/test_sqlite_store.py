"""`SQLiteStore`: the contract suite on a real file, and what only a file shared by processes
has to show: state that survives a restart, exact limits across OS processes, a locked
database that fails within the timeout, WAL mode, and an event loop that never waits."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from llmfence import Fence, MemoryStore, SQLiteStore
from llmfence.exceptions import ConfigurationError, StoreError
from llmfence.stores import (
    Admission,
    BudgetScope,
    KeyRecord,
    RateHit,
    Settlement,
    SpendRecord,
    Store,
    TeamRecord,
    UserRecord,
    hash_key,
    mask_key,
)
from llmfence.stores._memory_state import ENDED_GRACE
from llmfence.stores._sqlite_base import SCHEMA_VERSION
from llmfence.testing import FakeClock, mock_llm_app
from tests.middleware.conftest import CHAT, auth, chat_body, client_for

from . import test_contract
from .test_redis_store import History

pytestmark = pytest.mark.anyio

T0 = test_contract.T0
DAY = 86_400.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    sqlite_store = SQLiteStore(tmp_path / "llmfence.db", max_spend_records=50)
    yield sqlite_store
    await sqlite_store.aclose()


@pytest.fixture
def lossy_store(store: SQLiteStore) -> SQLiteStore:
    return store


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


def rid() -> str:
    return uuid.uuid4().hex


def rpm(limit: int) -> RateHit:
    return RateHit("rpm:key:k1", "requests", "key", "sk-...k1", limit, 1)


# -- persistence -----------------------------------------------------------------------------


async def test_everything_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "llmfence.db"
    key = KeyRecord(
        key_hash=hash_key("sk-" + "a" * 40), key_masked=mask_key("sk-" + "a" * 40),
        user_id="alice", team_id="core", max_budget=10_000, metadata={"env": "prod"},
        model_max_budget={"gpt-4o": 500},
    )  # fmt: skip
    user = UserRecord(user_id="alice", max_budget=5_000)
    team = TeamRecord(team_id="core", rpm_limit=3)
    scopes = (BudgetScope("key:h", "key", "h", 1_000, T0 + DAY), BudgetScope("global", "global",
              "global", None))  # fmt: skip
    record = SpendRecord(request_id="r1", timestamp=T0, model="gpt-4o", cost=250, key_hash="h",
                         user_id="alice", end_user="eu", input_tokens=7)  # fmt: skip

    first = SQLiteStore(path)
    assert await first.create_key(key)
    assert await first.create_user(user)
    assert await first.create_team(team)
    await first.set_access_group("beta", ["mistral"])
    await first.set_project("p", {"u": {"total_budget": 1.5}})
    assert (await first.admit(Admission("r1", T0, (rpm(2),), budgets=scopes, cost=400))).admitted
    held = Admission("r2", T0, budgets=scopes, cost=100)
    assert (await first.admit(held)).admitted
    assert await first.settle(Settlement("r1", T0, 250, record=record))
    await first.aclose()

    second = SQLiteStore(path)
    try:
        assert await second.get_key(key.key_hash) == key
        assert await second.list_keys(user_id="alice") == [key]
        assert await second.get_user("alice") == user
        assert await second.get_team("core") == team
        assert await second.access_groups() == {"beta": ("mistral",)}
        assert await second.get_project("p") == {"u": {"total_budget": 1.5}}
        states = await second.budgets(scopes, T0 + 1)
        assert [(s.spent, s.total, s.resets_at) for s in states] == [
            (350, 250, T0 + DAY), (350, 250, None)
        ]  # fmt: skip
        assert await second.spend_records() == [record]
        assert (await second.spend_totals("global")).cost == 250
        assert (await second.spend_totals("end_user", "eu")).input_tokens == 7
        # The reservation and the bucket hit made before the restart stand after it.
        assert await second.settle(Settlement("r2", T0 + 1, 10))
        assert [s.spent for s in await second.budgets(scopes, T0 + 1)] == [260, 260]
        again = await second.admit(Admission(rid(), T0, (rpm(2),)))
        assert again.rates[0].remaining == 0
    finally:
        await second.aclose()


async def test_keys_made_through_the_admin_api_work_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "gateway.db"
    clock = FakeClock(T0)

    def gateway(store: SQLiteStore) -> Any:
        app = mock_llm_app()
        Fence(store=store, master_key="sk-master-key-123", clock=clock.now).install(app, admin=True)
        return app

    before = SQLiteStore(path)
    async with client_for(gateway(before)) as client:
        made = await client.post(
            "/key/generate", json={"max_budget": 10}, headers=auth("sk-master-key-123")
        )
        key = made.json()["key"]
        assert (await client.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 200
        info = await client.get("/key/info", params={"key": key}, headers=auth("sk-master-key-123"))
        spend = info.json()["info"]["spend"]
        assert spend > 0
    await before.aclose()

    after = SQLiteStore(path)  # a new process, in effect: nothing shared but the file
    async with client_for(gateway(after)) as client:
        info = await client.get("/key/info", params={"key": key}, headers=auth("sk-master-key-123"))
        assert info.json()["info"]["spend"] == spend
        assert (await client.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 200
    await after.aclose()


# -- many processes, one file ----------------------------------------------------------------

_WORKER = textwrap.dedent(
    """
    import asyncio, json, random, sys
    from llmfence import SQLiteStore
    from llmfence.stores import Admission, BudgetScope, RateHit

    path, seed, now = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

    async def main() -> None:
        store = SQLiteStore(path, timeout=30)
        await store.ping()
        print("ready", flush=True)
        sys.stdin.readline()  # go
        rng = random.Random(seed)
        hit = RateHit("rpm:key:shared", "requests", "key", "k", 137, 1)
        budget = (BudgetScope("key:shared", "key", "k", 300_000),)

        async def rate() -> bool:
            return (await store.admit(Admission(f"r{seed}-{rng.random()}", now, (hit,)))).admitted

        async def spend(cost: int) -> int:
            admission = Admission(f"b{seed}-{rng.random()}", now, budgets=budget, cost=cost)
            return cost if (await store.admit(admission)).admitted else 0

        rates = await asyncio.gather(*(rate() for _ in range(200)))
        spent = await asyncio.gather(*(spend(rng.randint(1, 5_000)) for _ in range(200)))
        await store.aclose()
        print(json.dumps({"rpm": sum(rates), "spent": sum(spent)}), flush=True)

    asyncio.run(main())
    """
)


def test_two_processes_never_exceed_a_limit_together(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, path, str(seed), str(T0)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    try:
        for worker in workers:  # both have opened the file before either admits
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        results = [json.loads(worker.communicate(timeout=60)[0]) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()
    assert all(worker.returncode == 0 for worker in workers)
    assert sum(r["rpm"] for r in results) == 137  # exactly the limit, across both
    spent = sum(r["spent"] for r in results)
    assert spent <= 300_000

    async def read() -> int:
        store = SQLiteStore(path)
        try:
            scope = BudgetScope("key:shared", "key", "k", 300_000)
            return (await store.budgets([scope], T0))[0].spent
        finally:
            await store.aclose()

    assert asyncio.run(read()) == spent  # exactly what was admitted, nothing lost or doubled


# -- time bounds and the event loop ----------------------------------------------------------


async def test_a_locked_database_fails_within_the_timeout(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = SQLiteStore(path, timeout=0.2)
    await store.ping()  # creates the file and its schema
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process's write, stuck
        secret = "sk-" + "s" * 40
        scope = BudgetScope(f"key:{hash_key(secret)}", "key", mask_key(secret), 100)
        with pytest.raises(StoreError) as failed:
            await store.admit(Admission(rid(), T0, budgets=(scope,), cost=1))
        assert isinstance(failed.value.__cause__, sqlite3.OperationalError | TimeoutError)
        assert secret not in str(failed.value)
        assert hash_key(secret) not in str(failed.value)
        blocker.execute("ROLLBACK")
        # Recovery needs no restart.
        assert (await store.admit(Admission(rid(), T0, budgets=(scope,), cost=1))).admitted
    finally:
        blocker.close()
        await store.aclose()


async def test_the_event_loop_runs_while_a_call_waits(tmp_path: Path) -> None:
    path = tmp_path / "slow.db"
    store = SQLiteStore(path, timeout=60)
    await store.ping()
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the store's next write waits for this lock
        admit = asyncio.ensure_future(store.admit(Admission(rid(), T0, (rpm(5),))))
        ticks = 0
        while ticks < 20:  # the loop keeps running other tasks meanwhile
            await anyio.sleep(0.005)
            ticks += 1
        assert not admit.done()
        blocker.execute("COMMIT")
        assert (await admit).admitted
    finally:
        blocker.close()
        await store.aclose()


async def test_wal_mode_and_schema_version(store: SQLiteStore) -> None:
    await store.ping()
    raw = sqlite3.connect(store.path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")  # a newer llmfence's file
        raw.commit()
    finally:
        raw.close()
    newer = SQLiteStore(store.path)
    with pytest.raises(StoreError, match="schema version"):
        await newer.ping()
    await newer.aclose()


def test_one_store_serves_one_event_loop_after_another(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "loops.db")
    for _ in range(3):  # each asyncio.run is a new loop, as a sync facade makes them
        assert asyncio.run(store.admit(Admission(rid(), T0, (rpm(5),)))).admitted
    result = asyncio.run(store.admit(Admission(rid(), T0, (rpm(5),))))
    assert result.rates[0].remaining == 1
    asyncio.run(store.aclose())


async def test_fence_store_timeout_governs_the_store(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "t.db")
    assert store.call_timeout == 5.0  # the default of every shipped store
    assert SQLiteStore.bounds_call_time
    assert not getattr(SQLiteStore, "never_suspends", False)
    Fence(store=store, master_key="sk-master-key-123", store_timeout=0.75)
    assert store.call_timeout == 0.75
    for bad in (0, -1, float("inf"), True, "1"):
        with pytest.raises(ConfigurationError):
            store.set_call_timeout(bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        SQLiteStore(tmp_path / "t.db", max_spend_records=-1)
    assert not (tmp_path / "t.db").exists()  # nothing opened before the first call


# -- exact money and bounded state -----------------------------------------------------------


async def test_amounts_beyond_64_bits_stay_exact(store: Store) -> None:
    huge = 2**70 + 3
    scope = BudgetScope("global", "global", "global", None)
    await store.charge([scope], huge, T0)
    await store.charge([scope], huge, T0)
    [state] = await store.budgets([scope], T0)
    assert (state.spent, state.total) == (2 * huge, 2 * huge)
    record = SpendRecord(request_id="r", timestamp=T0, model="m", cost=huge, key_hash="k")
    await store.settle(Settlement("r", T0, 0, record=record))
    await store.settle(Settlement("r2", T0, 0, record=record._replace(request_id="r2")))
    assert (await store.spend_totals("key", "k")).cost == 2 * huge
    assert (await store.spend_records())[0].cost == huge


def _end_user_scopes(name: str) -> tuple[BudgetScope, ...]:
    return (
        BudgetScope("key:k", "key", "k", 10**12),
        BudgetScope(f"end_user:{name}", "end_user", name, 5_000, T0 + DAY),
    )


async def test_idle_end_users_are_swept_and_operators_kept(store: SQLiteStore) -> None:
    for i in range(30):
        rates = (RateHit(f"rpm:end_user:eu{i}", "requests", "end_user", f"eu{i}", 5, 1),)
        admission = Admission(f"r{i}", T0, rates, budgets=_end_user_scopes(f"eu{i}"), cost=100)
        assert (await store.admit(admission)).admitted
        await store.settle(Settlement(f"r{i}", T0, 7))
    slow = Admission("slow", T0, budgets=_end_user_scopes("slow"), cost=100, ttl=3 * DAY)
    assert (await store.admit(slow)).admitted
    counts = await store.entry_counts()
    assert (counts["budgets"], counts["buckets"], counts["reservations"]) == (32, 30, 1)
    later = T0 + DAY + ENDED_GRACE
    await store._sweep(later)
    counts = await store.entry_counts()
    # The key's counter stays (its total is the operator's), and the end user a live
    # reservation holds; every other end user's counter and bucket is gone.
    assert (counts["budgets"], counts["buckets"], counts["reservations"]) == (2, 0, 1)
    [key, end_user] = await store.budgets(_end_user_scopes("eu3"), later)
    assert (key.total, end_user.spent, end_user.total) == (7 * 30, 0, 0)
    assert await store.settle(Settlement("slow", later, 30))
    await store._sweep(later)
    assert (await store.entry_counts())["budgets"] == 1


async def test_end_user_totals_are_bounded(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "totals.db", max_spend_records=10)
    try:
        for i in range(1005):
            record = SpendRecord(request_id=f"r{i}", timestamp=T0, model="m", cost=1,
                                 key_hash="k", end_user=f"eu{i}")  # fmt: skip
            await store.settle(Settlement(f"r{i}", T0, 1, record=record))
        assert (await store.spend_totals("end_user", "eu1004")).requests == 1
        assert (await store.spend_totals("end_user", "eu4")).requests == 0
        assert (await store.spend_totals("end_user", "eu5")).requests == 1
        assert (await store.spend_totals("key", "k")).requests == 1005
        assert len(await store.spend_records()) == 10
    finally:
        await store.aclose()


# -- the same answers as MemoryStore ---------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
async def test_matches_memory_store(tmp_path: Path, seed: int) -> None:
    # RedisStore's randomized comparison (`History`), replayed on SQLiteStore.
    memory = MemoryStore(max_spend_records=20)
    store = SQLiteStore(tmp_path / "same.db", max_spend_records=20)
    history = History(seed)
    rng = history.rng

    async def both(method: str, *args: Any, **kwargs: Any) -> Any:
        expected = await getattr(memory, method)(*args, **kwargs)
        assert await getattr(store, method)(*args, **kwargs) == expected, method
        return expected

    try:
        for _ in range(400):
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
                await both("charge", rng.sample(history.scopes(), 2), rng.randint(0, 4000),
                           history.now)  # fmt: skip
            elif roll < 0.96:
                key = rng.choice(sorted(History.BUDGET_KEYS))
                await both("reset_budget", key, rng.choice([None, history.now + 20]), history.now)
            await both("budgets", history.scopes(), history.now)
        await both("spend_records", limit=1000)
        await both("spend_records", user_id="u", limit=5)
        for group, name in [("global", ""), ("model", "m1"), ("key", "k1"), ("end_user", "e")]:
            await both("spend_totals", group, name)
    finally:
        await store.aclose()
