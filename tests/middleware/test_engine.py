"""The engine: llmfence layers fuse into one callable, join across foreign middlewares, and never
behave differently because of their neighbours."""

from __future__ import annotations

import itertools
import random
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from llmfence import (
    BudgetGuardMiddleware,
    ConfigurationError,
    Fence,
    KeyAuthMiddleware,
    MemoryStore,
    ParallelRequestLimitMiddleware,
    RequestRateLimitMiddleware,
    SpendRecorderMiddleware,
    Store,
    TokenRateLimitMiddleware,
)
from llmfence.middleware._base import FenceMiddleware
from llmfence.stores import Admission, AdmissionResult, BudgetScope
from llmfence.testing import mock_llm_app

from .conftest import CHAT, MODEL, Counting, auth, chat_body, client_for

pytestmark = pytest.mark.anyio
MASTER = "sk-master-key"
SIX: list[tuple[Any, dict[str, Any]]] = [
    (KeyAuthMiddleware, {"master_key": MASTER}),
    (RequestRateLimitMiddleware, {"limit": 3}),
    (TokenRateLimitMiddleware, {"limit": 1_000_000}),
    (ParallelRequestLimitMiddleware, {"limit": 1}),
    (BudgetGuardMiddleware, {"max_budget": 1.0}),
    (SpendRecorderMiddleware, {}),
]


class CountingStore(MemoryStore):
    """A real MemoryStore that counts the admissions sent to it."""

    def __init__(self) -> None:
        super().__init__()
        self.admits = 0

    async def admit(self, admission: Admission) -> AdmissionResult:
        self.admits += 1
        return await super().admit(admission)


async def post_many(app: ASGIApp, count: int, **headers: str) -> list[int]:
    async with client_for(app) as client:
        return [
            (await client.post(CHAT, json=chat_body(), headers=headers)).status_code
            for _ in range(count)
        ]


async def test_a_deferred_limiter_alone_is_still_enforced() -> None:
    # `defer` used to leave the check to a later llmfence layer: alone, it was never sent.
    app = mock_llm_app()
    app.add_middleware(RequestRateLimitMiddleware, limit=1, defer=True)
    assert await post_many(app, 4) == [200, 429, 429, 429]


async def test_layers_added_separately_without_a_store_share_one() -> None:
    # Each used to build its own MemoryStore: the lease taken in one was never freed.
    app = mock_llm_app()
    app.add_middleware(ParallelRequestLimitMiddleware, limit=1)
    app.add_middleware(RequestRateLimitMiddleware, limit=100)
    assert await post_many(app, 5) == [200] * 5


async def test_adjacent_layers_fuse_into_one_callable() -> None:
    app = mock_llm_app()
    fence = Fence(master_key=MASTER)
    wrapped = fence.wrap(app)
    assert isinstance(wrapped, FenceMiddleware)
    assert wrapped.app is app  # no llmfence layer left in between
    assert [layer.name for layer in wrapped.layers] == [cls.__name__ for cls, _ in SIX]


async def test_wrap_needs_no_starlette_host() -> None:
    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        await receive()
        body = b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}'
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER)
    key, record = await fence.generate_key(rpm_limit=1)
    transport = httpx.ASGITransport(app=fence.wrap(bare))  # no lifespan: the app has none
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        statuses = [
            (await client.post(CHAT, json=chat_body(), headers=auth(key))).status_code
            for _ in range(2)
        ]
    assert statuses == [200, 429]
    [spent] = await store.budgets([BudgetScope(f"key:{record.key_hash}", "key", "k")], 0)
    assert spent.total == 3 * 1500 + 4 * 2000  # gpt-3.5-turbo-0613, from the JSON usage


def shuffled_orders() -> list[list[int]]:
    orders = list(itertools.permutations(range(6)))
    return [list(order) for order in random.Random(9).sample(orders, 6)]


@pytest.mark.parametrize("order", shuffled_orders())
async def test_the_six_in_any_order_make_one_admission_per_request(order: list[int]) -> None:
    store = CountingStore()
    counting = Counting(mock_llm_app())
    app = Starlette(routes=[Route(CHAT, counting, methods=["POST"])])
    for index in order:
        cls, options = SIX[index]
        app.add_middleware(cls, store=store, **options)
    statuses = await post_many(app, 5, authorization=f"Bearer {MASTER}")
    # The master key has no rate limits of its own; the default limits apply to keys only.
    assert statuses == [200] * 5
    assert store.admits == 5  # one store call before the app, per request
    assert counting.calls == 5
    records = await store.spend_records()
    assert len(records) == 5  # one record each, the settlement carries it
    [spent] = await store.budgets([BudgetScope("global", "global", "global")], 0)
    assert spent.total == sum(record.cost for record in records) > 0


@pytest.mark.parametrize("order", shuffled_orders())
async def test_limits_hold_in_any_order(order: list[int]) -> None:
    store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER)
    key, _ = await fence.generate_key(rpm_limit=3)
    app = mock_llm_app()
    for index in order:
        cls, options = SIX[index]
        app.add_middleware(cls, store=store, **options)
    # Requests reach the rate limit only once authenticated when auth is outside it; inside,
    # the limiter counts them as one anonymous caller (limit 3 as well).
    assert await post_many(app, 4, authorization=f"Bearer {key}") == [200, 200, 200, 429]


async def test_layers_across_a_foreign_middleware_join_one_request() -> None:
    store = CountingStore()
    fence = Fence(store=store, master_key=MASTER)
    key, _ = await fence.generate_key(rpm_limit=2, max_parallel_requests=1)
    app = mock_llm_app()
    app.add_middleware(SpendRecorderMiddleware, store=store)
    app.add_middleware(ParallelRequestLimitMiddleware, store=store)
    app.add_middleware(CORSMiddleware, allow_origins=["*"])
    app.add_middleware(RequestRateLimitMiddleware, store=store)
    app.add_middleware(KeyAuthMiddleware, store=store)
    statuses = await post_many(app, 3, authorization=f"Bearer {key}")
    assert statuses == [200, 200, 429]
    # The lease is released by the outer engine's settlement: sequential calls never collide.
    assert len(await store.spend_records()) == 2
    assert store.admits == 2 + 2 + 1  # two admissions per served request, one for the refusal


async def test_a_joined_layer_without_a_store_uses_the_outer_one() -> None:
    store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER)
    key, _ = await fence.generate_key(rpm_limit=1)
    app = mock_llm_app()
    app.add_middleware(RequestRateLimitMiddleware)  # no store: joins the outer request's
    app.add_middleware(CORSMiddleware, allow_origins=["*"])
    app.add_middleware(KeyAuthMiddleware, store=store)
    assert await post_many(app, 2, authorization=f"Bearer {key}") == [200, 429]


async def test_adjacent_layers_over_different_stores_are_refused_when_built() -> None:
    app = mock_llm_app()
    app.add_middleware(BudgetGuardMiddleware, store=MemoryStore(), max_budget=1.0)
    app.add_middleware(RequestRateLimitMiddleware, store=MemoryStore(), limit=1)
    with pytest.raises(ConfigurationError, match="RequestRateLimitMiddleware and Budget"):
        app.build_middleware_stack()


async def test_joined_layers_over_different_stores_are_refused_on_the_first_request() -> None:
    app = mock_llm_app()
    app.add_middleware(RequestRateLimitMiddleware, store=MemoryStore(), limit=1)
    app.add_middleware(CORSMiddleware, allow_origins=["*"])
    app.add_middleware(KeyAuthMiddleware, store=MemoryStore(), master_key=MASTER)
    with pytest.raises(ConfigurationError, match="another store"):
        await post_many(app, 1, authorization=f"Bearer {MASTER}")


async def test_route_guards_beside_the_middlewares_reuse_their_caller() -> None:
    store: Store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER)
    key, record = await fence.generate_key(rpm_limit=100)

    @fence.limit(rpm=1, per="key", name="summaries")
    async def summarize(request: Request) -> JSONResponse:
        await fence.charge(request, model=MODEL, usage={"prompt_tokens": 10})
        return JSONResponse({"ok": True})

    app = mock_llm_app()
    app.router.routes.append(Route("/summarize", summarize, methods=["POST"]))
    fence.install(app)
    async with client_for(app) as client:
        first = await client.post("/summarize", json={}, headers=auth(key))
        second = await client.post("/summarize", json={}, headers=auth(key))
        chat = await client.post(CHAT, json=chat_body(), headers=auth(key))
    assert (first.status_code, second.status_code, chat.status_code) == (200, 429, 200)
    assert second.json()["error"]["type"] == "requests"
    # The route's charge landed at the key level the middlewares also charge.
    [state] = await store.budgets([BudgetScope(f"key:{record.key_hash}", "key", "k")], 0)
    usage = chat.json()["usage"]
    chat_cost = usage["prompt_tokens"] * 1500 + usage["completion_tokens"] * 2000
    assert state.total == 10 * 1500 + chat_cost


async def test_every_metered_response_names_its_request_id() -> None:
    store = MemoryStore()
    app = mock_llm_app()
    Fence(store=store, master_key=MASTER).install(app)
    async with client_for(app) as client:
        response = await client.post(CHAT, json=chat_body(), headers=auth(MASTER))
    [record] = await store.spend_records()
    assert response.headers["x-llmfence-request-id"] == record.request_id
