"""What every llmfence middleware shares: the request context, the body, the response scan.

The first llmfence middleware a request meets owns its context: it reads the body once (under a
size cap), parses it once, stores the context in `scope["state"]["llmfence"]`, replays the body
to the app, watches the response for usage, and settles when the app returns. Every later
llmfence middleware finds the context and only adds its own check.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import re
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmfence._core.meter import Meter, RequestContext, amend_body
from llmfence._core.refusals import error_headers, rate_limit_headers
from llmfence._request import endpoint_for_path, parse_request
from llmfence.exceptions import LLMFenceError, RequestTooLargeError
from llmfence.stores import Store

__all__ = ["DEFAULT_EXEMPT_PATHS", "FenceMiddleware", "PathRules"]

logger = logging.getLogger("llmfence")

STATE_KEY = "llmfence"
DEFAULT_MAX_BODY_SIZE = 32 * 1024 * 1024
DEFAULT_EXEMPT_PATHS = ("/health", "/healthz", "/livez", "/readyz")


class PathRules:
    """Which paths are metered, which get auth only, and which llmfence leaves alone.

    Args:
        metered: `fnmatch` patterns of metered paths; `None` meters the OpenAI and Anthropic
            LLM endpoints (`*/chat/completions`, `*/completions`, `*/embeddings`,
            `*/responses`, `*/messages`).
        exempt: `fnmatch` patterns of paths that get nothing (health checks, docs).
    """

    # Every middleware of a stack asks about every request's path: answers are remembered, in
    # a dict bounded because paths come from clients.
    _CACHE_SIZE = 4096

    def __init__(
        self, metered: Sequence[str] | None = None, exempt: Sequence[str] = DEFAULT_EXEMPT_PATHS
    ) -> None:
        self.metered = tuple(metered) if metered is not None else None
        self.exempt = tuple(exempt)
        self._metered_re = _compile(self.metered) if self.metered is not None else None
        self._exempt_re = _compile(self.exempt)
        self._seen: dict[str, tuple[bool, bool]] = {}

    def _classify(self, path: str) -> tuple[bool, bool]:
        known = self._seen.get(path)
        if known is None:
            exempt = self._exempt_re is not None and self._exempt_re.match(path) is not None
            if self._metered_re is None:
                metered = endpoint_for_path(path) is not None
            else:
                metered = self._metered_re.match(path) is not None
            if len(self._seen) >= self._CACHE_SIZE:
                self._seen.clear()
            known = self._seen[path] = (exempt, metered)
        return known

    def is_exempt(self, path: str) -> bool:
        """Whether llmfence leaves this path alone."""
        return self._classify(path)[0]

    def is_metered(self, path: str) -> bool:
        """Whether requests to this path are LLM calls to limit and charge."""
        return self._classify(path)[1]


def _compile(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class FenceMiddleware:
    """Base of the llmfence middlewares; subclasses implement `check`.

    Args:
        app: The ASGI app to protect.
        store: The store; ignored when `meter` is given.
        meter: A shared meter (what `Fence` passes), else one is built over `store`.
        paths: Which paths are metered and which are exempt.
        max_body_size: Largest request body accepted on a metered path, in bytes (413 above).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store | None = None,
        meter: Meter | None = None,
        paths: PathRules | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        if meter is None:
            if store is None:
                from llmfence.stores import MemoryStore

                store = MemoryStore()
            meter = Meter(store)
        self.app = app
        self.meter = meter
        self.paths = paths or PathRules()
        self.max_body_size = max_body_size

    async def check(self, ctx: RequestContext, scope: Scope) -> LLMFenceError | None:
        """This middleware's check; the error to answer with, or None to go on."""
        raise NotImplementedError

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.paths.is_exempt(scope["path"]):
            # Lifespan and websocket scopes pass through untouched (llmfence meters HTTP).
            await self.app(scope, receive, send)
            return
        ctx: RequestContext | None = scope.get("state", {}).get(STATE_KEY)
        if ctx is not None:
            error = await self.check(ctx, scope)
            if error is not None:
                await send_error(send, error, ctx)
                return
            await self.app(scope, receive, send)
            return
        await self._own(scope, receive, send)

    async def _own(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = self.meter.new_context(scope["path"])
        metered = self.paths.is_metered(scope["path"]) and scope["method"] == "POST"
        if metered:
            try:
                ctx.body = await read_body(scope, receive, self.max_body_size)
                ctx.request = parse_request(ctx.body, scope["path"])
            except LLMFenceError as bad_request:
                await send_error(send, bad_request, None)
                return
        # A per-request copy of the lifespan state: servers and test transports may hand every
        # request the same dict, and one request's context must never leak into the next.
        scope["state"] = {**scope.get("state", {}), STATE_KEY: ctx}
        # Every response of a metered request, refusals included, goes out through the scanner,
        # which adds the rate-limit headers at its start.
        out = _scanning_send(self.meter, ctx, send) if metered else send
        try:
            error = await self.check(ctx, scope)
            if error is not None:
                await send_error(out, error, ctx)
                return
            if not metered:
                await self.app(scope, receive, send)
                return
            try:
                await self.app(scope, _replay(ctx, receive), out)
            except Exception:
                ctx.app_failed = True
                raise
        finally:
            await self.meter.finish(ctx)


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refused with `RequestTooLargeError` past `limit` bytes."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise RequestTooLargeError(f"The request body is larger than {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"The request body is larger than {limit} bytes.")
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(ctx: RequestContext, receive: Receive) -> Receive:
    """Give the app the (possibly amended) body once, then the real `receive`."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            ctx.app_called = True  # only the app itself reads the body llmfence replays
            return {"type": "http.request", "body": ctx.body, "more_body": False}
        return await receive()

    return replay


def _scanning_send(meter: Meter, ctx: RequestContext, send: Send) -> Send:
    """Forward the response as it comes: headers added at the start, every chunk scanned."""

    async def scanning(message: Message) -> None:
        if message["type"] == "http.response.start":
            ctx.app_called = True
            headers = list(message.get("headers", []))
            fields = {k.lower(): v.decode("latin-1").lower() for k, v in headers}
            meter.start_response(
                ctx,
                message["status"],
                fields.get(b"content-type", ""),
                fields.get(b"content-encoding", ""),
            )
            if ctx.hide_usage:
                # The body shrinks when the usage chunk is hidden; streams carry no length.
                headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
            headers += rate_limit_headers(ctx.rate_states) + ctx.response_headers
            message = {**message, "headers": headers}
        elif message["type"] == "http.response.body":
            body = meter.scan(ctx, message.get("body", b""))
            if not message.get("more_body", False):
                body += meter.end_of_stream(ctx)
            message = {**message, "body": body}
        await send(message)

    return scanning


def ensure_stream_usage(ctx: RequestContext) -> None:
    """Ask the upstream for a usage chunk on a stream whose client did not, and hide it."""
    request = ctx.request
    if request is None or not request.stream or request.usage_in_stream or ctx.hide_usage:
        return
    options = dict(request.body.get("stream_options") or {}) if request.body else {}
    options["include_usage"] = True
    ctx.body = amend_body(ctx, stream_options=options)
    ctx.hide_usage = True


async def send_error(send: Send, error: LLMFenceError, ctx: RequestContext | None) -> None:
    """Send an OpenAI-shaped error response (never raise through the app)."""
    now = ctx.now if ctx is not None else 0.0
    body = json.dumps(error.to_openai()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *error_headers(error, now),
    ]
    if ctx is not None:
        ctx.refused = True
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})
