"""The product: a bare Starlette app against the same app behind llmfence's six middlewares.

Measures requests/s and µs per request, in-process over ASGI (the app is called directly with a
prebuilt scope, `receive` and `send`, as uvicorn would call it, so the numbers are those of the
middleware and not of an HTTP client), for a small chat request with a JSON response, a ~4k-token
20-turn chat (first sight, then resent with one new message), and a response streamed as 200 SSE
chunks. The app is `llmfence.testing.mock_llm_app`; the stack is `Fence(...).install(app)` over a
`MemoryStore`, with a generated key whose limits never refuse. Bare and stack batches are
interleaved round by round and reported as a ratio, which holds on a noisy shared machine where
the absolute µs do not.

The mock upstream reports usage with a cheap character-based estimate instead of tiktoken: a real
upstream counts tokens on its own machine, and counting them in the bare app too would hide the
stack's own token counting, which is part of what is measured here.

Run: `python benchmarks/bench_stack.py [--quick]`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import Callable
from typing import Any

from _harness import (
    AsyncBatch,
    Settings,
    Stats,
    arun_rounds,
    fmt_ratio,
    fmt_us,
    history,
    parse_settings,
    print_table,
    text,
)
from starlette.types import ASGIApp, Message

import llmfence
from llmfence import Fence, LLMRequest, MemoryStore, TokenCounter
from llmfence.testing import mock_llm_app

PATH = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
CHUNKS = 200
MASTER_KEY = "sk-benchmark-master-key"
TABLE_HEADER = (
    "scenario",
    "bare µs",
    "stack µs",
    "overhead µs",
    "bare req/s",
    "stack req/s",
    "stack / bare",
)


def reply_of(tokens: int) -> str:
    """A reply of exactly `tokens` tokens: the mock streams one token per chunk up to 200."""
    counter = TokenCounter()
    for seed in range(100):
        words = text(random.Random(seed), tokens).split(" ")
        for end in range(tokens // 2, len(words) + 1):
            found = counter.count_text(" ".join(words[:end]), MODEL)
            if found == tokens:
                return " ".join(words[:end])
            if found > tokens:
                break
    raise RuntimeError(f"no reply of exactly {tokens} tokens")


REPLY = reply_of(CHUNKS)


class UpstreamCounter(TokenCounter):
    """The mock upstream's usage report: a cheap estimate, alike in the bare app and the stack."""

    def count(self, request: LLMRequest) -> int:
        chars = sum(len(str(m.get("content", ""))) for m in request.messages)
        return 3 + (chars + sum(len(t) for t in request.texts)) // 4

    async def acount(self, request: LLMRequest) -> int:
        return self.count(request)


def make_scope(body: bytes, key: str, *, stream: bool = False) -> dict[str, Any]:
    """An HTTP scope as uvicorn builds it for `POST /v1/chat/completions`."""
    headers = [
        (b"host", b"gateway.internal"),
        (b"user-agent", b"OpenAI/Python 1.54.0"),
        (b"accept", b"application/json"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"authorization", b"Bearer " + key.encode()),
    ]
    if stream:
        headers.append((b"x-mock-chunks", str(CHUNKS).encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 54321),
        "scheme": "http",
        "method": "POST",
        "root_path": "",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "headers": headers,
    }


class Outcome:
    """What a client saw of one response."""

    __slots__ = ("body", "chunks", "headers", "status")

    def __init__(self) -> None:
        self.status = 0
        self.chunks = 0
        self.headers: dict[bytes, bytes] = {}
        self.body = bytearray()


async def call(app: ASGIApp, scope: dict[str, Any], body: bytes, keep: bool = False) -> Outcome:
    """One request, straight into the ASGI app; `receive` waits for the end of the response
    before it reports the disconnect, as a server does for a client that stays."""
    outcome = Outcome()
    done = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            outcome.status = message["status"]
            if keep:
                outcome.headers = dict(message.get("headers", []))
        elif message["type"] == "http.response.body":
            if message.get("body"):
                outcome.chunks += 1
                if keep:
                    outcome.body += message["body"]
            if not message.get("more_body", False):
                done.set()

    await app(dict(scope), receive, send)
    return outcome


def chat(messages: list[dict[str, str]], **extra: object) -> bytes:
    return json.dumps({"model": MODEL, "messages": messages, **extra}).encode()


def scenarios() -> dict[str, Callable[[int], tuple[bytes, bool]]]:
    """Bodies by scenario: each call makes request `i` (new content every time)."""
    base = history(20)

    def small(i: int) -> tuple[bytes, bool]:
        question = f"Hey, how's it going? What is item {i} on my last invoice?"
        messages = [{"role": "system", "content": "You are a helpful assistant."}]
        return chat([*messages, {"role": "user", "content": question}], user="bob"), False

    def first_sight(i: int) -> tuple[bytes, bool]:
        messages = history(20, tag=f"[conversation {i}] ")
        return chat([*messages, {"role": "user", "content": "And then?"}]), False

    def resent(i: int) -> tuple[bytes, bool]:
        new = {"role": "user", "content": f"And what about item {i}? Be brief."}
        return chat([*base, new]), False

    def stream(i: int) -> tuple[bytes, bool]:
        messages = [{"role": "user", "content": f"Tell me a story about item {i}."}]
        return chat(messages, stream=True), True

    return {
        "(a) small chat, JSON response": small,
        "(b) ~4k-token chat, first sight": first_sight,
        "(b) ~4k-token chat, resent + 1 message": resent,
        f"(c) streamed response, {CHUNKS} SSE chunks": stream,
    }


def batch(
    app: ASGIApp, key: str, make: Callable[[int], tuple[bytes, bool]], serial: itertools.count[int]
) -> AsyncBatch:
    async def run(n: int) -> float:
        requests = []
        for _ in range(n):
            body, stream = make(next(serial))
            requests.append((make_scope(body, key, stream=stream), body))
        start = time.perf_counter()
        for scope, body in requests:
            outcome = await call(app, scope, body)
            if outcome.status != 200:
                raise RuntimeError(f"status {outcome.status}")
        return time.perf_counter() - start

    return run


async def check(stack: ASGIApp, fence: Fence, key: str) -> None:
    """Refuse to time a stack that does not meter: every scenario must pass through it."""
    for name, make in scenarios().items():
        body, stream = make(-1)
        outcome = await call(stack, make_scope(body, key, stream=stream), body, keep=True)
        if outcome.status != 200:
            raise SystemExit(
                f"{name}: the stack answered {outcome.status}: {bytes(outcome.body)!r}"
            )
        if b"x-ratelimit-remaining-requests" not in outcome.headers:
            raise SystemExit(f"{name}: no x-ratelimit headers; is the stack installed?")
        if stream and outcome.chunks < CHUNKS:
            raise SystemExit(f"{name}: {outcome.chunks} chunks streamed, not {CHUNKS}")
    records = await fence.store.spend_records()
    if len(records) != len(scenarios()) or any(r.cost <= 0 for r in records):
        raise SystemExit("the stack did not record the spend of every request")


async def run(settings: Settings) -> dict[str, dict[str, Stats]]:
    bare = mock_llm_app(reply=REPLY, counter=UpstreamCounter())
    stack = mock_llm_app(reply=REPLY, counter=UpstreamCounter())
    fence = Fence(
        store=MemoryStore(), master_key=MASTER_KEY, max_budget=1_000_000, budget_duration="30d"
    )
    fence.install(stack)
    limits: dict[str, Any] = {
        "rpm_limit": 10**9,
        "tpm_limit": 10**12,
        "max_parallel_requests": 10**6,
        "max_budget": 1_000_000,
        "budget_duration": "30d",
    }
    await fence.new_user("alice", **limits)
    key, _ = await fence.generate_key(user_id="alice", **limits)
    await check(stack, fence, key)

    results = {}
    serial = itertools.count()
    for name, make in scenarios().items():
        cases = {
            "bare": batch(bare, key, make, serial),
            "stack": batch(stack, key, make, serial),
        }
        results[name] = await arun_rounds(cases, settings, max_batch=5_000)
    return results


def main() -> None:
    settings = parse_settings(__doc__ or "", rounds=15, batch_seconds=0.1)
    started = time.perf_counter()
    print("llmfence benchmark: stack (bare Starlette app vs. Fence's six middlewares)")
    print(f"llmfence {llmfence.__version__}; model {MODEL}; MemoryStore; in-process ASGI; ", end="")
    print(f"{settings.rounds} rounds per case, bare and stack interleaved")
    results = asyncio.run(run(settings))
    rows = []
    for name, pair in results.items():
        bare, stack = pair["bare"], pair["stack"]
        rows.append(
            [
                name,
                fmt_us(bare.median),
                fmt_us(stack.median),
                fmt_us(stack.median - bare.median),
                f"{bare.per_second:,.0f}",
                f"{stack.per_second:,.0f}",
                fmt_ratio(stack.median / bare.median),
            ]
        )
    print_table("µs per request (median) and requests/s, one request at a time", TABLE_HEADER, rows)
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
