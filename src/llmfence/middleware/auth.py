"""`KeyAuthMiddleware`: API keys, the master key, expiry and model access."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from starlette.types import ASGIApp, Scope

from llmfence._core.auth import Authenticator, api_key_from_headers
from llmfence._core.meter import Meter, RequestContext
from llmfence.exceptions import LLMFenceError, StoreError
from llmfence.stores import Store

from ._base import DEFAULT_MAX_BODY_SIZE, FenceMiddleware, PathRules

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
        cache_ttl: Seconds key, user and team records are cached; a change made by another
            instance is seen within this time.
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
        super().__init__(app, store=store, meter=meter, paths=paths, max_body_size=max_body_size)
        self.authenticator = authenticator or Authenticator(
            self.meter.store,
            master_key=master_key,
            access_groups=access_groups,
            cache_ttl=cache_ttl,
            clock=self.meter.clock,
        )

    async def check(self, ctx: RequestContext, scope: Scope) -> LLMFenceError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            ctx.principal = await self.authenticator.authenticate(api_key_from_headers(headers))
            if ctx.request is not None and not ctx.principal.is_master:
                await self.authenticator.check_model(ctx.principal, ctx.request.model)
        except StoreError as error:
            self.meter.degraded("auth", error)  # no store, no keys: auth always fails closed
            return error
        except LLMFenceError as error:
            return error
        return None
