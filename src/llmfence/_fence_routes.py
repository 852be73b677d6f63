"""`Fence`'s per-route guards and charges (see `llmfence.guards`)."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request

from ._core.services import Services
from ._openapi import refusal_responses
from ._route_ledger import charge_request, exception_handler
from ._usage import Usage
from .exceptions import LLMFenceError
from .guards import Per, RouteGuard

__all__ = ["RoutesMixin"]


class RoutesMixin:
    """Rate limits and budgets on single routes, and what a route reports its calls cost."""

    services: Services

    def limit(
        self,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        per: Per = "key",
        name: str | None = None,
        window: float = 60.0,
        tokens_estimate: int = 0,
    ) -> RouteGuard:
        """Rate limits on one route: a decorator, a FastAPI dependency, or `hold()`.

        ```python
        @app.post("/summarize")
        @fence.limit(rpm=10, per="user")
        async def summarize(request: Request) -> Response: ...
        ```

        Args:
            rpm: Calls per window, or `None`.
            tpm: Tokens per window, or `None`; the route reports its tokens with `charge`.
            per: Whom the limits count: `"key"` (the API key), `"user"` (the key's user, else
                the key), `"team"` (the key's team, else its user, else the key),
                `"end_user"` (a `user` query parameter or JSON body field; 400 without one),
                `"ip"` (see `trusted_proxies`), or a function of the request returning an id.
            name: Names the counters (`route:{name}:rpm:…`); default the endpoint's module
                and qualified name. Routes given the same name share their counters.
            window: Window length in seconds.
            tokens_estimate: Tokens reserved when a call starts, replaced by what it charges.

        Raises:
            ConfigurationError: An option is invalid.
        """
        return RouteGuard(
            self.services,
            rpm=rpm,
            tpm=tpm,
            per=per,
            name=name,
            window=window,
            tokens_estimate=tokens_estimate,
        )

    def budget(
        self,
        *,
        max_usd: float,
        duration: str | None = None,
        per: Per = "user",
        estimate_usd: float = 0.0,
        name: str | None = None,
    ) -> RouteGuard:
        """A USD budget on one route: a decorator, a FastAPI dependency, or `hold()`.

        Args:
            max_usd: The budget of each `per` identity, in USD.
            duration: How often it resets (`"30d"`, `"monthly"`…); `None` never resets.
            per: Whom the budget counts (see `limit`); default the key's user, else the key.
            estimate_usd: Reserved when a call starts; what the route charges replaces it,
                and it is spent as is when the route charges nothing.
            name: Names the counter (`route:{name}:budget:…`); default the endpoint's name.

        Raises:
            ConfigurationError: An option is invalid.
        """
        return RouteGuard(
            self.services,
            max_usd=max_usd,
            duration=duration,
            per=per,
            estimate_usd=estimate_usd,
            name=name,
        )

    def guard(
        self,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        window: float = 60.0,
        tokens_estimate: int = 0,
        max_usd: float | None = None,
        duration: str | None = None,
        estimate_usd: float = 0.0,
        per: Per = "user",
        name: str | None = None,
    ) -> RouteGuard:
        """Rate limits and a USD budget on one route, admitted together.

        ```python
        @app.post("/chat")
        async def chat(permit: Annotated[Permit, Depends(fence.guard(rpm=10, max_usd=1.0))]):
            ...
            permit.charge(reply)
        ```

        Args:
            rpm: Calls per window, or `None`.
            tpm: Tokens per window, or `None`.
            window: Window length in seconds.
            tokens_estimate: Tokens reserved when a call starts.
            max_usd: The budget of each `per` identity in USD, or `None`.
            duration: How often the budget resets; `None` never resets.
            estimate_usd: USD reserved when a call starts.
            per: Whom the guard counts (see `limit`); default the key's user, else the key.
            name: Names the counters; default the endpoint's module and qualified name.

        Raises:
            ConfigurationError: An option is invalid.
        """
        return RouteGuard(
            self.services,
            rpm=rpm,
            tpm=tpm,
            window=window,
            tokens_estimate=tokens_estimate,
            max_usd=max_usd,
            duration=duration,
            estimate_usd=estimate_usd,
            per=per,
            name=name,
        )

    async def charge(
        self,
        request: Request,
        response: Any = None,
        *,
        model: str | None = None,
        usage: Usage | Mapping[str, Any] | None = None,
    ) -> int:
        """Report what one LLM call of a route cost; several calls of a request add up.

        In a guarded request the sum settles the guard's reservation when the request ends.
        Without a guard the cost is charged at once to the caller's key, user, team and the
        whole app (tracked, never refused), and a spend record is written. On a path the
        llmfence middlewares meter, they already charge the response: do not charge it twice.

        Args:
            request: The route's request.
            response: The LLM response: an OpenAI or Anthropic SDK object, or its JSON dict.
                Its usage and `model` are read; a response without usage charges nothing
                (the guard's estimate then stands).
            model: The model, when no response is given (or to override the response's).
            usage: The call's usage, when no response is given: a `Usage`, or a dict of
                OpenAI or Anthropic usage fields.

        Returns:
            The call's cost in nano-USD.

        Raises:
            ConfigurationError: Neither a response nor `usage` with a model was given.
            UnknownModelError: No price is known for the model.
        """
        return await charge_request(self.services, request, response, model=model, usage=usage)

    def charge_sync(
        self,
        request: Request,
        response: Any = None,
        *,
        model: str | None = None,
        usage: Usage | Mapping[str, Any] | None = None,
    ) -> int:
        """`charge` for sync endpoints, which run in a worker thread; same arguments."""
        call = functools.partial(self.charge, request, response, model=model, usage=usage)
        return anyio.from_thread.run(call)

    def openapi_responses(
        self, *, anthropic: bool = False, statuses: tuple[int, ...] = (401, 403, 429, 503)
    ) -> dict[int | str, dict[str, Any]]:
        """llmfence's refusals of a route, for FastAPI's `responses=` (`install` adds them
        on its own to metered paths and to routes guarded by `Depends(fence.guard(...))`).

        ```python
        @app.post("/chat", responses=fence.openapi_responses())
        ```

        Args:
            anthropic: Also Anthropic's error shape (a route of Anthropic's API).
            statuses: Which refusals: any of 400, 401, 403, 413, 429, 503.
        """
        return refusal_responses(statuses, anthropic=anthropic)

    def add_exception_handlers(self, app: Starlette) -> None:
        """Render `LLMFenceError`s raised in the app (route guard dependencies' refusals) as
        the middlewares' OpenAI-shaped responses. `install` calls it.

        Args:
            app: The Starlette or FastAPI app.
        """
        app.add_exception_handler(LLMFenceError, exception_handler(self.services))
