"""The exceptions llmfence raises.

Every exception derives from `LLMFenceError`::

    LLMFenceError
    ├── ConfigurationError          (also a ValueError) bad option, duration, price…
    ├── InvalidRequestError         a request body llmfence cannot meter → HTTP 400
    │   ├── RequestTooLargeError    over the body cap, or over a whole limit → HTTP 413
    │   └── UnknownModelError       no price for the model and no fallback → HTTP 400
    ├── StoreError                  the store failed or timed out → HTTP 503 when closed
    ├── RateLimitExceededError      a requests/tokens/parallel limit refused → HTTP 429
    ├── BudgetExceededError         a USD budget refused → HTTP 429 insufficient_quota
    ├── UnknownUserError            (also a KeyError) `BudgetManager` has no such user
    └── AuthError                   (internal) no key, a bad key → 401; a forbidden model → 403

Over HTTP the middlewares never raise these through the app: they send the OpenAI-shaped
error response that `LLMFenceError.to_openai()` describes, or on Anthropic's API (`/v1/messages`)
Anthropic's shape, `LLMFenceError.to_anthropic()`, with the same status and headers. Python APIs
(`BudgetManager`, the per-route guards) raise them.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BudgetExceededError",
    "ConfigurationError",
    "InvalidRequestError",
    "LLMFenceError",
    "RateLimitExceededError",
    "RequestTooLargeError",
    "StoreError",
    "UnknownModelError",
]


class LLMFenceError(Exception):
    """Root of every llmfence exception.

    Attributes:
        status_code: The HTTP status the middlewares answer with.
        code: OpenAI's `error.code`.
        type: OpenAI's `error.type`.
        param: OpenAI's `error.param`, the offending field when there is one.
    """

    status_code: int = 500
    code: str = "internal_error"
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    @property
    def anthropic_type(self) -> str:
        """Anthropic's `error.type` for this error's status (`"rate_limit_error"` for 429…)."""
        return _ANTHROPIC_TYPES.get(self.status_code, "api_error")

    def to_anthropic(self) -> dict[str, Any]:
        """Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`."""
        return {"type": "error", "error": {"type": self.anthropic_type, "message": self.message}}

    def to_openai(self) -> dict[str, Any]:
        """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# Anthropic's documented error types, by HTTP status; any other status is an `api_error`. A
# budget refusal is a 429 like a rate limit (its headers say not to retry), and a store outage
# (503) is the temporary unavailability Anthropic calls `overloaded_error`.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class ConfigurationError(LLMFenceError, ValueError):
    """An option, duration, price or limit given to llmfence is not valid."""

    code = "configuration_error"


class InvalidRequestError(LLMFenceError):
    """The request body cannot be metered: not JSON, not an object, wrong types, bad numbers."""

    status_code = 400
    code = "invalid_request_error"
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param)
        if code is not None:
            self.code = code


class RequestTooLargeError(InvalidRequestError):
    """The body is over the size cap."""

    status_code = 413
    code = "request_too_large"


class UnknownModelError(InvalidRequestError):
    """No price is known for the model and the unknown-model policy is `reject`."""

    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"No price is known for model {model!r}; configure a price override or a "
            "fallback price to allow it.",
            param="model",
        )
        self.model = model


class StoreError(LLMFenceError):
    """The store failed, timed out or is unreachable. Raised `from` the backend's exception."""

    status_code = 503
    code = "store_unavailable"
    type = "service_unavailable"


class RateLimitExceededError(LLMFenceError):
    """A requests, tokens or parallel-requests limit refused the call.

    Attributes:
        kind: `"requests"`, `"tokens"` or `"parallel_requests"`.
        scope: The level that refused, e.g. `"key"`, `"user"`, `"team"`.
        limit: The limit of that level.
        current: What that level has in use now.
        retry_after: Seconds until the call could pass, or `None` when it never can.
    """

    status_code = 429
    code = "rate_limit_exceeded"

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        scope: str,
        limit: int,
        current: int,
        retry_after: float | None,
    ) -> None:
        super().__init__(message)
        self.type = kind
        self.kind = kind
        self.scope = scope
        self.limit = limit
        self.current = current
        self.retry_after = retry_after


class BudgetExceededError(LLMFenceError):
    """A USD budget refused the call (LiteLLM's `BudgetExceededError`, same attributes).

    Attributes:
        current_cost: What the budget has spent in this period, in USD.
        max_budget: The budget, in USD.
        scope: The level that refused (`"global"`, `"team"`, `"user"`, `"key"`, `"end_user"`,
            `"model"`), when known.
        resets_at: Unix time when the period rolls, or `None` when it never does.
    """

    status_code = 429
    code = "insufficient_quota"
    type = "budget_exceeded"

    def __init__(
        self,
        current_cost: float,
        max_budget: float,
        message: str | None = None,
        *,
        scope: str | None = None,
        resets_at: float | None = None,
    ) -> None:
        if message is None:
            message = (
                f"Budget has been exceeded! Current cost: {current_cost}, Max budget: {max_budget}"
            )
        super().__init__(message)
        self.current_cost = current_cost
        self.max_budget = max_budget
        self.scope = scope
        self.resets_at = resets_at
