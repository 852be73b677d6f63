"""HTTP renderings of llmfence's answers: rate-limit headers, retry headers, error responses.

The core says what happened (a `RateState`, a refusal as an `LLMFenceError`); this module says it
in HTTP. Rate-limit headers are on every metered response, so their static parts (the header
names, each policy's `q=`/`w=` text) are built once per policy and reused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime

from starlette.types import Send

from llmfence._core.auth import KEY_HEADERS
from llmfence._core.refusals import format_reset
from llmfence._request import LLMRequest, endpoint_for_path
from llmfence.exceptions import BudgetExceededError, LLMFenceError, RateLimitExceededError
from llmfence.stores import RateState

__all__ = ["api_key", "error_headers", "is_anthropic", "rate_limit_headers", "send_error"]

_NAMES = {
    kind: tuple(f"x-ratelimit-{what}-{kind}".encode() for what in ("limit", "remaining", "reset"))
    for kind in ("requests", "tokens")
}
# (level, kind, limit, window) -> (the policy's name, its RateLimit-Policy item); bounded by the
# distinct limits in use, cleared if it ever grows past that.
_POLICIES: dict[tuple[str, str, int, float], tuple[str, str]] = {}
_MAX_POLICIES = 4096


def _policy(state: RateState) -> tuple[str, str]:
    known = (state.level, state.kind, state.limit, state.window)
    found = _POLICIES.get(known)
    if found is None:
        name = f'"{state.level}-{state.kind}"'
        unit = "" if state.kind == "requests" else ';qu="tokens"'
        found = (name, f"{name};q={state.limit};w={math.ceil(state.window)}{unit}")
        if len(_POLICIES) >= _MAX_POLICIES:
            _POLICIES.clear()
        _POLICIES[known] = found
    return found


def rate_limit_headers(states: Sequence[RateState]) -> list[tuple[bytes, bytes]]:
    """OpenAI's `x-ratelimit-*` headers and the IETF draft `RateLimit-Policy`/`RateLimit`.

    OpenAI's headers report, per kind, the tightest level (fewest remaining). The IETF fields
    list one policy per level and kind, named like `"key-requests"`.
    """
    if not states:
        return []
    headers: list[tuple[bytes, bytes]] = []
    policies: list[str] = []
    current: list[str] = []
    for kind, names in _NAMES.items():
        tightest: RateState | None = None
        for state in states:
            if state.kind != kind:
                continue
            if (
                tightest is None
                or state.remaining < tightest.remaining
                or (
                    state.remaining == tightest.remaining
                    and state.reset_after > tightest.reset_after
                )
            ):
                tightest = state
            name, policy = _policy(state)
            policies.append(policy)
            current.append(f"{name};r={state.remaining};t={math.ceil(state.reset_after)}")
        if tightest is not None:
            headers.append((names[0], b"%d" % tightest.limit))
            headers.append((names[1], b"%d" % tightest.remaining))
            headers.append((names[2], _reset(tightest.reset_after)))
    headers.append((b"ratelimit-policy", ", ".join(policies).encode()))
    headers.append((b"ratelimit", ", ".join(current).encode()))
    return headers


# Reset texts by whole milliseconds: formatting one costs more than looking it up.
_RESETS: dict[int, bytes] = {}


def _reset(seconds: float) -> bytes:
    millis = round(seconds * 1000)
    text = _RESETS.get(millis)
    if text is None:
        text = format_reset(millis / 1000).encode()
        if len(_RESETS) >= _MAX_POLICIES:
            _RESETS.clear()
        _RESETS[millis] = text
    return text


def _when(resets_at: float) -> str:
    return datetime.fromtimestamp(resets_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


async def send_error(
    send: Send,
    error: LLMFenceError,
    now: float,
    extra: Sequence[tuple[bytes, bytes]] = (),
    *,
    anthropic: bool = False,
) -> None:
    """Send an error response (never raise through the app): OpenAI-shaped, or Anthropic's
    shape with `anthropic` (a request to Anthropic's API), with the same status and headers."""
    body = json.dumps(error.to_anthropic() if anthropic else error.to_openai()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        *error_headers(error, now),
        *extra,
    ]
    await send({"type": "http.response.start", "status": error.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def is_anthropic(request: LLMRequest | None, path: str) -> bool:
    """Whether a refusal speaks Anthropic's error shape: the parsed body's API (`messages`),
    else, for a request refused before its body was parsed, its path (`*/messages`)."""
    if request is not None:
        return request.endpoint == "messages"
    return endpoint_for_path(path) == "messages"


# The core's list of where clients put a key besides `Authorization: Bearer`, as raw names.
_KEY_HEADERS = tuple(name.encode() for name in KEY_HEADERS)


def api_key(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The request's API key: `Authorization: Bearer`, else `x-api-key`, `api-key`,
    `x-goog-api-key` (OpenAI's, Anthropic's, Azure's and Google's SDKs), in that order."""
    others: dict[bytes, bytes] = {}
    for name, value in headers:
        name = name.lower()
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name in _KEY_HEADERS and value.strip():
            others.setdefault(name, value)
    for name in _KEY_HEADERS:
        if name in others:
            return others[name].decode("latin-1").strip()
    return None
