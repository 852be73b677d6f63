"""Every example runs, offline, and does what it says."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmfence import MemoryStore
from llmfence.testing import mock_llm_app

from .middleware.conftest import client_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

from fastapi_gateway import create_app  # noqa: E402


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=120
    )


def test_demo_runs_offline_in_under_30_seconds() -> None:
    started = time.monotonic()
    result = run_example("demo.py")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 30
    out = result.stdout
    for section in (
        "1. The admin API",
        "3. Requests per minute",
        "4. Tokens per minute",
        "5. A streamed call",
        "6. A key budget",
        "7. An end user",
        "8. Spend",
    ):
        assert section in out
    assert "429 rate_limit_exceeded (requests)" in out
    assert "429 rate_limit_exceeded (tokens)" in out
    assert "429 insufficient_quota (budget_exceeded)" in out
    assert "Budget exceeded for end_user customer-42" in out
    assert "x-should-retry                   false" in out


@pytest.mark.parametrize("name", ["budget_manager.py", "starlette_routes.py"])
def test_other_examples_run(name: str) -> None:
    if not (EXAMPLES / name).exists():
        pytest.fail(f"examples/{name} is missing")
    result = run_example(name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.anyio
async def test_gateway_forwards_and_streams_through_the_fence() -> None:
    upstream = mock_llm_app()
    app, _ = create_app(
        upstream_base_url="http://upstream/v1",
        upstream_api_key="sk-upstream",
        store=MemoryStore(),
        master_key="sk-gateway-master",
        transport=httpx.ASGITransport(app=upstream),
    )
    async with client_for(app) as client:
        admin = {"authorization": "Bearer sk-gateway-master"}
        key = (await client.post("/key/generate", headers=admin, json={"rpm_limit": 2})).json()[
            "key"
        ]
        headers = {"authorization": f"Bearer {key}"}
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        ok = await client.post("/v1/chat/completions", headers=headers, json=body)
        assert ok.status_code == 200
        assert ok.json()["usage"]["prompt_tokens"] == 8
        assert ok.headers["x-ratelimit-remaining-requests"] == "1"
        streamed = await client.post(
            "/v1/chat/completions", headers=headers, json={**body, "stream": True}
        )
        assert streamed.status_code == 200
        events = [e for e in streamed.text.split("\n\n") if e.startswith("data: {")]
        assert events
        assert all(json.loads(e[6:])["usage"] is None for e in events)
        refused = await client.post("/v1/chat/completions", headers=headers, json=body)
        assert refused.status_code == 429
        logs = (await client.get("/spend/logs", headers=admin)).json()
    assert [entry["provenance"] for entry in logs] == ["provider-reported"] * 2
    assert logs[0]["completion_tokens"] > 0


class Recording:
    """The mock upstream, noting each request's path and headers, and answering with the
    headers a real one sends (its own `date` and `server`, hop-by-hop ones)."""

    def __init__(self) -> None:
        self.app = mock_llm_app()
        self.requests: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.requests.append((scope["path"], headers))

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [
                    (b"date", b"Tue, 01 Dec 2026 00:00:00 GMT"),
                    (b"server", b"upstream"),
                    (b"connection", b"keep-alive, x-hop"),
                    (b"keep-alive", b"timeout=5"),
                    (b"x-hop", b"1"),
                    (b"x-request-id", b"req_upstream"),
                ]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)


@pytest.mark.anyio
async def test_gateway_forwards_no_credentials_nor_hop_by_hop_headers_and_lists_models() -> None:
    upstream = Recording()
    app, _ = create_app(
        upstream_base_url="http://upstream/v1",
        upstream_api_key="sk-upstream",
        store=MemoryStore(),
        master_key="sk-gateway-master",
        transport=httpx.ASGITransport(app=upstream),
        models=["gpt-4o-mini", "text-embedding-3-small"],
    )
    async with client_for(app) as client:
        admin = {"authorization": "Bearer sk-gateway-master"}
        key = (await client.post("/key/generate", headers=admin, json={})).json()["key"]
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        for credential in ("x-goog-api-key", "x-api-key", "api-key", "authorization"):
            value = f"Bearer {key}" if credential == "authorization" else key
            sent = {
                credential: value,
                "openai-organization": "org-someone-else",
                "openai-project": "proj_someone_else",
                "cookie": "session=1",
                "connection": "keep-alive, x-client-hop",
                "keep-alive": "timeout=5",
                "x-client-hop": "1",
                "te": "trailers",
                "upgrade": "h2c",
                "proxy-authorization": "Basic eA==",
                "openai-beta": "assistants=v2",
            }
            response = await client.post("/v1/chat/completions", headers=sent, json=body)
            assert response.status_code == 200, response.text
            assert response.headers.get_list("server") == []
            assert response.headers.get_list("date") == []
            for hop in ("connection", "keep-alive", "x-hop"):
                assert hop not in response.headers
            assert response.headers["x-request-id"] == "req_upstream"
        assert len(upstream.requests) == 4
        for path, headers in upstream.requests:
            assert path == "/v1/chat/completions"
            assert headers["authorization"] == "Bearer sk-upstream"
            assert key not in " ".join(headers.values())
            for name in (
                "x-goog-api-key",
                "x-api-key",
                "api-key",
                "openai-organization",
                "openai-project",
                "cookie",
                "keep-alive",
                "x-client-hop",
                "te",
                "upgrade",
                "proxy-authorization",
            ):
                assert name not in headers
            assert headers["openai-beta"] == "assistants=v2"

        models = await client.get("/v1/models", headers={"x-api-key": key})
        assert models.status_code == 200
        listed = models.json()
        assert listed["object"] == "list"
        assert [m["id"] for m in listed["data"]] == ["gpt-4o-mini", "text-embedding-3-small"]
        assert all(m["object"] == "model" for m in listed["data"])
        assert (await client.get("/v1/models")).status_code == 401


async def raw_post(app: ASGIApp, raw_path: bytes, body: bytes, key: str) -> int:
    """A request as a server hands it over (httpx would normalize the path before sending)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"x-api-key", key.encode())],
        "client": ("127.0.0.1", 40000),
        "server": ("gateway", 80),
    }
    incoming: list[Message] = [{"type": "http.request", "body": body}]
    sent: list[Message] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status: int = sent[0]["status"]
    return status


@pytest.mark.anyio
async def test_gateway_forwards_exactly_the_path_llmfence_metered() -> None:
    upstream = Recording()
    store = MemoryStore()
    app, fence = create_app(
        upstream_base_url="http://upstream/v1",
        upstream_api_key="sk-upstream",
        store=store,
        master_key="sk-gateway-master",
        transport=httpx.ASGITransport(app=upstream),
    )
    key, _ = await fence.generate_key(rpm_limit=1)
    chat = json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    decoy = json.dumps({"model": "gpt-4o-mini", "prompt": "x", "messages": []}).encode()
    async with LifespanManager(app) as manager:
        for raw_path, body in [
            (b"/v1/chat/completions/.", chat),
            (b"/v1/chat/x/../completions", decoy),
            (b"/v1//chat/completions", chat),
            (b"/v1/chat%2Fcompletions", chat),
            (b"/v1/files/./x", chat),  # not metered, but httpx would send /v1/files/x
        ]:
            assert await raw_post(manager.app, raw_path, body, key) == 400
        assert upstream.requests == []
        assert await store.spend_records() == []
        assert await raw_post(manager.app, b"/v1/chat/completions", chat, key) == 200
        assert await raw_post(manager.app, b"/v1/chat/completions", chat, key) == 429
    assert [path for path, _ in upstream.requests] == ["/v1/chat/completions"]
    assert len(await store.spend_records()) == 1
