"""The variants every comparison builds: the bare app, llmfence on each store, slowapi, naive.

One place builds them, so that `bench_peers.py` (in process), `bench_http.py` (under uvicorn),
`bench_growth.py`, `bench_fairness.py` and `bench_roundtrips.py` time the same things:

- `bare app`: `bench_stack.upstream("canned")`, prebuilt answers;
- `llmfence, MemoryStore` / `SQLiteStore` / `RedisStore`: `bench_stack.metered`, the whole
  stack (`Fence(...).install(app)`) over that store, and the given key generated for the same
  user, so every process of a run can use one key;
- `slowapi`: as its documentation sets it up (`Limiter` in `app.state.limiter`, the
  `RateLimitExceeded` handler, `SlowAPIMiddleware`), a per-minute limit per API key (the bearer
  token), in-memory storage, the default fixed window;
- `naive middleware`: `_naive.NaiveLimiter` (auth, one body parse, tiktoken, `limits` RPM/TPM).
"""

from __future__ import annotations

import importlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _harness import machine
from _naive import NaiveLimiter
from bench_stack import CHUNKS, LIMITS, PATH, SMALL, call, make_scope, metered, scenarios
from bench_stack import upstream as canned_upstream
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import ASGIApp

from llmfence import Fence, MemoryStore, RedisStore, SQLiteStore, Store, TokenCounter

__all__ = [
    "BARE",
    "FENCES",
    "MEMORY",
    "NAIVE",
    "NEVER",
    "REDIS",
    "SHORT",
    "SLOWAPI",
    "SQLITE",
    "VARIANTS",
    "Built",
    "Places",
    "build",
    "check_bites",
    "check_peer",
    "flush_redis",
    "load_slowapi",
    "machine",
    "naive_app",
    "new_key",
    "new_store",
    "slowapi_app",
]

BARE = "bare app"
MEMORY = "llmfence, MemoryStore"
SQLITE = "llmfence, SQLiteStore"
REDIS = "llmfence, RedisStore"
SLOWAPI = "slowapi"
NAIVE = "naive middleware"
VARIANTS = (BARE, MEMORY, SQLITE, REDIS, SLOWAPI, NAIVE)
FENCES = (MEMORY, SQLITE, REDIS)
SHORT = dict(zip(("bare", "memory", "sqlite", "redis", "slowapi", "naive"), VARIANTS, strict=True))
"""The variants by the names command lines use."""
NEVER = 10**9
"""A per-minute limit the benchmark never reaches (requests for RPM; tokens ×1000 for TPM)."""


def new_key() -> str:
    """A fresh API key in llmfence's form."""
    return "sk-bench-" + secrets.token_urlsafe(24)


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


def naive_app(key: str, rpm: int, counter: TokenCounter | None = None) -> ASGIApp:
    """The canned upstream behind the naive reference middleware."""
    return NaiveLimiter(
        canned_upstream("canned"),
        keys={key: "alice"},
        rpm=rpm,
        tpm=NEVER * 1000,
        paths=(PATH,),
        counter=counter or TokenCounter(),
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


async def flush_redis(url: str) -> None:
    """Empty the database at `url` (a fresh RedisStore per scenario)."""
    import redis.asyncio

    client = redis.asyncio.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()


@dataclass(frozen=True, slots=True)
class Places:
    """Where the stores of a run live: a directory for SQLite files, a redis-server's URL."""

    directory: Path
    redis_url: str | None = None


@dataclass(frozen=True, slots=True)
class Built:
    """A variant ready to call: the app, its key, its `Fence` (llmfence only) and what closes
    it."""

    app: ASGIApp
    key: str
    fence: Fence | None
    close: Callable[[], Awaitable[None]]


async def _nothing() -> None:
    return None


async def build(
    variant: str,
    key: str,
    places: Places,
    *,
    slowapi: dict[str, Any] | None = None,
    rpm: int = NEVER,
    store: Store | None = None,
) -> Built:
    """A new instance of `variant` over fresh state (new store, new counters).

    Args:
        variant: One of `VARIANTS`.
        key: The API key the variant accepts.
        places: Where SQLite files go and which Redis to use (flushed first).
        slowapi: `load_slowapi()`'s pieces, for the slowapi variant.
        rpm: The peers' per-minute limit (1 to check that they bite).
        store: For llmfence: this store instead of a new one.
    """
    if variant == BARE:
        return Built(canned_upstream("canned"), key, None, _nothing)
    if variant == SLOWAPI:
        if slowapi is None:
            raise ValueError("slowapi is not installed")
        return Built(slowapi_app(slowapi, rpm), key, None, _nothing)
    if variant == NAIVE:
        return Built(naive_app(key, rpm), key, None, _nothing)
    store = store or await new_store(variant, places)
    app, fence, _ = await metered("canned", store)
    await fence.generate_key(key=key, user_id="alice", **LIMITS)
    return Built(app, key, fence, store.aclose)


async def new_store(variant: str, places: Places) -> Store:
    """A fresh store for an llmfence variant."""
    if variant == MEMORY:
        return MemoryStore()
    if variant == SQLITE:
        path = places.directory / f"llmfence-{secrets.token_hex(6)}.db"
        return SQLiteStore(path)
    if variant == REDIS:
        if places.redis_url is None:
            raise ValueError("no redis-server for the RedisStore variant")
        await flush_redis(places.redis_url)
        return RedisStore.from_url(places.redis_url)
    raise ValueError(f"unknown variant {variant!r}")
