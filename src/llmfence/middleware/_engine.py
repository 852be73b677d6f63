"""The engine: one ASGI callable that runs every check of an llmfence stack.

Each public middleware only contributes checks (plain data, `_core.checks`). When a stack is
built, a middleware whose inner app is another llmfence middleware absorbs it, so adjacent layers
run as one callable: one frame, one body read and parse, one `receive` and one `send` wrapper,
one admission, one settlement. A layer that is not adjacent (another middleware sits between)
finds the outer engine's `RequestContext` in the scope and joins it: its checks are admitted on
arrival, in the same store, and the outer engine settles them with the rest. A middleware
therefore never behaves differently because of its neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmfence._core.auth import Authenticator, Principal
from llmfence._core.checks import (
    AuthCheck,
    BudgetCheck,
    Check,
    ParallelCheck,
    RateCheck,
    RecordCheck,
)
from llmfence._core.context import RequestContext
from llmfence._core.meter import Meter
from llmfence._core.plan import Plan
from llmfence._core.refusals import note_refusal
from llmfence._core.settle import finish
from llmfence._request import amend, parse_request
from llmfence._usage import StreamUsageScanner, UsageChunkFilter
from llmfence.exceptions import (
    ConfigurationError,
    InvalidRequestError,
    LLMFenceError,
    RequestTooLargeError,
    StoreError,
)

from ._http import api_key, is_anthropic, rate_limit_headers, send_error
from ._lifespan import run_lifespan
from ._paths import PathRules

__all__ = ["STATE_KEY", "Engine", "Layer"]

STATE_KEY = "llmfence"
# A JSON response larger than this is forwarded untouched but not parsed for usage; the spend
# is then estimated. No LLM response body comes near it.
_MAX_JSON_RESPONSE = 8 * 1024 * 1024
_REQUEST_ID = b"x-llmfence-request-id"

StoreCheck = RateCheck | ParallelCheck | BudgetCheck


@dataclass(frozen=True, slots=True)
class Layer:
    """One middleware's contribution to an engine: its name, its checks, its meter if given."""

    name: str
    checks: tuple[Check | AuthCheck | RecordCheck, ...]
    meter: Meter | None


class Engine:
    """Runs the checks of one or more fused llmfence layers over an ASGI app."""

    app: ASGIApp
    paths: PathRules
    max_body_size: int
    layers: tuple[Layer, ...]
    meter: Meter
    authenticator: Authenticator | None

    def _configure(
        self, app: ASGIApp, layers: tuple[Layer, ...], paths: PathRules, max_body_size: int
    ) -> None:
        self.app, self.layers, self.paths, self.max_body_size = app, layers, paths, max_body_size
        given = [(layer.name, layer.meter) for layer in layers if layer.meter is not None]
        for name, meter in given[1:]:
            if meter.store is not given[0][1].store:
                raise ConfigurationError(
                    f"{given[0][0]} and {name} are llmfence layers over different stores: one "
                    "stack keeps its state in one store (pass the same store= or meter=)."
                )
        # Layers given no store share one: a stack is one engine over one state.
        self._explicit = bool(given)
        if given:
            self.meter = given[0][1]
        else:
            from llmfence.stores import MemoryStore

            self.meter = Meter(MemoryStore())
        checks = [check for layer in layers for check in layer.checks]
        self._auth = next((c for c in checks if isinstance(c, AuthCheck)), None)
        self.authenticator = None
        self._joined_authenticator: Authenticator | None = None
        if self._auth is not None:
            self.authenticator = self._auth.authenticator or self._new_authenticator(self.meter)
        self._checks: tuple[StoreCheck, ...] = tuple(
            c for c in checks if isinstance(c, RateCheck | ParallelCheck | BudgetCheck)
        )
        self._record = any(isinstance(c, RecordCheck) for c in checks)
        # Token limits, budgets and the spend log need a stream's usage: ask the upstream.
        self._wants_usage = self._record or any(
            isinstance(c, BudgetCheck) or (isinstance(c, RateCheck) and c.kind == "tokens")
            for c in checks
        )
        self._anonymous: Plan | None = None

    def _new_authenticator(self, meter: Meter) -> Authenticator:
        assert self._auth is not None
        return Authenticator(
            meter.store,
            master_key=self._auth.master_key,
            access_groups=self._auth.access_groups,
            cache_ttl=self._auth.cache_ttl,
            clock=meter.clock,
            call=meter.call,
        )

    def _authenticator_for(self, meter: Meter) -> Authenticator | None:
        """The authenticator for a request on `meter`'s store: this layer's own, or, for a
        layer given no store that joined an outer one, one over the outer layers' store."""
        if self._explicit or meter is self.meter or self._auth is None:
            return self.authenticator
        if self._auth.authenticator is not None:
            return self._auth.authenticator
        joined = self._joined_authenticator
        if joined is None or joined.store is not meter.store:
            joined = self._joined_authenticator = self._new_authenticator(meter)
        return joined

    def _names(self) -> str:
        return " + ".join(layer.name for layer in self.layers)

    def _plan(self, principal: Principal | None) -> Plan:
        if principal is None:
            if self._anonymous is None:
                self._anonymous = Plan(self._checks, None)
            return self._anonymous
        plan = principal.plans.get(self)
        if plan is None:
            plan = principal.plans[self] = Plan(self._checks, principal)
        return plan  # type: ignore[return-value]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":  # passed through; the outbox drains meanwhile
                await run_lifespan(self.meter, self.app, scope, receive, send)
                return
            # Websocket scopes pass through untouched (llmfence meters HTTP).
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        try:
            # The normalized path decides; one that reads otherwise on a metered route is
            # refused, since the app behind may forward either reading.
            exempt, metered = self.paths.classify(path, scope.get("raw_path"))
        except InvalidRequestError as ambiguous:
            note_refusal(self.meter, ambiguous, None, path)
            anthropic = is_anthropic(None, path)
            await send_error(send, ambiguous, self.meter.clock(), anthropic=anthropic)
            return
        if exempt or (scope["method"] == "OPTIONS" and _preflight(scope)):
            await self.app(scope, receive, send)
            return
        state = scope.get("state")
        joined = state.get(STATE_KEY) if state else None
        metered = metered and scope["method"] == "POST"
        meter = self.meter
        if isinstance(joined, RequestContext):
            self._same_store(joined)
            if joined.request is not None or not metered:
                await self._join(joined, scope, receive, send)
                return
            # The outer layers do not meter this path, this one does: it meters the request
            # itself, on the outer store, for the caller the outer layers resolved.
            meter = joined.meter
        ctx = meter.context(path)
        if isinstance(joined, RequestContext):
            ctx.principal = joined.principal
        if metered:
            try:
                ctx.body = await _read_body(scope, receive, self.max_body_size)
                ctx.request = parse_request(ctx.body, path, meter.deployments)
            except LLMFenceError as bad_request:
                note_refusal(meter, bad_request, ctx)
                anthropic = is_anthropic(ctx.request, path)
                await send_error(send, bad_request, ctx.now, _request_id(ctx), anthropic=anthropic)
                await finish(ctx)
                return
        # A per-request copy of the lifespan state: servers and test transports may hand every
        # request the same dict, and one request's context must never leak into the next.
        scope["state"] = {**state, STATE_KEY: ctx} if state else {STATE_KEY: ctx}
        try:
            # Every response of a metered request, refusals included, goes out through the
            # responder, which adds the rate-limit headers at its start.
            out = _responder(ctx, send) if metered else send
            error = await self._check(ctx, scope)
            if error is not None:
                note_refusal(meter, error, ctx)
                await send_error(out, error, ctx.now, anthropic=is_anthropic(ctx.request, path))
                return
            if not metered:
                await self.app(scope, receive, send)
                return
            self._prepare(ctx)
            try:
                await self.app(scope, _replay(ctx, receive), out)
            except Exception:
                ctx.app_failed = True
                raise
        finally:
            await finish(ctx)

    async def _join(self, ctx: RequestContext, scope: Scope, receive: Receive, send: Send) -> None:
        """Run this layer's checks in the request an outer llmfence layer owns."""
        error = await self._check(ctx, scope)
        if error is not None:
            note_refusal(ctx.meter, error, ctx)
            anthropic = is_anthropic(ctx.request, scope["path"])
            await send_error(send, error, ctx.now, anthropic=anthropic)
            return
        if ctx.request is not None:
            self._prepare(ctx)
        await self.app(scope, receive, send)

    def _same_store(self, outer: RequestContext) -> None:
        if self._explicit and outer.meter.store is not self.meter.store:
            raise ConfigurationError(
                f"{self._names()} uses another store than the llmfence layer in front of it: "
                "one stack keeps its state in one store (pass the same store= or meter=)."
            )

    async def _check(self, ctx: RequestContext, scope: Scope) -> LLMFenceError | None:
        """Authenticate (if this engine does), then admit every check in one store call."""
        meter = ctx.meter
        authenticator = self._authenticator_for(meter)
        if authenticator is not None:
            try:
                principal = await authenticator.authenticate(api_key(scope["headers"]))
                if ctx.request is not None and not principal.is_master:
                    await authenticator.check_model(principal, ctx.request.model)
                if ctx.request is not None and ctx.request.end_user:
                    ctx.customer = await authenticator.customer(ctx.request.end_user)
            except StoreError as error:
                meter.degraded("auth", error, ctx.request_id)  # no store, no keys: closed
                return error
            except LLMFenceError as error:
                return error
            ctx.principal = principal
        request = ctx.request
        if request is None:
            return None
        try:
            if not self._checks:
                if self._record and ctx.price is None:
                    # Never silently free: an unknown model is refused, recorded or not.
                    ctx.price = meter.prices.price_for(request.model)
                return None
            return await meter.admit(ctx, self._plan(ctx.principal))
        except LLMFenceError as error:  # an unknown model, say
            return error

    def _prepare(self, ctx: RequestContext) -> None:
        """What an admitted request needs before the app sees it."""
        if self._record:
            ctx.record_spend = True
        request = ctx.request
        if (
            self._wants_usage
            and request is not None
            and request.stream
            and not request.usage_in_stream
            and not ctx.hide_usage
        ):
            # Ask the upstream for the usage chunk, and hide it from a client that did not ask.
            options = dict(request.body.get("stream_options") or {}) if request.body else {}
            options["include_usage"] = True
            ctx.request, ctx.body = amend(request, stream_options=options)
            ctx.hide_usage = True


def _preflight(scope: Scope) -> bool:
    """A CORS preflight: browsers send it without credentials, so auth could only refuse it."""
    return any(name == b"access-control-request-method" for name, _ in scope["headers"])


def _request_id(ctx: RequestContext) -> list[tuple[bytes, bytes]]:
    return [(_REQUEST_ID, ctx.request_id.encode())]


async def _read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The whole request body, refused with `RequestTooLargeError` past `limit` bytes."""
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise RequestTooLargeError(f"The request body is larger than {limit} bytes.")
    message = await receive()
    body: bytes = message.get("body", b"") if message["type"] == "http.request" else b""
    if not message.get("more_body", False):  # the whole body in one message: no copies
        if len(body) > limit:
            raise RequestTooLargeError(f"The request body is larger than {limit} bytes.")
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLargeError(f"The request body is larger than {limit} bytes.")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
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


def _responder(ctx: RequestContext, send: Send) -> Send:
    """Forward the response as it comes: headers added at the start, every chunk scanned."""

    json_size = 0

    async def respond(message: Message) -> None:
        nonlocal json_size
        if message["type"] == "http.response.body":
            body: bytes = message.get("body", b"")
            last = not message.get("more_body", False)
            if ctx.stream_filter is not None:
                out = ctx.stream_filter.feed(body)
                if last:
                    out += ctx.stream_filter.finish()
                if out is not body:
                    message = {**message, "body": out}
            elif ctx.scanner is not None:
                ctx.scanner.feed(body)
            elif ctx.json_parts is not None:
                json_size += len(body)
                if json_size <= _MAX_JSON_RESPONSE:
                    ctx.json_parts.append(body)
                else:
                    ctx.json_parts = None
            if last:
                ctx.completed = True
        elif message["type"] == "http.response.start":
            message = _start(ctx, message)
        await send(message)

    return respond


def _start(ctx: RequestContext, message: Message) -> Message:
    """Note the response's status, pick how its body is scanned, and add llmfence's headers."""
    ctx.app_called = True
    ctx.status = message["status"]
    headers = list(message.get("headers", ()))
    content_type = encoding = b""
    for name, value in headers:
        name = name.lower()
        if name == b"content-type":
            content_type = value.lower()
        elif name == b"content-encoding":
            encoding = value.lower()
    if encoding in (b"", b"identity"):
        # (A compressed body cannot be read as it passes: its reservation is charged.)
        if content_type.startswith(b"text/event-stream"):
            request, counter = ctx.request, ctx.meter.counter
            model = request.model if request is not None else None
            ctx.scanner = StreamUsageScanner(lambda text: counter.count_text(text, model))
            if ctx.hide_usage:
                ctx.stream_filter = UsageChunkFilter(ctx.scanner)
        elif b"json" in content_type:
            ctx.json_parts = []
    if ctx.hide_usage:
        # The body shrinks when the usage chunk is hidden; streams carry no length.
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    if ctx.rate_states:
        headers += rate_limit_headers(ctx.rate_states)
    headers += ctx.response_headers
    headers += _request_id(ctx)
    return {**message, "headers": headers}
