"""A real forwarding LLM gateway: FastAPI + httpx, protected by llmfence.

Clients call this app with llmfence virtual keys; it forwards each call to an OpenAI-compatible
upstream with the real provider key, streaming responses straight through. llmfence authenticates
the keys, enforces rate limits and budgets, and records the spend. It forwards exactly the path
llmfence metered, none of the client's credentials nor its OpenAI organization/project headers,
no hop-by-hop headers either way; `GET /v1/models` lists the models it serves.

    UPSTREAM_BASE_URL=https://api.openai.com/v1 UPSTREAM_API_KEY=sk-... \\
    LLMFENCE_MASTER_KEY=sk-master-... [LLMFENCE_STORE=sqlite:///llmfence.db] \\
    uvicorn examples.fastapi_gateway:app --port 8000 [--workers 4]

`LLMFENCE_STORE` names the store (`llmfence.store_from_url`): `sqlite:///llmfence.db` for any
number of workers on one machine, `redis://…` (or `redis+cluster://…`) for several machines;
`REDIS_URL`, if set instead, means Redis. Without either, state lives in the process: one
worker only (each worker of several would count on its own).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmfence import Fence, Store, store_from_url

# What never goes upstream: the client's credentials (llmfence virtual keys, in any of the headers
# llmfence reads them from) and cookies; OpenAI's organization and project headers (the gateway's
# provider key decides who is billed, not the caller); hop-by-hop headers (RFC 9110 §7.6.1), and
# what the transport sets itself (host, length, encoding).
_CREDENTIALS = {"authorization", "x-api-key", "api-key", "x-goog-api-key", "cookie"}
_BILLING = {"openai-organization", "openai-project"}
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}
_DROP = _CREDENTIALS | _BILLING | _HOP_BY_HOP | {"host", "content-length", "accept-encoding"}
# From the upstream's response: hop-by-hop headers, what the body no longer matches once httpx has
# decoded it, and `date` / `server`, which this app's server sets once itself.
_DROP_RESPONSE = _HOP_BY_HOP | {"content-length", "content-encoding", "date", "server"}
# What `GET /v1/models` lists unless told otherwise (`models=`, or `GATEWAY_MODELS=a,b`).
DEFAULT_MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "text-embedding-3-small")


def _forwardable(headers: Iterable[tuple[str, str]], drop: set[str]) -> dict[str, str]:
    """`headers` without those in `drop`, nor those a `Connection` header names (RFC 9110)."""
    pairs = [(name.lower(), value) for name, value in headers]
    named = {
        token.strip().lower()
        for name, value in pairs
        if name == "connection"
        for token in value.split(",")
    }
    return {name: value for name, value in pairs if name not in drop and name not in named}


def _invalid(message: str) -> JSONResponse:
    """An OpenAI-shaped 400, as llmfence sends its own."""
    error = {"message": message, "type": "invalid_request_error", "param": None}
    error["code"] = "invalid_request_error"
    return JSONResponse({"error": error}, status_code=400)


def create_app(
    *,
    upstream_base_url: str,
    upstream_api_key: str,
    store: Store | None = None,
    master_key: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    fence_options: Mapping[str, Any] | None = None,
    models: Sequence[str] = DEFAULT_MODELS,
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
        models: The models `GET /v1/models` lists.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        # One connection pool for the app's lifetime, reached through the lifespan state.
        async with httpx.AsyncClient(
            base_url=upstream_base_url, transport=transport, timeout=httpx.Timeout(600, connect=10)
        ) as client:
            yield {"upstream": client}

    app = FastAPI(title="LLM gateway", lifespan=lifespan)

    created = int(time.time())

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        # Behind llmfence's key auth like every non-metered path.
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "gateway"} for m in models
        ]
        return {"object": "list", "data": data}

    @app.post("/v1/{path:path}")
    async def forward(path: str, request: Request) -> Response:
        client: httpx.AsyncClient = request.state.upstream
        headers = _forwardable(request.headers.items(), _DROP)
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
        # Forward exactly the path llmfence classified, or nothing: httpx resolves `.` and `..`
        # segments and reads `//x` as a host, so a path it would change is refused here. (On
        # metered routes llmfence has refused such paths already.)
        if upstream_request.url.path != f"{client.base_url.path.rstrip('/')}/{path}":
            return _invalid(f"The request path {request.url.path!r} is not in normal form.")
        upstream = await client.send(upstream_request, stream=True)
        return StreamingResponse(
            upstream.aiter_bytes(),  # decoded: the content-encoding header is dropped
            status_code=upstream.status_code,
            headers=_forwardable(upstream.headers.items(), _DROP_RESPONSE),
            background=BackgroundTask(upstream.aclose),
        )

    fence = Fence(store=store, master_key=master_key, **(fence_options or {}))
    fence.install(app, admin=True)
    return app, fence


def _from_environment() -> FastAPI:
    url = os.environ.get("LLMFENCE_STORE") or os.environ.get("REDIS_URL") or "memory://"
    store: Store = store_from_url(url)
    app, _ = create_app(
        upstream_base_url=os.environ.get("UPSTREAM_BASE_URL", "https://api.openai.com/v1"),
        upstream_api_key=os.environ.get("UPSTREAM_API_KEY", ""),
        store=store,
        master_key=os.environ.get("LLMFENCE_MASTER_KEY"),
        models=[m.strip() for m in os.environ.get("GATEWAY_MODELS", "").split(",") if m.strip()]
        or DEFAULT_MODELS,
    )
    return app


if os.environ.get("UPSTREAM_API_KEY"):
    app = _from_environment()

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(_from_environment(), host="127.0.0.1", port=int(os.environ.get("PORT", "8000")))
