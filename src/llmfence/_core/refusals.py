"""Refusals as OpenAI-shaped errors, and the rate-limit headers of metered responses.

Messages name the level, its current value, its limit and when it resets, and never a key or its
hash (levels carry a masked key as their label).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

from llmfence._money import nano_to_decimal, nano_to_usd
from llmfence.exceptions import BudgetExceededError, LLMFenceError, RateLimitExceededError
from llmfence.stores import RateState, Refusal

__all__ = ["error_headers", "format_reset", "rate_limit_headers", "refusal_error"]

_UNITS = {"requests": "requests", "tokens": "tokens"}


def _usd(nano: int) -> str:
    text = format(nano_to_decimal(nano).normalize(), "f")
    return f"${text}"


def _when(resets_at: float) -> str:
    return datetime.fromtimestamp(resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def refusal_error(refusal: Refusal, window: float = 60.0) -> LLMFenceError:
    """The exception a refusal is answered with (its `to_openai()` is the response body)."""
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
            f"{resets}",
            scope=refusal.level,
            resets_at=refusal.resets_at,
        )
    if refusal.reason == "parallel_requests":
        message = (
            f"Too many parallel requests for {who}: limit {refusal.limit}, "
            f"in flight {refusal.current}."
        )
    else:
        per = f"per {window:g}s" if window != 60 else "per minute"
        unit = _UNITS[refusal.reason]
        if refusal.retry_after is None:
            message = (
                f"Request too large for {who} on {unit} {per}: limit {refusal.limit}, "
                f"requested {refusal.requested}. Reduce the input or max_tokens."
            )
        else:
            message = (
                f"Rate limit reached for {who} on {unit} {per}: limit {refusal.limit}, "
                f"used {refusal.current}, requested {refusal.requested}. Please try again in "
                f"{format_reset(refusal.retry_after)}."
            )
    return RateLimitExceededError(
        message,
        kind=refusal.reason,
        scope=refusal.level,
        limit=refusal.limit,
        current=refusal.current,
        retry_after=refusal.retry_after,
    )


def error_headers(error: LLMFenceError, now: float) -> list[tuple[bytes, bytes]]:
    """Headers that go with an error response: when to retry, and whether to at all."""
    if isinstance(error, BudgetExceededError):
        # Budgets must not look retryable: OpenAI's SDKs retry every 429 unless told not to.
        headers = [(b"x-should-retry", b"false")]
        if error.resets_at is not None:
            wait = max(1, math.ceil(error.resets_at - now))
            headers.append((b"retry-after", str(wait).encode()))
            headers.append((b"x-llmfence-budget-reset", _when(error.resets_at).encode()))
        return headers
    if isinstance(error, RateLimitExceededError):
        if error.retry_after is None:
            return [(b"x-should-retry", b"false")]
        return [
            (b"retry-after", str(max(1, math.ceil(error.retry_after))).encode()),
            (b"retry-after-ms", str(max(1, math.ceil(error.retry_after * 1000))).encode()),
        ]
    if error.status_code == 503:
        return [(b"retry-after", b"1")]
    return []


def format_reset(seconds: float) -> str:
    """A duration as OpenAI's `x-ratelimit-reset-*` headers write it: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    minutes, rest = divmod(seconds, 60)
    rest_text = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{rest_text}" if minutes else rest_text


def rate_limit_headers(states: Sequence[RateState]) -> list[tuple[bytes, bytes]]:
    """OpenAI's `x-ratelimit-*` headers and the IETF draft `RateLimit-Policy`/`RateLimit`.

    OpenAI's headers report, per kind, the tightest level (fewest remaining). The IETF fields
    list one policy per level and kind, named like `"key-requests"`.
    """
    headers: list[tuple[bytes, bytes]] = []
    policies: list[str] = []
    current: list[str] = []
    for kind in ("requests", "tokens"):
        of_kind = [s for s in states if s.kind == kind]
        if not of_kind:
            continue
        tightest = min(of_kind, key=lambda s: (s.remaining, -s.reset_after))
        headers += [
            (f"x-ratelimit-limit-{kind}".encode(), str(tightest.limit).encode()),
            (f"x-ratelimit-remaining-{kind}".encode(), str(tightest.remaining).encode()),
            (f"x-ratelimit-reset-{kind}".encode(), format_reset(tightest.reset_after).encode()),
        ]
        for state in of_kind:
            name = f'"{state.level}-{kind}"'
            unit = "" if kind == "requests" else ';qu="tokens"'
            policies.append(f"{name};q={state.limit};w={math.ceil(state.window)}{unit}")
            current.append(f"{name};r={state.remaining};t={math.ceil(state.reset_after)}")
    if policies:
        headers.append((b"ratelimit-policy", ", ".join(policies).encode()))
        headers.append((b"ratelimit", ", ".join(current).encode()))
    return headers
