"""The output allowance: what a request that names no `max_tokens` reserves, and how it fits."""

from __future__ import annotations

import json
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import Message, Receive, Scope, Send

from llmfence import Fence, Store
from llmfence.stores import BudgetScope
from llmfence.testing import FakeClock, mock_llm_app

from .conftest import CHAT, auth, chat_body, client_for

pytestmark = pytest.mark.anyio
MASTER = "sk-master-key"


def spying_app(seen: list[bytes]) -> Starlette:
    """The mock upstream behind a spy that keeps every body it is sent."""
    upstream = mock_llm_app()

    async def spy(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await upstream(scope, receive, send)
            return
        message = await receive()
        seen.append(message["body"])
        replayed = False

        async def again() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return message
            return await receive()

        await upstream(scope, again, send)

    return Starlette(routes=[Mount("/", app=spy)])


def build(store: Store, clock: FakeClock, **options: Any) -> tuple[Fence, Starlette, list[bytes]]:
    seen: list[bytes] = []
    app = spying_app(seen)
    fence = Fence(store=store, master_key=MASTER, clock=clock.now, **options)
    fence.install(app)
    return fence, app, seen


async def key_spent(store: Store, key_hash: str) -> int:
    [state] = await store.budgets([BudgetScope(f"key:{key_hash}", "key", "k")], 0)
    return state.total


async def test_a_small_tpm_limit_admits_a_call_without_max_tokens(
    store: Store, clock: FakeClock
) -> None:
    fence, app, seen = build(store, clock)
    key, _ = await fence.generate_key(tpm_limit=1000)
    async with client_for(app) as client:
        response = await client.post(CHAT, json=chat_body("Hi"), headers=auth(key))
    assert response.status_code == 200, response.text
    fitted = int(response.headers["x-llmfence-max-tokens-clamped"])
    usage = response.json()["usage"]
    # What was reserved (the prompt and the fitted allowance) is the whole limit at most.
    assert usage["prompt_tokens"] + fitted <= 1000
    assert fitted >= 900
    assert json.loads(seen[0])["max_tokens"] == fitted


async def test_the_seeds_tiny_budget_admits_a_short_call_and_never_overspends(
    store: Store, clock: FakeClock
) -> None:
    fence, app, seen = build(store, clock)
    key, record = await fence.generate_key(max_budget=0.0001)
    statuses = []
    async with client_for(app) as client:
        for _ in range(8):
            response = await client.post(CHAT, json=chat_body("Hey"), headers=auth(key))
            statuses.append(response.status_code)
    assert statuses[0] == 200
    assert 429 in statuses  # once not even the minimum output fits
    assert await key_spent(store, record.key_hash) <= 100_000  # $0.0001 in nano-USD
    assert all("max_tokens" in json.loads(body) for body in seen)


async def test_an_allowance_that_fits_is_forwarded_unchanged(
    store: Store, clock: FakeClock
) -> None:
    fence, app, seen = build(store, clock)
    key, _ = await fence.generate_key(tpm_limit=100_000, max_budget=10.0)
    body = json.dumps(chat_body("Hello there")).encode()
    async with client_for(app) as client:
        response = await client.post(
            CHAT, content=body, headers={**auth(key), "content-type": "application/json"}
        )
    assert response.status_code == 200
    assert "x-llmfence-max-tokens-clamped" not in response.headers
    assert seen == [body]


async def test_a_named_max_tokens_that_does_not_fit_is_refused_with_what_would(
    store: Store, clock: FakeClock
) -> None:
    fence, app, _ = build(store, clock)
    key, _ = await fence.generate_key(tpm_limit=200)
    async with client_for(app) as client:
        response = await client.post(CHAT, json=chat_body("Hi", max_tokens=500), headers=auth(key))
    assert response.status_code == 429
    message = response.json()["error"]["message"]
    assert "Reduce the input or max_tokens." in message
    fit = int(message.rsplit("fits now is ", 1)[1].rstrip("."))
    assert 150 < fit < 200
    async with client_for(app) as client:
        ok = await client.post(CHAT, json=chat_body("Hi", max_tokens=fit), headers=auth(key))
    assert ok.status_code == 200


async def test_a_refusal_never_names_a_max_tokens_the_client_did_not_send(
    store: Store, clock: FakeClock
) -> None:
    fence, app, _ = build(store, clock)
    key, _ = await fence.generate_key(tpm_limit=50)
    long_prompt = "word " * 200  # more than the whole limit by itself
    async with client_for(app) as client:
        response = await client.post(CHAT, json=chat_body(long_prompt), headers=auth(key))
    assert response.status_code == 429
    message = response.json()["error"]["message"]
    assert message.startswith("Request too large")
    assert "max_tokens" not in message
    assert response.headers["x-should-retry"] == "false"


async def test_the_minimum_output_is_configurable(store: Store, clock: FakeClock) -> None:
    fence, app, _ = build(store, clock, min_output_tokens=500)
    key, _ = await fence.generate_key(tpm_limit=300)
    async with client_for(app) as client:
        response = await client.post(CHAT, json=chat_body("Hi"), headers=auth(key))
    assert response.status_code == 429
    assert "max_tokens" not in response.json()["error"]["message"]
