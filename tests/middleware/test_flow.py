"""The request flow: body read once under a cap, parsed once, replayed to the app."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi import FastAPI, Request
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message

from llmfence import (
    BudgetGuardMiddleware,
    Fence,
    KeyAuthMiddleware,
    MemoryStore,
    ParallelRequestLimitMiddleware,
    RequestRateLimitMiddleware,
    SpendRecorderMiddleware,
    TokenRateLimitMiddleware,
)

from .conftest import CHAT, MODEL, auth, chat_body, client_for

pytestmark = pytest.mark.anyio

USAGE = {"prompt_tokens": 14, "completion_tokens": 29, "total_tokens": 43}


def echo_app(received: list[bytes]) -> Starlette:
    async def chat(request: Request) -> JSONResponse:
        received.append(await request.body())
        return JSONResponse({"choices": [], "usage": USAGE})

    return Starlette(routes=[Route(CHAT, chat, methods=["POST"])])


@pytest.mark.parametrize(
    ("middleware", "options"),
    [
        (KeyAuthMiddleware, {"master_key": "sk-master-key"}),
        (RequestRateLimitMiddleware, {"limit": 2}),
        (TokenRateLimitMiddleware, {"limit": 100_000}),
        (ParallelRequestLimitMiddleware, {"limit": 2}),
        (BudgetGuardMiddleware, {"max_budget": 1.0}),
        (SpendRecorderMiddleware, {}),
    ],
)
@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
async def test_each_middleware_works_alone(
    middleware: type, options: dict[str, Any], framework: str
) -> None:
    received: list[bytes] = []
    store = MemoryStore()
    if framework == "fastapi":
        app: Any = FastAPI()

        @app.post(CHAT)  # type: ignore[untyped-decorator]
        async def chat(request: Request) -> dict[str, Any]:
            received.append(await request.body())
            return {"choices": [], "usage": USAGE}
    else:
        app = echo_app(received)
    app.add_middleware(middleware, store=store, **options)
    raw = json.dumps(chat_body()).encode()
    async with client_for(app) as client:
        response = await client.post(
            CHAT, content=raw, headers={**auth("sk-master-key"), "content-type": "application/json"}
        )
    assert response.status_code == 200, response.text
    assert received == [raw]  # the app got exactly the bytes the client sent
    if middleware is SpendRecorderMiddleware:
        [record] = await store.spend_records()
        assert record.cost == 79_000
        assert record.provenance == "provider-reported"


async def test_lifespan_passes_through() -> None:
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, str]]:
        events.append("startup")
        yield {"upstream": "ready"}
        events.append("shutdown")

    async def chat(request: Request) -> JSONResponse:
        return JSONResponse({"state": request.state.upstream, "usage": USAGE})

    app = Starlette(routes=[Route(CHAT, chat, methods=["POST"])], lifespan=lifespan)
    Fence(master_key="sk-master-key").install(app)
    async with client_for(app) as client:
        response = await client.post(CHAT, json=chat_body(), headers=auth("sk-master-key"))
        assert response.json()["state"] == "ready"
    assert events == ["startup", "shutdown"]


async def test_body_cap_and_bad_bodies_never_reach_the_app() -> None:
    received: list[bytes] = []
    app = echo_app(received)
    Fence(master_key="sk-master-key", max_body_size=1000).install(app)
    headers = auth("sk-master-key")
    async with client_for(app) as client:
        too_big = await client.post(CHAT, json=chat_body("x" * 2000), headers=headers)

        async def chunks() -> Any:  # no content-length: the cap holds while reading
            for _ in range(20):
                yield b" " * 100

        streamed = await client.post(CHAT, content=chunks(), headers=headers)
        bad = {
            "not json": await client.post(CHAT, content=b"{nope", headers=headers),
            "not utf-8": await client.post(CHAT, content=b"\xff\xfe", headers=headers),
            "array": await client.post(CHAT, content=b"[]", headers=headers),
            "negative": await client.post(CHAT, json=chat_body(max_tokens=-1), headers=headers),
            "no model": await client.post(CHAT, json={"messages": []}, headers=headers),
        }
    for response in (too_big, streamed):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
    for name, response in bad.items():
        assert response.status_code == 400, name
        assert response.json()["error"]["code"] == "invalid_request_error", name
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert received == []


async def test_app_still_gets_http_disconnect() -> None:
    messages: list[Message] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        messages.append(await receive())
        messages.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    guarded = RequestRateLimitMiddleware(app, store=MemoryStore(), limit=5)
    body = json.dumps(chat_body()).encode()
    incoming: list[Message] = [
        {"type": "http.request", "body": body[:10], "more_body": True},
        {"type": "http.request", "body": body[10:], "more_body": False},
        {"type": "http.disconnect"},
    ]

    async def receive() -> Message:
        return incoming.pop(0)

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": CHAT, "headers": [], "query_string": b""}
    await guarded(scope, receive, send)
    assert messages == [
        {"type": "http.request", "body": body, "more_body": False},
        {"type": "http.disconnect"},
    ]
    assert sent[0]["status"] == 200


async def test_websockets_pass_through() -> None:
    seen: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    guarded = KeyAuthMiddleware(app, store=MemoryStore(), master_key="sk-master-key")
    await guarded({"type": "websocket", "path": "/ws", "headers": []}, None, None)  # type: ignore[arg-type]
    assert seen == ["websocket"]


async def test_parse_is_shared_through_the_scope() -> None:
    seen: list[Any] = []

    async def chat(request: Request) -> JSONResponse:
        seen.append(request.scope["state"]["llmfence"].request.model)
        return JSONResponse({"usage": USAGE})

    app = Starlette(routes=[Route(CHAT, chat, methods=["POST"])])
    Fence(master_key="sk-master-key").install(app)
    async with client_for(app) as client:
        await client.post(CHAT, json=chat_body(), headers=auth("sk-master-key"))
    assert seen == [MODEL]


async def test_settlement_never_delays_the_response_bytes() -> None:
    events: list[str] = []

    class SlowSettle(MemoryStore):
        async def settle(self, settlement: Any) -> bool:
            events.append("settle")
            return await super().settle(settlement)

    app = echo_app([])
    Fence(store=SlowSettle(), master_key="sk-master-key").install(app)
    body = json.dumps(chat_body()).encode()
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            events.append("last body byte sent")

    scope = {
        "type": "http",
        "method": "POST",
        "path": CHAT,
        "query_string": b"",
        "headers": [(b"authorization", b"Bearer sk-master-key")],
    }
    await app(scope, receive, send)
    # The settlement (and the spend record) come after the client has every byte.
    assert events == ["last body byte sent", "settle"]


async def test_metered_paths_are_configurable() -> None:
    received: list[bytes] = []

    async def generate(request: Request) -> JSONResponse:
        received.append(await request.body())
        return JSONResponse({"usage": USAGE})

    app = Starlette(
        routes=[
            Route("/api/generate", generate, methods=["POST"]),
            Route(CHAT, generate, methods=["POST"]),
        ]
    )
    store = MemoryStore()
    Fence(store=store, master_key="sk-master-key", metered_paths=["/api/*"]).install(app)
    async with client_for(app) as client:
        bad = await client.post("/api/generate", content=b"nope", headers=auth("sk-master-key"))
        ok = await client.post("/api/generate", json=chat_body(), headers=auth("sk-master-key"))
        other = await client.post(CHAT, content=b"not metered", headers=auth("sk-master-key"))
    assert bad.status_code == 400
    assert ok.status_code == 200
    assert other.status_code == 200  # no longer metered: auth only, body untouched
    assert received[-1] == b"not metered"
    assert (await store.spend_totals("global")).requests == 1
