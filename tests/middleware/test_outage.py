"""Store outages: fail open or closed per guard, a timeout on every call, recovery, shadow."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from llmfence import Fence, RedisStore
from llmfence.testing import RedisServer, mock_llm_app

from .conftest import CHAT, auth, chat_body, client_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def redis_process() -> Iterator[RedisServer]:
    """A redis-server this test starts and stops itself, on a fixed port."""
    server = RedisServer()
    with server:
        server.stop()  # each test starts it when it wants it up
        yield server


def gateway(url: str, **options: Any) -> tuple[Fence, Any]:
    store = RedisStore.from_url(url, timeout=0.5)
    fence = Fence(store=store, master_key="sk-master-key", store_timeout=0.5, **options)
    app = mock_llm_app()
    fence.install(app)
    return fence, app


async def test_budgets_fail_closed_and_recover(
    redis_process: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    fence, app = gateway(redis_process.url, max_budget=1.0)
    headers = auth("sk-master-key")
    async with client_for(app) as c:
        with caplog.at_level(logging.WARNING, logger="llmfence"):
            down = await c.post(CHAT, json=chat_body(), headers=headers)
        assert down.status_code == 503
        error = down.json()["error"]
        assert (error["code"], error["type"]) == ("store_unavailable", "service_unavailable")
        assert fence.meter.degraded_count >= 1
        assert any("degraded" in r.getMessage() for r in caplog.records)
        redis_process.start()  # the store comes back: no restart of the app needed
        up = await c.post(CHAT, json=chat_body(), headers=headers)
        assert up.status_code == 200
    assert (await fence.store.spend_totals("global")).requests == 1
    await fence.store.aclose()


async def test_limits_fail_open(redis_process: RedisServer) -> None:
    redis_process.start()
    fence, app = gateway(redis_process.url, budgets_on_store_error="fail_open")
    key, _ = await fence.generate_key(rpm_limit=1)
    async with client_for(app) as c:
        assert (await c.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 200
        assert (await c.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 429
        redis_process.stop()
        # The key record is cached, so auth still works; the limit check fails open.
        degraded = await c.post(CHAT, json=chat_body(), headers=auth(key))
        assert degraded.status_code == 200
        assert degraded.headers["x-llmfence-degraded"] == "store-unavailable"
    assert fence.meter.degraded_count >= 2  # the admission and the settlement
    await fence.store.aclose()


async def test_limits_fail_closed_when_asked(redis_process: RedisServer) -> None:
    fence, app = gateway(
        redis_process.url, limits_on_store_error="fail_closed", budgets_on_store_error="fail_open"
    )
    async with client_for(app) as c:
        response = await c.post(CHAT, json=chat_body(), headers=auth("sk-master-key"))
    # The master key has no per-key limits; the whole-app budget check is open: passes.
    assert response.status_code == 200
    await fence.store.aclose()


async def test_every_store_call_has_a_timeout() -> None:
    # A server that accepts connections and never answers.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"
        fence, app = gateway(url, max_budget=1.0)
        started = time.monotonic()
        async with client_for(app) as c:
            response = await c.post(CHAT, json=chat_body(), headers=auth("sk-master-key"))
        assert response.status_code == 503
        assert time.monotonic() - started < 5
        await fence.store.aclose()


async def test_shadow_mode_reports_but_never_refuses(gateway: Any) -> None:
    fence, _app, client = gateway(shadow={"requests", "budget"}, max_budget=0.0003)
    key, _ = await fence.generate_key(rpm_limit=1)
    body = chat_body(max_tokens=100)
    async with client as c:
        responses = [await c.post(CHAT, json=body, headers=auth(key)) for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    shadowed = [r.headers.get("x-llmfence-shadow-refusal") for r in responses]
    assert shadowed == [None, "requests", "requests"]
    # Usage is still counted while shadowed.
    assert responses[2].headers["x-ratelimit-remaining-requests"] == "0"
    assert (await fence.store.spend_totals("global")).requests == 3
