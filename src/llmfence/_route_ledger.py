"""What a guarded call charged, and how its reservation is settled.

A request's `Ledger` sums what its route reported with `Fence.charge` (or `Permit.charge`); each
guard's `Hold` settles its reservation once, with that sum or with the guard's estimate, when
the call ends — also on a disconnect, shielded from cancellation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from llmfence._core.auth import Principal, api_key_from_headers
from llmfence._core.context import RequestContext, new_request_id
from llmfence._core.plan import budget_scopes
from llmfence._core.services import Services
from llmfence._core.settle import (
    protected,
    send_settlements,
    settle_reservations,
    spend_record,
)
from llmfence._usage import Usage, usage_from_json
from llmfence.exceptions import ConfigurationError, LLMFenceError
from llmfence.middleware._engine import STATE_KEY
from llmfence.middleware._http import error_headers, rate_limit_headers
from llmfence.stores import BudgetScope, RateState, Settlement

__all__ = [
    "DEGRADED",
    "SCOPE_KEY",
    "Hold",
    "Ledger",
    "Permit",
    "SettlingResponse",
    "charge_request",
    "error_response",
    "exception_handler",
    "ledger_of",
    "price_call",
    "request_context",
]

logger = logging.getLogger("llmfence")

# The request's ledger lives in the ASGI scope itself: `scope["state"]` may be the lifespan state
# that every request shares when the llmfence middlewares did not run.
SCOPE_KEY = "llmfence.route"
DEGRADED = ("x-llmfence-degraded", "store-unavailable")


@dataclass(slots=True, eq=False)
class Ledger:
    """What one request's LLM calls cost, as the route reported it; shared by all its guards."""

    cost: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    model: str = ""
    source: str = ""
    provenance: str | None = None  # None until something is charged
    holds: int = 0  # guards holding a reservation right now
    principal: Principal | None = None
    end_user: str | None = None
    rate_states: list[RateState] = field(default_factory=list)
    # (guard, counter name) pairs already admitted for this request: a guard used both as a
    # dependency and as a decorator of one endpoint is admitted, and charged, once.
    admitted: set[tuple[int, str]] = field(default_factory=set)

    def add(self, cost: int, usage: Usage, model: str, source: str) -> None:
        self.cost += cost
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens
        self.cached_tokens += usage.cached_input_tokens
        self.model, self.source = self.model or model, self.source or source
        if usage.estimated or self.provenance == "estimated":
            self.provenance = "estimated"
        else:
            self.provenance = "provider-reported"


class Permit:
    """The pass of one admitted call: report through it what the call's LLM requests cost.

    Attributes:
        identity: Who the call is counted against, as messages show it (a masked key, an id).
    """

    def __init__(self, services: Services, ledger: Ledger, identity: str) -> None:
        self._services = services
        self._ledger = ledger
        self.identity = identity

    @property
    def charged(self) -> int:
        """What has been charged so far, in nano-USD."""
        return self._ledger.cost

    def charge(
        self,
        response: Any = None,
        *,
        model: str | None = None,
        usage: Usage | Mapping[str, Any] | None = None,
    ) -> int:
        """Report the cost of one LLM call; several calls add up. See `Fence.charge`."""
        priced = price_call(self._services, response, model, usage)
        if priced is None:
            return 0
        self._ledger.add(*priced)
        return priced[0]


@dataclass(slots=True, eq=False)
class Hold:
    """One admitted reservation, settled once when the guarded call ends."""

    services: Services
    ledger: Ledger
    request_id: str
    reserved: bool  # False: let through while the store was down, or charged without a guard
    budgets: tuple[BudgetScope, ...]
    estimate: int
    tokens_estimate: int | None
    path: str
    now: float
    started: float = field(default_factory=time.perf_counter)
    settled: bool = False
    noop: bool = False  # every guard of it was admitted already, by another use
    charge_levels: bool = True  # also count the spend at the app's and the caller's levels

    def headers(self) -> list[tuple[str, str]]:
        pairs = [(k.decode(), v.decode()) for k, v in rate_limit_headers(self.ledger.rate_states)]
        return pairs if self.reserved else [*pairs, DEGRADED]

    async def settle(self, status: int, *, refund: bool = False) -> None:
        """Settle once: with what was charged, else the estimate; `refund` gives it all back
        (a call the app rejected before spending anything)."""
        if self.settled or self.noop:
            return
        self.settled = True
        ledger, services = self.ledger, self.services
        meter = services.meter
        ledger.holds -= 1
        charged = ledger.provenance is not None
        held = self.reserved
        # A client disconnect cancels the request's task: the reservation must settle anyway.
        with protected(meter):
            if refund and not charged:
                # Sent even when the admission's answer was lost: it then leaves a
                # tombstone that turns the admission, should it run late, into a no-op.
                refunds = [self.request_id] if self.reserved or self.budgets else []
                await settle_reservations(meter, refunds, 0, 0, None, refund=True)
                return
            cost = ledger.cost if charged else self.estimate
            tokens: int | None = ledger.input_tokens + ledger.output_tokens
            record = None
            if charged or self.budgets:  # a limits-only call that charged nothing spent 0
                usage = Usage(ledger.input_tokens, ledger.output_tokens, ledger.cached_tokens)
                record = spend_record(
                    self.request_id,
                    self.now,
                    ledger.model,
                    cost,
                    usage,
                    ledger.principal,
                    ledger.end_user,
                    ledger.provenance or "reservation-only",
                    ledger.source,
                    status,
                    self.started,
                    self.path,
                )
            now = services.clock()
            budgets = tuple(self.budgets)
            settlements = []
            if held or record is not None or budgets:
                # Its one reservation, or none (the spend then lands at the guard's levels).
                if not held or not charged:
                    tokens = self.tokens_estimate if held else None
                rid = self.request_id
                settlements.append(Settlement(rid, now, cost, tokens, record, False, budgets))
            if cost and self.charge_levels:
                # The route's spend counts in the app's, the caller's and the end user's
                # budgets too (their limits are the middlewares' to enforce).
                levels = budget_scopes(
                    services.budgets, ledger.principal, ledger.end_user, ledger.model, now
                )
                rid = f"{self.request_id}.levels"
                settlements.append(Settlement(rid, now, cost, None, None, False, levels))
            await send_settlements(meter, settlements)


class SettlingResponse(Response):
    """A streamed response that settles its guard's reservation once it has been sent."""

    def __init__(self, inner: StreamingResponse, held: Hold) -> None:
        # Not Response.__init__: this only forwards to `inner`, which rendered everything.
        self.inner, self.held = inner, held
        self.status_code = inner.status_code
        self.background = inner.background
        self.raw_headers = inner.raw_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.inner.background = self.background  # FastAPI may have set background tasks
        sent = False
        try:
            await self.inner(scope, receive, send)
            sent = True
        finally:
            await self.held.settle(self.status_code if sent else 499)


def price_call(
    services: Services, response: Any, model: str | None, usage: Usage | Mapping[str, Any] | None
) -> tuple[int, Usage, str, str] | None:
    """(cost in nano-USD, usage, model, price source) of one call, or None without usage."""
    if response is not None:
        data = response.model_dump() if hasattr(response, "model_dump") else response
        if not isinstance(data, Mapping):
            raise ConfigurationError("charge() takes an OpenAI or Anthropic response, or a dict")
        found = usage_from_json(data)
        model = model or data.get("model")
    elif isinstance(usage, Usage):
        found = usage
    elif usage is not None:
        # A dict of OpenAI usage fields, or an SDK's usage object.
        fields = cast(Any, usage).model_dump() if hasattr(usage, "model_dump") else usage
        found = usage_from_json({"usage": fields})
    else:
        raise ConfigurationError("charge() needs a response, or model= and usage=")
    if found is None:
        # The call happened but says nothing of its usage: the reservation's estimate stands.
        logger.warning("llmfence charge(): the response reports no usage; keeping the estimate")
        return None
    if not isinstance(model, str) or not model:
        raise ConfigurationError("charge() needs the model (model=, or the response's `model`)")
    price = services.meter.prices.price_for(model)
    return price.cost(found), found, model, price.source


async def charge_request(
    services: Services,
    request: Request,
    response: Any = None,
    *,
    model: str | None = None,
    usage: Usage | Mapping[str, Any] | None = None,
) -> int:
    """`Fence.charge`: into the request's guard reservation, or at once without one."""
    priced = price_call(services, response, model, usage)
    if priced is None:
        return 0
    ledger = request.scope.get(SCOPE_KEY)
    if isinstance(ledger, Ledger) and ledger.holds > 0:
        ledger.add(*priced)
        return priced[0]
    ctx = request_context(request)
    principal = ctx.principal if ctx is not None else None
    if principal is None and isinstance(ledger, Ledger):
        principal = ledger.principal
    api_key = api_key_from_headers(request.headers)
    if principal is None and api_key:
        try:
            principal = await services.authenticator.authenticate(api_key)
        except LLMFenceError:  # the call was made: its spend lands at the global level at least
            principal = None
    once = Ledger(holds=1, principal=principal, end_user=ctx.end_user if ctx else None)
    once.add(*priced)
    # The spend lands at every level of the caller, limits untouched (`store.charge`), with
    # the Fence's own periods for the global and end-user levels.
    now = services.clock()
    scopes = budget_scopes(services.budgets, principal, once.end_user, priced[2], now)
    request_id = f"route.{new_request_id()}"
    held = Hold(services, once, request_id, False, scopes, 0, None, request.url.path, now)
    held.charge_levels = False  # its budgets are those levels already
    await held.settle(200)
    return priced[0]


def request_context(request: Request) -> RequestContext | None:
    ctx = (request.scope.get("state") or {}).get(STATE_KEY)
    return ctx if isinstance(ctx, RequestContext) else None


def ledger_of(request: Request) -> Ledger:
    ledger = request.scope.get(SCOPE_KEY)
    if not isinstance(ledger, Ledger):
        ledger = request.scope[SCOPE_KEY] = Ledger()
    return ledger


def error_response(error: LLMFenceError, states: Sequence[RateState], now: float) -> Response:
    """The middlewares' answer to a refusal: OpenAI-shaped body, retry and rate-limit headers."""
    response = JSONResponse(error.to_openai(), status_code=error.status_code)
    for header, value in [*error_headers(error, now), *rate_limit_headers(states)]:
        response.headers.append(header.decode(), value.decode())
    return response


def exception_handler(services: Services) -> Callable[[Request, Exception], Awaitable[Response]]:
    """A Starlette exception handler rendering `LLMFenceError`s raised by guard dependencies."""

    async def handle(request: Request, error: Exception) -> Response:
        if not isinstance(error, LLMFenceError):  # pragma: no cover - registered for it only
            raise error
        ledger = request.scope.get(SCOPE_KEY)
        states = ledger.rate_states if isinstance(ledger, Ledger) else []
        return error_response(error, states, services.clock())

    return handle
