"""What authentication reads beyond keys, users and teams: budget tiers, team memberships and
registered customers (the end users request bodies name).

A record that names a budget tier (`budget_id`) takes the tier's amount, period and limits
where it sets none of its own; the merged record is what plans are built from, so it is
cached with the principal (or the customer) and a tier change reaches every record naming
it within one cache period (at once on the instance that made it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

from cachetools import TTLCache

from llmfence.stores import (
    CustomerRecord,
    KeyRecord,
    Store,
    TeamRecord,
    UserRecord,
)
from llmfence.stores._record_types import BUDGET_TIER_FIELDS

__all__ = ["Customers", "team_member", "with_tier"]

_T = TypeVar("_T", KeyRecord, UserRecord, CustomerRecord)
_ABSENT: Final = object()
Call = Callable[[Awaitable[Any]], Awaitable[Any]]


async def with_tier(store: Store, call: Call, record: _T) -> _T:
    """A record with its budget tier's amount, period and limits where it sets none.

    A tier's amount comes with its period unless the record sets a period of its own. A
    store without budget tiers (no `BudgetTierStore`), or a tier that is gone, changes nothing.
    """
    get_tier = getattr(store, "get_budget_tier", None)
    if not record.budget_id or get_tier is None:
        return record
    tier = await call(get_tier(record.budget_id))
    if tier is None:
        return record
    changes = {
        name: getattr(tier, name)
        for name in BUDGET_TIER_FIELDS
        if getattr(record, name) is None and getattr(tier, name) is not None
    }
    return record.replace(**changes) if changes else record


def team_member(team: TeamRecord, user_id: str | None) -> UserRecord | None:
    """A user's own budget inside a team (`max_budget_in_team`), as a user record; None if
    the team gives the user none."""
    membership = team.members.get(user_id) if user_id else None
    if user_id is None or not membership or membership.get("max_budget") is None:
        return None
    return UserRecord(
        user_id=user_id,
        team_id=team.team_id,
        max_budget=membership["max_budget"],
        budget_duration=membership.get("budget_duration"),
        created_at=membership.get("created_at") or team.created_at,
    )


class Customers:
    """Registered customers by id, with their tiers, cached for `ttl` seconds.

    Unknown ids are cached too (as None), so the store is asked at most once per id and cache
    period, and a request that names no customer never asks.
    """

    def __init__(
        self, store: Store, size: int, ttl: float, clock: Callable[[], float], call: Call
    ) -> None:
        self._store = store
        self._call = call
        self._cache: TTLCache[str, object] = TTLCache(size, ttl, timer=clock)
        self._generation = 0

    async def get(self, end_user: str) -> CustomerRecord | None:
        """The customer, or None (not cached if an admin change raced the read)."""
        found = self._cache.get(end_user, _ABSENT)
        if found is _ABSENT:
            generation = self._generation
            get = getattr(self._store, "get_customer", None)
            record = None if get is None else await self._call(get(end_user))
            if record is not None:
                record = await with_tier(self._store, self._call, record)
            if generation == self._generation:
                self._cache[end_user] = record
            return record
        return found if isinstance(found, CustomerRecord) else None

    def forget(self, end_user: str | None = None) -> None:
        """Drop one cached customer, or all of them."""
        self._generation += 1
        if end_user is None:
            self._cache.clear()
        else:
            self._cache.pop(end_user, None)
