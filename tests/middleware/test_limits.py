from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from llmfence import Fence, RedisStore, Store
from llmfence.testing import FakeClock, mock_llm_app

from .conftest import CHAT, MODEL, Counting, auth, chat_body, client_for

pytestmark = pytest.mark.anyio


async def test_rpm_per_key_with_headers(gateway: Any, clock: FakeClock) -> None:
    fence, _app, client = gateway()
    key, _ = await fence.generate_key(rpm_limit=3)
    async with client as c:
        responses = [await c.post(CHAT, json=chat_body(), headers=auth(key)) for _ in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429]
    ok = responses[0].headers
    assert ok["x-ratelimit-limit-requests"] == "3"
    assert ok["x-ratelimit-remaining-requests"] == "2"
    assert ok["x-ratelimit-reset-requests"].endswith("s")
    assert ok["ratelimit-policy"] == '"key-requests";q=3;w=60'
    assert ok["ratelimit"].startswith('"key-requests";r=2;t=')
    refused = responses[3]
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "requests"
    assert "key sk-..." in error["message"]
    assert "limit 3" in error["message"]
    assert key not in refused.text
    assert int(refused.headers["retry-after"]) >= 1
    assert int(refused.headers["retry-after-ms"]) >= 1
    assert "x-should-retry" not in refused.headers
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_rpm_levels_user_team_and_fence_default(gateway: Any) -> None:
    fence, _app, client = gateway(rpm_limit=2)
    await fence.new_team("core", rpm_limit=3)
    await fence.new_user("alice", team_id="core", rpm_limit=10)
    default_key, _ = await fence.generate_key()
    team_keys = [(await fence.generate_key(user_id="alice", rpm_limit=100))[0] for _ in range(2)]
    async with client as c:
        defaults = [
            await c.post(CHAT, json=chat_body(), headers=auth(default_key)) for _ in range(3)
        ]
        shared = [
            await c.post(CHAT, json=chat_body(), headers=auth(team_keys[i % 2])) for i in range(4)
        ]
    assert [r.status_code for r in defaults] == [200, 200, 429]
    assert [r.status_code for r in shared] == [200, 200, 200, 429]
    assert shared[3].json()["error"]["message"].startswith("Rate limit reached for team core")
    assert shared[0].headers["ratelimit-policy"] == (
        '"key-requests";q=100;w=60, "user-requests";q=10;w=60, "team-requests";q=3;w=60'
    )
    # OpenAI's headers report the tightest level.
    assert shared[0].headers["x-ratelimit-limit-requests"] == "3"


async def test_raising_a_limit_keeps_the_usage(gateway: Any) -> None:
    fence, _app, client = gateway()
    key, record = await fence.generate_key(rpm_limit=2)
    async with client as c:
        for _ in range(2):
            assert (await c.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 200
        await fence.store.update_key(record.key_hash, {"rpm_limit": 3})
        fence.authenticator.invalidate_key(record.key_hash)
        assert (await c.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 200
        assert (await c.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 429


async def test_window_slides_with_the_clock(gateway: Any, clock: FakeClock) -> None:
    fence, _app, client = gateway()
    key, _ = await fence.generate_key(rpm_limit=1)
    async with client as c:
        assert (await c.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 200
        assert (await c.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 429
        clock.advance(121)
        assert (await c.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 200


async def test_tpm_reserves_prompt_plus_allowance_and_settles(gateway: Any) -> None:
    fence, _app, client = gateway()
    key, _ = await fence.generate_key(tpm_limit=100)
    async with client as c:
        # 14 prompt + 60 allowance = 74 reserved; settled to the reported total.
        first = await c.post(CHAT, json=chat_body(max_tokens=60), headers=auth(key))
        assert first.status_code == 200
        assert first.headers["x-ratelimit-remaining-tokens"] == str(100 - 74)
        used = first.json()["usage"]["total_tokens"]
        assert used < 74
        second = await c.post(CHAT, json=chat_body(max_tokens=40), headers=auth(key))
        assert second.status_code == 200
        assert second.headers["x-ratelimit-remaining-tokens"] == str(100 - used - 54)
        third = await c.post(CHAT, json=chat_body(max_tokens=60), headers=auth(key))
    assert third.status_code == 429
    assert third.json()["error"]["type"] == "tokens"


async def test_request_larger_than_the_whole_limit_is_not_retryable(gateway: Any) -> None:
    fence, _app, client = gateway()
    key, _ = await fence.generate_key(tpm_limit=50)
    async with client as c:
        response = await c.post(CHAT, json=chat_body(max_tokens=500), headers=auth(key))
    assert response.status_code == 429
    assert response.headers["x-should-retry"] == "false"
    assert "retry-after" not in response.headers
    assert response.json()["error"]["message"].startswith("Request too large")


async def test_refused_requests_never_reach_the_app_nor_get_charged(
    store: Store, clock: FakeClock
) -> None:
    upstream = Counting(mock_llm_app())
    app = Starlette(routes=[Mount("/", app=upstream)])
    fence = Fence(store=store, master_key="sk-master-key", max_budget=1.0, clock=clock.now)
    fence.install(app)
    key, _record = await fence.generate_key(rpm_limit=1, tpm_limit=10_000)
    async with client_for(app) as c:
        ok = await c.post(CHAT, json=chat_body(), headers=auth(key))
        assert ok.status_code == 200
        for _ in range(5):
            assert (await c.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 429
    assert upstream.calls == 1
    assert (await fence.store.spend_totals("global")).requests == 1
    [state] = await fence.store.budgets(
        [__import__("llmfence").stores.BudgetScope("global", "global", "global")], 0
    )
    usage = ok.json()["usage"]
    assert state.spent == usage["prompt_tokens"] * 1500 + usage["completion_tokens"] * 2000


async def test_parallel_limit_and_release(gateway: Any) -> None:
    fence, _app, client = gateway()
    key, _ = await fence.generate_key(max_parallel_requests=2)
    slow = {**auth(key), "x-mock-delay": "0.05", "x-mock-chunks": "4"}
    statuses: list[int] = []
    async with client as c:

        async def call() -> None:
            response = await c.post(CHAT, json=chat_body(stream=True), headers=slow)
            statuses.append(response.status_code)
            if response.status_code == 429:
                assert response.json()["error"]["type"] == "parallel_requests"

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(call)
        assert sorted(statuses) == [200, 200, 429, 429, 429]
        # Every slot came back when the streams ended.
        again = [await c.post(CHAT, json=chat_body(), headers=auth(key)) for _ in range(3)]
    assert [r.status_code for r in again] == [200, 200, 200]


async def test_rpm_exact_across_two_fences_sharing_redis(redis_url: str) -> None:
    clock = FakeClock(1_795_000_000.0)
    apps = []
    fences = []
    for _ in range(2):
        store = RedisStore.from_url(redis_url)
        fence = Fence(store=store, master_key="sk-master-key", clock=clock.now)
        app = mock_llm_app()
        fence.install(app)
        fences.append(fence)
        apps.append(app)
    key, _ = await fences[0].generate_key(rpm_limit=25)
    ok = 0
    async with client_for(apps[0]) as a, client_for(apps[1]) as b:

        async def call(client: httpx.AsyncClient) -> None:
            nonlocal ok
            response = await client.post(CHAT, json=chat_body(), headers=auth(key))
            ok += response.status_code == 200

        async with anyio.create_task_group() as tg:
            for i in range(80):
                tg.start_soon(call, a if i % 2 else b)
    assert ok == 25
    for fence in fences:
        await fence.store.aclose()


async def test_model_name_in_error_messages_never_the_key(gateway: Any) -> None:
    fence, _app, client = gateway()
    key, record = await fence.generate_key(tpm_limit=10)
    async with client as c:
        response = await c.post(CHAT, json=chat_body(), headers=auth(key))
    assert response.status_code == 429
    assert key not in response.text
    assert record.key_hash not in response.text
    assert MODEL not in response.headers.get("retry-after", "")


async def test_rates_in_the_limits_notation() -> None:
    from starlette.applications import Starlette

    from llmfence import MemoryStore, RequestRateLimitMiddleware, TokenRateLimitMiddleware
    from llmfence._core.checks import parse_rate
    from llmfence.exceptions import ConfigurationError

    assert parse_rate("100/minute") == (100, 60.0)
    assert parse_rate("20000 per 2 minutes") == (20_000, 120.0)
    assert parse_rate("5/second") == (5, 1.0)
    with pytest.raises(ConfigurationError, match="nonsense"):
        parse_rate("nonsense")
    app = mock_llm_app()
    app.add_middleware(RequestRateLimitMiddleware, store=MemoryStore(), rate="2/minute")
    async with client_for(app) as c:
        statuses = [(await c.post(CHAT, json=chat_body())).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    guarded = TokenRateLimitMiddleware(Starlette(), rate="1000/hour")
    assert (guarded.limit_check.default_limit, guarded.limit_check.window) == (1000, 3600.0)  # type: ignore[attr-defined]


async def test_two_windows_of_one_kind_are_two_counters() -> None:
    from llmfence import MemoryStore, RequestRateLimitMiddleware
    from llmfence.testing import FakeClock

    clock = FakeClock(1_795_000_000.0)
    store = MemoryStore()
    app = mock_llm_app()
    from llmfence._core.meter import Meter

    meter = Meter(store, clock=clock.now)
    app.add_middleware(RequestRateLimitMiddleware, meter=meter, rate="5/second")
    app.add_middleware(RequestRateLimitMiddleware, meter=meter, rate="12/hour")
    statuses = []
    async with client_for(app) as c:
        for _ in range(20):
            statuses.append((await c.post(CHAT, json=chat_body())).status_code)
            clock.advance(0.5)  # 2 requests a second: the per-second limit never binds
    assert statuses.count(200) == 12  # the hourly limit does


@pytest.mark.parametrize("window", [0, -1, float("nan"), float("inf"), 0.0001])
def test_windows_must_be_finite_and_at_least_a_millisecond(window: float) -> None:
    from llmfence import MemoryStore, RequestRateLimitMiddleware
    from llmfence.exceptions import ConfigurationError

    with pytest.raises(ConfigurationError, match="window"):
        RequestRateLimitMiddleware(mock_llm_app(), store=MemoryStore(), limit=1, window=window)
    with pytest.raises(ConfigurationError, match="window"):
        Fence(store=MemoryStore()).limit(rpm=1, window=window)
