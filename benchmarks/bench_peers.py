"""llmfence beside what users would pick instead, in-process over ASGI, in one run.

The scenarios, the upstream and the way a request is driven are `bench_stack.py`'s: the app is
called directly with a prebuilt scope, `receive` and `send` (no sockets, no HTTP client), for a
small chat request with a JSON response, a ~4k-token 20-turn chat seen for the first time, the
same history resent with one new message, and a response streamed as 200 SSE chunks. The bare
app is `canned_llm_app` (prebuilt answers). In front of it, each variant:

- `llmfence, MemoryStore`: `Fence(...).install(app)`, the whole stack, a key of a user whose
  limits never refuse, a whole-app budget (as in `bench_stack.py`);
- `llmfence, RedisStore`: the same over a private redis-server (`llmfence.testing.RedisServer`);
- `llmfence, SQLiteStore`: not built yet (the row says so);
- `slowapi`: as its documentation sets it up: `Limiter` in `app.state.limiter`, the
  `RateLimitExceeded` handler, `SlowAPIMiddleware` (a Starlette `BaseHTTPMiddleware`), a
  per-minute default limit keyed per API key (the bearer token), in-memory storage, the default
  fixed-window strategy and no headers (the documented defaults). Skipped, with a line saying
  so, when slowapi is not installed (`pip install -e '.[bench]'`);
- `naive middleware`: `benchmarks/_naive.py`, a hand-written pure-ASGI middleware doing bearer
  auth, one body parse, tiktoken counting and `limits` RPM/TPM, and nothing else (its
  docstring lists what it leaves out).

Each variant is built fresh for every scenario (new store, new counters), checked to answer 200
and stream every chunk, and the rate limiters of slowapi and the naive middleware are checked to
bite (a copy with a limit of one request refuses the second). The cases of a scenario are
interleaved round by round; the table gives µs per request (median of the rounds) and the
ratio to the bare app, which holds on a noisy shared machine where the absolute µs do not.

Run: `python benchmarks/bench_peers.py [--quick] [--json PATH] [--no-redis]`.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import itertools
import os
import platform
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from _harness import (
    AsyncBatch,
    Settings,
    Stats,
    arun_rounds,
    fmt_ratio,
    fmt_us,
    parse_args,
    print_table,
    source_revision,
    write_json,
)
from _naive import NaiveLimiter
from bench_stack import CHUNKS, MODEL, PATH, SMALL, batch, call, make_scope, metered, scenarios
from bench_stack import check as check_fence
from bench_stack import upstream as canned_upstream
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import ASGIApp

import llmfence
from llmfence import MemoryStore, RedisStore, TokenCounter
from llmfence.testing import RedisServer, find_redis_server

BARE = "bare app"
MEMORY = "llmfence, MemoryStore"
REDIS = "llmfence, RedisStore"
SQLITE = "llmfence, SQLiteStore"
SLOWAPI = "slowapi"
NAIVE = "naive middleware"
VARIANTS = (BARE, MEMORY, REDIS, SQLITE, SLOWAPI, NAIVE)
NEVER = 10**9
"""A per-minute limit the benchmark never reaches (requests for RPM; tokens ×1000 for TPM)."""
TABLE_HEADER = ("variant", "µs / request", "overhead µs", "req/s", "/ bare")


def load_slowapi() -> tuple[dict[str, Any] | None, str]:
    """slowapi's documented pieces, or `None` and why not.

    Imported by name at run time: slowapi is an optional dependency (`.[bench]`), and mypy runs
    where it may be absent.
    """
    try:
        slowapi = importlib.import_module("slowapi")
        errors = importlib.import_module("slowapi.errors")
        middleware = importlib.import_module("slowapi.middleware")
    except ImportError:
        return None, "slowapi is not installed (pip install -e '.[bench]'): its column is skipped"
    version = getattr(slowapi, "__version__", None)
    if version is None:
        from importlib.metadata import version as dist_version

        version = dist_version("slowapi")
    return {
        "Limiter": slowapi.Limiter,
        "handler": slowapi._rate_limit_exceeded_handler,
        "RateLimitExceeded": errors.RateLimitExceeded,
        "SlowAPIMiddleware": middleware.SlowAPIMiddleware,
    }, f"slowapi {version}"


def api_key(request: Request) -> str:
    """slowapi's `key_func`: the bearer token, so the limit is per API key."""
    return request.headers.get("authorization", "").removeprefix("Bearer ").strip() or "anonymous"


def slowapi_app(parts: dict[str, Any], rpm: int) -> Starlette:
    """The canned upstream behind slowapi, set up as slowapi's documentation does."""
    app = canned_upstream("canned")
    limiter = parts["Limiter"](key_func=api_key, default_limits=[f"{rpm}/minute"])
    app.state.limiter = limiter
    app.add_exception_handler(parts["RateLimitExceeded"], parts["handler"])
    app.add_middleware(parts["SlowAPIMiddleware"])
    return app


def naive_app(key: str, rpm: int, counter: TokenCounter) -> ASGIApp:
    """The canned upstream behind the naive reference middleware."""
    return NaiveLimiter(
        canned_upstream("canned"),
        keys={key: "alice"},
        rpm=rpm,
        tpm=NEVER * 1000,
        paths=(PATH,),
        counter=counter,
    )


async def check_peer(name: str, app: ASGIApp, key: str, scenario: str) -> None:
    """Refuse to time a variant that does not answer a scenario in full."""
    body, stream = scenarios()[scenario](-1)
    outcome, _ = await call(app, make_scope(body, key, stream=stream), body, keep=True)
    if outcome.status != 200:
        raise SystemExit(f"{name}, {scenario}: {outcome.status}: {bytes(outcome.body)!r}")
    if stream and outcome.chunks < CHUNKS:
        raise SystemExit(f"{name}, {scenario}: {outcome.chunks} chunks streamed, not {CHUNKS}")


async def check_bites(name: str, app: ASGIApp, key: str) -> None:
    """Refuse to time a limiter that is not in the path: with a limit of one request per
    minute, the second small request must be refused."""
    statuses = []
    for i in range(2):
        body, _ = scenarios()[SMALL](i)
        outcome, _ = await call(app, make_scope(body, key), body)
        statuses.append(outcome.status)
    if statuses != [200, 429]:
        raise SystemExit(f"{name} with a limit of 1/minute answered {statuses}, not [200, 429]")


@dataclass
class Results:
    """Stats by scenario and variant; why a variant was skipped, by variant."""

    scenarios: dict[str, dict[str, Stats]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


async def run(
    settings: Settings,
    redis_url: str | None,
    slowapi: dict[str, Any] | None,
    skipped: dict[str, str],
) -> Results:
    results = Results(skipped=dict(skipped))
    names = list(scenarios())
    closers: list[Callable[[], Awaitable[None]]] = []

    async def fresh_redis() -> RedisStore | None:
        """A new RedisStore on an emptied database, or `None` without a server."""
        if redis_url is None:
            return None
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(redis_url)
        await client.flushdb()
        await client.aclose()
        store = RedisStore.from_url(redis_url)
        closers.append(store.aclose)
        return store

    try:
        # Once, before any timing: every llmfence variant meters and records every scenario,
        # the peers answer every scenario and their limiters are in the path.
        app, fence, key = await metered("canned", MemoryStore())
        await check_fence(app, fence, key, names)
        redis_store = await fresh_redis()
        if redis_store is not None:
            app, fence, redis_key = await metered("canned", redis_store)
            await check_fence(app, fence, redis_key, names)
        if slowapi is not None:
            await check_bites(SLOWAPI, slowapi_app(slowapi, 1), key)
        await check_bites(NAIVE, naive_app(key, 1, TokenCounter()), key)

        serial = itertools.count()
        for name, make in scenarios().items():
            # Fresh variants per scenario: no state carried from one scenario to the next.
            memory_app, _, memory_key = await metered("canned", MemoryStore())
            apps: dict[str, tuple[ASGIApp, str]] = {
                BARE: (canned_upstream("canned"), memory_key),
                MEMORY: (memory_app, memory_key),
            }
            redis_store = await fresh_redis()
            if redis_store is not None:
                redis_app, _, redis_key = await metered("canned", redis_store)
                apps[REDIS] = (redis_app, redis_key)
            if slowapi is not None:
                apps[SLOWAPI] = (slowapi_app(slowapi, NEVER), memory_key)
            apps[NAIVE] = (naive_app(memory_key, NEVER, TokenCounter()), memory_key)
            for variant, (peer, peer_key) in apps.items():
                if variant not in (MEMORY, REDIS):
                    await check_peer(variant, peer, peer_key, name)
            cases: dict[str, AsyncBatch] = {
                variant: batch(peer, peer_key, make, serial)
                for variant, (peer, peer_key) in apps.items()
            }
            results.scenarios[name] = await arun_rounds(cases, settings, max_batch=5_000)
    finally:
        for close in closers:
            await close()
    return results


def report(results: Results, settings: Settings, started: float) -> dict[str, Any]:
    """Print one table per scenario; return the same figures for `--json`."""
    data: dict[str, dict[str, Any]] = {}
    for name, stats in results.scenarios.items():
        bare = stats[BARE].median
        rows = []
        data[name] = {}
        for variant in VARIANTS:
            if variant not in stats:
                rows.append([variant, "—", "—", "—", "skipped"])
                continue
            median = stats[variant].median
            rows.append(
                [
                    variant,
                    fmt_us(median),
                    "—" if variant == BARE else fmt_us(median - bare),
                    f"{stats[variant].per_second:,.0f}",
                    fmt_ratio(median / bare),
                ]
            )
            data[name][variant] = {
                "us": median,
                "best_us": stats[variant].best,
                "ratio": median / bare,
                "requests_per_batch": stats[variant].n,
            }
        title = f"{name}: µs per request (median of {settings.rounds} interleaved rounds)"
        print_table(title, TABLE_HEADER, rows)
    if results.skipped:
        print()
        for variant, reason in results.skipped.items():
            print(f"{variant}: skipped: {reason}")
    elapsed = time.perf_counter() - started
    print(f"done in {elapsed:.1f} s")
    return {
        "benchmark": "bench_peers",
        "llmfence": llmfence.__version__,
        "revision": source_revision(),
        "python": platform.python_version(),
        "machine": machine(),
        "quick": settings.quick,
        "rounds": settings.rounds,
        "scenarios": data,
        "skipped": results.skipped,
        "seconds": elapsed,
    }


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs visible"


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--no-redis", action="store_true", help="skip the RedisStore variant")


def main() -> None:
    settings, args = parse_args(__doc__ or "", rounds=15, batch_seconds=0.1, extra=options)
    started = time.perf_counter()
    print("llmfence benchmark: peers (bare app, llmfence, slowapi, a naive middleware)")
    print(f"llmfence {llmfence.__version__} at {source_revision()}; model {MODEL}; ", end="")
    print(f"in-process ASGI; {settings.rounds} rounds per case, interleaved")
    print(f"machine: {machine()}, Python {platform.python_version()}; shared and noisy:")
    print("read the ratios to the bare app (same run), not the absolute µs")
    skipped = {SQLITE: "SQLiteStore is not built yet"}
    slowapi, slowapi_note = load_slowapi()
    print(slowapi_note)
    if slowapi is None:
        skipped[SLOWAPI] = slowapi_note
    binary = None if args.no_redis else find_redis_server()
    if binary is None:
        skipped[REDIS] = "--no-redis" if args.no_redis else "no redis-server found"
        results = asyncio.run(run(settings, None, slowapi, skipped))
    else:
        with RedisServer(binary) as server:
            print(f"redis-server: {binary} on 127.0.0.1:{server.port}")
            results = asyncio.run(run(settings, server.url, slowapi, skipped))
    payload = report(results, settings, started)
    if args.json:
        write_json(args.json, payload)
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
