"""The naive reference: the pure-ASGI middleware a team would write by hand in an afternoon.

`NaiveLimiter` does what a first version of "auth and token rate limits in front of our LLM
routes" does, and no more, so that `bench_peers.py` can show what llmfence's extra work costs
next to it:

- bearer auth: the `Authorization: Bearer` key looked up in a dict (key → principal);
- the body read once (every `http.request` message joined), `json.loads` once, and replayed to
  the app downstream;
- the prompt's tokens counted with `llmfence.TokenCounter` (tiktoken, with its per-message
  cache, so a resent history is not encoded again);
- RPM through the `limits` library's `MovingWindowRateLimiter` and TPM (prompt tokens plus the
  body's `max_tokens` when it names one) through its `FixedWindowRateLimiter`, both on
  `limits`' asyncio `MemoryStorage`, keyed by principal;
- 401 / 400 / 429 answered as small JSON bodies.

What it leaves out, compared with llmfence (so the comparison is honest: each of these is work
llmfence does per request and this middleware does not):

- budgets and money: no prices, no cost, no budget at any level, no spend records;
- the response: never read. No usage parsing (JSON or SSE), so TPM counts the prompt and the
  requested `max_tokens` only, never the actual completion, and nothing is settled or refunded
  afterwards; no `stream_options.include_usage`; no `max_tokens` clamping;
- no concurrency (parallel request) limit, no rate-limit headers (`x-ratelimit-*`,
  `RateLimit`), no request id;
- keys: the raw key is the dict key (no hashing, no constant-time comparison, no expiry, no
  users, teams, end users, per-model limits or allowed models); only `Authorization: Bearer`;
- state: one process's memory only (no Redis, no SQLite, no outage policy);
- all-or-nothing: the RPM hit is taken before TPM is checked, so a request refused for tokens
  still uses a request; a fixed TPM window lets a client burst to twice its limit across a
  window boundary, which llmfence's token buckets do not;
- no body size cap, and tokens are counted on the event loop (llmfence moves large uncached
  prompts to a worker thread so other requests are not stalled);

Two costs come with `limits` itself, not with this code: its in-memory moving window keeps one
entry per request of the last minute and inserts at the head of a list, so its cost grows with
the requests of the last minute (flat up to a few ten thousand, then a memmove per request;
`bench_peers.py` builds a fresh middleware per scenario, which keeps it in the flat part); and
its asyncio `MemoryStorage` starts an expiry task on a hit when the previous one has finished,
which bisects every key's entries in a worker thread, so a slow request (a stream) pays about
one thread hop. The synchronous `MemoryStorage` (a `threading.Timer` instead) measured slower on
small requests and faster on streams, so neither is a free choice; this uses the asyncio one.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any

from limits import RateLimitItemPerMinute
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmfence import LLMRequest, TokenCounter

__all__ = ["NaiveLimiter"]


class NaiveLimiter:
    """Bearer auth, one body parse, tiktoken counting and `limits` RPM/TPM (see the module).

    Args:
        app: The ASGI app behind.
        keys: API key → principal (the rate limits are per principal).
        rpm: Requests per minute per principal.
        tpm: Tokens per minute per principal.
        paths: The paths metered (POST only); other requests pass through untouched.
        counter: The token counter (a new one by default).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        keys: Mapping[str, str],
        rpm: int,
        tpm: int,
        paths: Collection[str] = ("/v1/chat/completions",),
        counter: TokenCounter | None = None,
    ) -> None:
        self.app = app
        self.keys = dict(keys)
        self.paths = frozenset(paths)
        self.counter = counter or TokenCounter()
        storage = MemoryStorage()
        self.requests = MovingWindowRateLimiter(storage)
        self.tokens = FixedWindowRateLimiter(storage)
        self.rpm = RateLimitItemPerMinute(rpm)
        self.tpm = RateLimitItemPerMinute(tpm)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        principal = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, key = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    principal = self.keys.get(key.strip())
                break
        if principal is None:
            await _error(send, 401, "invalid_api_key", "Invalid API key.")
            return

        chunks = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            parsed = json.loads(body)
            request = LLMRequest(
                endpoint="chat",
                model=str(parsed["model"]),
                messages=tuple(parsed["messages"]),
                max_output_tokens=parsed.get("max_tokens"),
            )
        except (ValueError, KeyError, TypeError):
            await _error(send, 400, "invalid_request_error", "Invalid request body.")
            return
        tokens = self.counter.count(request) + (request.max_output_tokens or 0)

        if not await self.requests.hit(self.rpm, principal):
            await _error(send, 429, "rate_limit_exceeded", "Too many requests.")
            return
        if not await self.tokens.hit(self.tpm, principal, cost=tokens):
            await _error(send, 429, "rate_limit_exceeded", "Too many tokens.")
            return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _error(send: Send, status: int, code: str, message: str) -> None:
    error: dict[str, Any] = {"message": message, "type": "invalid_request_error", "code": code}
    content = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(content))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})
