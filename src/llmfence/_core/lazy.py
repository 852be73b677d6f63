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
  admitted as well, with the same output allowance. The decision is the same; only what the
  store holds until settlement is larger, by the bound's excess.
- **Not comfortably** admitted: when the bound reservation took more than half the room of some
  token window or budget (`comfortable`), the request is near a limit, where a figure matters:
  the prompt is counted exactly at once, and the result is restated as the exact reservation
  would have left it (`as_if_exact`), so the `x-ratelimit-*` headers and budget alerts read the
  exact figures there. Far from every limit the headers count the bound reservation: a
  conservative `remaining`, low by the bound's excess at most, while the request is in flight.
- **Settlement** replaces the reservation with the response's usage, as always; when the
  response reports none (a stream without usage, an error body, a disconnect), the prompt is
  counted exactly then, so records and charges equal what counting at admission would give.

What this does not restate: the excess the store holds between admission and settlement. A
concurrent request on the same counters, near their limit, sees up to that much less room than
with exact counting; the comfort rule keeps the excess to requests that took at most half of
every room they touched. Requests in sequence decide exactly as with exact counting (a property
test runs the two side by side on every store). Route guards never count prompts (they reserve
their configured estimates) and are unaffected.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from llmfence.stores import Admission, AdmissionResult

from .context import RequestContext

if TYPE_CHECKING:
    from .meter import Meter

__all__ = ["admit_bounded", "as_if_exact", "comfortable", "count_exactly", "exact_admission"]


async def admit_bounded(
    meter: Meter, ctx: RequestContext, admission: Admission
) -> tuple[AdmissionResult | None, Admission]:
    """Admit a request whose prompt is still only bounded (`ctx.bounded`).

    Returns:
        The result when the bound decided it (admitted), else `None` and the admission to
        send instead, with the exact count: the bound was refused, which reserved nothing.
    """
    result = await meter.call(meter.store.admit(admission))
    if result.refusal is None:
        if comfortable(result, (ctx.prompt_tokens or 0) + ctx.allowance, admission.cost):
            return result, admission
        # Near a limit: the figures the headers and alerts read are the exact ones.
        bound_cost = ctx.cost
        fewer = await count_exactly(meter, ctx)
        return as_if_exact(result, fewer, bound_cost - ctx.cost), admission
    await count_exactly(meter, ctx)
    tokens = (ctx.prompt_tokens or 0) + ctx.allowance
    return None, exact_admission(admission, tokens, ctx.cost)


async def count_exactly(meter: Meter, ctx: RequestContext) -> int:
    """Replace a request's bounded prompt by its exact count, and its projected cost with it.

    Returns:
        How many tokens fewer the exact count is (0 when the prompt was counted already).
    """
    request = ctx.request
    if not ctx.bounded or request is None:
        return 0
    bound = ctx.prompt_tokens or 0
    ctx.prompt_tokens = exact = await meter.counter.acount(request)
    ctx.bounded = False
    if ctx.cost and ctx.price is not None:
        ctx.cost = ctx.price.projected(exact, ctx.allowance)
    return bound - exact


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


def as_if_exact(result: AdmissionResult, fewer_tokens: int, less_cost: int) -> AdmissionResult:
    """An admitted result restated as a reservation `fewer_tokens` smaller in every token window
    and `less_cost` smaller at every budget level would have left the store.

    A bucket's whole units left grow by exactly the tokens not taken (the level moves by whole
    units of the window); its time to empty is taken down by the whole milliseconds those
    units drain in, which is at most 1 ms later than exact (the reset is a ceiling).
    """
    if not fewer_tokens and not less_cost:
        return result
    rates = result.rates
    if fewer_tokens:
        restated = []
        for state in rates:
            if state.kind == "tokens":
                window_ms = round(state.window * 1000)
                reset_ms = round(state.reset_after * 1000) - fewer_tokens * window_ms // state.limit
                state = replace(
                    state,
                    remaining=min(state.limit, state.remaining + fewer_tokens),
                    reset_after=max(0, reset_ms) / 1000,
                )
            restated.append(state)
        rates = tuple(restated)
    budgets = result.budgets
    if less_cost:
        budgets = tuple(replace(state, spent=state.spent - less_cost) for state in budgets)
    return replace(result, rates=rates, budgets=budgets)


def exact_admission(admission: Admission, tokens: int, cost: int) -> Admission:
    """The admission again with the exact `tokens` in its token windows and the exact `cost`."""
    rates = tuple(
        replace(hit, cost=tokens) if hit.kind == "tokens" else hit for hit in admission.rates
    )
    return replace(admission, rates=rates, cost=cost)
