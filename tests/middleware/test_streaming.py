from __future__ import annotations

import json
from typing import Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.types import Message

from llmfence import Fence, Store
from llmfence.testing import FakeClock, mock_llm_app

from .conftest import CHAT, MODEL, auth, chat_body, client_for

pytestmark = pytest.mark.anyio


def sse_payloads(text: str) -> list[Any]:
    events = [e for e in text.split("\n\n") if e.strip()]
    payloads = []
    for event in events:
        data = "\n".join(
            line[5:].lstrip() for line in event.splitlines() if line.startswith("data:")
        )
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


async def test_stream_usage_is_requested_then_hidden(gateway: Any) -> None:
    fence, _app, client = gateway()
    key, _record = await fence.generate_key()
    async with client as c:
        response = await c.post(CHAT, json=chat_body(stream=True), headers=auth(key))
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    assert all(p == "[DONE]" or p["usage"] is None for p in payloads)  # the usage chunk is gone
    assert "content-length" not in response.headers
    [log] = await fence.store.spend_records()
    assert log.provenance == "provider-reported"
    assert log.input_tokens == 14
    text = "".join(p["choices"][0]["delta"]["content"] for p in payloads[:-1])
    assert log.output_tokens == fence.meter.counter.count_text(text, MODEL)
    assert log.cost == log.input_tokens * 1500 + log.output_tokens * 2000


async def test_client_that_asked_for_usage_gets_it(gateway: Any) -> None:
    fence, _app, client = gateway()
    body = chat_body(stream=True, stream_options={"include_usage": True})
    async with client as c:
        response = await c.post(CHAT, json=body, headers=auth("sk-master-key"))
    usage_chunks = [p for p in sse_payloads(response.text) if p != "[DONE]" and p["usage"]]
    assert len(usage_chunks) == 1
    [log] = await fence.store.spend_records()
    assert log.output_tokens == usage_chunks[0]["usage"]["completion_tokens"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/messages",
            {
                "model": "claude-3-5-haiku-latest",
                "max_tokens": 50,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
        ),
        ("/v1/responses", {"model": "gpt-4.1-mini", "input": "hi", "stream": True}),
        (
            "/v1/completions",
            {
                "model": MODEL,
                "prompt": "hi",
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ),
    ],
)
async def test_other_apis_stream_usage(gateway: Any, path: str, body: dict[str, Any]) -> None:
    fence, _app, client = gateway()
    async with client as c:
        response = await c.post(path, json=body, headers=auth("sk-master-key"))
    assert response.status_code == 200, response.text
    [log] = await fence.store.spend_records()
    assert log.provenance == "provider-reported"
    assert log.output_tokens > 0
    assert log.cost > 0


async def test_stream_without_usage_is_counted_from_the_deltas(store: Store) -> None:
    # An upstream that ignores include_usage: the deltas are counted, marked as an estimate.
    upstream = mock_llm_app()

    async def no_usage(scope: Any, receive: Any, send: Any) -> None:
        async def strip(message: Message) -> None:
            if message["type"] == "http.response.body":
                events = message["body"].split(b"\n\n")
                message = {
                    **message,
                    "body": b"\n\n".join(e for e in events if b'"usage": {' not in e),
                }
            await send(message)

        await upstream(scope, receive, strip)

    app = Starlette(routes=[Mount("/", app=no_usage)])
    fence = Fence(store=store, master_key="sk-master-key")
    fence.install(app)  # the upstream behind llmfence drops the usage chunk it was asked for
    async with client_for(app) as c:
        response = await c.post(CHAT, json=chat_body(stream=True), headers=auth("sk-master-key"))
    text = "".join(
        p["choices"][0]["delta"]["content"] for p in sse_payloads(response.text) if p != "[DONE]"
    )
    [log] = await store.spend_records()
    assert log.provenance == "estimated"
    assert log.output_tokens == fence.meter.counter.count_text(text, MODEL)
    assert log.input_tokens == 14


async def call_and_disconnect(
    app: Any, body: dict[str, Any], headers: dict[str, str], after_chunks: int
) -> list[Message]:
    """Drive the app directly over ASGI, and disconnect after some body chunks."""
    sent: list[Message] = []
    gone = anyio.Event()
    raw = json.dumps(body).encode()
    requested = False

    async def receive() -> Message:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)
        chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if len(chunks) >= after_chunks:
            gone.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT,
        "raw_path": CHAT.encode(),
        "query_string": b"",
        "root_path": "",
        "server": ("test", 80),
        "client": ("127.0.0.1", 5000),
        "headers": [
            (k.lower().encode(), v.encode())
            for k, v in {**headers, "content-type": "application/json"}.items()
        ],
    }
    await app(scope, receive, send)
    return sent


async def test_disconnect_mid_stream_settles_what_was_streamed(
    store: Store, clock: FakeClock
) -> None:
    app = mock_llm_app()
    fence = Fence(
        store=store, master_key="sk-master-key", clock=clock.now, disconnect_extra_tokens=5
    )
    fence.install(app)
    key, _record = await fence.generate_key(max_parallel_requests=1)
    headers = {**auth(key), "x-mock-chunks": "10", "x-mock-delay": "0.01"}
    sent = await call_and_disconnect(app, chat_body(stream=True), headers, after_chunks=3)
    streamed = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    payloads = sse_payloads(streamed.decode())
    text = "".join(p["choices"][0]["delta"]["content"] for p in payloads if p != "[DONE]")
    [log] = await store.spend_records()
    assert log.status == 499
    assert log.provenance == "estimated"
    assert log.output_tokens == fence.meter.counter.count_text(text, MODEL) + 5
    assert 0 < log.output_tokens < 30
    # The parallel slot came back: the next request is admitted at once.
    async with client_for(app) as c:
        again = await c.post(CHAT, json=chat_body(), headers=auth(key))
    assert again.status_code == 200


async def test_in_flight_never_above_the_limit_with_disconnects(store: Store) -> None:
    app = mock_llm_app()
    fence = Fence(store=store, master_key="sk-master-key")
    fence.install(app)
    key, _ = await fence.generate_key(max_parallel_requests=3)
    in_flight = 0
    peak = 0
    admitted = 0

    async def one(i: int) -> None:
        nonlocal in_flight, peak, admitted
        headers = {**auth(key), "x-mock-chunks": "6", "x-mock-delay": "0.005"}
        started = False

        async def count(message: Message) -> None:
            nonlocal in_flight, peak, started, admitted
            if message["type"] == "http.response.start" and message["status"] == 200:
                started = True
                admitted += 1
                in_flight += 1
                peak = max(peak, in_flight)

        sent = await call_and_disconnect(
            app, chat_body(stream=True), headers, after_chunks=2 if i % 2 else 100
        )
        for message in sent:
            await count(message)
        if started:
            in_flight -= 1

    for _ in range(4):
        async with anyio.create_task_group() as tg:
            for i in range(12):
                tg.start_soon(one, i)
    assert peak <= 3
    assert admitted >= 4 * 3


async def test_one_record_per_request_success_error_disconnect(gateway: Any) -> None:
    fence, app, client = gateway()
    key, record = await fence.generate_key()
    async with client as c:
        ok = await c.post(CHAT, json=chat_body(), headers=auth(key))
        failed = await c.post(CHAT, json=chat_body(), headers={**auth(key), "x-mock-status": "500"})
    await call_and_disconnect(
        app, chat_body(stream=True), {**auth(key), "x-mock-chunks": "6", "x-mock-delay": "0.01"}, 2
    )
    assert ok.status_code == 200
    assert failed.status_code == 500
    records = await fence.store.spend_records(key_hash=record.key_hash)
    assert [r.status for r in records] == [499, 500, 200]
    assert records[1].cost == 0  # providers do not bill failed calls
    assert records[2].cost > 0
