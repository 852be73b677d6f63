"""Options are checked when `Fence` and the middlewares are built, naming the argument as
written; and one `store_timeout` bounds every store's calls."""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis.asyncio
from starlette.applications import Starlette

from llmfence import (
    BudgetGuardMiddleware,
    Fence,
    KeyAuthMiddleware,
    MemoryStore,
    ParallelRequestLimitMiddleware,
    RedisStore,
    RequestRateLimitMiddleware,
    SpendRecorderMiddleware,
    SQLiteStore,
    TokenRateLimitMiddleware,
)
from llmfence._core.meter import DEFAULT_STORE_TIMEOUT, Meter
from llmfence.exceptions import ConfigurationError
from llmfence.stores._protocol import DEFAULT_TIMEOUT
from llmfence.testing import mock_llm_app

from .middleware.conftest import CHAT, MODEL, auth, client_for

pytestmark = pytest.mark.anyio

MASTER = "sk-master-key-123"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"rpm_limit": "60"}, "rpm_limit"),
        ({"rpm_limit": -5}, "rpm_limit"),
        ({"rpm_limit": 1.5}, "rpm_limit"),
        ({"tpm_limit": True}, "tpm_limit"),
        ({"max_parallel_requests": -1}, "max_parallel_requests"),
        ({"end_user_rpm_limit": "5"}, "end_user_rpm_limit"),
        ({"limits_on_store_error": "fail-open"}, "limits_on_store_error"),
        ({"budgets_on_store_error": "closed"}, "budgets_on_store_error"),
        ({"max_budget": float("inf")}, "max_budget"),
        ({"max_budget": 1e300}, "max_budget"),
        ({"max_budget": -1}, "max_budget"),
        ({"max_end_user_budget": "lots"}, "max_end_user_budget"),
        ({"budget_duration": "999999y"}, "budget_duration"),
        ({"end_user_budget_duration": "soon"}, "end_user_budget_duration"),
        ({"default_max_tokens": 0}, "default_max_tokens"),
        ({"default_max_tokens": "4096"}, "default_max_tokens"),
        ({"min_output_tokens": -1}, "min_output_tokens"),
        ({"max_body_size": 0}, "max_body_size"),
        ({"disconnect_extra_tokens": 1.5}, "disconnect_extra_tokens"),
        ({"calendar_aligned": "yes"}, "calendar_aligned"),
        ({"clamp_max_tokens": 1}, "clamp_max_tokens"),
        ({"store_timeout": 0}, "store_timeout"),
        ({"store_timeout": float("nan")}, "store_timeout"),
        ({"store_timeout": "5"}, "store_timeout"),
        ({"cache_ttl": -1}, "cache_ttl"),
        ({"metered_paths": "/v1/*"}, "metered_paths"),
        ({"exempt_paths": [1]}, "exempt_paths"),
        ({"deployments": {"prod": 4}}, "deployments"),
        ({"clock": 5}, "clock"),
        ({"shadow": "budget"}, "shadow"),
        ({"master_key": 12345678}, "master_key"),
        ({"store": "redis://localhost"}, "store"),
        ({"access_groups": "beta"}, "access_groups"),
        ({"access_groups": {"beta": 5}}, "access_groups"),
        ({"deployments": ["prod"]}, "deployments"),
        ({"prices": {"m": {"input": "x", "output": 1}}}, "prices"),
        ({"fallback_price": {"input": -1, "output": 1}}, "fallback_price"),
    ],
)
def test_fence_checks_every_option_when_built(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"^{named}\b"):
        Fence(**{"store": MemoryStore(), **options})


def test_fence_takes_good_options_and_iterables_once() -> None:
    fence = Fence(
        store=MemoryStore(),
        rpm_limit=60,
        max_budget=10,
        store_timeout=3,
        metered_paths=(p for p in ["/v1/*"]),  # a generator is read once
    )
    assert fence.paths == Fence(store=MemoryStore(), metered_paths=["/v1/*"]).paths


async def test_a_bad_option_never_reaches_a_request() -> None:
    # Starlette builds middlewares at the first request: the option must fail before that.
    app = Starlette()
    with pytest.raises(ConfigurationError, match="rpm_limit"):
        Fence(store=MemoryStore(), rpm_limit="60").install(app)  # type: ignore[arg-type]


_APP = Starlette()


@pytest.mark.parametrize(
    ("cls", "options", "named"),
    [
        (RequestRateLimitMiddleware, {"limit": "60"}, "limit"),
        (RequestRateLimitMiddleware, {"limit": -5}, "limit"),
        (TokenRateLimitMiddleware, {"limit": 1.5}, "limit"),
        (TokenRateLimitMiddleware, {"window": 0}, "window"),
        (TokenRateLimitMiddleware, {"rate": 100}, "rate"),
        (RequestRateLimitMiddleware, {"end_user_limit": "3"}, "end_user_limit"),
        (RequestRateLimitMiddleware, {"on_store_error": "fail-open"}, "on_store_error"),
        (RequestRateLimitMiddleware, {"shadow": "no"}, "shadow"),
        (RequestRateLimitMiddleware, {"max_body_size": -1}, "max_body_size"),
        (ParallelRequestLimitMiddleware, {"limit": "2"}, "limit"),
        (ParallelRequestLimitMiddleware, {"lease_ttl": -1}, "lease_ttl"),
        (ParallelRequestLimitMiddleware, {"lease_ttl": float("inf")}, "lease_ttl"),
        (BudgetGuardMiddleware, {"max_budget": "ten"}, "max_budget"),
        (BudgetGuardMiddleware, {"max_budget": 1e300}, "max_budget"),
        (BudgetGuardMiddleware, {"max_end_user_budget": float("nan")}, "max_end_user_budget"),
        (BudgetGuardMiddleware, {"budget_duration": "999999w"}, "budget_duration"),
        (BudgetGuardMiddleware, {"on_store_error": "open"}, "on_store_error"),
        (BudgetGuardMiddleware, {"clamp_max_tokens": "yes"}, "clamp_max_tokens"),
        (SpendRecorderMiddleware, {"max_body_size": 0}, "max_body_size"),
        (KeyAuthMiddleware, {"cache_ttl": -1}, "cache_ttl"),
        (KeyAuthMiddleware, {"master_key": ""}, "master_key"),
        (KeyAuthMiddleware, {"access_groups": {"beta": "mistral"}}, "access_groups"),
        (KeyAuthMiddleware, {"store": "redis://localhost"}, "store"),
        (RequestRateLimitMiddleware, {"store": "redis://localhost"}, "store"),
        (ParallelRequestLimitMiddleware, {"store": object()}, "store"),
        (BudgetGuardMiddleware, {"store": "redis://localhost"}, "store"),
        (SpendRecorderMiddleware, {"store": "redis://localhost"}, "store"),
    ],
)
def test_middlewares_check_every_option_when_built(
    cls: type[Any], options: dict[str, Any], named: str
) -> None:
    with pytest.raises(ConfigurationError, match=rf"^{named}\b"):
        cls(_APP, **{"store": MemoryStore(), **options})


# -- one store_timeout ---------------------------------------------------------------------------


def test_the_meter_gives_its_store_timeout_to_a_redis_store(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url, timeout=1.0)
    assert Meter(store).store_timeout == 1.0  # none given: the store's own
    assert Meter(store, store_timeout=5).store_timeout == 5
    assert store.call_timeout == 5
    assert Meter(MemoryStore()).store_timeout == DEFAULT_STORE_TIMEOUT


async def _paused_request(redis_url: str, fence: Fence, pause_ms: int) -> tuple[int, float]:
    """One request through the fence while Redis answers no client for `pause_ms`."""
    app = mock_llm_app()
    fence.install(app)
    async with client_for(app) as client:  # its shutdown sends what the stall left behind
        key, _ = await fence.generate_key()
        body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
        assert (await client.post(CHAT, json=body, headers=auth(key))).status_code == 200
        admin = redis.asyncio.Redis.from_url(redis_url)
        try:
            await admin.client_pause(pause_ms, all=True)
            started = time.monotonic()
            response = await client.post(CHAT, json=body, headers=auth(key))
            elapsed = time.monotonic() - started
            await anyio.sleep(max(0.0, pause_ms / 1000 - elapsed))
        finally:
            await admin.client_unpause()
            await admin.aclose()
    await fence.store.aclose()
    return response.status_code, elapsed


def _fence(redis_url: str, own_timeout: float, **options: Any) -> Fence:
    store = RedisStore.from_url(redis_url, prefix=f"opt-{uuid.uuid4().hex}", timeout=own_timeout)
    # A budget fails closed: a store call that times out is a 503.
    return Fence(store=store, master_key=MASTER, max_budget=10.0, **options)


# A 1.5 s stall; the outcome (served or 503) tells which bound governed, with no clock read.


async def test_a_longer_store_timeout_outlasts_the_store_s_own(redis_url: str) -> None:
    fence = _fence(redis_url, own_timeout=0.3, store_timeout=5)
    status, _ = await _paused_request(redis_url, fence, 1500)
    assert status == 200


async def test_a_shorter_store_timeout_cuts_a_stall_short(redis_url: str) -> None:
    fence = _fence(redis_url, own_timeout=10, store_timeout=0.3)
    status, _ = await _paused_request(redis_url, fence, 1500)
    assert status == 503


async def test_without_store_timeout_the_store_keeps_its_own(redis_url: str) -> None:
    status, _ = await _paused_request(redis_url, _fence(redis_url, own_timeout=0.3), 1500)
    assert status == 503
    status, _ = await _paused_request(redis_url, _fence(redis_url, own_timeout=10), 1500)
    assert status == 200


def test_every_shipped_store_defaults_to_five_seconds(tmp_path: Path) -> None:
    assert DEFAULT_TIMEOUT == DEFAULT_STORE_TIMEOUT == 5.0
    assert RedisStore.from_url("redis://127.0.0.1:1").call_timeout == DEFAULT_TIMEOUT
    assert SQLiteStore(tmp_path / "x.db").call_timeout == DEFAULT_TIMEOUT


async def test_the_python_doors_check_ids_as_the_admin_api_does() -> None:
    fence = Fence(store=MemoryStore())
    with pytest.raises(ConfigurationError, match="key_alias"):
        await fence.generate_key(key_alias="x" * 257)
    with pytest.raises(ConfigurationError, match="user_id"):
        await fence.new_user("u" * 257)
    with pytest.raises(ConfigurationError, match="team_id"):
        await fence.new_team("\ud800")
    assert await fence.store.list_keys() == []


def test_a_forwarding_wrapper_does_not_inherit_the_stores_promises() -> None:
    class Forwarding:
        """Forwards every attribute, but could await in methods of its own."""

        def __init__(self, store: MemoryStore) -> None:
            self.store = store

        def __getattr__(self, name: str) -> Any:
            return getattr(self.store, name)

    assert Meter(MemoryStore()).never_suspends is True
    assert Meter(Forwarding(MemoryStore())).never_suspends is False


async def test_lease_ttl_is_a_fence_option() -> None:
    from starlette.types import Receive, Scope, Send

    from llmfence.testing import FakeClock

    clock = FakeClock(1_795_000_000.0)
    fence = Fence(store=MemoryStore(), master_key="sk-master-key", lease_ttl=5, clock=clock.now)
    key, _ = await fence.generate_key(max_parallel_requests=1)
    upstream = mock_llm_app()
    entered, release = anyio.Event(), anyio.Event()
    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        if scope["type"] == "http":
            calls += 1
            if calls == 1:  # the first call hangs, holding its slot, like a dead worker's
                entered.set()
                await release.wait()
        await upstream(scope, receive, send)

    stack = fence.wrap(app)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    transport = httpx.ASGITransport(app=stack)

    async def hung() -> None:
        await client.post(CHAT, json=body, headers=auth(key))

    async with (
        httpx.AsyncClient(transport=transport, base_url="http://gateway") as client,
        anyio.create_task_group() as tasks,
    ):
        tasks.start_soon(hung)
        await entered.wait()
        held = await client.post(CHAT, json=body, headers=auth(key))
        clock.advance(6)  # past lease_ttl: the hung call's slot frees itself
        freed = await client.post(CHAT, json=body, headers=auth(key))
        release.set()
    assert (held.status_code, freed.status_code) == (429, 200)
    with pytest.raises(ConfigurationError, match="lease_ttl"):
        Fence(lease_ttl=0)


def test_a_short_master_key_is_accepted_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    # LiteLLM's docs use `master_key: sk-1234`: it works, and the log says it is weak.
    with caplog.at_level(logging.WARNING, logger="llmfence"):
        fence = Fence(store=MemoryStore(), master_key="sk-1234")
        KeyAuthMiddleware(_APP, store=MemoryStore(), master_key="sk-1234")
    assert fence.authenticator.is_master("sk-1234")
    warnings = [r for r in caplog.records if r.name == "llmfence" and "master_key" in r.message]
    assert len(warnings) == 2
    assert all("sk-1234" not in r.getMessage() for r in caplog.records)
