"""Fixtures of the reliability suite: a store server of its own per test (`store_url`, or
`faulty_store` for the tests that stall and kill it), the mock upstream (one per session) and
the gateway, two uvicorn processes on that store.

Every process is started here and stopped here, by PID, whatever the test's outcome.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from .processes import AofRedis, Process, free_port, uvicorn, wait_until_serving

MASTER_KEY = "sk-master-reliability-0123456789"


@pytest.fixture
def aof_redis(redis_binary: str, tmp_path: Path) -> Iterator[AofRedis]:
    """A redis-server of this test's own, AOF on (`appendfsync always`), in a tmp dir."""
    directory = tmp_path / "redis"
    directory.mkdir()
    server = AofRedis(redis_binary, directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# The stores the suite runs against: each yields the URL that `stores.open_store` turns into
# the store, and, for `faulty_store`, an object that can stall, kill and restart its server.
@pytest.fixture(params=["redis", "redis_cluster", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh store, one per test, for each store kind in turn: a Redis of the
    test's own, the session's 3-master Redis Cluster (flushed), an SQLite file of its own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'llmfence.db'}"
    if request.param == "redis_cluster":
        url: str = request.getfixturevalue("redis_cluster_url")
        return url.replace("redis://", "redis+cluster://", 1)
    server: AofRedis = request.getfixturevalue("aof_redis")
    return server.url


@pytest.fixture(params=["redis"])
def faulty_store(request: pytest.FixtureRequest) -> AofRedis:
    """A fresh store whose server the test may stall (SIGSTOP), kill and restart."""
    server: AofRedis = request.getfixturevalue("aof_redis")
    return server


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The mock upstream (`upstream_app`) in its own uvicorn process; yields its base URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("upstream") / "upstream.log"
    process = uvicorn("tests.reliability.upstream_app:app", port, log)
    process.start()
    try:
        wait_until_serving([(process, f"http://127.0.0.1:{port}/stats")])
        yield f"http://127.0.0.1:{port}"
    finally:
        process.stop()


@dataclass
class Gateways:
    """The gateway as separate uvicorn processes on one store, started by `start()`."""

    store_url: str
    upstream: str
    logs: Path
    count: int = 2
    store_timeout: float | None = None  # the gateways' `Fence(store_timeout=...)`, if set
    processes: list[Process] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)

    def start(self) -> None:
        env = {
            "LLMFENCE_STORE_URL": self.store_url,
            "UPSTREAM_BASE_URL": f"{self.upstream}/v1",
            "LLMFENCE_MASTER_KEY": MASTER_KEY,
        }
        if self.store_timeout is not None:
            env["LLMFENCE_STORE_TIMEOUT"] = str(self.store_timeout)
        for index in range(self.count):
            port = free_port()
            log = self.logs / f"gateway-{index}.log"
            target = "tests.reliability.gateway_app:build_app"
            self.processes.append(uvicorn(target, port, log, env, factory=True))
            self.urls.append(f"http://127.0.0.1:{port}")
        for process in self.processes:
            process.start()
        # `/health` is exempt from llmfence and not a route of the gateway: a 404 that needs no
        # store, once the lifespan has started.
        pairs = zip(self.processes, self.urls, strict=True)
        wait_until_serving([(p, f"{u}/health") for p, u in pairs])

    def stop(self) -> None:
        for process in self.processes:
            process.stop()

    def tails(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.tail()}" for p in self.processes)

    @asynccontextmanager
    async def clients(self) -> AsyncIterator[list[httpx.AsyncClient]]:
        """One client per gateway, with no connection limit (a burst is sent at once)."""
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        clients = [
            httpx.AsyncClient(base_url=url, timeout=60.0, limits=limits) for url in self.urls
        ]
        try:
            yield clients
        finally:
            for client in clients:
                await client.aclose()

    @asynccontextmanager
    async def admin(self, gateway: int = 0) -> AsyncIterator[httpx.AsyncClient]:
        """A client of the admin API (master key) on one gateway."""
        headers = {"authorization": f"Bearer {MASTER_KEY}"}
        async with httpx.AsyncClient(
            base_url=self.urls[gateway], headers=headers, timeout=30.0
        ) as client:
            yield client


@pytest.fixture
def gateway_processes(store_url: str, upstream: str, tmp_path: Path) -> Iterator[Gateways]:
    """Two gateway processes on `store_url`, not started yet (the test starts them)."""
    gateways = Gateways(store_url, upstream, tmp_path)
    try:
        yield gateways
    finally:
        gateways.stop()
        print(gateways.tails())  # pytest shows a fixture's output when its test failed


@pytest.fixture
def gateways(gateway_processes: Gateways) -> Gateways:
    """Two gateway processes on `store_url`, serving."""
    gateway_processes.start()
    return gateway_processes


@pytest.fixture
def faulty_gateways(faulty_store: AofRedis, upstream: str, tmp_path: Path) -> Iterator[Gateways]:
    """Two gateway processes, serving, on `faulty_store`, with a 1 s store timeout: an operator
    who prefers a quick 503 (or a fail-open) to a wait, so a stall of a few seconds times out."""
    gateways = Gateways(faulty_store.url, upstream, tmp_path, store_timeout=1.0)
    try:
        gateways.start()
        yield gateways
    finally:
        gateways.stop()
        print(gateways.tails())


async def new_key(admin: httpx.AsyncClient, **fields: object) -> str:
    """A key made through the admin API with `fields` (`max_budget`, `rpm_limit`, …)."""
    response = await admin.post("/key/generate", json=fields)
    assert response.status_code == 200, response.text
    key: str = response.json()["key"]
    return key
