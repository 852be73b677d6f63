"""`KeyAuthMiddleware`: API keys, the master key, expiry and model access."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from starlette.types import ASGIApp

from llmfence._core.auth import Authenticator
from llmfence._core.checks import AuthCheck
from llmfence._core.meter import Meter
from llmfence._options import (
    checked_access_groups,
    checked_int,
    checked_master_key,
    checked_seconds,
    checked_store,
)
from llmfence.stores import Store

from ._base import DEFAULT_MAX_BODY_SIZE, FenceMiddleware
from ._paths import PathRules

__all__ = ["KeyAuthMiddleware"]


class KeyAuthMiddleware(FenceMiddleware):
    """Resolves the caller's API key to a principal, or answers 401/403.

    Keys are read from `Authorization: Bearer`, `x-api-key`, `api-key` or `x-goog-api-key`.
    Every non-exempt path needs a valid key; on metered paths the body's model must be allowed
    by the key's, user's and team's model lists (names, access groups or patterns).

    Args:
        app: The ASGI app to protect.
        store: Where key records live (ignored when `authenticator` is given).
        master_key: The key that may do everything, the admin API included.
        access_groups: Model access groups defined in code (`{"beta-models": ["mistral"]}`).
        authenticator: A shared authenticator (what `Fence` passes).
        meter: A shared meter (what `Fence` passes).
        paths: Which paths are metered and which are exempt.
        max_body_size: Largest request body accepted on a metered path, in bytes.
        cache_ttl: Seconds a key's records are cached; a change made by another instance is
            seen within this time.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store | None = None,
        master_key: str | None = None,
        access_groups: Mapping[str, Iterable[str]] | None = None,
        authenticator: Authenticator | None = None,
        meter: Meter | None = None,
        paths: PathRules | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        cache_ttl: float = 5.0,
    ) -> None:
        checked_master_key(master_key)
        checked_seconds("cache_ttl", cache_ttl, zero=True)
        checked_store(store)
        checked_access_groups(access_groups)
        checked_int("max_body_size", max_body_size, low=1)
        check = AuthCheck(master_key, access_groups, cache_ttl, authenticator)
        if meter is None and store is None and authenticator is not None:
            store = authenticator.store
        super().__init__(
            app, (check,), store=store, meter=meter, paths=paths, max_body_size=max_body_size
        )
