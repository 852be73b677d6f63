"""`Fence`: the whole llmfence stack, configured once and installed in the right order."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.types import ASGIApp

from ._core.auth import Authenticator
from ._core.checks import BudgetCheck
from ._core.meter import Meter
from ._core.observe import Observer
from ._core.services import Services
from ._fence_alerts import DEFAULT_THRESHOLDS, AlertHook, install_alerts
from ._fence_customers import CustomersMixin
from ._fence_metrics import MetricsMixin
from ._fence_ops import RegistryMixin
from ._fence_records import RecordsMixin
from ._fence_routes import RoutesMixin
from ._fields import budget_nano, checked_duration, checked_limit
from ._openapi import install_routes
from ._options import (
    checked_access_groups,
    checked_bool,
    checked_deployments,
    checked_int,
    checked_master_key,
    checked_patterns,
    checked_policy,
    checked_prices,
    checked_seconds,
    checked_store,
)
from ._pricing import ModelPrice, PriceBook, PriceOverride
from ._request import MAX_OUTPUT_TOKENS
from ._tokens import TokenCounter
from .exceptions import ConfigurationError
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
from .stores import MemoryStore, Store
from .stores._leases import return_leases

__all__ = ["Fence"]

_GUARDS = frozenset({"requests", "tokens", "parallel_requests", "budget"})

PriceSpec = PriceOverride | ModelPrice | Mapping[str, Any]


def _budget(name: str, value: object) -> None:
    try:
        budget_nano(value)  # type: ignore[arg-type]
    except ConfigurationError as error:
        raise ConfigurationError(f"{name}: {error}") from None


class Fence(RecordsMixin, RegistryMixin, CustomersMixin, RoutesMixin, MetricsMixin):
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
        end_user_rpm_limit: Requests per minute of each end user, or `None`.
        end_user_tpm_limit: Tokens per minute of each end user, or `None`.
        end_user_scope: Whose namespace end-user ids are in: `"global"` (default, as LiteLLM:
            a `bob` named by any key is one end user) or `"team"` / `"key"` (each team's, or
            each key's, end users are its own: pick one for a multi-tenant gateway).
        rpm_limit: Default requests per minute of a key whose record sets none.
        tpm_limit: Default tokens per minute of a key whose record sets none.
        max_parallel_requests: Default requests in flight of a key whose record sets none.
        lease_ttl: Seconds after which a request's slot frees itself if its worker died (or
            its release was lost in a store outage).
        prices: Price overrides per model, USD per million tokens
            (`{"my-llama": {"input": 0.2, "output": 0.6}}`).
        fallback_price: Price of models nobody knows; without it they are refused (400).
        default_max_tokens: Output allowance reserved when a request names none. When it does
            not fit the tightest token window or budget, the request goes upstream with the
            `max_tokens` that does fit (`x-llmfence-max-tokens-clamped` says which).
        min_output_tokens: Below this many output tokens, such a request is refused instead.
        lazy_counting: Admit with an upper bound of the prompt's tokens (its UTF-8 length),
            counting exactly only when a decision needs it (near a limit, a refusal, no usage);
            decisions are exact counting's. `False`: count every prompt first (far from every
            limit `x-ratelimit-remaining-tokens` counts the bound while a request runs).
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
        store_timeout: Seconds any one store call may take, whatever the store: `RedisStore`
            is given this bound in place of its own `timeout`, and calls to other stores run
            under it. `None` (default): the store's own bound (`RedisStore`'s and
            `SQLiteStore`'s `timeout`, 5 s by default), else 5 s. `MemoryStore` answers
            without waiting, so it always fits.
        cache_ttl: Seconds key records are cached (bounded staleness across instances).
        disconnect_extra_tokens: Output tokens charged beyond what was streamed when a client
            disconnects mid-stream.
        deployments: The model each Azure-style deployment runs (`{"prod-4o": "gpt-4o"}`): on
            `/openai/deployments/{name}/...` paths the deployment decides what is checked,
            priced and counted, whatever the body's `model` says; a deployment not named here
            runs the model of its own name.
        trusted_proxies: How many reverse proxies in front of the app append to
            `X-Forwarded-For`; route guards with `per="ip"` then count the address the
            outermost of them saw (the N-th from the right). 0 (default) uses the client
            address of the connection.
        metrics: A `llmfence.metrics` adapter (`PrometheusMetrics()`, `OpenTelemetryMetrics()`)
            told of every request, refusal, spend and store call; serve Prometheus's with
            `metrics_app()`. `None` (default): no metrics, at no cost.
        alert_thresholds: Fractions of a budget that alert `on_alert` once the spend reaches them.
        on_alert: An async callable given each `BudgetAlert` (once per level, period and
            threshold across app instances), or a URL they are posted to as JSON, with retries.
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
        end_user_rpm_limit: int | None = None,
        end_user_tpm_limit: int | None = None,
        end_user_scope: str = "global",
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        max_parallel_requests: int | None = None,
        lease_ttl: float = 600.0,
        prices: Mapping[str, PriceSpec] | None = None,
        fallback_price: PriceSpec | None = None,
        default_max_tokens: int = 4096,
        min_output_tokens: int = 16,
        lazy_counting: bool = True,
        calendar_aligned: bool = False,
        clamp_max_tokens: bool = False,
        metered_paths: Iterable[str] | None = None,
        exempt_paths: Iterable[str] = DEFAULT_EXEMPT_PATHS,
        access_groups: Mapping[str, Iterable[str]] | None = None,
        shadow: Collection[str] = (),
        limits_on_store_error: str = "fail_open",
        budgets_on_store_error: str = "fail_closed",
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        store_timeout: float | None = None,
        cache_ttl: float = 5.0,
        disconnect_extra_tokens: int = 0,
        deployments: Mapping[str, str] | None = None,
        trusted_proxies: int = 0,
        metrics: Observer | None = None,
        alert_thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
        on_alert: AlertHook | str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Every option is checked here, naming the argument as written: a bad one must fail
        # now, not as a 500 at the first request (Starlette builds middlewares lazily).
        if isinstance(shadow, str):
            raise ConfigurationError(f"shadow must be a collection of guard names, not {shadow!r}")
        unknown = set(shadow) - _GUARDS
        if unknown:
            raise ConfigurationError(f"shadow names unknown guards: {sorted(unknown)}")
        checked_master_key(master_key)
        for name, limit in (
            ("rpm_limit", rpm_limit),
            ("tpm_limit", tpm_limit),
            ("max_parallel_requests", max_parallel_requests),
        ):
            checked_limit(name, limit)
        _budget("max_budget", max_budget)
        _budget("max_end_user_budget", max_end_user_budget)
        checked_duration(budget_duration, "budget_duration")
        checked_duration(end_user_budget_duration, "end_user_budget_duration")
        checked_int("default_max_tokens", default_max_tokens, low=1, high=MAX_OUTPUT_TOKENS)
        checked_int("min_output_tokens", min_output_tokens, low=0, high=MAX_OUTPUT_TOKENS)
        checked_int("max_body_size", max_body_size, low=1)
        checked_int(
            "disconnect_extra_tokens", disconnect_extra_tokens, low=0, high=MAX_OUTPUT_TOKENS
        )
        checked_bool("calendar_aligned", calendar_aligned)
        checked_bool("clamp_max_tokens", clamp_max_tokens)
        checked_bool("lazy_counting", lazy_counting)
        checked_policy("limits_on_store_error", limits_on_store_error)
        checked_policy("budgets_on_store_error", budgets_on_store_error)
        if store_timeout is not None:
            checked_seconds("store_timeout", store_timeout)
        checked_seconds("cache_ttl", cache_ttl, zero=True)
        self._lease_ttl = checked_seconds("lease_ttl", lease_ttl)
        metered = (
            None if metered_paths is None else checked_patterns("metered_paths", metered_paths)
        )
        exempt = checked_patterns("exempt_paths", exempt_paths)
        checked_deployments(deployments)
        if not callable(clock):
            raise ConfigurationError(f"clock must be a callable, not {clock!r}")
        checked_store(store)
        checked_access_groups(access_groups)
        checked_prices(prices, fallback_price)
        self.store: Store = store if store is not None else MemoryStore()
        self.meter = Meter(
            self.store,
            prices=PriceBook(overrides=prices, fallback=fallback_price, clock=clock),
            counter=TokenCounter(),
            default_max_tokens=default_max_tokens,
            min_output_tokens=min_output_tokens,
            store_timeout=store_timeout,
            disconnect_extra_tokens=disconnect_extra_tokens,
            deployments=deployments,
            clock=clock,
            observer=metrics,
            lazy_counting=lazy_counting,
        )
        self.authenticator = Authenticator(
            self.store,
            master_key=master_key,
            access_groups=access_groups,
            cache_ttl=cache_ttl,
            clock=clock,
            call=self.meter.call,
        )
        self.paths = PathRules(metered, exempt)
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
            end_user_scope=end_user_scope,
        )
        self.meter.tracking = self.budget_check
        install_alerts(self.meter, alert_thresholds, on_alert, clock)
        self._limits = {
            "requests": rpm_limit,
            "tokens": tpm_limit,
            "parallel_requests": max_parallel_requests,
        }
        self._end_user_limits = {
            "requests": checked_limit("end_user_rpm_limit", end_user_rpm_limit),
            "tokens": checked_limit("end_user_tpm_limit", end_user_tpm_limit),
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
                `llmfence.admin`), which need the master key. On a FastAPI app they are in
                its OpenAPI schema, and so are llmfence's refusals of metered and guarded
                routes.
        """
        install_routes(app, self, admin=admin)  # on FastAPI, documented in OpenAPI
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

    async def flush(self) -> int:
        """Send the settlements the store did not take again, and return its leases, now.

        Leases: `RedisStore`'s global budget slices on a cluster. The app's lifespan does
        both at shutdown; call this where none runs (a script, a test), or before an aclose.

        Returns:
            How many settlements still wait (the store still fails).
        """
        outbox = self.meter.outbox
        await outbox.drain(self.meter.resend, wait=True)
        await return_leases(self.meter.store)
        if self.meter.alerts is not None:  # and the budget alerts waiting to be sent
            await self.meter.alerts.flush()
        return outbox.depth

    def _layers(self) -> list[tuple[type[Any], dict[str, Any]]]:
        """The six middlewares and their options, outermost first."""
        common: dict[str, Any] = {
            "meter": self.meter,
            "paths": self.paths,
            "max_body_size": self._max_body_size,
        }
        limits = {"on_store_error": self._limits_policy, **common}
        end_users = {"end_user_scope": self.budget_check.end_user_scope}
        budget = self.budget_check
        return [
            (KeyAuthMiddleware, {"authenticator": self.authenticator, **common}),
            (
                RequestRateLimitMiddleware,
                {
                    "limit": self._limits["requests"],
                    "end_user_limit": self._end_user_limits["requests"],
                    "shadow": "requests" in self._shadow,
                    **end_users,
                    **limits,
                },
            ),
            (
                TokenRateLimitMiddleware,
                {
                    "limit": self._limits["tokens"],
                    "end_user_limit": self._end_user_limits["tokens"],
                    "shadow": "tokens" in self._shadow,
                    **end_users,
                    **limits,
                },
            ),
            (
                ParallelRequestLimitMiddleware,
                {
                    "limit": self._limits["parallel_requests"],
                    "lease_ttl": self._lease_ttl,
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
                    "end_user_scope": budget.end_user_scope,
                    "on_store_error": budget.on_store_error,
                    "shadow": budget.shadow,
                    **common,
                },
            ),
            (SpendRecorderMiddleware, common),
        ]
