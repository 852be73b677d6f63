"""The end of a request: what it used, what it cost, one settlement and one spend record.

`finish` settles every reservation of a middleware-metered request once, after its last byte;
`settle_reservations`, `send_settlements` and `spend_record` are the pieces route guards share.
Settlement is shielded from cancellation (a client disconnect cancels the request's task) unless
the store never suspends, and never raises: a settlement the store does not take is logged,
counted and queued in the meter's outbox, to be sent again when the store answers.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

import anyio

from llmfence._usage import Usage, usage_from_json
from llmfence.exceptions import LLMFenceError, StoreError
from llmfence.stores import BudgetScope, Settlement, SpendRecord

from .auth import Principal
from .context import RequestContext
from .lazy import count_exactly
from .meter import Meter
from .plan import budget_scopes

__all__ = [
    "finish",
    "protected",
    "send_settlements",
    "settle_reservations",
    "spend_record",
    "usage_of",
]


def spend_record(
    request_id: str,
    timestamp: float,
    model: str,
    cost: int,
    usage: Usage,
    principal: Principal | None,
    end_user: str | None,
    provenance: Any,
    price_source: str,
    status: int,
    started: float,
    path: str,
) -> SpendRecord:
    """The one builder of spend records, for the middlewares and the route guards alike."""
    if principal is not None:
        who = (principal.key_hash, principal.key_masked, principal.user_id, principal.team_id)
    else:
        who = (None, None, None, None)
    return SpendRecord(
        request_id,
        timestamp,
        model,
        cost,
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_input_tokens,
        *who,
        end_user,
        provenance,
        price_source,
        status,
        round((time.perf_counter() - started) * 1000, 3),
        path,
    )


def usage_of(meter: Meter, ctx: RequestContext) -> tuple[Usage, str]:
    """The request's usage and its provenance, from the response or estimated."""
    prompt = ctx.prompt_tokens or 0
    if ctx.scanner is not None:
        usage = ctx.scanner.finish()
        if ctx.scanner.usage_seen:
            return usage, "provider-reported"
        extra = 0 if ctx.completed else meter.disconnect_extra_tokens
        return Usage(prompt, usage.output_tokens + extra, estimated=True), "estimated"
    if ctx.json_parts is not None and ctx.completed:
        found = usage_from_json(b"".join(ctx.json_parts))
        if found is not None:
            return found, "provider-reported"
    if (ctx.status is not None and ctx.status >= 400) or ctx.app_failed:
        # Providers do not bill failed calls, and an app that raised made none we know of.
        return Usage(estimated=True), "estimated"
    if ctx.status is None:
        # The client left before the response began: what the upstream did is unknown.
        return Usage(prompt, meter.disconnect_extra_tokens, estimated=True), "estimated"
    # A response cut short that is not a stream was generated (and billed) in full before
    # its first byte: charge what was reserved. So is a complete one without usage.
    return Usage(prompt, ctx.allowance, estimated=True), "reservation-only"


async def finish(ctx: RequestContext) -> None:
    """Settle every reservation of the request and write its spend record, once."""
    if ctx.finished:
        return
    ctx.finished = True
    meter = ctx.meter
    if meter.observer is not None:
        meter.observer.request_finished(ctx)
    if not ctx.reservations and not ctx.uncertain and not ctx.record_spend:
        return
    # Counting a prompt nobody counted yet (or only bounded) may go to a worker thread: a
    # suspension point.
    request = ctx.request
    suspends = request is not None and (
        ctx.prompt_tokens is None or (ctx.bounded and meter.counter.may_thread(request))
    )
    with protected(meter, suspends=suspends):
        await _settle(meter, ctx)


def protected(meter: Meter, *, suspends: bool = False) -> AbstractContextManager[Any]:
    """Shield a settlement from cancellation (a client disconnect cancels the request's task),
    unless neither the store nor the settlement itself (`suspends`) ever yields to the event
    loop: then nothing can interrupt it, and a shield is waste."""
    if meter.never_suspends and not suspends:
        return nullcontext()
    return anyio.CancelScope(shield=True)


async def _settle(meter: Meter, ctx: RequestContext) -> None:
    held = [*ctx.reservations, *ctx.uncertain]
    now = meter.clock()
    if ctx.refused or not ctx.app_called:
        # A refused request is never charged: what earlier checks reserved goes back.
        refunds = [Settlement(rid, now, 0, 0, refund_requests=True) for rid in held]
        await send_settlements(meter, refunds)
        return
    await meter.tokens(ctx)  # a recorder without guards has not counted the prompt yet
    usage, provenance = usage_of(meter, ctx)
    if ctx.bounded and usage.estimated and usage.input_tokens:
        # No usage reported, and the prompt was only bounded (`_core.lazy`): the record and
        # the charge take the exact count, as if it had been counted at admission.
        await count_exactly(meter, ctx)
        usage = replace(usage, input_tokens=ctx.prompt_tokens or 0)
    cost, source = _cost(meter, ctx, usage)
    request = ctx.request
    model = request.model if request is not None else ""
    if meter.observer is not None:
        meter.observer.spent(ctx, model, (usage.input_tokens, usage.output_tokens), cost)
    record = None
    if ctx.record_spend:
        record = spend_record(
            ctx.request_id,
            ctx.now,
            model,
            cost,
            usage,
            ctx.principal,
            ctx.end_user,
            provenance,
            source,
            ctx.status if ctx.completed and ctx.status is not None else _cut_short(ctx),
            ctx.started,
            ctx.path,
        )
    tokens = usage.input_tokens + usage.output_tokens
    charges = ctx.charges
    # Each admission's settlement names the levels it reserved: should the admission never
    # have reached the store (it failed open), the cost still lands there.
    settlements = [
        Settlement(rid, now, cost, tokens, None, False, charges.get(rid, ())) for rid in held
    ]
    if not charges:
        # No admission reserved the cost (a recorder without a budget guard, or none was
        # sent): it lands at every tracked level, with the record, under the request's own id.
        scopes = ctx.budget_scopes
        if not scopes:
            named = model if request is not None else None
            scopes = budget_scopes(meter.tracking, ctx.principal, ctx.end_user, named, ctx.now)
        settlements.append(Settlement(ctx.request_id, now, cost, None, record, False, scopes))
    elif record is not None:
        settlements[0] = replace(settlements[0], record=record)
    await send_settlements(meter, settlements)


async def settle_reservations(
    meter: Meter,
    request_ids: list[str],
    cost: int,
    tokens: int | None,
    record: SpendRecord | None,
    *,
    refund: bool = False,
    charges: tuple[BudgetScope, ...] = (),
) -> None:
    """Settle reservations with the actual cost; the record goes with the first, and the
    first names the levels that take the cost should it hold no reservation."""
    now = meter.clock()
    settlements = [Settlement(rid, now, cost, tokens, None, refund, ()) for rid in request_ids]
    if settlements:
        settlements[0] = replace(settlements[0], record=record, charges=charges)
    await send_settlements(meter, settlements)


async def send_settlements(meter: Meter, settlements: list[Settlement]) -> None:
    """Send settlements in order. Those the store does not take go to the outbox (logged and
    counted), to be sent again when it answers; nothing here raises."""
    store = meter.store
    for index, settlement in enumerate(settlements):
        try:
            await meter.call(store.settle(settlement))
        except StoreError as error:
            meter.degraded("settle", error, settlement.request_id)
            # The rest would only wait for the same timeout: they queue behind it.
            meter.outbox.put(settlements[index:])
            return
    outbox = meter.outbox
    # The store answered: if settlements wait and no lifespan task drains them, a few go
    # now (after the response: nothing waits for them but this request's task).
    if outbox.depth and not outbox.running and outbox.due():
        await outbox.drain(meter.resend, limit=8)


def _cost(meter: Meter, ctx: RequestContext, usage: Usage) -> tuple[int, str]:
    if ctx.request is None:
        return 0, ""
    price = ctx.price
    if price is None:
        try:
            price = ctx.price = meter.prices.price_for(ctx.request.model)
        except LLMFenceError:
            return 0, "unknown"
    return price.cost(usage), price.source


def _cut_short(ctx: RequestContext) -> int:
    return 500 if ctx.app_failed else 499  # 499: the client closed the request
