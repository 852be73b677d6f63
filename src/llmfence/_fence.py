"""`Fence`: the whole llmfence stack, configured once and installed in the right order."""

from __future__ import annotations

import functools
import secrets
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from decimal import Decimal
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.types import ASGIApp

from ._core.auth import Authenticator
from ._core.checks import BudgetCheck, checked_limit
from ._core.meter import Meter
from ._core.services import Services
from ._duration import parse_duration
from ._money import usd_to_nano
from ._pricing import ModelPrice, PriceBook, PriceOverride
from ._route_ledger import charge_request
from ._tokens import TokenCounter
from ._usage import Usage
from .exceptions import ConfigurationError, LLMFenceError
from .guards import Per, RouteGuard, exception_handler
from .middleware import (
    BudgetGuardMiddleware,
    KeyAuthMiddleware,
    ParallelRequestLimitMiddleware,
    RequestRateLimitMiddleware,
    SpendRecorderMiddleware,
    TokenRateLimitMiddleware,
)
from .middleware._base import DEFAULT_EXEMPT_PATHS, DEFAULT_MAX_BODY_SIZE
from .middleware._paths import PathRules
from .stores import KeyRecord, MemoryStore, Store, TeamRecord, UserRecord, hash_key, mask_key

__all__ = ["Fence"]

_GUARDS = frozenset({"requests", "tokens", "parallel_requests", "budget"})
_MIN_KEY_LENGTH = 20

PriceSpec = PriceOverride | ModelPrice | Mapping[str, Any]


class Fence:
    """Budgets, rate limits, key auth and spend tracking for an app, in one object.

    ```python
    fence = Fence(store=MemoryStore(), master_key="sk-master", max_budget=100.0,
                  budget_duration="30d", max_end_user_budget=0.5)
    fence.install(app)
    ```

    Args:
        store: Where state lives: `MemoryStore()` (default) for one process, `RedisStore`
            for many.
        master_key: The key that may do everything, the admin API included.
        max_budget: Whole-app budget in USD, or `None`.
        budget_duration: How often the whole-app budget resets (`"30d"`, `"monthly"`…).
        max_end_user_budget: Budget of each end user (the body's `user`) in USD, or `None`.
        end_user_budget_duration: How often end-user budgets reset.
        rpm_limit: Default requests per minute of a key whose record sets none.
        tpm_limit: Default tokens per minute of a key whose record sets none.
        max_parallel_requests: Default requests in flight of a key whose record sets none.
        prices: Price overrides per model, USD per million tokens
            (`{"my-llama": {"input": 0.2, "output": 0.6}}`).
        fallback_price: Price of models nobody knows; without it they are refused (400).
        default_max_tokens: Output allowance reserved when a request names none.
        calendar_aligned: Align budget periods to UTC calendar boundaries instead of rolling.
        clamp_max_tokens: Lower `max_tokens` to what the tightest budget can pay for instead of
            refusing.
        metered_paths: `fnmatch` patterns of LLM paths; default the OpenAI and Anthropic ones.
        exempt_paths: `fnmatch` patterns llmfence leaves alone (no auth either).
        access_groups: Model access groups defined in code.
        shadow: Guards that evaluate and report but never refuse: any of `"requests"`,
            `"tokens"`, `"parallel_requests"`, `"budget"`.
        limits_on_store_error: Rate limits while the store is down: `"fail_open"` (default).
        budgets_on_store_error: Budgets while the store is down: `"fail_closed"` (default).
        max_body_size: Largest request body accepted on a metered path, in bytes.
        store_timeout: Seconds any one store call may take.
        cache_ttl: Seconds key records are cached (bounded staleness across instances).
        disconnect_extra_tokens: Output tokens charged beyond what was streamed when a client
            disconnects mid-stream.
        trusted_proxies: How many reverse proxies in front of the app append to
            `X-Forwarded-For`; route guards with `per="ip"` then count the address the
            outermost of them saw (the N-th from the right). 0 (default) uses the client
            address of the connection.
        clock: Unix time (a fake clock in tests).
    """

    def __init__(
        self,
        *,
        store: Store | None = None,
        master_key: str | None = None,
        max_budget: float | None = None,
        budget_duration: str | None = None,
        max_end_user_budget: float | None = None,
        end_user_budget_duration: str | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        max_parallel_requests: int | None = None,
        prices: Mapping[str, PriceSpec] | None = None,
        fallback_price: PriceSpec | None = None,
        default_max_tokens: int = 4096,
        calendar_aligned: bool = False,
        clamp_max_tokens: bool = False,
        metered_paths: Iterable[str] | None = None,
        exempt_paths: Iterable[str] = DEFAULT_EXEMPT_PATHS,
        access_groups: Mapping[str, Iterable[str]] | None = None,
        shadow: Collection[str] = (),
        limits_on_store_error: str = "fail_open",
        budgets_on_store_error: str = "fail_closed",
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        store_timeout: float = 2.0,
        cache_ttl: float = 5.0,
        disconnect_extra_tokens: int = 0,
        trusted_proxies: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        unknown = set(shadow) - _GUARDS
        if unknown:
            raise ConfigurationError(f"shadow names unknown guards: {sorted(unknown)}")
        if master_key is not None and len(master_key) < 8:
            raise ConfigurationError("master_key must be at least 8 characters long")
        self.store: Store = store if store is not None else MemoryStore()
        self.meter = Meter(
            self.store,
            prices=PriceBook(overrides=prices, fallback=fallback_price, clock=clock),
            counter=TokenCounter(),
            default_max_tokens=default_max_tokens,
            store_timeout=store_timeout,
            disconnect_extra_tokens=disconnect_extra_tokens,
            clock=clock,
        )
        self.authenticator = Authenticator(
            self.store,
            master_key=master_key,
            access_groups=access_groups,
            cache_ttl=cache_ttl,
            clock=clock,
        )
        self.paths = PathRules(
            None if metered_paths is None else tuple(metered_paths), tuple(exempt_paths)
        )
        self.clock = clock
        # Validated now, not at the first request.
        self.budget_check = BudgetCheck(
            on_store_error=budgets_on_store_error,
            shadow="budget" in shadow,
            max_budget=max_budget,
            budget_duration=budget_duration,
            max_end_user_budget=max_end_user_budget,
            end_user_budget_duration=end_user_budget_duration,
            calendar_aligned=calendar_aligned,
            clamp_max_tokens=clamp_max_tokens,
        )
        self.meter.tracking = self.budget_check
        self._limits = {
            "requests": rpm_limit,
            "tokens": tpm_limit,
            "parallel_requests": max_parallel_requests,
        }
        self._shadow = frozenset(shadow)
        self._limits_policy = limits_on_store_error
        self._max_body_size = max_body_size
        if type(trusted_proxies) is not int or trusted_proxies < 0:
            raise ConfigurationError("trusted_proxies must be a non-negative int")
        self.trusted_proxies = trusted_proxies
        self.services = Services(
            self.meter,
            self.authenticator,
            self.budget_check,
            limits_on_store_error,
            trusted_proxies,
        )
        """What route guards and `charge` use: the store, meter, authenticator and policies."""

    def install(self, app: Starlette, *, admin: bool = False) -> None:
        """Add the whole stack to a Starlette or FastAPI app, outermost first:

        KeyAuth → RPM → TPM → Parallel → BudgetGuard → SpendRecorder → the app.

        The six layers fuse into one engine when Starlette builds the stack: one body read,
        one store call before the app and one after the response.

        Args:
            app: The app to protect.
            admin: Also add the admin API routes (`/key/generate`, `/user/new`, …; see
                `llmfence.admin`), which need the master key.
        """
        if admin:
            from .admin import admin_routes

            app.router.routes.extend(admin_routes(self))
        # add_middleware puts the last one added outermost, so add them innermost first.
        for cls, options in reversed(self._layers()):
            app.add_middleware(cls, **options)
        self.add_exception_handlers(app)

    def wrap(self, app: ASGIApp) -> ASGIApp:
        """The whole stack over any ASGI app, with no Starlette host in front of it.

        ```python
        app = fence.wrap(asgi_app)
        ```

        Args:
            app: The ASGI app to protect (route guard refusals raised in it are not rendered:
                use `install` for Starlette apps that use guard dependencies).

        Returns:
            One ASGI callable: the six llmfence layers fused into one engine.
        """
        for cls, options in reversed(self._layers()):
            app = cls(app, **options)
        return app

    def _layers(self) -> list[tuple[type[Any], dict[str, Any]]]:
        """The six middlewares and their options, outermost first."""
        common: dict[str, Any] = {
            "meter": self.meter,
            "paths": self.paths,
            "max_body_size": self._max_body_size,
        }
        limits = {"on_store_error": self._limits_policy, **common}
        budget = self.budget_check
        return [
            (KeyAuthMiddleware, {"authenticator": self.authenticator, **common}),
            (
                RequestRateLimitMiddleware,
                {
                    "limit": self._limits["requests"],
                    "shadow": "requests" in self._shadow,
                    **limits,
                },
            ),
            (
                TokenRateLimitMiddleware,
                {"limit": self._limits["tokens"], "shadow": "tokens" in self._shadow, **limits},
            ),
            (
                ParallelRequestLimitMiddleware,
                {
                    "limit": self._limits["parallel_requests"],
                    "shadow": "parallel_requests" in self._shadow,
                    **limits,
                },
            ),
            (
                BudgetGuardMiddleware,
                {
                    "max_budget": budget.max_budget,
                    "budget_duration": budget.budget_duration,
                    "max_end_user_budget": budget.max_end_user_budget,
                    "end_user_budget_duration": budget.end_user_budget_duration,
                    "calendar_aligned": budget.calendar_aligned,
                    "clamp_max_tokens": budget.clamp_max_tokens,
                    "on_store_error": budget.on_store_error,
                    "shadow": budget.shadow,
                    **common,
                },
            ),
            (SpendRecorderMiddleware, common),
        ]

    # -- keys, users and teams ---------------------------------------------------------------

    async def generate_key(
        self,
        *,
        key: str | None = None,
        user_id: str | None = None,
        team_id: str | None = None,
        key_alias: str | None = None,
        max_budget: float | Decimal | None = None,
        budget_duration: str | None = None,
        model_max_budget: Mapping[str, float | Decimal] | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        max_parallel_requests: int | None = None,
        models: Iterable[str] = (),
        duration: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> tuple[str, KeyRecord]:
        """Create a virtual key; returns the plain key (shown once) and its stored record.

        Args:
            key: A caller-chosen key for migrations (`sk-` and at least 20 characters);
                default a new random `sk-` key.
            duration: Key lifetime (`"30d"`…); `None` never expires.

        Raises:
            ConfigurationError: A field is invalid, or the key already exists.
        """
        now = self.clock()
        plain = key if key is not None else "sk-" + secrets.token_urlsafe(32)
        if not plain.startswith("sk-") or len(plain) < _MIN_KEY_LENGTH:
            raise ConfigurationError("a key must start with 'sk-' and be at least 20 characters")
        record = KeyRecord(
            key_hash=hash_key(plain),
            key_masked=mask_key(plain),
            user_id=user_id,
            team_id=team_id,
            key_alias=key_alias,
            model_max_budget={m: usd_to_nano(v) for m, v in (model_max_budget or {}).items()},
            expires=None if duration is None else parse_duration(duration).period_end(now),
            **self._limit_fields(
                max_budget,
                budget_duration,
                rpm_limit,
                tpm_limit,
                max_parallel_requests,
                models,
                metadata,
            ),
        )
        if not await self.store.create_key(record):
            raise ConfigurationError("that key already exists")
        self.authenticator.invalidate_key(record.key_hash)
        return plain, record

    async def new_user(
        self,
        user_id: str,
        *,
        team_id: str | None = None,
        max_budget: float | Decimal | None = None,
        budget_duration: str | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        max_parallel_requests: int | None = None,
        models: Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> UserRecord:
        """Create a user whose budget and limits all of its keys share.

        Raises:
            ConfigurationError: A field is invalid, or the user exists.
        """
        record = UserRecord(
            user_id=user_id,
            team_id=team_id,
            **self._limit_fields(
                max_budget,
                budget_duration,
                rpm_limit,
                tpm_limit,
                max_parallel_requests,
                models,
                metadata,
            ),
        )
        if not await self.store.create_user(record):
            raise ConfigurationError(f"user {user_id!r} already exists")
        self.authenticator.invalidate_user(user_id)
        return record

    async def new_team(
        self,
        team_id: str,
        *,
        max_budget: float | Decimal | None = None,
        budget_duration: str | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        max_parallel_requests: int | None = None,
        models: Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> TeamRecord:
        """Create a team whose budget and limits all of its keys share.

        Raises:
            ConfigurationError: A field is invalid, or the team exists.
        """
        record = TeamRecord(
            team_id=team_id,
            **self._limit_fields(
                max_budget,
                budget_duration,
                rpm_limit,
                tpm_limit,
                max_parallel_requests,
                models,
                metadata,
            ),
        )
        if not await self.store.create_team(record):
            raise ConfigurationError(f"team {team_id!r} already exists")
        self.authenticator.invalidate_team(team_id)
        return record

    def _limit_fields(
        self,
        max_budget: float | Decimal | None,
        budget_duration: str | None,
        rpm_limit: int | None,
        tpm_limit: int | None,
        max_parallel_requests: int | None,
        models: Iterable[str],
        metadata: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """The fields keys, users and teams share, checked and in storage form."""
        return {
            "max_budget": _nano(max_budget),
            "budget_duration": _checked_duration(budget_duration),
            "rpm_limit": checked_limit("rpm_limit", rpm_limit),
            "tpm_limit": checked_limit("tpm_limit", tpm_limit),
            "max_parallel_requests": checked_limit("max_parallel_requests", max_parallel_requests),
            "models": tuple(models),
            "metadata": dict(metadata or {}),
            "created_at": self.clock(),
        }

    # -- per-route guards (see `llmfence.guards`) --------------------------------------------

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

    def add_exception_handlers(self, app: Starlette) -> None:
        """Render `LLMFenceError`s raised in the app (route guard dependencies' refusals) as
        the middlewares' OpenAI-shaped responses. `install` calls it.

        Args:
            app: The Starlette or FastAPI app.
        """
        app.add_exception_handler(LLMFenceError, exception_handler(self.services))


def _nano(usd: float | Decimal | None) -> int | None:
    if usd is None:
        return None
    nano = usd_to_nano(usd)
    if nano < 0:
        raise ConfigurationError("a budget must not be negative")
    return nano


def _checked_duration(value: str | None) -> str | None:
    if value is not None:
        parse_duration(value)
    return value
