"""Per-route guards: rate limits and USD budgets on single routes of apps that are not gateways.

The middlewares meter the LLM endpoints a gateway serves. An app with a few routes that *call*
an LLM guards each route as a whole instead, and the route reports what its calls cost:

```python
@app.post("/summarize")
@fence.limit(rpm=10, per="user")
@fence.budget(max_usd=5.0, duration="monthly", estimate_usd=0.01)
async def summarize(doc: Doc, request: Request) -> Summary:
    reply = await client.chat.completions.create(model="gpt-4o-mini", messages=...)
    await fence.charge(request, reply)           # settles the reservation with the real cost
    ...

@app.post("/chat")                               # the dependency form
async def chat(permit: Annotated[Permit, Depends(fence.guard(rpm=10, max_usd=1.0))]) -> ...:
    permit.charge(reply)

async with fence.guard(rpm=10, max_usd=1.0, name="batch").hold("alice") as permit:
    permit.charge(model="gpt-4o", usage=reply.usage)      # plain Python, no HTTP
```

Every check of one guarded call goes to the store in one admission (stacked decorators are
merged into one), which reserves `estimate_usd` and `tokens_estimate`; the end of the call
settles the reservation with the sum of what was charged, or with the estimates.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast, overload

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from llmfence import _counters
from llmfence._core.checks import check_window
from llmfence._core.context import new_request_id
from llmfence._core.refusals import refusal_error
from llmfence._core.services import Services
from llmfence._core.settle import protected, settle_reservations
from llmfence._duration import parse_duration
from llmfence._money import usd_to_nano
from llmfence._route_identity import PERS, Per, Who, who_is
from llmfence._route_ledger import (
    Hold,
    Ledger,
    Permit,
    SettlingResponse,
    error_response,
    ledger_of,
)
from llmfence.exceptions import ConfigurationError, LLMFenceError
from llmfence.stores import (
    Admission,
    BudgetScope,
    RateHit,
    hash_key,
    mask_key,
)

__all__ = ["Per", "Permit", "RouteGuard"]

_F = TypeVar("_F", bound=Callable[..., Any])
_HIDDEN = "llmfence_request_"
# An end user is read from bodies of ordinary size, and named by at most this many characters
# (an id becomes part of a counter's name).
_KEYWORD_ONLY = inspect.Parameter.KEYWORD_ONLY
_POSITIONAL_OR_KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD


class RouteGuard:
    """Rate limits and a USD budget on one route, made by `Fence.limit`, `budget` or `guard`.

    A guard is used in one of three ways:

    - as a decorator on a Starlette or FastAPI endpoint, sync or async, under the route's own
      decorator (`@app.post(...)` outermost; stacked guards are admitted together). A refusal
      is answered with the middlewares' OpenAI-shaped response and never reaches the endpoint.
      `x-ratelimit-*` headers are added when the endpoint returns a Starlette `Response`;
      FastAPI endpoints that return plain values get none. A `StreamingResponse` settles when
      its stream ends.
    - as a FastAPI dependency, `Depends(guard)`, which yields a `Permit`. Refusals are raised
      as `LLMFenceError`s, which `Fence.install` (or `add_exception_handlers`) renders.
    - in plain Python: `async with guard.hold(identity) as permit`, which raises
      `RateLimitExceededError`, `BudgetExceededError` or `StoreError`.

    Counters are named `route:{name}:{rpm|tpm}:{window ms}:{identity}` and
    `route:{name}:budget:{identity}`: two routes share them only
    when given the same `name`. Merged guards reserve the largest of their estimates.

    Args:
        services: The store, prices, clock, authenticator and policies the guard uses
            (`Fence.services`).
        rpm: Calls per window, or `None`.
        tpm: Tokens per window, or `None`.
        window: Window length in seconds.
        tokens_estimate: Tokens reserved when a call starts.
        max_usd: The budget of each identity in USD, or `None`.
        duration: How often the budget resets; `None` never resets.
        estimate_usd: USD reserved when a call starts, and spent when nothing is charged.
        per: Whom the guard counts (see `Fence.limit`).
        name: Names the counters; default the endpoint's module and qualified name.
    """

    __signature__: inspect.Signature

    def __init__(
        self,
        services: Services,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        window: float = 60.0,
        tokens_estimate: int = 0,
        max_usd: float | None = None,
        duration: str | None = None,
        estimate_usd: float = 0.0,
        per: Per = "key",
        name: str | None = None,
    ) -> None:
        if not callable(per) and per not in PERS:
            raise ConfigurationError(f"per must be one of {PERS} or a callable, not {per!r}")
        for option, value in (("rpm", rpm), ("tpm", tpm), ("tokens_estimate", tokens_estimate)):
            if value is not None and (type(value) is not int or value < 0):
                raise ConfigurationError(f"{option} must be a non-negative int, not {value!r}")
        check_window(window)
        if rpm is None and tpm is None and max_usd is None:
            raise ConfigurationError("a route guard needs rpm, tpm or max_usd")
        self.max_budget = None if max_usd is None else usd_to_nano(max_usd)
        self.estimate = usd_to_nano(estimate_usd)
        if (self.max_budget or 0) < 0 or self.estimate < 0:
            raise ConfigurationError("max_usd and estimate_usd must not be negative")
        aligned = services.budgets.calendar_aligned
        self.duration = None if duration is None else parse_duration(duration, aligned=aligned)
        self.rpm, self.tpm, self.window, self.tokens_estimate = rpm, tpm, window, tokens_estimate
        self.per, self.name = per, name
        self._services = services
        # One object is both a decorator and a FastAPI dependency, and both are calls. FastAPI
        # picks how to call a dependency from `obj.__call__` (an attribute lookup, which finds
        # this instance attribute first) and `obj.__signature__`; calling the guard itself goes
        # through the class's `__call__`, which tells the two uses apart.
        vars(self)["__call__"] = self._dependency
        self.__signature__ = inspect.Signature(
            [inspect.Parameter("request", _POSITIONAL_OR_KEYWORD, annotation=Request)]
        )

    @overload
    def __call__(self, endpoint: _F, /) -> _F: ...
    @overload
    def __call__(self, *, request: Request) -> AsyncIterator[Permit]: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Decorate an endpoint, or (called by FastAPI with the request) be its dependency."""
        [target] = [*args, *kwargs.values()]
        if isinstance(target, Request):
            return self._dependency(target)
        if not callable(target):
            raise TypeError("a route guard decorates an endpoint, or is used as Depends(guard)")
        return self._decorate(target)

    @asynccontextmanager
    async def hold(self, identity: str) -> AsyncIterator[Permit]:
        """Guard a block of plain Python code, counted against `identity`.

        `identity` is what the guard's `per` names: a user id for `"user"`, a plain API key
        for `"key"` (only its hash is stored), anything for a callable `per`. A guard without a
        `name` keeps its counters under the name `"default"`.

        Raises:
            RateLimitExceededError: A rate limit refused the call.
            BudgetExceededError: The budget refused the call.
            StoreError: The store is down and the guard fails closed.
        """
        kind = self.per if isinstance(self.per, str) else "caller"
        if kind == "key":
            who = ("key", f"key:{hash_key(identity)}", mask_key(identity))
        else:
            who = (kind, f"{kind}:{identity}", identity)
        async with _holding(self, self.name or "default", who, Ledger(), "") as permit:
            yield permit

    async def _dependency(self, request: Request) -> AsyncIterator[Permit]:
        ledger = ledger_of(request)
        endpoint = request.scope.get("endpoint")
        name = self.name or (_qualified(endpoint) if endpoint else request.url.path)
        who = await who_is(self._services, self.per, request, ledger)
        async with _holding(self, name, who, ledger, request.url.path) as permit:
            yield permit

    def _decorate(self, endpoint: _F) -> _F:
        marker = getattr(endpoint, "__llmfence__", None)
        if isinstance(marker, _Guarded) and marker.wrapper is endpoint:
            inner, guards = marker.endpoint, (self, *marker.guards)  # stacked: merge
        else:
            inner, guards = endpoint, (self,)
        if any(g._services is not self._services for g in guards):
            raise ConfigurationError("stacked route guards must come from the same Fence")
        services, default = self._services, _qualified(inner)
        named = [(g, g.name or default) for g in guards]
        try:  # as FastAPI reads it, so what it sees does not change
            signature = inspect.signature(inner, eval_str=True)
        except NameError:
            signature = inspect.signature(inner)
        params = list(signature.parameters.values())
        hidden = not any(_is_request(p.annotation) for p in params)
        call_async = inspect.iscoroutinefunction(inner) or inspect.iscoroutinefunction(
            getattr(inner, "__call__", None)  # noqa: B004 - an object with an async __call__
        )

        @functools.wraps(inner)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            request = kwargs.pop(_HIDDEN, None) if hidden else None
            if not isinstance(request, Request):
                given = (*args, *kwargs.values())
                request = next((a for a in given if isinstance(a, Request)), None)
            if request is None:
                raise ConfigurationError(f"{default} is guarded: it must be called with a Request")
            ledger = ledger_of(request)
            try:
                entries = [(g, n, await who_is(services, g.per, request, ledger)) for g, n in named]
                held = await _admit(services, entries, ledger, request.url.path)
            except LLMFenceError as error:
                return error_response(error, ledger.rate_states, services.clock())
            status, streaming = 499, False  # 499 unless the endpoint returns or raises
            rejected = False
            try:
                if call_async:
                    result = await inner(*args, **kwargs)
                else:  # as FastAPI and Starlette run sync endpoints
                    result = await run_in_threadpool(inner, *args, **kwargs)
                if isinstance(result, Response):
                    status = result.status_code
                    for header, value in held.headers():
                        result.headers.append(header, value)
                    if isinstance(result, StreamingResponse):
                        # The route may charge while it streams: settle when the response has
                        # been sent (or failed to be), whether its stream ever started or not.
                        streaming = True
                        return SettlingResponse(result, held)
                else:
                    status = 200
                return result
            except Exception as error:
                # An endpoint that rejects the call (a 4xx) before charging spent nothing.
                status = _status_of(error)
                rejected = 400 <= status < 500
                raise
            finally:
                if not streaming:
                    await held.settle(status, refund=rejected)

        if hidden:
            # FastAPI injects the Request through this keyword (Request parameters never show
            # in the OpenAPI schema); the wrapper takes it out before calling the endpoint.
            at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
            params.insert(at, inspect.Parameter(_HIDDEN, _KEYWORD_ONLY, annotation=Request))
            cast(Any, wrapper).__signature__ = signature.replace(parameters=params)
        cast(Any, wrapper).__llmfence__ = _Guarded(wrapper, inner, guards)
        return cast(_F, wrapper)


@dataclass(frozen=True, slots=True, eq=False)
class _Guarded:
    """Marks a guard's wrapper, so that a guard stacked on it merges instead of nesting."""

    wrapper: Callable[..., Any]
    endpoint: Callable[..., Any]
    guards: tuple[RouteGuard, ...]


@asynccontextmanager
async def _holding(
    guard: RouteGuard, name: str, who: Who, ledger: Ledger, path: str
) -> AsyncIterator[Permit]:
    held = await _admit(guard._services, [(guard, name, who)], ledger, path)
    status, rejected = 500, False
    try:
        yield Permit(guard._services, ledger, who[2])
        status = 200
    except Exception as error:
        # FastAPI throws a validation error (422) or an endpoint's 4xx into the dependency:
        # a call rejected before it charged anything spent nothing.
        status = _status_of(error)
        rejected = 400 <= status < 500
        raise
    finally:
        await held.settle(status, refund=rejected)


async def _admit(
    services: Services, guards: Sequence[tuple[RouteGuard, str, Who]], ledger: Ledger, path: str
) -> Hold:
    """Send every check of one guarded call to the store in one admission."""
    now = services.clock()
    guards = [(g, n, w) for g, n, w in guards if (id(g), n) not in ledger.admitted]
    ledger.admitted.update((id(g), n) for g, n, _ in guards)
    rates: list[RateHit] = []
    budgets: list[BudgetScope] = []
    for guard, name, (level, ident, label) in guards:
        tag = f"{label} on route {name}"
        if guard.rpm is not None:
            key = _counters.route_rate(name, "requests", guard.window, ident)
            rates.append(RateHit(key, "requests", level, tag, guard.rpm, 1, guard.window))
        if guard.tpm is not None:
            # At least one token: a call may start only while the window has room left.
            cost = max(1, guard.tokens_estimate)
            key = _counters.route_rate(name, "tokens", guard.window, ident)
            rates.append(RateHit(key, "tokens", level, tag, guard.tpm, cost, guard.window))
        if guard.max_budget is not None:
            end = guard.duration.period_end(now) if guard.duration is not None else None
            key = _counters.route_budget(name, guard.duration, ident)
            budgets.append(BudgetScope(key, level, tag, guard.max_budget, end))
    estimate = max((g.estimate for g, _, _ in guards if g.max_budget is not None), default=0)
    token_estimates = {g.tokens_estimate for g, _, _ in guards if g.tpm is not None}
    held = Hold(
        services,
        ledger,
        f"route.{new_request_id()}",
        True,
        tuple(budgets),
        estimate,
        token_estimates.pop() if len(token_estimates) == 1 else None,
        path,
        now,
    )
    if not guards:
        held.noop = True
        return held
    # At least one nano-USD, so a budget already used up refuses even a call estimated free.
    reserve = max(1, estimate) if budgets else 0
    admission = Admission(held.request_id, now, tuple(rates), (), held.budgets, reserve)
    # The middlewares' outage policies: the app's budget policy for budgets, its limits'
    # policy for rate limits.
    fail_closed = (budgets and services.budgets.on_store_error == "fail_closed") or (
        rates and services.limits_on_store_error == "fail_closed"
    )
    meter = services.meter
    try:
        result = await meter.reserve(meter.call(meter.store.admit(admission)), bool(fail_closed))
    except BaseException:
        # A lost reply or a cancel: the store may have applied the admission. Give back what
        # it may have taken (settling an id it never saw changes nothing).
        with protected(meter):
            await settle_reservations(meter, [held.request_id], 0, 0, None, refund=True)
        raise
    if result is None:
        held.reserved = False
    else:
        ledger.rate_states = list(result.rates)
        if meter.alerts is not None and result.budgets:  # a route's budgets alert too
            meter.alerts.check(result, reserve, None, now)
        refusal = result.refusal
        if refusal is not None:
            owner = (h for h in rates if (h.kind, h.label) == (refusal.reason, refusal.label))
            window = next((h.window for h in owner), 60.0)
            raise refusal_error(refusal, window)
    ledger.holds += 1
    return held


def _qualified(endpoint: Any) -> str:
    return f"{endpoint.__module__}.{endpoint.__qualname__}"


def _is_request(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Request)


def _status_of(error: BaseException) -> int:
    """The HTTP status an exception becomes: its own, 422 for a validation error, else 500."""
    status = getattr(error, "status_code", None)
    if isinstance(status, int):
        return status
    return 422 if type(error).__name__ == "RequestValidationError" else 500
