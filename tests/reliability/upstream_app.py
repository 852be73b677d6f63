"""The mock upstream the reliability suite's gateways forward to, run by uvicorn in its own
process: `python -m uvicorn tests.reliability.upstream_app:app`.

It is llmfence's offline OpenAI-compatible mock (`mock_llm_app`: chat completions with `usage`,
JSON or SSE streams) behind a thin ASGI layer that makes requests stay in flight and counts them:

- `x-upstream-delay: S` waits S seconds before answering (streams also take `x-mock-delay`,
  a wait before each chunk);
- `x-reliability-tag: T` names the counter a request belongs to (the test's key); the layer
  tracks, per tag, how many requests are in flight right now, the most ever in flight at once,
  and how many it answered. A request counts as in flight from its arrival until its last body
  byte has been sent.
- `GET /stats` returns `{tag: {"in_flight", "max_in_flight", "served"}}`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import anyio
from starlette.types import Receive, Scope, Send

from llmfence.testing import mock_llm_app

__all__ = ["app"]

_TAG = b"x-reliability-tag"
_DELAY = b"x-upstream-delay"


@dataclass
class Counter:
    """One tag's requests."""

    in_flight: int = 0
    max_in_flight: int = 0
    served: int = 0


class CountingUpstream:
    """`mock_llm_app`, counting concurrency per tag and delaying on request."""

    def __init__(self) -> None:
        self.app = mock_llm_app()
        self.counters: dict[str, Counter] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/stats":
            body = json.dumps({tag: asdict(c) for tag, c in self.counters.items()}).encode()
            start = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": start})
            await send({"type": "http.response.body", "body": body})
            return
        headers: dict[bytes, bytes] = dict(scope["headers"])
        tag = headers.get(_TAG, b"").decode("latin-1")
        delay = float(headers.get(_DELAY, b"0"))
        counter = self.counters.setdefault(tag, Counter())
        counter.in_flight += 1
        counter.max_in_flight = max(counter.max_in_flight, counter.in_flight)
        try:
            if delay:
                await anyio.sleep(delay)
            await self.app(scope, receive, send)
            counter.served += 1
        finally:
            counter.in_flight -= 1


app = CountingUpstream()
