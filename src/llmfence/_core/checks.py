"""The checks a request can go through: plain, validated configuration.

Each llmfence middleware contributes checks; one engine runs all the checks of a stack. What a
check asks of the store for a given caller (which windows, leases and budget levels, with which
limits) is worked out once per caller in `_core.plan`; the `Meter` sends every check of one
request to the store in one step. Checks hold configuration only, never per-request state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import limits

from llmfence._duration import parse_duration
from llmfence._fields import checked_limit
from llmfence._money import usd_to_nano
from llmfence.exceptions import ConfigurationError
from llmfence.stores._types import RateKind

from .auth import Authenticator

__all__ = [
    "AuthCheck",
    "BudgetCheck",
    "Check",
    "ParallelCheck",
    "RateCheck",
    "RecordCheck",
    "check_end_user_scope",
    "check_window",
    "checked_limit",
    "parse_rate",
]

OutagePolicy = str  # "fail_open" | "fail_closed"


def parse_rate(rate: str) -> tuple[int, float]:
    """A rate in the `limits` notation (`"100/minute"`, `"20000 per 2 minutes"`) as
    `(amount, window seconds)`.

    Raises:
        ConfigurationError: The string is not a rate `limits` understands.
    """
    try:
        item = limits.parse(rate)
    except ValueError as error:
        raise ConfigurationError(f"Invalid rate {rate!r}: {error}") from error
    return item.amount, float(item.get_expiry())


def check_window(window: float) -> None:
    """Refuse a window that is not a finite number of seconds of at least a millisecond."""
    if not isinstance(window, int | float) or not math.isfinite(window) or window < 0.001:
        raise ConfigurationError(f"window must be at least 0.001 seconds, not {window!r}")


END_USER_SCOPES = ("global", "team", "key")


def check_end_user_scope(value: str) -> None:
    """Refuse an `end_user_scope` that is not `"global"`, `"team"` or `"key"`."""
    if value not in END_USER_SCOPES:
        raise ConfigurationError(f"end_user_scope must be one of {END_USER_SCOPES}, not {value!r}")


def _policy(value: str) -> str:
    if value not in ("fail_open", "fail_closed"):
        raise ConfigurationError(
            f"on_store_error must be 'fail_open' or 'fail_closed', not {value!r}"
        )
    return value


@dataclass(frozen=True, slots=True)
class Check:
    """What every check shares.

    Attributes:
        on_store_error: `"fail_open"` lets requests through while the store is unreachable;
            `"fail_closed"` answers 503.
        shadow: Evaluate, record and emit headers, but never refuse.
    """

    on_store_error: str = "fail_open"
    shadow: bool = False

    def __post_init__(self) -> None:
        _policy(self.on_store_error)


@dataclass(frozen=True, slots=True)
class RateCheck(Check):
    """Requests (RPM) or tokens (TPM) per window, as a token bucket, per key, user and team.

    Attributes:
        kind: `"requests"` or `"tokens"`.
        default_limit: Applies per key when the key's record sets none (and to unauthenticated
            requests as one shared bucket).
        window: Window length in seconds.
        end_user_limit: The limit of each end user the request bodies name, or `None`.
        end_user_scope: Whose namespace an end-user id is in: `"global"` (one `bob` for every
            tenant, as LiteLLM), `"team"` or `"key"` (each tenant its own `bob`).
    """

    kind: RateKind = "requests"
    default_limit: int | None = None
    window: float = 60.0
    end_user_limit: int | None = None
    end_user_scope: str = "global"

    def __post_init__(self) -> None:
        Check.__post_init__(self)
        if self.kind not in ("requests", "tokens"):
            raise ConfigurationError(f"kind must be 'requests' or 'tokens', not {self.kind!r}")
        checked_limit("default_limit", self.default_limit)
        checked_limit("end_user_limit", self.end_user_limit)
        check_window(self.window)
        check_end_user_scope(self.end_user_scope)


@dataclass(frozen=True, slots=True)
class ParallelCheck(Check):
    """Concurrent requests in flight, per key, user and team.

    Attributes:
        default_limit: Applies per key when the key's record sets none.
        lease_ttl: Seconds after which a lease frees itself if its worker died.
    """

    default_limit: int | None = None
    lease_ttl: float = 600.0

    def __post_init__(self) -> None:
        Check.__post_init__(self)
        checked_limit("default_limit", self.default_limit)


@dataclass(frozen=True, slots=True)
class BudgetCheck(Check):
    """USD budgets at every level: global, team, user, key, end user and per model on a key.

    Attributes:
        max_budget: Whole-app budget in USD, or `None`.
        budget_duration: How often the whole-app budget resets.
        max_end_user_budget: Budget of each end user named by a request body, or `None`.
        end_user_budget_duration: How often end-user budgets reset.
        calendar_aligned: Align periods to UTC calendar boundaries instead of rolling.
        clamp_max_tokens: Lower `max_tokens` to what the tightest budget can pay for instead
            of refusing.
        end_user_scope: Whose namespace an end-user id is in (see `RateCheck`).
    """

    on_store_error: str = "fail_closed"
    max_budget: float | None = None
    budget_duration: str | None = None
    max_end_user_budget: float | None = None
    end_user_budget_duration: str | None = None
    calendar_aligned: bool = False
    clamp_max_tokens: bool = False
    end_user_scope: str = "global"

    def __post_init__(self) -> None:
        Check.__post_init__(self)
        check_end_user_scope(self.end_user_scope)
        for name in ("max_budget", "max_end_user_budget"):
            value = getattr(self, name)
            if value is not None and usd_to_nano(value) < 0:
                raise ConfigurationError(f"{name} must not be negative")
        for duration in (self.budget_duration, self.end_user_budget_duration):
            if duration is not None:
                parse_duration(duration)


@dataclass(frozen=True, slots=True)
class RecordCheck:
    """Write one spend record per metered request (what `SpendRecorderMiddleware` adds)."""


@dataclass(frozen=True, slots=True, eq=False)
class AuthCheck:
    """Resolve the caller's key to a principal, and check its model access.

    Attributes:
        master_key: The key that may do everything.
        access_groups: Model access groups defined in code.
        cache_ttl: Seconds principals are cached.
        authenticator: A shared authenticator (what `Fence` passes); else the engine builds
            one over its store from the fields above.
    """

    master_key: str | None = None
    access_groups: Mapping[str, Iterable[str]] | None = None
    cache_ttl: float = 5.0
    authenticator: Authenticator | None = field(default=None)
