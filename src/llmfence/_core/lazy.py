"""Counting a prompt only when a decision needs it (`Meter(lazy_counting=True)`).

Encoding a first-sight 4k-token prompt costs far more than the rest of an admission, yet most
admissions are nowhere near a limit: any reasonable figure gets the same answer. So the meter
admits first with `TokenCounter.bound`, the prompt's UTF-8 length run through the counter's own
arithmetic (never below the exact count), and counts exactly only when the answer could depend
on the difference:

- **Refused under the bound**: a refusal reserves nothing (every store's admission is all or
  none), so the meter counts exactly and admits again from scratch, clamping included. A
  refusal is never answered without that exact re-check, and a clamped `max_tokens` is always
  the one exact counting gives: fitting only ever runs on the exact count.
- **Admitted under the bound**: every check is monotone in its cost (a token bucket fits iff
  its level plus the cost is within its size, a budget iff the cost is within its room; request
  windows and leases do not depend on tokens), so the exact, smaller costs would have been
  admitted as well, with the same output allowance. The decision is the same; what the store
  holds until settlement is what the next two cases settle.
- **Never comfortable**: a bound reservation above half of some token window's or budget's
  whole limit cannot leave half of its room, so the prompt is counted before any store call.
- **Not comfortably** admitted: when the bound reservation took more than half the room of some
  token window or budget (`comfortable`), the request is near a limit, where the bound's excess
  could crowd out other requests and the figures matter. That reservation is given back at
  once (a settlement of nothing at the same instant, which restores every counter as the
  admission found it), the prompt is counted exactly, and the request is admitted again on the
  exact count under a new id: the store then holds what exact counting holds, and the
  `x-ratelimit-*` headers and budget alerts read the exact figures. Two more store calls, only
  near a limit.
- **Comfortably** admitted: the store holds the bound's excess until settlement, and at least
  half of every room the request touched is left to others; the headers count the bound
  reservation, a conservative `remaining` (low by the excess at most) while it runs.
- **Settlement** replaces the reservation with the response's usage, as always; when the
  response reports none (a stream without usage, an error body, a disconnect), the prompt is
  counted exactly then, so records and charges equal what counting at admission would give.

Requests in sequence decide exactly as with exact counting, and leave the same counters (a
property test runs the two side by side on every store). Concurrent requests on the same
counters may see up to a comfortable request's excess less room while it runs. Route guards
never count prompts (they reserve their configured estimates) and are unaffected.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from llmfence.stores import Admission, AdmissionResult, Settlement

from .context import RequestContext

if TYPE_CHECKING:
    from .meter import Meter

__all__ = ["admit_bounded", "comfortable", "count_exactly", "exact_admission"]


async def admit_bounded(
    meter: Meter, ctx: RequestContext, admission: Admission
) -> tuple[AdmissionResult | None, Admission]:
    """Admit a request whose prompt is still only bounded (`ctx.bounded`).

    Returns:
        The result when the bound decided it (admitted comfortably), else `None` and the
        admission to send instead, on the exact count: the bound could never be comfortable
        (it was not sent), was refused (which reserved nothing), or took more than half of
        some room and was given back (the exact admission then has a new id).
    """
    tokens = (ctx.prompt_tokens or 0) + ctx.allowance
    if not _may_fit_comfortably(admission, tokens):
        # More than half of a whole limit: never comfortable, whatever the store holds. The
        # exact count goes first, sparing the round trips of a reservation given back.
        await count_exactly(meter, ctx)
        tokens = (ctx.prompt_tokens or 0) + ctx.allowance
        return None, exact_admission(admission, tokens, ctx.cost)
    result = await meter.call(meter.store.admit(admission))
    if result.refusal is None:
        if comfortable(result, tokens, admission.cost):
            return result, admission
        # Near a limit: the store is to hold what exact counting reserves, not the bound.
        # The refund restores every counter as the admission found it (same instant).
        refund = Settlement(admission.request_id, ctx.now, 0, 0, refund_requests=True)
        await meter.call(meter.store.settle(refund))
        admission = _renamed(ctx, admission)
    await count_exactly(meter, ctx)
    tokens = (ctx.prompt_tokens or 0) + ctx.allowance
    return None, exact_admission(admission, tokens, ctx.cost)


def _renamed(ctx: RequestContext, admission: Admission) -> Admission:
    """The admission under a new id: a settled id is answered as admitted and takes nothing
    in every store (a retry's protection), so the exact one cannot reuse it."""
    old, new = admission.request_id, f"{ctx.request_id}.{ctx.admissions}"
    ctx.admissions += 1
    ctx.uncertain[ctx.uncertain.index(old)] = new
    if old in ctx.charges:
        ctx.charges[new] = ctx.charges.pop(old)
    return replace(admission, request_id=new)


async def count_exactly(meter: Meter, ctx: RequestContext) -> None:
    """Replace a request's bounded prompt by its exact count, and its projected cost (if one
    was projected) with it; nothing when the prompt was counted already."""
    request = ctx.request
    if not ctx.bounded or request is None:
        return
    ctx.prompt_tokens = exact = await meter.counter.acount(request)
    ctx.bounded = False
    if ctx.cost and ctx.price is not None:
        ctx.cost = ctx.price.projected(exact, ctx.allowance)


def _may_fit_comfortably(admission: Admission, tokens: int) -> bool:
    """Whether the reservation is at most half of every token window's and budget's limit
    (a room is never larger than its limit)."""
    for hit in admission.rates:
        if hit.kind == "tokens" and 2 * tokens > hit.limit:
            return False
    cost = admission.cost
    return all(scope.limit is None or 2 * cost <= scope.limit for scope in admission.budgets)


def comfortable(result: AdmissionResult, tokens: int, cost: int) -> bool:
    """Whether an admitted reservation of `tokens` per token window and `cost` per budget level
    took at most half the room each had before it.

    A window's room before the admission is what remains after it plus what it took; the
    budgets' `headroom` is already the tightest room before it.
    """
    for state in result.rates:
        if state.kind == "tokens" and 2 * tokens > state.remaining + tokens:
            return False
    headroom = result.headroom
    return headroom is None or 2 * cost <= headroom


def exact_admission(admission: Admission, tokens: int, cost: int) -> Admission:
    """The admission again with the exact `tokens` in its token windows and the exact `cost`."""
    rates = tuple(
        replace(hit, cost=tokens) if hit.kind == "tokens" else hit for hit in admission.rates
    )
    return replace(admission, rates=rates, cost=cost)
