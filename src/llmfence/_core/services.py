"""`Services`: the few long-lived objects an adapter needs, instead of the whole `Fence`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmfence.stores import Store

from .auth import Authenticator
from .checks import BudgetCheck
from .meter import Meter

__all__ = ["Services"]


@dataclass(frozen=True, slots=True, eq=False)
class Services:
    """What route guards and `Fence.charge` work with.

    Attributes:
        meter: Store calls, prices, token counts, the clock.
        authenticator: Keys to principals.
        budgets: The app's budget levels and periods (global, end user), where spend lands.
        limits_on_store_error: Rate limits' outage policy, `"fail_open"` or `"fail_closed"`.
        trusted_proxies: Reverse proxies in front of the app that append to X-Forwarded-For.
    """

    meter: Meter
    authenticator: Authenticator
    budgets: BudgetCheck
    limits_on_store_error: str = "fail_open"
    trusted_proxies: int = 0

    @property
    def store(self) -> Store:
        """The store every call goes to."""
        return self.meter.store

    @property
    def clock(self) -> Callable[[], float]:
        """Unix time."""
        return self.meter.clock
