"""A real forwarding LLM gateway: FastAPI + httpx, protected by llmfence.

Clients call this app with llmfence virtual keys; it forwards each call to an OpenAI-compatible
upstream with the real provider key, streaming responses straight through. llmfence authenticates
the keys, enforces rate limits and budgets, and records the spend.

    UPSTREAM_BASE_URL=https://api.openai.com/v1 UPSTREAM_API_KEY=sk-... \\
    LLMFENCE_MASTER_KEY=sk-master-... [REDIS_URL=redis://localhost:6379/0] \\
    uvicorn examples.fastapi_gateway:app --port 8000

With `REDIS_URL` set, every gateway instance shares one Redis store; without it, state lives in
the process (one worker).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from starlette.background import BackgroundTask
from starlette.responses import Response, StreamingResponse

from llmfence import Fence, MemoryStore, RedisStore, Store

# Hop-by-hop and length headers are the transport's business, not the upstream's.
_DROP = {
    "host",
    "content-length",
    "authorization",
    "x-api-key",
    "api-key",
    "connection",
    "transfer-encoding",
    "accept-encoding",
}
_DROP_RESPONSE = {"content-length", "transfer-encoding", "connection", "content-encoding"}


def create_app(
    *,
    upstream_base_url: str,
    upstream_api_key: str,
    store: Store | None = None,
    master_key: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    fence_options: Mapping[str, Any] | None = None,
) -> tuple[FastAPI, Fence]:
    """Build the gateway.

    Args:
        upstream_base_url: The provider's base URL, e.g. `https://api.openai.com/v1`.
        upstream_api_key: The provider key the gateway uses for every call.
        store: llmfence's store (a `RedisStore` for several instances).
        master_key: llmfence's master key (admin API).
        transport: An httpx transport for the upstream (tests and the demo pass an in-process
            one).
        fence_options: More `Fence` options (budgets, default limits…).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # One connection pool for the app's lifetime, reached through the lifespan state.
        async with httpx.AsyncClient(
            base_url=upstream_base_url, transport=transport, timeout=httpx.Timeout(600, connect=10)
        ) as client:
            yield {"upstream": client}

    app = FastAPI(title="LLM gateway", lifespan=lifespan)

    @app.post("/v1/{path:path}")
    async def forward(path: str, request: Request) -> Response:
        client: httpx.AsyncClient = request.state.upstream
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        headers["authorization"] = f"Bearer {upstream_api_key}"
        # `request.body()` is the body llmfence forwards: the client's, or amended (a usage
        # chunk asked for on streams, a clamped max_tokens).
        upstream_request = client.build_request(
            "POST",
            f"/{path}",
            content=await request.body(),
            headers=headers,
            params=request.query_params,
        )
        upstream = await client.send(upstream_request, stream=True)
        response_headers = {
            k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_RESPONSE
        }
        return StreamingResponse(
            upstream.aiter_bytes(),  # decoded: the content-encoding header is dropped
            status_code=upstream.status_code,
            headers=response_headers,
            background=BackgroundTask(upstream.aclose),
        )

    fence = Fence(store=store, master_key=master_key, **(fence_options or {}))
    fence.install(app, admin=True)
    return app, fence


def _from_environment() -> FastAPI:
    redis_url = os.environ.get("REDIS_URL")
    store: Store = RedisStore.from_url(redis_url) if redis_url else MemoryStore()
    app, _ = create_app(
        upstream_base_url=os.environ.get("UPSTREAM_BASE_URL", "https://api.openai.com/v1"),
        upstream_api_key=os.environ.get("UPSTREAM_API_KEY", ""),
        store=store,
        master_key=os.environ.get("LLMFENCE_MASTER_KEY"),
    )
    return app


if os.environ.get("UPSTREAM_API_KEY"):
    app = _from_environment()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(_from_environment(), host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
