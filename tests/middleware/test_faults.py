"""Faults: nothing lost or double-charged when the store's reply is lost, the client leaves
early, the app raises, or two budget guards share a level."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.types import Message, Receive, Scope, Send

from llmfence import BudgetGuardMiddleware, Fence, MemoryStore, SpendRecorderMiddleware, Store
from llmfence._core.meter import Meter
from llmfence.exceptions import StoreError
from llmfence.stores import Admission, AdmissionResult, BudgetScope
from llmfence.testing import FakeClock, mock_llm_app

from .conftest import CHAT, auth, chat_body, client_for

pytestmark = pytest.mark.anyio
GLOBAL = BudgetScope("global", "global", "global")


class LostReplies:
    """A real store whose next `admit` replies get lost after the store applied them."""

    def __init__(self, store: Store, losses: int = 1) -> None:
        self.store = store
        self.losses = losses

    async def admit(self, admission: Admission) -> AdmissionResult:
        result = await self.store.admit(admission)
        if self.losses:
            self.losses -= 1
            raise StoreError("reply lost")
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def global_spent(store: Store) -> int:
    [state] = await store.budgets([GLOBAL], 0)
    return state.total


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
async def test_a_lost_admission_reply_is_settled_never_leaked(store: Store, policy: str) -> None:
    flaky = LostReplies(store)
    app = mock_llm_app()
    fence = Fence(
        store=flaky,
        master_key="sk-master-key",
        max_budget=1.0,
        budgets_on_store_error=policy,
    )
    fence.install(app)
    key, _ = await fence.generate_key(max_parallel_requests=1)
    async with client_for(app) as client:
        first = await client.post(CHAT, json=chat_body(max_tokens=100), headers=auth(key))
        after_first = await global_spent(store)
        # The lease the lost admission took came back: the next request is admitted.
        second = await client.post(CHAT, json=chat_body(max_tokens=100), headers=auth(key))
    assert second.status_code == 200
    if policy == "fail_closed":
        assert first.status_code == 503
        assert after_first == 0  # answered 503: never charged, although the store reserved
    else:
        assert first.status_code == 200
        usage = first.json()["usage"]
        # Charged exactly once: the reservation the store did make was settled, not doubled.
        assert after_first == usage["prompt_tokens"] * 1500 + usage["completion_tokens"] * 2000


def json_app(parts: list[bytes]) -> Any:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await receive()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        for part in parts[:-1]:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        message = await receive()
        assert message["type"] == "http.disconnect"  # the client left before the last part

    return app


async def call(app: Any, body: dict[str, Any], disconnect: bool = True) -> list[Message]:
    sent: list[Message] = []
    raw = json.dumps(body).encode()
    messages: list[Message] = [
        {"type": "http.request", "body": raw, "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": CHAT,
        "query_string": b"",
        "headers": [(b"authorization", b"Bearer sk-master-key")],
    }
    await app(scope, receive, send)
    return sent


async def test_a_json_response_cut_short_is_charged_its_reservation() -> None:
    store = MemoryStore()
    body = json.dumps(
        {
            "choices": [{"message": {"content": "x" * 500}}],
            "usage": {"prompt_tokens": 14, "completion_tokens": 4000},
        }
    ).encode()
    app = json_app([body[:-200], body[-200:]])
    fenced = SpendRecorderMiddleware(app, store=store)
    await call(fenced, chat_body(max_tokens=4000))
    [record] = await store.spend_records()
    assert record.provenance == "reservation-only"
    assert record.status == 499
    assert (record.input_tokens, record.output_tokens) == (14, 4000)
    assert record.cost == 14 * 1500 + 4000 * 2000


async def test_an_app_that_raises_is_not_charged() -> None:
    store = MemoryStore()

    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        raise RuntimeError("the app failed")

    fenced = SpendRecorderMiddleware(broken, store=store)
    with pytest.raises(RuntimeError):
        await call(fenced, chat_body())
    [record] = await store.spend_records()
    assert (record.status, record.cost) == (500, 0)


async def test_two_budget_guards_charge_a_level_once() -> None:
    store = MemoryStore()
    app = mock_llm_app()
    meter = Meter(store, clock=FakeClock(1e9).now)
    app.add_middleware(BudgetGuardMiddleware, meter=meter, max_end_user_budget=1.0)
    app.add_middleware(BudgetGuardMiddleware, meter=meter, max_budget=5.0)
    async with client_for(app) as client:
        response = await client.post(CHAT, json=chat_body(user="eve"))
    usage = response.json()["usage"]
    cost = usage["prompt_tokens"] * 1500 + usage["completion_tokens"] * 2000
    assert await global_spent(store) == cost
    [end_user] = await store.budgets([BudgetScope("end_user:eve", "end_user", "eve")], 0)
    assert end_user.total == cost


async def test_clamping_a_reasoning_model_uses_max_completion_tokens(store: Store) -> None:
    seen: list[dict[str, Any]] = []
    upstream = mock_llm_app()

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        seen.append(json.loads(message["body"]))
        replayed = False

        async def again() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return message
            return await receive()

        await upstream(scope, again, send)

    from starlette.routing import Mount

    app = Starlette(routes=[Mount("/", app=spy)])
    fence = Fence(
        store=store, master_key="sk-master-key", clamp_max_tokens=True, default_max_tokens=100_000
    )
    fence.install(app)
    key, _ = await fence.generate_key(max_budget=0.001)
    body = {"model": "o3-mini", "messages": [{"role": "user", "content": "think"}]}
    async with client_for(app) as client:
        response = await client.post(CHAT, json=body, headers=auth(key))
    assert response.status_code == 200
    clamped = int(response.headers["x-llmfence-max-tokens-clamped"])
    assert seen[0]["max_completion_tokens"] == clamped
    assert "max_tokens" not in seen[0]


async def test_a_request_refused_by_a_later_guard_takes_no_request_slot() -> None:
    from llmfence import RequestRateLimitMiddleware

    store = MemoryStore()
    app = mock_llm_app()
    meter = Meter(store, clock=FakeClock(1e9).now)
    app.add_middleware(BudgetGuardMiddleware, meter=meter, max_budget=0.000001)
    app.add_middleware(RequestRateLimitMiddleware, meter=meter, limit=2)
    async with client_for(app) as client:
        statuses = [(await client.post(CHAT, json=chat_body())).status_code for _ in range(3)]
        last = await client.post(CHAT, json=chat_body())
    # Every call is refused by the budget; none of them used up the RPM limit of 2.
    assert statuses == [429, 429, 429]
    assert last.json()["error"]["code"] == "insufficient_quota"


async def test_a_compressed_response_is_charged_its_reservation() -> None:
    import gzip

    store = MemoryStore()
    body = gzip.compress(
        json.dumps({"usage": {"prompt_tokens": 14, "completion_tokens": 3}}).encode()
    )

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        headers = [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    await call(SpendRecorderMiddleware(app, store=store), chat_body(max_tokens=50))
    [record] = await store.spend_records()
    assert record.provenance == "reservation-only"
    assert (record.input_tokens, record.output_tokens) == (14, 50)


async def test_auth_store_failures_are_counted() -> None:
    from llmfence import RedisStore

    fence = Fence(
        store=RedisStore.from_url("redis://127.0.0.1:1/0", timeout=0.2), master_key="sk-master-key"
    )
    app = mock_llm_app()
    fence.install(app)
    async with client_for(app) as client:
        response = await client.post(CHAT, json=chat_body(), headers=auth("sk-" + "k" * 40))
    assert response.status_code == 503
    assert fence.meter.degraded_count == 1
    await fence.store.aclose()
