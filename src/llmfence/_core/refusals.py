"""Refusals as errors: what a store's `Refusal` says, in words a client can act on.

Messages name the level, its current value, its limit and when it resets, and never a key or its
hash (levels carry a masked key as their label).
"""

from __future__ import annotations

from datetime import UTC, datetime

from llmfence._money import nano_to_decimal, nano_to_usd
from llmfence.exceptions import BudgetExceededError, LLMFenceError, RateLimitExceededError
from llmfence.stores import Refusal

__all__ = ["format_reset", "refusal_error"]

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
