"""`RedisStore`'s registry beyond keys: listing and deleting users and teams, customers and
budget tiers.

Like key, user and team records, a customer (`customer:<id>`) and a budget tier
(`budget_tier:<id>`) is a hash of one JSON value per field, under the registry's hash tag.
Each kind's ids are listed in a sorted set scored by creation order (`users`, `teams`,
`customers`, `budget_tiers`), written in the script that creates the record and cleared in the
one that deletes it. Users and teams created before these indexes existed are found by id but
not listed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypeVar

from ._redis_records import RedisRecords, decode_fields
from ._types import BudgetTier, CustomerRecord, TeamRecord, UserRecord

__all__ = ["RedisRegistry"]

_L = TypeVar("_L", UserRecord, TeamRecord, CustomerRecord, BudgetTier)
_KEEP: Final = ("keep", "", "keep", "")


class RedisRegistry(RedisRecords):
    """The registry part of `RedisStore`, with customers and budget tiers."""

    async def delete_user(self, user_id: str) -> bool:
        """Delete a user record (not its keys); False if there was none."""
        return await self._delete("user", "users", user_id)

    async def list_users(self) -> list[UserRecord]:
        """Every user record, oldest first."""
        return await self._list(UserRecord, "user", "users")

    async def delete_team(self, team_id: str) -> bool:
        """Delete a team record (not its keys); False if there was none."""
        return await self._delete("team", "teams", team_id)

    async def list_teams(self) -> list[TeamRecord]:
        """Every team record, oldest first."""
        return await self._list(TeamRecord, "team", "teams")

    async def create_customer(self, record: CustomerRecord) -> bool:
        """Store a new customer; False if the id is taken."""
        key = self._key("customer", record.user_id)
        return await self._create_record(key, record, "customers")

    async def get_customer(self, user_id: str) -> CustomerRecord | None:
        """A customer by id."""
        return await self._get_record(CustomerRecord, self._key("customer", user_id))

    async def update_customer(
        self, user_id: str, changes: Mapping[str, Any]
    ) -> CustomerRecord | None:
        """Change some fields of a customer."""
        keys = [self._key("customer", user_id)]
        return await self._update_record(CustomerRecord, keys, user_id, _KEEP, changes)

    async def delete_customer(self, user_id: str) -> bool:
        """Delete a customer; False if there was none."""
        return await self._delete("customer", "customers", user_id)

    async def list_customers(self) -> list[CustomerRecord]:
        """Every customer, oldest first."""
        return await self._list(CustomerRecord, "customer", "customers")

    async def create_budget_tier(self, tier: BudgetTier) -> bool:
        """Store a new tier; False if the id is taken."""
        key = self._key("budget_tier", tier.budget_id)
        return await self._create_record(key, tier, "budget_tiers")

    async def get_budget_tier(self, budget_id: str) -> BudgetTier | None:
        """A tier by id."""
        return await self._get_record(BudgetTier, self._key("budget_tier", budget_id))

    async def update_budget_tier(
        self, budget_id: str, changes: Mapping[str, Any]
    ) -> BudgetTier | None:
        """Change some fields of a tier."""
        keys = [self._key("budget_tier", budget_id)]
        return await self._update_record(BudgetTier, keys, budget_id, _KEEP, changes)

    async def delete_budget_tier(self, budget_id: str) -> bool:
        """Delete a tier; False if there was none."""
        return await self._delete("budget_tier", "budget_tiers", budget_id)

    async def list_budget_tiers(self) -> list[BudgetTier]:
        """Every tier, oldest first."""
        return await self._list(BudgetTier, "budget_tier", "budget_tiers")

    async def _delete(self, kind: str, index: str, record_id: str) -> bool:
        keys = [self._key(kind, record_id), self._key(index)]
        return bool(await self._script("registry_delete", keys, [record_id]))

    async def _list(self, cls: type[_L], kind: str, index: str) -> list[_L]:
        # list_keys.lua reads any kind's index and records ("all": every id, oldest first).
        reply = await self._script(
            "list_keys", [self._key(index)], ["all", "", self._key(kind, "")]
        )
        return [cls.from_dict(decode_fields(fields)) for fields in reply[1::2]]
