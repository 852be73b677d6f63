"""Refusals as errors: what a store's `Refusal` says, in words a client can act on.

Messages name the level, its current value, its limit and when it resets, and never a key or its
hash (levels carry a masked key as their label). `note_refusal` is where every refusal an engine
answers is logged (`llmfence.refusals`, with the same facts as fields) and counted.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from llmfence._logs import iso, log_refusal
from llmfence._money import nano_to_decimal, nano_to_usd
from llmfence.exceptions import (
    BudgetExceededError,
    InvalidRequestError,
    LLMFenceError,
    RateLimitExceededError,
    RequestTooLargeError,
    StoreError,
)
from llmfence.stores import Refusal

if TYPE_CHECKING:
    from .context import RequestContext
    from .meter import Meter

__all__ = ["format_reset", "note_refusal", "refusal_error", "refusal_kind"]

_UNITS = {"requests": "requests", "tokens": "tokens"}
_PER = {1.0: "per second", 60.0: "per minute", 3600.0: "per hour", 86_400.0: "per day"}


def _usd(nano: int) -> str:
    text = format(nano_to_decimal(nano).normalize(), "f")
    return f"${text}"


def _when(resets_at: float) -> str:
    return datetime.fromtimestamp(resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def refusal_error(
    refusal: Refusal, window: float = 60.0, *, max_tokens: bool = True, fit: int | None = None
) -> LLMFenceError:
    """The exception a refusal is answered with (its `to_openai()` is the response body).

    Args:
        refusal: What the store refused.
        window: The refusing window's length, in seconds.
        max_tokens: Whether the client named a `max_tokens` (a message never names one the
            client did not send).
        fit: The largest `max_tokens` that would fit now, to tell the client.
    """
    hint = f" The largest max_tokens that fits now is {fit}." if max_tokens and fit else ""
    who = f"{refusal.level} {refusal.label}" if refusal.level != "global" else "this service"
    if refusal.reason == "budget":
        resets = (
            f" It resets at {_when(refusal.resets_at)}."
            if refusal.resets_at is not None
            else " It does not reset."
        )
        return BudgetExceededError(
            nano_to_usd(refusal.current),
            nano_to_usd(refusal.limit),
            f"Budget exceeded for {who}: spent {_usd(refusal.current)} of "
            f"{_usd(refusal.limit)}; this request needs up to {_usd(refusal.requested)}."
            f"{hint}{resets}",
            scope=refusal.level,
            resets_at=refusal.resets_at,
        )
    if refusal.reason == "parallel_requests":
        message = (
            f"Too many parallel requests for {who}: limit {refusal.limit}, "
            f"in flight {refusal.current}."
        )
    else:
        per = _PER.get(window, f"per {window:g}s")
        unit = _UNITS[refusal.reason]
        if refusal.retry_after is None:
            message = (
                f"Request too large for {who} on {unit} {per}: limit {refusal.limit}, "
                f"requested {refusal.requested}. "
                f"{'Reduce the input or max_tokens.' if max_tokens else 'Reduce the input.'}"
                f"{hint}"
            )
        else:
            message = (
                f"Rate limit reached for {who} on {unit} {per}: limit {refusal.limit}, "
                f"used {refusal.current}, requested {refusal.requested}. Please try again in "
                f"{format_reset(refusal.retry_after)}.{hint}"
            )
    return RateLimitExceededError(
        message,
        kind=refusal.reason,
        scope=refusal.level,
        limit=refusal.limit,
        current=refusal.current,
        retry_after=refusal.retry_after,
    )


def format_reset(seconds: float) -> str:
    """A duration as OpenAI's `x-ratelimit-reset-*` headers write it: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    rest_text = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{rest_text}" if minutes else rest_text


def refusal_kind(error: LLMFenceError) -> str:
    """Which of `_core.observe.REFUSAL_KINDS` an error answers a request with."""
    if isinstance(error, RateLimitExceededError):
        return "request_too_large" if error.retry_after is None else error.kind
    if isinstance(error, BudgetExceededError):
        return "budget_exceeded"
    if isinstance(error, StoreError):
        return "store_unavailable"
    if isinstance(error, RequestTooLargeError):
        return "request_too_large"
    if isinstance(error, InvalidRequestError):
        return "invalid_request"
    if error.code in ("invalid_api_key", "model_not_allowed"):
        return error.code
    return "invalid_request"


def note_refusal(
    meter: Meter, error: LLMFenceError, ctx: RequestContext | None, path: str = ""
) -> None:
    """Mark a request refused, log it (INFO, `llmfence.refusals`) and count it."""
    reason = refusal_kind(error)
    if ctx is not None:
        ctx.refused = True
    log_refusal(reason, error.status_code, error.message, _fields(error, ctx, path))
    observer = meter.observer
    if observer is not None:
        observer.refused(reason, ctx)


def _fields(error: LLMFenceError, ctx: RequestContext | None, path: str) -> dict[str, Any]:
    """The refusal's facts as `llmfence_*` log fields: who, which level, its limit, its value
    and when it resets. A key shows as its masked form only."""
    fields: dict[str, Any] = {"llmfence_path": path}
    if ctx is not None:
        request, principal = ctx.request, ctx.principal
        fields["llmfence_request_id"] = ctx.request_id
        fields["llmfence_path"] = ctx.path
        fields["llmfence_model"] = request.model if request is not None else None
        fields["llmfence_end_user"] = ctx.end_user
        if principal is not None:
            fields["llmfence_key"] = principal.key_masked
            fields["llmfence_user"] = principal.user_id
            fields["llmfence_team"] = principal.team_id
        refusal = ctx.refusal
        if refusal is not None:
            budget = refusal.reason == "budget"
            numbers: tuple[float, ...] = (refusal.current, refusal.limit, refusal.requested)
            if budget:  # nano-USD to USD, for people and dashboards
                numbers = tuple(nano_to_usd(int(n)) for n in numbers)
            value, limit, requested = numbers
            resets_at = refusal.resets_at
            if resets_at is None and refusal.retry_after is not None:
                resets_at = ctx.now + refusal.retry_after
            fields.update(
                llmfence_level=refusal.level,
                llmfence_scope=refusal.label,
                llmfence_unit="usd" if budget else refusal.reason,
                llmfence_limit=limit,
                llmfence_value=value,
                llmfence_requested=requested,
                llmfence_retry_after=refusal.retry_after,
                llmfence_reset=iso(resets_at),
            )
            return fields
    scope = getattr(error, "scope", None)
    if scope is not None:
        fields["llmfence_level"] = scope
    return fields
