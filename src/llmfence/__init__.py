"""llmfence: budgets, rate limits and key auth for LLM endpoints, as pure-ASGI middlewares."""

from __future__ import annotations

from importlib.metadata import version as _version

from ._core.alerts import BudgetAlert
from ._duration import Duration, parse_duration
from ._fence import Fence
from ._pricing import ModelPrice, PriceBook, PriceOverride
from ._request import LLMRequest, parse_request
from ._tokens import TokenCounter
from ._usage import StreamUsageScanner, Usage, UsageChunkFilter, usage_from_json
from .budget_manager import BudgetManager, UnknownUserError
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
from .guards import Permit, RouteGuard
from .middleware import (
    BudgetGuardMiddleware,
    KeyAuthMiddleware,
    ParallelRequestLimitMiddleware,
    PathRules,
    RequestRateLimitMiddleware,
    SpendRecorderMiddleware,
    TokenRateLimitMiddleware,
)
from .stores import MemoryStore, SQLiteStore, Store, store_from_url
from .stores.redis import RedisStore

__version__ = _version("llmfence")

__all__ = [
    "BudgetAlert",
    "BudgetExceededError",
    "BudgetGuardMiddleware",
    "BudgetManager",
    "ConfigurationError",
    "Duration",
    "Fence",
    "InvalidRequestError",
    "KeyAuthMiddleware",
    "LLMFenceError",
    "LLMRequest",
    "MemoryStore",
    "ModelPrice",
    "ParallelRequestLimitMiddleware",
    "PathRules",
    "Permit",
    "PriceBook",
    "PriceOverride",
    "RateLimitExceededError",
    "RedisStore",
    "RequestRateLimitMiddleware",
    "RequestTooLargeError",
    "RouteGuard",
    "SQLiteStore",
    "SpendRecorderMiddleware",
    "Store",
    "StoreError",
    "StreamUsageScanner",
    "TokenCounter",
    "TokenRateLimitMiddleware",
    "UnknownModelError",
    "UnknownUserError",
    "Usage",
    "UsageChunkFilter",
    "parse_duration",
    "parse_request",
    "store_from_url",
    "usage_from_json",
]
