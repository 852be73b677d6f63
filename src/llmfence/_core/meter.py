"""The meter: the services every adapter shares, and one request's admission.

`Meter` is long-lived: it holds the store, prices, token counter, clock and defaults, bounds
every store call, and counts degradations. `admit` turns a request and a caller's `Plan` into one
`Store.admit` call (with its shadow, clamping and outage rules; a prompt is only bounded until a
decision needs its exact count, `_core.lazy`); `_core.settle` ends the request.
The middlewares and the route guards both go through here. Nothing here knows ASGI.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import TypeVar

import anyio

from llmfence._logs import log_degraded
from llmfence._pricing import PriceBook
from llmfence._request import LLMRequest, amend
from llmfence._tokens import TokenCounter
from llmfence.exceptions import ConfigurationError, LLMFenceError, StoreError
from llmfence.stores import (
    Admission,
    AdmissionResult,
    BudgetScope,
    RateHit,
    Settlement,
    Store,
)
from llmfence.stores._protocol import DEFAULT_TIMEOUT

from .alerts import Alerts
from .checks import BudgetCheck
from .context import RequestContext
from .lazy import admit_bounded
from .observe import Observer, timed
from .outbox import Outbox
from .plan import Plan
from .refusals import refusal_error
from .shadow import relax, unrelax

__all__ = ["Meter"]

logger = logging.getLogger("llmfence")
_T = TypeVar("_T")

DEFAULT_STORE_TIMEOUT = DEFAULT_TIMEOUT
"""The bound of every call to a store that sets none of its own (seconds)."""
# How many times an admission may be retried with a smaller output allowance: once for the
# tightest level reported, once more if another level turns out tighter still.
_FITTINGS = 3
_CLAMP_HEADER = b"x-llmfence-max-tokens-clamped"
_SHADOW_HEADER = b"x-llmfence-shadow-refusal"
DEGRADED_HEADER = (b"x-llmfence-degraded", b"store-unavailable")


class Meter:
    """Counts, prices, admits and settles requests against one store.

    Args:
        store: Where limits, budgets and spend live.
        prices: Model prices.
        counter: Token counter.
        default_max_tokens: Output allowance reserved when a request names none; lowered to
            what the tightest token window or budget can still take when it does not fit.
        min_output_tokens: The smallest such lowered allowance worth sending upstream; a request
            that cannot get even this much is refused.
        store_timeout: Seconds any one store call may take. A store that can be told its
            bound (`RedisStore`) is given this one in place of its own `timeout`; calls to any
            other store that may wait run under it. `None`: the store's own bound, else
            `DEFAULT_STORE_TIMEOUT`.
        disconnect_extra_tokens: Output tokens charged on top of what was streamed when the
            client disconnects mid-stream (the upstream may have generated more).
        deployments: The model each Azure-style deployment (`/openai/deployments/{name}/...`)
            runs; on such paths the deployment, not the body, decides the model.
        clock: Unix time.
        observer: Told of every request, refusal, spend, store call and degradation (a
            `llmfence.metrics` adapter); `None` (default): nothing is observed, at the cost of
            one `is None` check at each of those points.
        lazy_counting: Admit with an upper bound of the prompt's tokens (its UTF-8 length,
            `TokenCounter.bound`) and count exactly only when a decision or a figure needs it:
            a refusal under the bound, a reservation that takes more than half the room of a
            token window or budget, a response without usage (see `_core.lazy`). Admissions
            decide as with exact counting; far from every limit, `x-ratelimit-remaining-tokens`
            counts the bound while the request runs. `False`: count every prompt first.
    """

    def __init__(
        self,
        store: Store,
        *,
        prices: PriceBook | None = None,
        counter: TokenCounter | None = None,
        default_max_tokens: int = 4096,
        min_output_tokens: int = 16,
        store_timeout: float | None = None,
        disconnect_extra_tokens: int = 0,
        deployments: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        observer: Observer | None = None,
        lazy_counting: bool = True,
    ) -> None:
        self.store = store
        self.lazy_counting = lazy_counting
        """Whether prompts are counted only when a decision needs it (`_core.lazy`)."""
        self.deployments = dict(deployments or {})
        """The model each Azure-style deployment runs (a deployment not named runs the model of
        its own name)."""
        self.prices = prices or PriceBook()
        self.counter = counter or TokenCounter()
        self.default_max_tokens = default_max_tokens
        self.min_output_tokens = min_output_tokens
        self.disconnect_extra_tokens = disconnect_extra_tokens
        self.clock = clock
        # Read off the store's class, not the instance: a wrapper that forwards attributes
        # (`__getattr__`) but awaits in its own methods must not inherit the promise.
        self.never_suspends = bool(getattr(type(store), "never_suspends", False))
        """Whether store calls complete without yielding to the event loop (MemoryStore):
        nothing can then cancel a settlement halfway, and it needs no shield."""
        # A store that bounds its own calls (RedisStore's timeout; MemoryStore never waits)
        # spares every call a second cancel scope, a tenth of the stack's overhead. One
        # `store_timeout` governs all the same: a store that takes its bound is given it, and
        # any other store that may wait gets the meter's deadline.
        self._store_bounds_calls = bool(getattr(type(store), "bounds_call_time", False))
        set_timeout = getattr(store, "set_call_timeout", None)
        if store_timeout is None:
            store_timeout = getattr(store, "call_timeout", None) or DEFAULT_STORE_TIMEOUT
        elif callable(set_timeout):
            set_timeout(store_timeout)
        else:  # its own bound may be longer: only a store that never waits needs none
            self._store_bounds_calls = self._store_bounds_calls and self.never_suspends
        self.store_timeout: float = store_timeout
        """Seconds any one store call may take."""
        self.tracking = BudgetCheck()
        """Where spend lands when nothing was reserved (every level; `Fence` sets its own, so
        the whole-app and end-user periods are its)."""
        self.degraded_count = 0
        """How many store calls failed (each logged); exposed for metrics."""
        self.outbox = Outbox()
        """Settlements the store did not take, sent again until it does (`_core.outbox`)."""
        self.alerts: Alerts | None = None  # budget alerts (`_core.alerts`), if configured
        self.observer: Observer | None = None
        """Where requests, refusals, spend and store calls are reported (`_core.observe`)."""
        if observer is not None:
            self.observe(observer)

    def observe(self, observer: Observer) -> None:
        """Report to `observer` from now on (a meter has one)."""
        if not isinstance(observer, Observer):
            raise ConfigurationError(
                f"metrics must be an llmfence.metrics adapter (an Observer), not {observer!r}"
            )
        if self.observer is not None and self.observer is not observer:
            raise ConfigurationError("this meter already reports to another metrics adapter")
        self.observer = observer
        observer.attach(self)

    def context(self, path: str) -> RequestContext:
        """A fresh context for a request arriving now (in flight until `_core.settle.finish`)."""
        if self.observer is not None:
            self.observer.request_started()
        return RequestContext(self, path, self.clock())

    # -- store calls -------------------------------------------------------------------------

    async def call(self, awaitable: Awaitable[_T]) -> _T:
        """Await one store call under the store timeout; any failure becomes `StoreError`."""
        if self.observer is not None:
            awaitable = timed(self.observer, awaitable)
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

    async def resend(self, settlement: Settlement) -> None:
        """Send one settlement from the outbox again (`StoreError` if the store fails)."""
        await self.call(self.store.settle(settlement))

    def degraded(self, operation: str, error: BaseException, request_id: str | None = None) -> None:
        """Log and count a store failure (the request goes on under its guard's policy)."""
        self.degraded_count += 1
        log_degraded(operation, error, request_id)
        if self.observer is not None:
            self.observer.degraded(operation)

    # -- projection --------------------------------------------------------------------------

    async def tokens(self, ctx: RequestContext) -> int:
        """Prompt tokens plus the output allowance (what TPM reserves), counted once: the
        prompt's upper bound under `lazy_counting` (`ctx.bounded`), else its exact count."""
        request = ctx.request
        if request is None:
            return 0
        if ctx.prompt_tokens is None:
            if self.lazy_counting:
                ctx.prompt_tokens = self.counter.bound(request)
                ctx.bounded = True
            else:
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

    async def admit(self, ctx: RequestContext, plan: Plan) -> LLMFenceError | None:
        """Send a plan's checks for this request to the store in one step.

        Returns:
            The error to answer with, or None to go on (admitted, or let through while the
            store is down under a `fail_open` policy).
        """
        request = ctx.request
        if request is None:
            return None
        rates: tuple[RateHit, ...] = plan.requests
        if plan.tokens:
            tokens = await self.tokens(ctx)
            rates += tuple(
                RateHit(k, "tokens", v, b, m, tokens, w) for k, v, b, m, w in plan.tokens
            )
        for key, kind, label, limit, window in plan.model_rates(request.model):
            cost = 1 if kind == "requests" else await self.tokens(ctx)
            rates += (RateHit(key, kind, "model", label, limit, cost, window),)  # type: ignore[arg-type]
        end_user = request.end_user
        customer = ctx.customer
        if end_user and (plan.end_user_rates or customer is not None):
            for kind, window, limit in plan.end_user_limits(customer):
                cost = 1 if kind == "requests" else await self.tokens(ctx)
                key = plan.end_user_counter(kind, window, end_user)
                hit = RateHit(key, kind, "end_user", end_user, limit, cost, window)  # type: ignore[arg-type]
                rates += (hit,)
        budgets: tuple[BudgetScope, ...] = ()
        if plan.has_budgets:
            await self.projected_cost(ctx)
            budgets = plan.budget_scopes(request.end_user, request.model, ctx.now, customer)
            if ctx.budget_scopes:  # a level is charged once, by the first layer that names it
                seen = {scope.key for scope in ctx.budget_scopes}
                budgets = tuple(scope for scope in budgets if scope.key not in seen)
            ctx.budget_scopes += budgets
        if not rates and not plan.slots and not budgets:
            return None
        request_id = f"{ctx.request_id}.{ctx.admissions}"
        ctx.admissions += 1
        if budgets:
            ctx.charges[request_id] = budgets
        ctx.uncertain.append(request_id)
        admission = Admission(request_id, ctx.now, rates, plan.slots, budgets, ctx.cost)
        try:
            admitted = await self.reserve(
                self._admit(ctx, plan, admission), plan.fail_closed, ctx.request_id
            )
        except StoreError as error:
            return error
        if admitted is None:
            ctx.response_headers.append(DEGRADED_HEADER)
            return None
        result, request_id = admitted  # the id changes when a bound's reservation went back
        ctx.uncertain.remove(request_id)
        ctx.rate_states.extend(result.rates)
        if self.alerts is not None and result.budgets:
            self.alerts.check(result, ctx.cost, ctx.principal, ctx.now)
        if self.observer is not None and result.budgets:
            self.observer.budgets(result.budgets)
        refusal = result.refusal
        if refusal is not None:
            ctx.refusal = refusal
            # The refusing window: the hit of that kind, level and limit (a key's per-minute
            # and per-day windows differ by their limits), else its check's.
            owner = plan.owner(refusal.reason, refusal.level, refusal.label)
            window = next(
                (
                    hit.window
                    for hit in rates
                    if (hit.kind, hit.level, hit.label, hit.limit)
                    == (refusal.reason, refusal.level, refusal.label, refusal.limit)
                ),
                getattr(owner, "window", 60.0),
            )
            named = request.max_output_tokens is not None
            return refusal_error(refusal, window, max_tokens=named, fit=ctx.fit if named else None)
        ctx.reservations.append(request_id)
        return None

    async def reserve(
        self,
        admission: Awaitable[_T],
        fail_closed: bool,
        request_id: str | None = None,
    ) -> _T | None:
        """Await an admission under the outage policy: its result; `None` when the store is
        down and the checks fail open (logged and counted); `StoreError` when they fail closed.
        """
        try:
            return await admission
        except StoreError as error:
            self.degraded("admit", error, request_id)
            if fail_closed:
                raise
            return None

    async def _admit(
        self, ctx: RequestContext, plan: Plan, admission: Admission
    ) -> tuple[AdmissionResult, str]:
        """The admission's result and the id its reservation holds."""
        if ctx.bounded:  # the prompt's bound first; counted exactly if a decision needs it
            admitted, admission = await admit_bounded(self, ctx, admission)
            if admitted is not None:
                return admitted, admission.request_id
        return await self._fitted(ctx, plan, admission), admission.request_id

    async def _fitted(
        self, ctx: RequestContext, plan: Plan, admission: Admission
    ) -> AdmissionResult:
        result = await self.call(self.store.admit(admission))
        for _ in range(_FITTINGS):
            refusal = result.refusal
            if refusal is None:
                return result
            if plan.shadow_keys or plan.shadow_prefixes:
                # Shadow checks never refuse: admit again with their limits lifted. Admitted
                # now, the refusal was theirs: say what they would have done; their usage is
                # still counted. Refused again, the refusal is a real check's.
                relaxed = relax(admission, plan.shadowed)
                again = await self.call(self.store.admit(relaxed))
                again = replace(again, rates=unrelax(again.rates, admission))
                if again.refusal is None:
                    ctx.response_headers.append((_SHADOW_HEADER, refusal.reason.encode()))
                    logger.info("llmfence shadow refusal: %s on %s", refusal.reason, refusal.level)
                    return again
                result, refusal = again, again.refusal
            request = ctx.request
            if refusal.reason not in ("tokens", "budget") or request is None:
                return result
            fit = self._fit(ctx, result)
            ctx.fit = fit
            # An allowance the client did not ask for shrinks to what fits, as does one it
            # asked for when the app clamps; a request that names a `max_tokens` is refused.
            if request.max_output_tokens is not None and not plan.clamp:
                return result
            if fit is None or fit < self._min_fit(request) or fit * request.n >= ctx.allowance:
                return result
            ctx.allowance = fit * request.n
            if ctx.price is not None:
                ctx.cost = ctx.price.projected(ctx.prompt_tokens or 0, ctx.allowance)
            ctx.request, ctx.body = amend(request, max_tokens=fit)
            tokens = (ctx.prompt_tokens or 0) + ctx.allowance
            rates = tuple(
                replace(hit, cost=tokens) if hit.kind == "tokens" else hit
                for hit in admission.rates
            )
            admission = replace(admission, rates=rates, cost=ctx.cost)
            result = await self.call(self.store.admit(admission))
            if result.refusal is None:
                ctx.response_headers.append((_CLAMP_HEADER, b"%d" % fit))
        return result

    def _min_fit(self, request: LLMRequest) -> int:
        # A clamped explicit max_tokens may go down to 1; an implicit allowance no lower than
        # the configured minimum (below it, the answer would be cut too short to be useful).
        return 1 if request.max_output_tokens is not None else self.min_output_tokens

    def _fit(self, ctx: RequestContext, result: AdmissionResult) -> int | None:
        """The largest `max_tokens` (per choice) every token window and budget can take now,
        or None when the request's output is not what limits it."""
        request = ctx.request
        if request is None or request.endpoint == "embeddings":
            return None
        prompt = ctx.prompt_tokens or 0
        rooms = [state.remaining - prompt for state in result.rates if state.kind == "tokens"]
        if result.headroom is not None and ctx.price is not None:
            rooms.append(ctx.price.max_output_tokens_for(max(0, result.headroom), prompt))
        if not rooms:
            return None
        return max(0, min(rooms)) // request.n
