"""The rate limiters: requests per minute, tokens per minute, requests in flight."""

from __future__ import annotations

from starlette.types import ASGIApp

from llmfence._core.checks import Check, ParallelCheck, RateCheck, parse_rate
from llmfence._core.meter import Meter
from llmfence._fields import checked_limit
from llmfence._options import (
    checked_bool,
    checked_int,
    checked_policy,
    checked_seconds,
    checked_store,
)
from llmfence.exceptions import ConfigurationError
from llmfence.stores import Store
from llmfence.stores._types import RateKind

from ._base import DEFAULT_MAX_BODY_SIZE, FenceMiddleware
from ._paths import PathRules

__all__ = [
    "ParallelRequestLimitMiddleware",
    "RequestRateLimitMiddleware",
    "TokenRateLimitMiddleware",
]


def _common(store: object, on_store_error: object, shadow: object, max_body_size: object) -> None:
    checked_store(store)
    checked_policy("on_store_error", on_store_error)
    checked_bool("shadow", shadow)
    checked_int("max_body_size", max_body_size, low=1)


class _CheckMiddleware(FenceMiddleware):
    """A middleware that adds one check to its stack's admission."""

    def __init__(
        self,
        app: ASGIApp,
        check: Check,
        *,
        store: Store | None,
        meter: Meter | None,
        paths: PathRules | None,
        max_body_size: int,
    ) -> None:
        super().__init__(
            app, (check,), store=store, meter=meter, paths=paths, max_body_size=max_body_size
        )
        self.limit_check = check


class _RateLimitMiddleware(_CheckMiddleware):
    """A token-bucket limit in requests or tokens; the subclasses name which."""

    kind: RateKind

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store | None = None,
        limit: int | None = None,
        window: float = 60.0,
        rate: str | None = None,
        end_user_limit: int | None = None,
        end_user_scope: str = "global",
        on_store_error: str = "fail_open",
        shadow: bool = False,
        defer: bool = False,
        meter: Meter | None = None,
        paths: PathRules | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        # Checked here, under the names the caller wrote (the check's own would be its fields').
        if rate is not None:
            if not isinstance(rate, str):
                raise ConfigurationError(f"rate must be a string like '100/minute', not {rate!r}")
            limit, window = parse_rate(rate)
        checked_limit("limit", limit)
        checked_seconds("window", window)
        checked_limit("end_user_limit", end_user_limit)
        _common(store, on_store_error, shadow, max_body_size)
        check = RateCheck(
            on_store_error, shadow, self.kind, limit, window, end_user_limit, end_user_scope
        )
        super().__init__(
            app, check, store=store, meter=meter, paths=paths, max_body_size=max_body_size
        )


class RequestRateLimitMiddleware(_RateLimitMiddleware):
    """Requests per minute (RPM), per key, user and team, as a token bucket: a burst of up to
    the limit, then room back at the limit's rate (and `rpd_limit` per day from the records).

    Limits come from the key, user and team records (`rpm_limit`); `limit` applies per key
    when the key's record sets none, and to unauthenticated requests as one shared bucket.

    Args:
        app: The ASGI app to protect.
        store: The store (ignored when `meter` is given).
        limit: The default requests per window, or `None` for records' limits only.
        window: Window length in seconds.
        rate: `limit` and `window` at once, in the `limits` notation: `"100/minute"`.
        end_user_limit: The requests per window of each end user a request body names (`user`),
            or `None`.
        end_user_scope: `"global"` (default: one `bob` for every tenant, as LiteLLM) or
            `"team"` / `"key"` (each tenant's end users are its own).
        on_store_error: `"fail_open"` (default) or `"fail_closed"` while the store is down.
        shadow: Evaluate and emit headers, but never refuse.
        defer: Ignored, kept for compatibility: adjacent llmfence middlewares always send
            their checks in one step.
        meter: A shared meter (what `Fence` passes).
        paths: Which paths are metered and which are exempt.
        max_body_size: Largest request body accepted on a metered path, in bytes.
    """

    kind = "requests"


class TokenRateLimitMiddleware(_RateLimitMiddleware):
    """Tokens per minute (TPM), per key, user and team, as a token bucket (and `tpd_limit` per
    day from the records).

    Each request reserves its prompt tokens plus its output allowance (`max_tokens`, or the
    meter's default); the response's actual usage replaces the reservation.

    Args:
        app: The ASGI app to protect.
        store: The store (ignored when `meter` is given).
        limit: The default tokens per window, or `None` for records' limits only.
        window: Window length in seconds.
        rate: `limit` and `window` at once, in the `limits` notation: `"20000/minute"`.
        end_user_limit: The tokens per window of each end user a request body names (`user`),
            or `None`.
        end_user_scope: `"global"` (default: one `bob` for every tenant, as LiteLLM) or
            `"team"` / `"key"` (each tenant's end users are its own).
        on_store_error: `"fail_open"` (default) or `"fail_closed"` while the store is down.
        shadow: Evaluate and emit headers, but never refuse.
        defer: Ignored, kept for compatibility (adjacent layers are admitted together).
        meter: A shared meter (what `Fence` passes).
        paths: Which paths are metered and which are exempt.
        max_body_size: Largest request body accepted on a metered path, in bytes.
    """

    kind = "tokens"


class ParallelRequestLimitMiddleware(_CheckMiddleware):
    """Requests in flight at once, per key, user and team (`max_parallel_requests`).

    A slot is a lease: released when the response ends or the client disconnects, and freed
    on its own after `lease_ttl` if the worker holding it died.

    Args:
        app: The ASGI app to protect.
        store: The store (ignored when `meter` is given).
        limit: The default requests in flight per key, or `None` for records' limits only.
        lease_ttl: Seconds after which an unreleased slot frees itself.
        on_store_error: `"fail_open"` (default) or `"fail_closed"` while the store is down.
        shadow: Evaluate, but never refuse.
        defer: Ignored, kept for compatibility (adjacent layers are admitted together).
        meter: A shared meter (what `Fence` passes).
        paths: Which paths are metered and which are exempt.
        max_body_size: Largest request body accepted on a metered path, in bytes.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store | None = None,
        limit: int | None = None,
        lease_ttl: float = 600.0,
        on_store_error: str = "fail_open",
        shadow: bool = False,
        defer: bool = False,
        meter: Meter | None = None,
        paths: PathRules | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        checked_limit("limit", limit)
        checked_seconds("lease_ttl", lease_ttl)
        _common(store, on_store_error, shadow, max_body_size)
        check = ParallelCheck(on_store_error, shadow, limit, lease_ttl)
        super().__init__(
            app, check, store=store, meter=meter, paths=paths, max_body_size=max_body_size
        )
