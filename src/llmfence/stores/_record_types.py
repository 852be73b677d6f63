"""The registry's records: keys, users, teams, customers (end users) and budget tiers.

Money is an `int` of nano-USD and time a `float` of Unix seconds, as everywhere in the stores.
Every record converts to a JSON-ready dict (`to_dict`) and back (`from_dict`, which ignores
fields it does not know and defaults the ones it lacks), so a store keeps it as JSON and a
record written by an older version still reads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

__all__ = [
    "BUDGET_TIER_FIELDS",
    "BudgetTier",
    "CustomerRecord",
    "KeyRecord",
    "TeamRecord",
    "UserRecord",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Limits:
    """What keys, users, teams, customers and budget tiers all carry: a budget, rate limits
    and model access."""

    max_budget: int | None = None
    """Budget in nano-USD, or `None` for no limit."""
    soft_budget: int | None = None
    """LiteLLM's soft budget, nano-USD: a key's, user's or team's spend in a period that
    reaches it is reported once (`Fence(on_alert=...)`); it never refuses a request."""
    budget_duration: str | None = None
    """How often the budget's spend resets (`"30d"`, `"monthly"`…), or `None` for never."""
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    rpd_limit: int | None = None
    """Requests per day (a one-day bucket beside the per-minute one)."""
    tpd_limit: int | None = None
    """Tokens per day."""
    max_parallel_requests: int | None = None
    models: tuple[str, ...] = ()
    """Models or access groups allowed; empty allows every model."""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    budget_id: str | None = None
    """The budget tier (`BudgetTier`) whose amount, period and limits apply where this
    record sets none of its own."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        data = dataclasses.asdict(self)
        data["models"] = list(self.models)
        data["metadata"] = dict(self.metadata)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """The record from `to_dict`'s output; unknown fields are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        if "models" in values:
            values["models"] = tuple(values["models"] or ())
        for name in ("metadata", "members"):
            if name in values and values[name] is None:
                del values[name]
        return cls(**values)

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


BUDGET_TIER_FIELDS = (
    "max_budget",
    "budget_duration",
    "rpm_limit",
    "tpm_limit",
    "max_parallel_requests",
)
"""What a budget tier gives the records that reference it (where they set none)."""

_PER_MODEL = ("model_max_budget", "model_budget_duration", "model_rpm_limit", "model_tpm_limit")


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyRecord(_Limits):
    """A virtual key, stored under the sha256 of the key."""

    key_hash: str
    key_masked: str
    user_id: str | None = None
    team_id: str | None = None
    key_alias: str | None = None
    expires: float | None = None
    """Unix time after which the key is refused, or `None`."""
    model_max_budget: Mapping[str, int] = field(default_factory=dict)
    """Per-model budgets on this key, nano-USD."""
    model_budget_duration: Mapping[str, str] = field(default_factory=dict)
    """A per-model budget's own period (LiteLLM's `time_period`); others use the key's."""
    model_rpm_limit: Mapping[str, int] = field(default_factory=dict)
    """Requests per minute of this key per model."""
    model_tpm_limit: Mapping[str, int] = field(default_factory=dict)
    """Tokens per minute of this key per model."""
    blocked: bool = False
    """A blocked key is refused (401) until it is unblocked."""
    counter_id: str | None = None
    """What the key's counters and spend are kept under, if not its own hash: a regenerated
    key keeps the hash of the key it replaced, so its spend and limits carry over."""

    @property
    def scope_id(self) -> str:
        """The id the key's counters and spend records are kept under."""
        return self.counter_id or self.key_hash

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        data = _Limits.to_dict(self)
        for name in _PER_MODEL:
            data[name] = dict(getattr(self, name))
        return data


@dataclass(frozen=True, slots=True, kw_only=True)
class UserRecord(_Limits):
    """A user: a budget and limits shared by all of the user's keys."""

    user_id: str
    team_id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TeamRecord(_Limits):
    """A team: a budget and limits shared by all of the team's keys.

    `members` maps each member's user id to its membership: `role` (`"admin"` or `"user"`),
    and `max_budget` (nano-USD) and `budget_duration`, the member's own budget inside the team
    (LiteLLM's `max_budget_in_team`), charged for that user's requests made with team keys.
    """

    team_id: str
    team_alias: str | None = None
    members: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class CustomerRecord(_Limits):
    """A registered customer (LiteLLM's end user): the `user` a request body names.

    Its own budget and limits apply to every request that names it, whatever the key; a
    blocked customer's requests are refused.
    """

    user_id: str
    alias: str | None = None
    blocked: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetTier(_Limits):
    """A reusable budget (LiteLLM's `/budget/new`): keys, users and customers that name its
    `budget_id` take its amount, period and limits where they set none of their own, so
    changing the tier changes all of them."""

    budget_id: str
