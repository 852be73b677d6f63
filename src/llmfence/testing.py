"""Helpers for testing code that uses llmfence: a fake clock, an offline LLM upstream, a
throwaway redis-server and a throwaway Redis Cluster."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from tiktoken import Encoding

from ._request import LLMRequest, endpoint_for_path, parse_request
from ._testing_redis import RedisClusterServers, RedisServer, find_redis_server
from ._tokens import TokenCounter, encoding_name_for_model, get_encoding

__all__ = [
    "FakeClock",
    "RedisClusterServers",
    "RedisServer",
    "find_redis_server",
    "mock_llm_app",
]


class FakeClock:
    """A clock that moves only when told to; pass `clock.now` where llmfence takes a clock.

    Args:
        start: The initial Unix time; defaults to the real current time.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start

    def now(self) -> float:
        """The current fake Unix time."""
        return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward and return the new time."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
        return self._now

    def set(self, moment: float) -> None:
        """Jump to a Unix time (forward only)."""
        self.advance(moment - self._now)


def mock_llm_app(
    *,
    reply: str = "Hello! I'm an AI, so I don't have emotions, but I'm here to assist you.",
    counter: TokenCounter | None = None,
) -> Starlette:
    """An offline, OpenAI- and Anthropic-compatible upstream for tests, examples and demos.

    It serves `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses` and
    `/v1/messages` (with and without the `/v1` prefix), as JSON or as SSE streams, and reports
    usage exactly as the real APIs do: prompt tokens counted with llmfence's own counter,
    completion tokens those of `reply` (cut to `max_tokens`). OpenAI chat streams carry a usage
    chunk only when `stream_options.include_usage` is set, as OpenAI's do.

    Request headers steer it: `x-mock-status: 500` answers that error; `x-mock-chunks: N`
    streams the reply in N chunks; `x-mock-delay: S` sleeps S seconds before each chunk.

    Args:
        reply: The assistant's answer to every request.
        counter: Token counter for the reported usage.
    """
    count = counter or TokenCounter()

    async def handle(request: Request) -> Response:
        endpoint = endpoint_for_path(request.url.path)
        raw = await request.body()
        status = int(request.headers.get("x-mock-status", "200"))
        if status >= 400:
            error = {"message": "mock upstream failure", "type": "server_error", "code": None}
            return JSONResponse({"error": error}, status_code=status)
        parsed = parse_request(raw, request.url.path)
        prompt = count.count(parsed)
        tokens = get_encoding(encoding_name_for_model(parsed.model)).encode_ordinary(reply)
        if parsed.max_output_tokens is not None:
            tokens = tokens[: parsed.max_output_tokens]
        enc = get_encoding(encoding_name_for_model(parsed.model))
        text = enc.decode(tokens)
        output = 0 if endpoint == "embeddings" else len(tokens)
        if not parsed.stream:
            return JSONResponse(_json_body(endpoint, parsed.model, text, prompt, output))
        chunks = int(request.headers.get("x-mock-chunks", "8"))
        delay = float(request.headers.get("x-mock-delay", "0"))
        pieces = _split(tokens, chunks, enc)
        events = _stream_events(endpoint, parsed, pieces, prompt, output)

        async def body() -> AsyncIterator[bytes]:
            for event in events:
                if delay:
                    await anyio.sleep(delay)
                yield event

        return StreamingResponse(body(), media_type="text/event-stream")

    paths = ("/chat/completions", "/completions", "/embeddings", "/responses", "/messages")
    routes = [
        Route(prefix + path, handle, methods=["POST"]) for prefix in ("", "/v1") for path in paths
    ]
    return Starlette(routes=routes)


def _split(tokens: list[int], chunks: int, enc: Encoding) -> list[str]:
    chunks = max(1, min(chunks, len(tokens) or 1))
    size = -(-len(tokens) // chunks) if tokens else 1
    return [enc.decode(tokens[i : i + size]) for i in range(0, len(tokens), size)] or [""]


def _json_body(
    endpoint: str | None, model: str, text: str, prompt: int, output: int
) -> dict[str, Any]:
    if endpoint == "embeddings":
        return {
            "object": "list",
            "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.1]}],
            "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
        }
    if endpoint == "messages":
        return {
            "id": "msg_mock",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": prompt, "output_tokens": output},
        }
    if endpoint == "responses":
        return {
            "id": "resp_mock",
            "object": "response",
            "model": model,
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text}],
                }
            ],
            "usage": {
                "input_tokens": prompt,
                "output_tokens": output,
                "total_tokens": prompt + output,
            },
        }
    usage = {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}
    if endpoint == "completions":
        return {
            "id": "cmpl-mock",
            "object": "text_completion",
            "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            "usage": usage,
        }
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": usage,
    }


def _sse(data: Mapping[str, Any] | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data)
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {payload}\n\n".encode()


def _stream_events(
    endpoint: str | None, request: LLMRequest, pieces: list[str], prompt: int, output: int
) -> list[bytes]:
    model = request.model
    if endpoint == "messages":
        start = {
            "type": "message_start",
            "message": {
                "id": "msg_mock",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [],
                "usage": {"input_tokens": prompt, "output_tokens": 1},
            },
        }
        events = [
            _sse(start, "message_start"),
            _sse(
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
                "content_block_start",
            ),
        ]
        events += [
            _sse(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": p},
                },
                "content_block_delta",
            )
            for p in pieces
        ]
        events += [
            _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
            _sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn"},
                    "usage": {"output_tokens": output},
                },
                "message_delta",
            ),
            _sse({"type": "message_stop"}, "message_stop"),
        ]
        return events
    if endpoint == "responses":
        events = [
            _sse({"type": "response.output_text.delta", "delta": p}, "response.output_text.delta")
            for p in pieces
        ]
        done = {
            "type": "response.completed",
            "response": {
                "id": "resp_mock",
                "model": model,
                "status": "completed",
                "usage": {
                    "input_tokens": prompt,
                    "output_tokens": output,
                    "total_tokens": prompt + output,
                },
            },
        }
        return [*events, _sse(done, "response.completed")]
    chunk: dict[str, Any] = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": model,
    }
    events = []
    for piece in pieces:
        choice: dict[str, Any] = (
            {"index": 0, "text": piece}
            if endpoint == "completions"
            else {"index": 0, "delta": {"content": piece}}
        )
        events.append(_sse({**chunk, "choices": [choice], "usage": None}))
    if request.include_usage:
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": output,
            "total_tokens": prompt + output,
        }
        events.append(_sse({**chunk, "choices": [], "usage": usage}))
    events.append(_sse("[DONE]"))
    return events
