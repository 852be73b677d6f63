"""The meter: one request's projection, admission, response scan and settlement.

`RequestContext` is the per-request state, created once by the first llmfence middleware and
shared through the ASGI scope. `Meter` is the long-lived service: it counts and prices the
request once, gathers the parts every check adds, sends them to the store in one step, watches
the response for usage, and settles at the end. It knows nothing of ASGI.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import anyio

from llmfence._pricing import ModelPrice, PriceBook
from llmfence._request import LLMRequest
from llmfence._tokens import TokenCounter
from llmfence._usage import StreamUsageScanner, Usage, UsageChunkFilter, usage_from_json
from llmfence.exceptions import LLMFenceError, StoreError
from llmfence.stores import (
    Admission,
    AdmissionResult,
    BudgetScope,
    RateHit,
    RateState,
    Refusal,
    Settlement,
    SlotRequest,
    SpendRecord,
    Store,
)

from .auth import Principal
from .checks import BudgetCheck, Check, ParallelCheck, RateCheck
from .refusals import refusal_error

__all__ = ["Meter", "RequestContext"]

logger = logging.getLogger("llmfence")
_T = TypeVar("_T")

# A JSON response larger than this is forwarded untouched but not parsed for usage; the spend
# is then estimated. No LLM response body comes near it.
_MAX_JSON_RESPONSE = 8 * 1024 * 1024
_RELAXED = 1 << 62
_CLAMP_HEADER = b"x-llmfence-max-tokens-clamped"
_SHADOW_HEADER = b"x-llmfence-shadow-refusal"
_DEGRADED_HEADER = b"x-llmfence-degraded"


@dataclass(slots=True, eq=False)
class _Part:
    check: Check
    rates: list[RateHit] = field(default_factory=list)
    slots: list[SlotRequest] = field(default_factory=list)
    budgets: list[BudgetScope] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class RequestContext:
    """Everything llmfence knows about one request, shared by its middlewares.

    Attributes:
        request_id: Unique per request; names its reservation, leases and spend record.
        path: The request path.
        now: Unix time when the request arrived.
        body: The body forwarded to the app (amended if llmfence changed it).
        request: The parsed LLM request, for metered paths.
        principal: Who is calling, once authenticated.
    """

    request_id: str
    path: str
    now: float
    started: float
    body: bytes = b""
    request: LLMRequest | None = None
    principal: Principal | None = None
    prompt_tokens: int | None = None
    price: ModelPrice | None = None
    allowance: int = 0
    cost: int = 0
    pending: list[_Part] = field(default_factory=list)
    reservations: list[str] = field(default_factory=list)
    rate_states: list[RateState] = field(default_factory=list)
    response_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    hide_usage: bool = False
    record_spend: bool = False
    status: int | None = None
    scanner: StreamUsageScanner | None = None
    stream_filter: UsageChunkFilter | None = None
    json_body: bytearray | None = None
    completed: bool = False
    refused: bool = False
    app_called: bool = False  # the app read the body or began a response
    app_failed: bool = False
    finished: bool = False
    budget_scopes: list[BudgetScope] | None = None
    # Admissions whose outcome is unknown (the store timed out or the task was cancelled while
    # it ran): they may hold a reservation, so the end of the request settles them too.
    uncertain: list[str] = field(default_factory=list)
    budget_ids: set[str] = field(default_factory=set)
    flushes: int = 0

    @property
    def end_user(self) -> str | None:
        """The end user named by the request body."""
        return self.request.end_user if self.request is not None else None


class Meter:
    """Counts, prices, admits and settles requests against one store.

    Args:
        store: Where limits, budgets and spend live.
        prices: Model prices.
        counter: Token counter.
        default_max_tokens: Output allowance reserved when a request names none.
        store_timeout: Seconds any one store call may take.
        disconnect_extra_tokens: Output tokens charged on top of what was streamed when the
            client disconnects mid-stream (the upstream may have generated more).
        clock: Unix time.
    """

    def __init__(
        self,
        store: Store,
        *,
        prices: PriceBook | None = None,
        counter: TokenCounter | None = None,
        default_max_tokens: int = 4096,
        store_timeout: float = 2.0,
        disconnect_extra_tokens: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.prices = prices or PriceBook()
        self.counter = counter or TokenCounter()
        self.default_max_tokens = default_max_tokens
        self.store_timeout = store_timeout
        self.disconnect_extra_tokens = disconnect_extra_tokens
        self.clock = clock
        # A store that bounds its own calls (RedisStore's timeout; MemoryStore never waits)
        # spares every call a second cancel scope, a tenth of the stack's overhead.
        self._store_bounds_calls = bool(getattr(store, "bounds_call_time", False))
        self.tracking = BudgetCheck()
        """Where spend lands when nothing was reserved (every level; `Fence` sets its own, so
        the whole-app and end-user periods are its)."""
        self.degraded_count = 0
        """How many store calls failed (each logged); exposed for metrics."""

    def new_context(self, path: str) -> RequestContext:
        """A fresh context for a request arriving now."""
        return RequestContext(uuid.uuid4().hex, path, self.clock(), time.perf_counter())

    # -- projection --------------------------------------------------------------------------

    async def tokens(self, ctx: RequestContext) -> int:
        """Prompt tokens plus the output allowance (what TPM reserves), counted once."""
        request = ctx.request
        if request is None:
            return 0
        if ctx.prompt_tokens is None:
            ctx.prompt_tokens = await self.counter.acount(request)
            if request.endpoint != "embeddings":
                ctx.allowance = (request.max_output_tokens or self.default_max_tokens) * request.n
        return ctx.prompt_tokens + ctx.allowance

    async def projected_cost(self, ctx: RequestContext) -> int:
        """The projected cost in nano-USD; raises `UnknownModelError` for unpriced models."""
        if ctx.request is None:
            return 0
        await self.tokens(ctx)
        if ctx.price is None:
            ctx.price = self.prices.price_for(ctx.request.model)
        ctx.cost = ctx.price.projected(ctx.prompt_tokens or 0, ctx.allowance)
        return ctx.cost

    # -- admission ---------------------------------------------------------------------------

    async def add(self, ctx: RequestContext, check: Check) -> None:
        """Add a check's parts to the request's pending admission."""
        part = _Part(check)
        principal = ctx.principal
        if isinstance(check, RateCheck):
            cost = 1 if check.kind == "requests" else await self.tokens(ctx)
            part.rates = check.hits(principal, cost)
        elif isinstance(check, ParallelCheck):
            part.slots = check.slots(principal)
        elif isinstance(check, BudgetCheck):
            await self.projected_cost(ctx)
            model = ctx.request.model if ctx.request is not None else None
            # A level is charged once per request: when two budget guards name the same level
            # (both track the whole app, say), the first one's limit applies.
            seen = {scope.key for scope in ctx.budget_scopes or ()}
            part.budgets = [
                scope
                for scope in check.scopes(principal, ctx.end_user, model, ctx.now)
                if scope.key not in seen
            ]
            ctx.budget_scopes = [*(ctx.budget_scopes or ()), *part.budgets]
        ctx.pending.append(part)

    async def flush(self, ctx: RequestContext) -> LLMFenceError | None:
        """Send the pending parts to the store in one step; the error to answer, or None."""
        parts = [p for p in ctx.pending if p.rates or p.slots or p.budgets]
        ctx.pending = []
        if not parts:
            return None
        request_id = f"{ctx.request_id}.{ctx.flushes}"
        ctx.flushes += 1
        if any(p.budgets for p in parts):
            ctx.budget_ids.add(request_id)
        ctx.uncertain.append(request_id)
        try:
            result = await self._admit(ctx, request_id, parts)
        except StoreError as error:
            self.degraded("admit", error)
            if any(p.check.on_store_error == "fail_closed" for p in parts):
                return error
            ctx.response_headers.append((_DEGRADED_HEADER, b"store-unavailable"))
            return None
        ctx.uncertain.remove(request_id)
        if result.refusal is not None:
            ctx.rate_states.extend(result.rates)
            return refusal_error(result.refusal, _window_of(parts, result.refusal))
        ctx.reservations.append(request_id)
        ctx.rate_states.extend(result.rates)
        return None

    async def _admit(
        self, ctx: RequestContext, request_id: str, parts: list[_Part]
    ) -> AdmissionResult:
        result = await self.call(self.store.admit(self._admission(ctx, request_id, parts)))
        refusal = result.refusal
        if refusal is None:
            return result
        owner = _owner(parts, refusal)
        if owner is not None and owner.check.shadow:
            # Shadow checks never refuse: say what they would have done, then admit again with
            # every shadow check's limits lifted, so their usage is still counted.
            ctx.response_headers.append((_SHADOW_HEADER, refusal.reason.encode()))
            logger.info("llmfence shadow refusal: %s on %s", refusal.reason, refusal.level)
            relaxed = [_relax(p) if p.check.shadow else p for p in parts]
            again = await self.call(self.store.admit(self._admission(ctx, request_id, relaxed)))
            return replace(again, rates=_unrelax(again.rates, parts))
        if (
            owner is not None
            and isinstance(owner.check, BudgetCheck)
            and owner.check.clamp_max_tokens
            and result.headroom is not None
        ):
            clamped = await self._clamp(ctx, result.headroom, parts)
            if clamped:
                retry = await self.call(self.store.admit(self._admission(ctx, request_id, parts)))
                if retry.refusal is None:
                    ctx.response_headers.append((_CLAMP_HEADER, str(clamped).encode()))
                return retry
        return result

    def _admission(self, ctx: RequestContext, request_id: str, parts: list[_Part]) -> Admission:
        return Admission(
            request_id=request_id,
            now=ctx.now,
            rates=tuple(hit for p in parts for hit in p.rates),
            slots=tuple(slot for p in parts for slot in p.slots),
            budgets=tuple(scope for p in parts for scope in p.budgets),
            cost=ctx.cost,
        )

    async def _clamp(self, ctx: RequestContext, headroom: int, parts: list[_Part]) -> int:
        """Lower the output allowance to what `headroom` pays for; the new max_tokens, or 0."""
        request, price = ctx.request, ctx.price
        if request is None or price is None or request.endpoint == "embeddings" or headroom <= 0:
            return 0
        per_choice = price.max_output_tokens_for(headroom, ctx.prompt_tokens or 0) // request.n
        if per_choice < 1 or per_choice * request.n >= ctx.allowance:
            return 0
        ctx.allowance = per_choice * request.n
        ctx.cost = price.projected(ctx.prompt_tokens or 0, ctx.allowance)
        ctx.body = amend_body(ctx, max_tokens=per_choice)
        tokens = (ctx.prompt_tokens or 0) + ctx.allowance
        for part in parts:
            part.rates = [
                replace(hit, cost=tokens) if hit.kind == "tokens" else hit for hit in part.rates
            ]
        return per_choice

    async def call(self, awaitable: Awaitable[_T]) -> _T:
        """Await one store call under the store timeout; any failure becomes `StoreError`."""
        try:
            if self._store_bounds_calls:
                return await awaitable
            with anyio.fail_after(self.store_timeout):
                return await awaitable
        except TimeoutError as error:
            raise StoreError("The llmfence store did not answer in time.") from error
        except StoreError:
            raise
        except Exception as error:  # a store bug or driver error must not become a 500
            raise StoreError("The llmfence store failed.") from error

    def degraded(self, operation: str, error: BaseException) -> None:
        """Log and count a store failure (the request goes on under its guard's policy)."""
        self.degraded_count += 1
        logger.warning(
            "llmfence store degraded during %s: %s (cause: %r)",
            operation,
            error,
            error.__cause__,
        )

    # -- the response ------------------------------------------------------------------------

    def start_response(
        self, ctx: RequestContext, status: int, content_type: str, content_encoding: str = ""
    ) -> None:
        """Note the response's status and pick how its body will be scanned for usage."""
        ctx.status = status
        if content_encoding not in ("", "identity"):
            # A compressed body cannot be read as it passes: the reservation is charged.
            return
        if content_type.startswith("text/event-stream"):
            ctx.scanner = StreamUsageScanner(self._output_counter(ctx))
            if ctx.hide_usage:
                ctx.stream_filter = UsageChunkFilter(ctx.scanner)
        elif "json" in content_type:
            ctx.json_body = bytearray()

    def scan(self, ctx: RequestContext, chunk: bytes) -> bytes:
        """Scan one response body chunk; the bytes to forward (a hidden usage chunk removed)."""
        if ctx.stream_filter is not None:
            return ctx.stream_filter.feed(chunk)
        if ctx.scanner is not None:
            ctx.scanner.feed(chunk)
        elif ctx.json_body is not None:
            if len(ctx.json_body) + len(chunk) <= _MAX_JSON_RESPONSE:
                ctx.json_body += chunk
            else:
                ctx.json_body = None
        return chunk

    def end_of_stream(self, ctx: RequestContext) -> bytes:
        """Bytes a usage filter still holds back, to send with the last body message."""
        ctx.completed = True
        return ctx.stream_filter.finish() if ctx.stream_filter is not None else b""

    def _output_counter(self, ctx: RequestContext) -> Callable[[str], int]:
        model = ctx.request.model if ctx.request is not None else None
        return lambda text: self.counter.count_text(text, model)

    # -- settlement --------------------------------------------------------------------------

    def usage(self, ctx: RequestContext) -> tuple[Usage, str]:
        """The request's usage and its provenance, from the response or estimated."""
        prompt = ctx.prompt_tokens or 0
        if ctx.scanner is not None:
            usage = ctx.scanner.finish()
            if ctx.scanner.usage_seen:
                return usage, "provider-reported"
            extra = 0 if ctx.completed else self.disconnect_extra_tokens
            return Usage(prompt, usage.output_tokens + extra, estimated=True), "estimated"
        if ctx.json_body is not None and ctx.completed:
            found = usage_from_json(bytes(ctx.json_body))
            if found is not None:
                return found, "provider-reported"
        if (ctx.status is not None and ctx.status >= 400) or ctx.app_failed:
            # Providers do not bill failed calls, and an app that raised made none we know of.
            return Usage(estimated=True), "estimated"
        if ctx.status is None:
            # The client left before the response began: what the upstream did is unknown.
            return Usage(prompt, self.disconnect_extra_tokens, estimated=True), "estimated"
        # A response cut short that is not a stream was generated (and billed) in full before
        # its first byte: charge what was reserved. So is a complete one without usage.
        return Usage(prompt, ctx.allowance, estimated=True), "reservation-only"

    async def finish(self, ctx: RequestContext) -> None:
        """Settle every reservation of the request and write its spend record, once.

        Runs shielded from cancellation (a client disconnect cancels the request's task), and
        never raises: a store failure here is logged and counted.
        """
        if ctx.finished:
            return
        ctx.finished = True
        if not ctx.reservations and not ctx.uncertain and not ctx.record_spend:
            return
        with anyio.CancelScope(shield=True):
            try:
                await self._settle(ctx)
            except StoreError as error:
                self.degraded("settle", error)

    async def _settle(self, ctx: RequestContext) -> None:
        held = [*ctx.reservations, *ctx.uncertain]
        if ctx.refused or not ctx.app_called:
            # A refused request is never charged: what earlier checks reserved goes back.
            for request_id in held:
                await self.call(
                    self.store.settle(
                        Settlement(request_id, self.clock(), 0, 0, refund_requests=True)
                    )
                )
            return
        await self.tokens(ctx)  # a recorder without guards has not counted the prompt yet
        usage, provenance = self.usage(ctx)
        cost, source = self._cost(ctx, usage)
        record = self._record(ctx, usage, provenance, cost, source) if ctx.record_spend else None
        tokens = usage.input_tokens + usage.output_tokens
        settled: dict[str, bool] = {}
        for request_id in held:
            # The store appends the record with the first settlement, known or not.
            settled[request_id] = await self.call(
                self.store.settle(Settlement(request_id, self.clock(), cost, tokens, record))
            )
            record = None
        if not any(settled.get(request_id) for request_id in ctx.budget_ids):
            # No budget reservation took the cost (a recorder without a budget guard, or a
            # store that was down at admission): it still lands at every level.
            model = ctx.request.model if ctx.request is not None else None
            scopes = ctx.budget_scopes
            if scopes is None:
                scopes = self.tracking.scopes(ctx.principal, ctx.end_user, model, ctx.now)
            await self.call(self.store.charge(scopes, cost, self.clock()))
        if record is not None:
            await self.call(
                self.store.settle(Settlement(ctx.request_id, self.clock(), 0, None, record))
            )

    def _cost(self, ctx: RequestContext, usage: Usage) -> tuple[int, str]:
        if ctx.request is None:
            return 0, ""
        price = ctx.price
        if price is None:
            try:
                price = ctx.price = self.prices.price_for(ctx.request.model)
            except LLMFenceError:
                return 0, "unknown"
        return price.cost(usage), price.source

    def _record(
        self, ctx: RequestContext, usage: Usage, provenance: str, cost: int, source: str
    ) -> SpendRecord:
        principal = ctx.principal
        return SpendRecord(
            request_id=ctx.request_id,
            timestamp=ctx.now,
            model=ctx.request.model if ctx.request is not None else "",
            cost=cost,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_tokens=usage.cached_input_tokens,
            **(principal.spend_fields() if principal else {}),
            end_user=ctx.end_user,
            provenance=provenance,  # type: ignore[arg-type]
            price_source=source,
            status=_status(ctx),
            latency_ms=round((time.perf_counter() - ctx.started) * 1000, 3),
            path=ctx.path,
        )


def _status(ctx: RequestContext) -> int:
    if ctx.completed and ctx.status is not None:
        return ctx.status
    return 500 if ctx.app_failed else 499  # 499: the client closed the request


# OpenAI's reasoning models refuse `max_tokens` and take `max_completion_tokens`.
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")


def amend_body(ctx: RequestContext, **changes: Any) -> bytes:
    """Re-serialize the request body with some fields changed (`max_tokens`, stream options)."""
    request = ctx.request
    assert request is not None
    assert request.body is not None
    body: dict[str, Any] = dict(request.body)
    if "max_tokens" in changes:
        value = changes.pop("max_tokens")
        names = ("max_completion_tokens", "max_output_tokens", "max_tokens")
        name = next((n for n in names if n in body), None)
        if name is None:
            if request.endpoint == "responses":
                name = "max_output_tokens"
            elif request.endpoint == "chat" and request.model.startswith(_REASONING_PREFIXES):
                name = "max_completion_tokens"
            else:
                name = "max_tokens"
        body[name] = value
    body.update(changes)
    request_body: Mapping[str, Any] = body
    ctx.request = replace(request, body=request_body)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _owner(parts: list[_Part], refusal: Refusal) -> _Part | None:
    for part in parts:
        check = part.check
        if refusal.reason == "budget" and isinstance(check, BudgetCheck):
            return part
        if refusal.reason == "parallel_requests" and isinstance(check, ParallelCheck):
            return part
        if isinstance(check, RateCheck) and check.kind == refusal.reason:
            return part
    return None


def _window_of(parts: list[_Part], refusal: Refusal) -> float:
    owner = _owner(parts, refusal)
    if owner is not None and isinstance(owner.check, RateCheck):
        return owner.check.window
    return 60.0


def _unrelax(states: tuple[RateState, ...], parts: list[_Part]) -> tuple[RateState, ...]:
    """Report shadowed windows against their real limits, not the lifted ones."""
    limits = {hit.key: hit.limit for part in parts for hit in part.rates}
    return tuple(
        replace(s, limit=limits[s.key], remaining=max(0, limits[s.key] - (s.limit - s.remaining)))
        if s.limit == _RELAXED
        else s
        for s in states
    )


def _relax(part: _Part) -> _Part:
    return _Part(
        part.check,
        [replace(hit, limit=_RELAXED) for hit in part.rates],
        [replace(slot, limit=_RELAXED) for slot in part.slots],
        [replace(scope, limit=None) for scope in part.budgets],
    )
