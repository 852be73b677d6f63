"""The pure-ASGI middlewares: thin adapters over llmfence's checks."""

from __future__ import annotations

from ._paths import PathRules
from .auth import KeyAuthMiddleware
from .budget import BudgetGuardMiddleware, SpendRecorderMiddleware
from .limits import (
    ParallelRequestLimitMiddleware,
    RequestRateLimitMiddleware,
    TokenRateLimitMiddleware,
)

__all__ = [
    "BudgetGuardMiddleware",
    "KeyAuthMiddleware",
    "ParallelRequestLimitMiddleware",
    "PathRules",
    "RequestRateLimitMiddleware",
    "SpendRecorderMiddleware",
    "TokenRateLimitMiddleware",
]
