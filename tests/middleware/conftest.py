"""Fixtures for the middleware tests: a store of each kind, a gateway, a client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp, Receive, Scope, Send

from llmfence import Fence, Store
from llmfence.testing import FakeClock, mock_llm_app

T0 = 1_795_000_000.0  # 2026-11-18, a fixed instant for fake clocks
CHAT = "/v1/chat/completions"
MODEL = "gpt-3.5-turbo-0613"  # $1.5 / $2 per million tokens


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


class Counting:
    """Wraps an app and counts the HTTP requests that reach it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.calls = 0
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.calls += 1
        await self.app(scope, receive, send)


def chat_body(content: str = "Hey, how's it going?", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@asynccontextmanager
async def client_for(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client


@pytest.fixture
def gateway(
    store: Store, clock: FakeClock
) -> Callable[..., tuple[Fence, Any, AbstractAsyncContextManager[httpx.AsyncClient]]]:
    """Build a mock gateway protected by a Fence over the test's store."""

    def build(**options: Any) -> tuple[Fence, Any, AbstractAsyncContextManager[httpx.AsyncClient]]:
        app = mock_llm_app()
        options.setdefault("master_key", "sk-master-key")
        fence = Fence(store=store, clock=clock.now, **options)
        fence.install(app)
        return fence, app, client_for(app)

    return build
