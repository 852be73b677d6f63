"""How the cost grows: with the prompt, and with the number of keys and end users in the store.

In process over ASGI, as `bench_peers.py` drives the variants (`_variants.build`):

- **Prompt size**: a chat of 100, 1k, 10k and 100k tokens (messages of ~500 tokens each), seen
  for the first time (every message new to the token counter's cache) and resent with one new
  message, through the bare app, llmfence on `MemoryStore` and the naive middleware. The table
  gives µs per request, the ratios to the bare app, and llmfence's added µs per 1k tokens.
- **Keys and end users**: llmfence (each store) holding N keys and N registered end users
  (customers), 10 → 1M on `MemoryStore` and `SQLiteStore`, 10 → 100k on `RedisStore`. Every
  small request picks a key and an end user at random among the N: at small N the key cache
  holds them all, at large N most requests miss it and read the key and the customer from the
  store. The figures are µs per request and the ratio to the smallest N, all sizes of one store
  interleaved round by round (their stores are all alive at once). Stores are filled through
  their API (`create_key`, `create_customer`), except SQLite's rows past the first thousand:
  its API writes one transaction per record (~0.7 ms here, ~12 minutes for 1M), so the rest are
  inserted with SQL in the row format the API wrote for the first ones; likewise Redis's past the
first thousand (its API checks and indexes every record in several round trips), written by a
pipeline as copies of the hashes and index entries the API wrote.

Run: `python benchmarks/bench_growth.py [--quick] [--json PATH] [--no-redis] [--max-keys N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import platform
import random
import sqlite3
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from _harness import (
    AsyncBatch,
    Settings,
    Stats,
    arun_rounds,
    finish,
    fmt_ratio,
    fmt_us,
    parse_args,
    print_table,
    source_revision,
    text,
)
from _variants import BARE, MEMORY, NAIVE, REDIS, SQLITE, Built, Places, build, machine, new_key
from bench_stack import MODEL, batch, call, chat, make_scope
from starlette.types import ASGIApp

import llmfence
from llmfence import MemoryStore, RedisStore, SQLiteStore, Store
from llmfence.stores import CustomerRecord, KeyRecord, hash_key
from llmfence.testing import RedisServer, find_redis_server

PROMPTS = (100, 1_000, 10_000, 100_000)
PROMPTS_QUICK = (100, 1_000)
KEYS = {MEMORY: (10, 1_000, 100_000, 1_000_000), SQLITE: (10, 1_000, 100_000, 1_000_000)}
KEYS[REDIS] = (10, 1_000, 10_000, 100_000)
KEYS_QUICK = (10, 1_000)
MESSAGE_TOKENS = 500
API_ROWS = 1_000  # SQLite rows written through the API; the rest by SQL in the same format


# -- prompt size -----------------------------------------------------------------------------


def long_chat(tokens: int, seed: int = 0) -> list[dict[str, str]]:
    """A chat of about `tokens` tokens: user/assistant messages of ~500 tokens each."""
    rng = random.Random(seed)
    count = max(1, round(tokens / MESSAGE_TOKENS))
    words = max(1, round(tokens / count / 1.2))
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": text(rng, words)}
        for i in range(count)
    ]


def prompt_makers(tokens: int) -> dict[str, Callable[[int], tuple[bytes, bool]]]:
    base = long_chat(tokens)

    def first(i: int) -> tuple[bytes, bool]:
        tag = f"[conversation {i}] "
        return chat([{**m, "content": tag + m["content"]} for m in base]), False

    def resent(i: int) -> tuple[bytes, bool]:
        return chat([*base, {"role": "user", "content": f"And item {i}? Be brief."}]), False

    return {"first sight": first, "resent + 1": resent}


async def prompt_growth(settings: Settings, places: Places, sizes: Sequence[int]) -> dict[str, Any]:
    key = new_key()
    serial = itertools.count()
    data: dict[str, Any] = {}
    rows = []
    for tokens in sizes:
        for mode, make in prompt_makers(tokens).items():
            built = {v: await build(v, key, places) for v in (BARE, MEMORY, NAIVE)}
            cases: dict[str, AsyncBatch] = {
                v: batch(b.app, key, make, serial) for v, b in built.items()
            }
            stats = await arun_rounds(cases, settings, max_batch=2_000)
            for b in built.values():
                await b.close()
            bare, fence, naive = stats[BARE].median, stats[MEMORY].median, stats[NAIVE].median
            per_1k = (fence - bare) / tokens * 1000
            data[f"{tokens} tokens, {mode}"] = {
                "tokens": tokens,
                "mode": mode,
                "bare_us": bare,
                "llmfence_us": fence,
                "naive_us": naive,
                "llmfence_over_bare": fence / bare,
                "naive_over_bare": naive / bare,
                "llmfence_over_naive": fence / naive,
                "llmfence_added_us_per_1k_tokens": per_1k,
            }
            rows.append(
                [
                    f"{tokens:,}",
                    mode,
                    fmt_us(bare),
                    fmt_us(fence),
                    fmt_us(naive),
                    fmt_ratio(fence / bare),
                    fmt_ratio(naive / bare),
                    fmt_ratio(fence / naive),
                    fmt_us(per_1k),
                ]
            )
    print_table(
        f"Prompt size: µs per request (median of {settings.rounds} interleaved rounds)",
        (
            "tokens",
            "prompt",
            "bare µs",
            "llmfence µs",
            "naive µs",
            "llmfence / bare",
            "naive / bare",
            "llmfence / naive",
            "llmfence added µs per 1k tokens",
        ),
        rows,
        left=2,
    )
    return data


# -- keys and end users ------------------------------------------------------------------------


def raw_key(i: int) -> str:
    return f"sk-fill-{i:012d}-growthbenchmark"


def end_user(i: int) -> str:
    return f"end-user-{i:09d}"


async def fill(
    store: Store, count: int, where: str = "", prefix: str = "", api_rows: int = API_ROWS
) -> None:
    """`count` keys and `count` customers, through the store's API (SQLite and Redis: the
    first `API_ROWS`, the rest copied in the rows' own format; `where`: the SQLite file or the
    Redis URL, `prefix`: the RedisStore's)."""
    key_template = KeyRecord(key_hash="", key_masked="sk-...mark")
    customer_template = CustomerRecord(user_id="")
    if not isinstance(store, SQLiteStore | RedisStore):
        api_rows = count
    api_rows = min(count, api_rows)
    step = 64 if isinstance(store, RedisStore) else 1
    for first in range(0, api_rows, step):
        indices = range(first, min(api_rows, first + step))
        await asyncio.gather(
            *(
                store.create_key(dataclasses.replace(key_template, key_hash=hash_key(raw_key(i))))
                for i in indices
            ),
            *(
                store.create_customer(dataclasses.replace(customer_template, user_id=end_user(i)))
                for i in indices
            ),
        )
    if api_rows < count and isinstance(store, SQLiteStore):
        bulk_sqlite(Path(where), api_rows, count)
    elif api_rows < count:
        bulk_redis(where, prefix, api_rows, count)


def bulk_redis(url: str, prefix: str, start: int, stop: int) -> None:
    """Keys and customers `start`…`stop`, copied from the hashes and index entries of row 0."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        key0 = hash_key(raw_key(0))
        tag = "{" + prefix + "}"
        key_fields: dict[Any, Any] = dict(client.hgetall(f"{tag}:key:{key0}"))
        customer_fields: dict[Any, Any] = dict(client.hgetall(f"{tag}:customer:{end_user(0)}"))
        for first in range(start, stop, 5_000):
            pipe = client.pipeline(transaction=False)
            for i in range(first, min(stop, first + 5_000)):
                h, user = hash_key(raw_key(i)), end_user(i)
                fields = {**key_fields, b"key_hash": json.dumps(h).encode()}
                pipe.hset(f"{tag}:key:{h}", mapping=fields)
                pipe.zadd(f"{tag}:keys", {h: i + 1})
                fields = {**customer_fields, b"user_id": json.dumps(user).encode()}
                pipe.hset(f"{tag}:customer:{user}", mapping=fields)
                pipe.zadd(f"{tag}:customers", {user: i + 1})
            pipe.execute()
        client.set(f"{tag}:keys:seq", stop)
        client.set(f"{tag}:customers:seq", stop)
    finally:
        client.close()


def bulk_sqlite(path: Path, start: int, stop: int) -> None:
    """Rows `start`…`stop` of keys and customers, copied from the format of row 0."""
    db = sqlite3.connect(path, timeout=30)
    try:
        key0 = hash_key(raw_key(0))
        (key_json,) = db.execute("SELECT record FROM keys WHERE key_hash = ?", (key0,)).fetchone()
        (customer_json,) = db.execute(
            "SELECT record FROM registry WHERE kind = 'customer' AND id = ?", (end_user(0),)
        ).fetchone()
        with db:
            db.executemany(
                "INSERT INTO keys (key_hash, user_id, team_id, record) VALUES (?, NULL, NULL, ?)",
                (
                    (h, key_json.replace(key0, h))
                    for h in (hash_key(raw_key(i)) for i in range(start, stop))
                ),
            )
            db.executemany(
                "INSERT INTO registry (kind, id, record) VALUES ('customer', ?, ?)",
                (
                    (end_user(i), customer_json.replace(end_user(0), end_user(i)))
                    for i in range(start, stop)
                ),
            )
    finally:
        db.close()


def keyed_batch(app: ASGIApp, count: int, serial: itertools.count[int]) -> AsyncBatch:
    """`n` small requests, each by a random key of the `count` and naming a random end user."""
    rng = random.Random(count)

    async def run(n: int) -> float:
        requests = []
        for _ in range(n):
            i = next(serial)
            messages = [{"role": "user", "content": f"What is item {i} on my last invoice?"}]
            body = chat(messages, user=end_user(rng.randrange(count)))
            requests.append((make_scope(body, raw_key(rng.randrange(count))), body))
        start = time.perf_counter()
        for scope, body in requests:
            outcome, _ = await call(app, scope, body)
            if outcome.status != 200:
                raise RuntimeError(f"status {outcome.status}")
        return time.perf_counter() - start

    return run


async def key_growth(
    settings: Settings, places: Places, sizes: Mapping[str, Sequence[int]], api_rows: int
) -> dict[str, Any]:
    data: dict[str, Any] = {}
    rows = []
    serial = itertools.count()
    for variant, counts in sizes.items():
        built: dict[int, Built] = {}
        fill_seconds: dict[int, float] = {}
        try:
            for count in counts:
                store: Store
                if variant == REDIS:
                    assert places.redis_url is not None
                    store = RedisStore.from_url(places.redis_url, prefix=f"growth{count}")
                elif variant == SQLITE:
                    path = places.directory / f"growth-{count}.db"
                    store = SQLiteStore(path)
                else:
                    store = MemoryStore()
                made = await build(variant, new_key(), places, store=store)
                built[count] = made
                started = time.perf_counter()
                if variant == REDIS:
                    where, prefix = places.redis_url or "", f"growth{count}"
                else:
                    where, prefix = str(places.directory / f"growth-{count}.db"), ""
                await fill(store, count, where, prefix, api_rows)
                fill_seconds[count] = time.perf_counter() - started
            cases = {f"{n:,}": keyed_batch(b.app, n, serial) for n, b in built.items()}
            stats: dict[str, Stats] = await arun_rounds(cases, settings, max_batch=5_000)
        finally:
            for made in built.values():
                await made.close()
        base = stats[f"{counts[0]:,}"].median
        data[variant] = {}
        for n in counts:
            median = stats[f"{n:,}"].median
            data[variant][str(n)] = {
                "us": median,
                "over_smallest": median / base,
                "fill_seconds": fill_seconds[n],
            }
            rows.append(
                [
                    variant,
                    f"{n:,}",
                    fmt_us(median),
                    fmt_ratio(median / base),
                    f"{fill_seconds[n]:.1f}",
                ]
            )
    print_table(
        "Keys and end users in the store: µs per small request (random key, random end user), "
        f"median of {settings.rounds} interleaved rounds",
        ("store", "keys and end users", "µs / request", "/ smallest N", "fill s"),
        rows,
        left=2,
    )
    return data


# -- main ------------------------------------------------------------------------------------


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--no-redis", action="store_true", help="skip the RedisStore rows")
    parser.add_argument("--max-keys", type=int, default=None, help="cap on N (keys, end users)")
    parser.add_argument(
        "--part", choices=("all", "prompt", "keys"), default="all", help="which half to run"
    )
    parser.add_argument("--api-rows", type=int, default=API_ROWS, help=argparse.SUPPRESS)


async def run(settings: Settings, places: Places, args: argparse.Namespace) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    if args.part in ("all", "prompt"):
        sizes = PROMPTS_QUICK if settings.quick else PROMPTS
        payload["prompt"] = await prompt_growth(settings, places, sizes)
    if args.part in ("all", "keys"):
        stores = [MEMORY, SQLITE] + ([REDIS] if places.redis_url else [])
        sizes_by_store = {
            v: [n for n in (KEYS_QUICK if settings.quick else KEYS[v]) if n <= (args.max_keys or n)]
            for v in stores
        }
        payload["keys"] = await key_growth(settings, places, sizes_by_store, args.api_rows)
    return payload


def main() -> None:
    settings, args = parse_args(__doc__ or "", rounds=9, batch_seconds=0.2, extra=options)
    started = time.perf_counter()
    print("llmfence benchmark: growth (prompt size; keys and end users in the store)")
    print(f"llmfence {llmfence.__version__} at {source_revision()}; model {MODEL}; ", end="")
    print(f"in-process ASGI; {machine()}, Python {platform.python_version()}")
    binary = None if args.no_redis else find_redis_server()
    with tempfile.TemporaryDirectory(prefix="llmfence-bench-growth-") as tmp:
        if binary is None:
            print("RedisStore rows skipped: " + ("--no-redis" if args.no_redis else "no server"))
            payload = asyncio.run(run(settings, Places(Path(tmp)), args))
        else:
            with RedisServer(binary) as server:
                payload = asyncio.run(run(settings, Places(Path(tmp), server.url), args))
    finish(
        args.json, "bench_growth", started, settings.quick, {"rounds": settings.rounds, **payload}
    )


if __name__ == "__main__":
    main()
