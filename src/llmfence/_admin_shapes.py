"""What the admin API's registry routes (`_admin_keys`, `_admin_users`, `_admin_customers`,
`_admin_spend`) share: reading ids and flags from bodies, mapping `Fence`'s errors to HTTP, a
level's budget state, and the response shapes of users, teams, customers and budget tiers in
LiteLLM's field names."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from ._admin_views import iso, key_view, limits_view, spend_view, usd
from ._counters import budget, period_end
from ._fence_ops import RecordConflictError, RecordNotFoundError
from ._fields_json import json_name
from .exceptions import ConfigurationError, InvalidRequestError
from .stores import (
    BudgetScope,
    BudgetState,
    BudgetTier,
    CustomerRecord,
    KeyRecord,
    TeamRecord,
    UserRecord,
)

if TYPE_CHECKING:
    from ._fence import Fence

__all__ = [
    "Handler",
    "Handlers",
    "budget_view",
    "checked",
    "customer_view",
    "flag",
    "id_list",
    "key_views",
    "level_state",
    "team_view",
    "user_view",
]

_T = TypeVar("_T")
Handler = Callable[[dict[str, Any]], Awaitable[Any]]
Handlers = list[tuple[str, str, Handler]]
"""Routes as `(path, method, handler)`: `admin_routes` puts the master-key check in front."""


async def checked(call: Awaitable[_T]) -> _T:
    """Run a `Fence` operation; a field it refuses becomes a 400 naming the reason (a record
    not found stays a 404, a conflict a 400 of its own)."""
    try:
        return await call
    except (RecordNotFoundError, RecordConflictError):
        raise
    except ConfigurationError as error:
        raise InvalidRequestError(str(error)) from error


def id_list(body: Mapping[str, Any], name: str) -> list[str]:
    """A body's array of ids (`user_ids`, `team_ids`…).

    Raises:
        InvalidRequestError: Not a non-empty array of ids.
    """
    value = body.get(name)
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(f"'{name}' must be a non-empty array of ids.", param=name)
    return [json_name(name, item) for item in value]


def flag(body: Mapping[str, Any], name: str, default: bool = False) -> bool:
    """A boolean field (JSON `true`/`false`, or `"true"`/`"false"` in a query).

    Raises:
        InvalidRequestError: Anything else.
    """
    value = body.get(name, default)
    if isinstance(value, bool):
        return value
    if value in ("true", "false"):
        return bool(value == "true")
    raise InvalidRequestError(f"'{name}' must be true or false.", param=name)


def _scope(fence: Fence, level: str, ident: str, record: Any, now: float) -> BudgetScope:
    aligned = fence.budget_check.calendar_aligned
    end = period_end(record.budget_duration, now, record.created_at, aligned=aligned)
    return BudgetScope(budget(level, ident), level, ident, record.max_budget, end)


async def level_state(
    fence: Fence, level: str, ident: str, record: UserRecord | TeamRecord | CustomerRecord
) -> BudgetState:
    """A level's budget as the budget guard counts it: same counter, same period."""
    now = fence.clock()
    [state] = await fence.store.budgets([_scope(fence, level, ident, record, now)], now)
    return state


async def key_views(fence: Fence, records: list[KeyRecord]) -> list[dict[str, Any]]:
    """Keys as `/key/info` shows them (with `token`, the hash `/key/list` names them by),
    their budgets read in one store call. A regenerated key's budget is the one it carries
    over (`KeyRecord.scope_id`)."""
    now = fence.clock()
    scopes = [_scope(fence, "key", record.scope_id, record, now) for record in records]
    states = await fence.store.budgets(scopes, now) if scopes else []
    return [
        {"token": record.key_hash, **key_view(record, state)}
        for record, state in zip(records, states, strict=True)
    ]


def user_view(record: UserRecord, state: BudgetState) -> dict[str, Any]:
    """A user as `/user/info`'s `user_info` and `/user/list` show it."""
    return {
        "user_id": record.user_id,
        "team_id": record.team_id,
        "budget_id": record.budget_id,
        **limits_view(record),
        **spend_view(state, record.budget_duration),
    }


def team_view(record: TeamRecord, state: BudgetState) -> dict[str, Any]:
    """A team as `/team/list` and `/team/update` show it, with its members."""
    return {
        "team_id": record.team_id,
        "team_alias": record.team_alias,
        "budget_id": record.budget_id,
        **limits_view(record),
        **spend_view(state, record.budget_duration),
        "members_with_roles": [
            {"user_id": user_id, "role": member.get("role", "user")}
            for user_id, member in record.members.items()
        ],
        "team_memberships": [
            {
                "user_id": user_id,
                "team_id": record.team_id,
                "max_budget_in_team": usd(member.get("max_budget")),
                "budget_duration": member.get("budget_duration"),
            }
            for user_id, member in record.members.items()
        ],
    }


def budget_view(tier: BudgetTier) -> dict[str, Any]:
    """A budget tier as `/budget/*` show it (LiteLLM's budget table row)."""
    return {
        "budget_id": tier.budget_id,
        "max_budget": usd(tier.max_budget),
        "budget_duration": tier.budget_duration,
        "rpm_limit": tier.rpm_limit,
        "tpm_limit": tier.tpm_limit,
        "max_parallel_requests": tier.max_parallel_requests,
        "created_at": iso(tier.created_at),
    }


def customer_view(record: CustomerRecord, state: BudgetState) -> dict[str, Any]:
    """A customer as `/customer/info` shows it: LiteLLM's end-user row, with its budget in
    `litellm_budget_table`."""
    spend = spend_view(state, record.budget_duration)
    return {
        "user_id": record.user_id,
        "alias": record.alias,
        "blocked": record.blocked,
        "spend": spend["spend"],
        "total_spend": spend["total_spend"],
        "budget_id": record.budget_id,
        "metadata": dict(record.metadata),
        "litellm_budget_table": {
            "max_budget": usd(record.max_budget),
            "budget_duration": record.budget_duration,
            "budget_reset_at": spend["budget_reset_at"],
            "rpm_limit": record.rpm_limit,
            "tpm_limit": record.tpm_limit,
        },
        "created_at": iso(record.created_at),
    }
