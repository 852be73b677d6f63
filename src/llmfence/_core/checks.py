"""The checks a request can go through, each turning a principal and a request into store parts.

A check decides *what* to ask of the store (which windows, leases and budget levels, with which
limits); the `Meter` sends every check's parts of one request to the store in one step. Checks
hold configuration only, never per-request state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import limits

from llmfence._duration import Duration, parse_duration
from llmfence._money import usd_to_nano
from llmfence.exceptions import ConfigurationError
from llmfence.stores import BudgetScope, RateHit, SlotRequest
from llmfence.stores._types import RateKind, _Limits

from .auth import Principal

__all__ = [
    "BudgetCheck",
    "Check",
    "ParallelCheck",
    "RateCheck",
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


def _policy(value: str) -> str:
    if value not in ("fail_open", "fail_closed"):
        raise ConfigurationError(
            f"on_store_error must be 'fail_open' or 'fail_closed', not {value!r}"
        )
    return value


def checked_limit(name: str, value: int | None) -> int | None:
    """`value` if it is a valid limit (an int ≥ 0, or None), else a `ConfigurationError`."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigurationError(f"{name} must be a non-negative int or None, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class _Level:
    level: str
    ident: str
    label: str
    limit: int | None


def _principal_levels(principal: Principal | None, attr: str, default: int | None) -> list[_Level]:
    """The key, user and team levels of a principal, with their limits for `attr`."""
    if principal is None or principal.is_master:
        return []
    levels = []
    if principal.key is not None and principal.key_hash is not None:
        own = getattr(principal.key, attr)
        levels.append(
            _Level(
                "key",
                principal.key_hash,
                principal.key_masked or "key",
                own if own is not None else default,
            )
        )
    if principal.user is not None:
        levels.append(
            _Level(
                "user",
                principal.user.user_id,
                principal.user.user_id,
                getattr(principal.user, attr),
            )
        )
    if principal.team is not None:
        levels.append(
            _Level(
                "team",
                principal.team.team_id,
                principal.team.team_id,
                getattr(principal.team, attr),
            )
        )
    return levels


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
    """Requests (RPM) or tokens (TPM) per sliding window, per key, user and team.

    Attributes:
        kind: `"requests"` or `"tokens"`.
        default_limit: Applies per key when the key's record sets none (and to unauthenticated
            requests as one shared bucket).
        window: Window length in seconds.
    """

    kind: RateKind = "requests"
    default_limit: int | None = None
    window: float = 60.0

    def __post_init__(self) -> None:
        Check.__post_init__(self)
        if self.kind not in ("requests", "tokens"):
            raise ConfigurationError(f"kind must be 'requests' or 'tokens', not {self.kind!r}")
        checked_limit("default_limit", self.default_limit)
        check_window(self.window)

    def hits(self, principal: Principal | None, cost: int) -> list[RateHit]:
        """The windows this request hits, with `cost` units (1 request, or N tokens)."""
        attr = "rpm_limit" if self.kind == "requests" else "tpm_limit"
        prefix = "rpm" if self.kind == "requests" else "tpm"
        levels = _principal_levels(principal, attr, self.default_limit)
        if principal is None and self.default_limit is not None:
            levels = [_Level("anonymous", "all", "unauthenticated", self.default_limit)]
        window_ms = round(self.window * 1000)
        return [
            RateHit(
                # The window length is part of the counter's name (two limits of one kind
                # with different windows are two counters); the limit amount is not.
                f"{prefix}:{window_ms}:{lv.level}:{lv.ident}",
                self.kind,
                lv.level,
                lv.label,
                lv.limit,
                cost,
                self.window,
            )
            for lv in levels
            if lv.limit is not None
        ]


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

    def slots(self, principal: Principal | None) -> list[SlotRequest]:
        """The leases this request needs."""
        levels = _principal_levels(principal, "max_parallel_requests", self.default_limit)
        if principal is None and self.default_limit is not None:
            levels = [_Level("anonymous", "all", "unauthenticated", self.default_limit)]
        return [
            SlotRequest(
                f"parallel:{lv.level}:{lv.ident}", lv.level, lv.label, lv.limit, self.lease_ttl
            )
            for lv in levels
            if lv.limit is not None
        ]


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
    """

    on_store_error: str = "fail_closed"
    max_budget: float | None = None
    budget_duration: str | None = None
    max_end_user_budget: float | None = None
    end_user_budget_duration: str | None = None
    calendar_aligned: bool = False
    clamp_max_tokens: bool = False

    def __post_init__(self) -> None:
        Check.__post_init__(self)
        for name in ("max_budget", "max_end_user_budget"):
            value = getattr(self, name)
            if value is not None and usd_to_nano(value) < 0:
                raise ConfigurationError(f"{name} must not be negative")
        for duration in (self.budget_duration, self.end_user_budget_duration):
            if duration is not None:
                parse_duration(duration)

    def scopes(
        self, principal: Principal | None, end_user: str | None, model: str | None, now: float
    ) -> list[BudgetScope]:
        """Every budget level this request is charged to, limited or not (spend is tracked)."""

        def period_end(duration: str | None, anchor: float | None = None) -> float | None:
            if duration is None:
                return None
            # Records know when they were created: their periods roll from then.
            anchor = anchor if anchor else None
            return _cached_duration(duration, self.calendar_aligned).period_end(now, anchor)

        scopes = [
            BudgetScope(
                "global",
                "global",
                "global",
                _nano(self.max_budget),
                period_end(self.budget_duration),
            )
        ]
        if principal is not None and not principal.is_master:
            records: list[tuple[str, str, str, _Limits]] = []
            if principal.team is not None:
                team_id = principal.team.team_id
                records.append(("team", team_id, team_id, principal.team))
            if principal.user is not None:
                user_id = principal.user.user_id
                records.append(("user", user_id, user_id, principal.user))
            key = principal.key
            if key is not None and principal.key_hash is not None:
                label = principal.key_masked or "key"
                records.append(("key", principal.key_hash, label, key))
            for level, ident, label, record in records:
                scopes.append(
                    BudgetScope(
                        f"{level}:{ident}",
                        level,
                        label,
                        record.max_budget,
                        period_end(record.budget_duration, record.created_at),
                    )
                )
            budgeted = _budgeted_model(key.model_max_budget, model) if key and model else None
            if key is not None and budgeted is not None:
                scopes.append(
                    BudgetScope(
                        f"key_model:{principal.key_hash}:{budgeted}",
                        "model",
                        f"{budgeted} on {principal.key_masked}",
                        key.model_max_budget[budgeted],
                        period_end(key.budget_duration, key.created_at),
                    )
                )
        if end_user:
            scopes.append(
                BudgetScope(
                    f"end_user:{end_user}",
                    "end_user",
                    end_user,
                    _nano(self.max_end_user_budget),
                    period_end(self.end_user_budget_duration),
                )
            )
        return scopes


@lru_cache(maxsize=1024)
def _cached_duration(duration: str, aligned: bool) -> Duration:
    # Records name their durations as strings: parsing each distinct one once keeps the
    # regular expression off the hot path.
    return parse_duration(duration, aligned=aligned)


def _budgeted_model(budgets: Mapping[str, int], model: str) -> str | None:
    """The per-model budget a request's model falls under, names compared as prices compare
    them: case aside, with or without a `provider/` prefix (`OpenAI/gpt-4o` is `gpt-4o`)."""
    if model in budgets:
        return model

    def bare(name: str) -> str:
        return name.rsplit("/", 1)[-1].lower()

    wanted = bare(model)
    return next((name for name in budgets if bare(name) == wanted), None)


def _nano(usd: float | None) -> int | None:
    return None if usd is None else usd_to_nano(usd)
