"""llmfence: budgets, rate limits and key auth for LLM endpoints, as pure-ASGI middlewares."""

from __future__ import annotations

from importlib.metadata import version as _version

from .exceptions import (
    BudgetExceededError,
    ConfigurationError,
    InvalidRequestError,
    LLMFenceError,
    RateLimitExceededError,
    RequestTooLargeError,
    StoreError,
    UnknownModelError,
)

__version__ = _version("llmfence")

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
