"""`BudgetGuardMiddleware` and `SpendRecorderMiddleware`: USD budgets and the spend log."""

from __future__ import annotations

from starlette.types import ASGIApp

from llmfence._core.checks import BudgetCheck, RecordCheck
from llmfence._core.meter import Meter
from llmfence._fields import budget_nano, checked_duration
from llmfence._options import checked_bool, checked_int, checked_policy, checked_store
from llmfence.exceptions import ConfigurationError
from llmfence.stores import Store

from ._base import DEFAULT_MAX_BODY_SIZE, FenceMiddleware
from ._paths import PathRules

__all__ = ["BudgetGuardMiddleware", "SpendRecorderMiddleware"]


class BudgetGuardMiddleware(FenceMiddleware):
    """Reserves each request's projected cost at every budget level, or answers 429.

    The projection is prompt tokens × input price + output allowance × output price. Levels:
    the whole app (`max_budget`), the key's team, user and key (from their records), the key's
    per-model budgets, and the end user named by the body (`max_end_user_budget`). All levels
    are reserved or none is; the actual cost replaces the reservation when the response ends.

    Args:
        app: The ASGI app to protect.
        store: The store (ignored when `meter` is given).
        max_budget: Whole-app budget in USD, or `None`.
        budget_duration: How often the whole-app budget resets (`"30d"`, `"monthly"`…).
        max_end_user_budget: Budget of each end user in USD, or `None`.
        end_user_budget_duration: How often end-user budgets reset.
        calendar_aligned: Align periods to UTC calendar boundaries instead of rolling them.
        clamp_max_tokens: Lower `max_tokens` to what the tightest budget can still pay for
            instead of refusing (the response says so in `x-llmfence-max-tokens-clamped`).
        end_user_scope: `"global"` (default: one end user `bob` for every tenant, as LiteLLM)
            or `"team"` / `"key"` (each tenant's end users have budgets of their own).
        on_store_error: `"fail_closed"` (default: 503 while the store is down) or `"fail_open"`.
        shadow: Evaluate and record, but never refuse.
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
        max_budget: float | None = None,
        budget_duration: str | None = None,
        max_end_user_budget: float | None = None,
        end_user_budget_duration: str | None = None,
        calendar_aligned: bool = False,
        clamp_max_tokens: bool = False,
        end_user_scope: str = "global",
        on_store_error: str = "fail_closed",
        shadow: bool = False,
        defer: bool = False,
        meter: Meter | None = None,
        paths: PathRules | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        # Checked here, under the names the caller wrote.
        for name, budget in (
            ("max_budget", max_budget),
            ("max_end_user_budget", max_end_user_budget),
        ):
            try:
                budget_nano(budget)
            except ConfigurationError as error:
                raise ConfigurationError(f"{name}: {error}") from None
        checked_store(store)
        checked_duration(budget_duration, "budget_duration")
        checked_duration(end_user_budget_duration, "end_user_budget_duration")
        checked_bool("calendar_aligned", calendar_aligned)
        checked_bool("clamp_max_tokens", clamp_max_tokens)
        checked_policy("on_store_error", on_store_error)
        checked_bool("shadow", shadow)
        checked_int("max_body_size", max_body_size, low=1)
        check = BudgetCheck(
            on_store_error=on_store_error,
            shadow=shadow,
            max_budget=max_budget,
            budget_duration=budget_duration,
            max_end_user_budget=max_end_user_budget,
            end_user_budget_duration=end_user_budget_duration,
            calendar_aligned=calendar_aligned,
            clamp_max_tokens=clamp_max_tokens,
            end_user_scope=end_user_scope,
        )
        super().__init__(
            app, (check,), store=store, meter=meter, paths=paths, max_body_size=max_body_size
        )
        self.limit_check = check


class SpendRecorderMiddleware(FenceMiddleware):
    """Writes one spend record per metered request: success, upstream error or disconnect.

    The record (model, tokens, cost, provenance, status, latency, masked key, user, team, end
    user) is written with the settlement after the last response byte has been sent, so it
    never delays the response. Without a budget guard in front, the spend still lands at the
    key, user, team, end-user and global levels.

    Args:
        app: The ASGI app to protect.
        store: The store (ignored when `meter` is given).
        meter: A shared meter (what `Fence` passes).
        paths: Which paths are metered and which are exempt.
        max_body_size: Largest request body accepted on a metered path, in bytes.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: Store | None = None,
        meter: Meter | None = None,
        paths: PathRules | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        checked_store(store)
        checked_int("max_body_size", max_body_size, low=1)
        super().__init__(
            app,
            (RecordCheck(),),
            store=store,
            meter=meter,
            paths=paths,
            max_body_size=max_body_size,
        )
