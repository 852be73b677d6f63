"""`MemoryStore`'s records: the registry, the spend log and BudgetManager projects.

The spend log is a bounded ring buffer beside running totals, so memory stays bounded however
long the process runs. It holds each record as a plain tuple of its values: CPython's garbage
collector stops tracking a tuple that holds only text, numbers and `None` (an exact tuple, not
a `SpendRecord`, which is a subclass), so a full log of 100,000 records adds nothing to what a
full collection walks.

Running totals are kept for ever for every group the operator names (global, keys, users,
teams, models). End users are named by clients, so their totals are kept for the most recently
active `max(max_spend_records, 1000)` of them only: the ones the log could still hold records of.
An end user evicted from them reads as one with no spend, as one the log has forgotten does.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ._protocol import SpendGroup
from ._spend import matches, total_key, total_keys
from ._types import (
    BudgetTier,
    CustomerRecord,
    KeyRecord,
    SpendRecord,
    SpendTotals,
    TeamRecord,
    UserRecord,
)

__all__ = ["MemoryRecords"]

_R = TypeVar("_R", KeyRecord, UserRecord, TeamRecord, CustomerRecord, BudgetTier)
_END_USER = "end_user:"
_MIN_END_USER_TOTALS = 1000


@dataclass(slots=True)
class _Totals:
    cost: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0


class MemoryRecords:
    """The registry, spend log and project half of `MemoryStore`."""

    def __init__(self, max_spend_records: int) -> None:
        self._keys: dict[str, KeyRecord] = {}
        self._users: dict[str, UserRecord] = {}
        self._teams: dict[str, TeamRecord] = {}
        self._customers: dict[str, CustomerRecord] = {}
        self._tiers: dict[str, BudgetTier] = {}
        self._groups: dict[str, tuple[str, ...]] = {}
        self._projects: dict[str, dict[str, Any]] = {}
        self._log: deque[tuple[Any, ...]] = deque(maxlen=max_spend_records)
        self._totals: dict[str, _Totals] = {}
        # End users' totals, least recently counted first (see the module docstring).
        self._end_user_totals: OrderedDict[str, _Totals] = OrderedDict()
        self._max_end_user_totals = max(max_spend_records, _MIN_END_USER_TOTALS)

    # -- key, user and team records ----------------------------------------------------------

    async def create_key(self, record: KeyRecord) -> bool:
        """Store a new key record; False if one with that hash exists."""
        return _create(self._keys, record.key_hash, record)

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        """The key record stored under a key's hash."""
        return self._keys.get(key_hash)

    async def update_key(self, key_hash: str, changes: Mapping[str, Any]) -> KeyRecord | None:
        """Change some fields of a key record."""
        return _update(self._keys, key_hash, changes)

    async def delete_key(self, key_hash: str) -> bool:
        """Delete a key record; False if there was none."""
        return self._keys.pop(key_hash, None) is not None

    async def list_keys(
        self, *, user_id: str | None = None, team_id: str | None = None
    ) -> list[KeyRecord]:
        """Key records, all of them or those of one user and/or team."""
        return [
            record
            for record in self._keys.values()
            if (user_id is None or record.user_id == user_id)
            and (team_id is None or record.team_id == team_id)
        ]

    async def create_user(self, record: UserRecord) -> bool:
        """Store a new user; False if the id is taken."""
        return _create(self._users, record.user_id, record)

    async def get_user(self, user_id: str) -> UserRecord | None:
        """A user record by id."""
        return self._users.get(user_id)

    async def update_user(self, user_id: str, changes: Mapping[str, Any]) -> UserRecord | None:
        """Change some fields of a user."""
        return _update(self._users, user_id, changes)

    async def create_team(self, record: TeamRecord) -> bool:
        """Store a new team; False if the id is taken."""
        return _create(self._teams, record.team_id, record)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        """A team record by id."""
        return self._teams.get(team_id)

    async def update_team(self, team_id: str, changes: Mapping[str, Any]) -> TeamRecord | None:
        """Change some fields of a team."""
        return _update(self._teams, team_id, changes)

    async def delete_user(self, user_id: str) -> bool:
        """Delete a user record (not its keys); False if there was none."""
        return self._users.pop(user_id, None) is not None

    async def list_users(self) -> list[UserRecord]:
        """Every user record, oldest first."""
        return list(self._users.values())

    async def delete_team(self, team_id: str) -> bool:
        """Delete a team record (not its keys); False if there was none."""
        return self._teams.pop(team_id, None) is not None

    async def list_teams(self) -> list[TeamRecord]:
        """Every team record, oldest first."""
        return list(self._teams.values())

    # -- customers and budget tiers ----------------------------------------------------------

    async def create_customer(self, record: CustomerRecord) -> bool:
        """Store a new customer; False if the id is taken."""
        return _create(self._customers, record.user_id, record)

    async def get_customer(self, user_id: str) -> CustomerRecord | None:
        """A customer by id."""
        return self._customers.get(user_id)

    async def update_customer(
        self, user_id: str, changes: Mapping[str, Any]
    ) -> CustomerRecord | None:
        """Change some fields of a customer."""
        return _update(self._customers, user_id, changes)

    async def delete_customer(self, user_id: str) -> bool:
        """Delete a customer; False if there was none."""
        return self._customers.pop(user_id, None) is not None

    async def list_customers(self) -> list[CustomerRecord]:
        """Every customer, oldest first."""
        return list(self._customers.values())

    async def create_budget_tier(self, tier: BudgetTier) -> bool:
        """Store a new tier; False if the id is taken."""
        return _create(self._tiers, tier.budget_id, tier)

    async def get_budget_tier(self, budget_id: str) -> BudgetTier | None:
        """A tier by id."""
        return self._tiers.get(budget_id)

    async def update_budget_tier(
        self, budget_id: str, changes: Mapping[str, Any]
    ) -> BudgetTier | None:
        """Change some fields of a tier."""
        return _update(self._tiers, budget_id, changes)

    async def delete_budget_tier(self, budget_id: str) -> bool:
        """Delete a tier; False if there was none."""
        return self._tiers.pop(budget_id, None) is not None

    async def list_budget_tiers(self) -> list[BudgetTier]:
        """Every tier, oldest first."""
        return list(self._tiers.values())

    async def set_access_group(self, name: str, models: Sequence[str]) -> None:
        """Define (or redefine) a model access group."""
        self._groups[name] = tuple(models)

    async def access_groups(self) -> dict[str, tuple[str, ...]]:
        """Every model access group and its models."""
        return dict(self._groups)

    # -- spend records -----------------------------------------------------------------------

    def _append(self, record: SpendRecord) -> None:
        self._log.append(tuple(record))  # an exact tuple: see the module docstring
        totals = self._totals
        for key in total_keys(record):
            if key.startswith(_END_USER):
                counted = self._end_user_total(key)
            else:
                found = totals.get(key)
                counted = totals[key] = _Totals() if found is None else found
            counted.cost += record.cost
            counted.input_tokens += record.input_tokens
            counted.output_tokens += record.output_tokens
            counted.requests += 1

    def _end_user_total(self, key: str) -> _Totals:
        kept = self._end_user_totals
        counted = kept.get(key)
        if counted is not None:
            kept.move_to_end(key)
            return counted
        counted = kept[key] = _Totals()
        if len(kept) > self._max_end_user_totals:
            kept.popitem(last=False)
        return counted

    async def spend_records(
        self,
        *,
        key_hash: str | None = None,
        user_id: str | None = None,
        team_id: str | None = None,
        model: str | None = None,
        start: float | None = None,
        end: float | None = None,
        limit: int = 1000,
        request_id: str | None = None,
    ) -> list[SpendRecord]:
        """Kept spend records matching every filter given, newest first."""
        filters = (key_hash, user_id, team_id, model, start, end)
        found: list[SpendRecord] = []
        for values in reversed(self._log):
            if len(found) >= limit:
                break
            if matches(values, filters, request_id):
                found.append(SpendRecord._make(values))
        return found

    async def spend_totals(self, group: SpendGroup, name: str = "") -> SpendTotals:
        """All-time totals of one group (`"global"` ignores `name`)."""
        key = total_key(group, name)
        table = self._end_user_totals if group == "end_user" else self._totals
        totals = table.get(key, _Totals())
        return SpendTotals(totals.cost, totals.input_tokens, totals.output_tokens, totals.requests)

    # -- BudgetManager project documents -----------------------------------------------------

    async def get_project(self, project_name: str) -> dict[str, Any] | None:
        """A BudgetManager project's user dict, or None."""
        document = self._projects.get(project_name)
        return None if document is None else copy.deepcopy(document)

    async def set_project(self, project_name: str, user_dict: Mapping[str, Any]) -> None:
        """Replace a BudgetManager project's user dict."""
        self._projects[project_name] = copy.deepcopy(dict(user_dict))


def _create(table: dict[str, _R], key: str, record: _R) -> bool:
    if key in table:
        return False
    table[key] = record
    return True


def _update(table: dict[str, _R], key: str, changes: Mapping[str, Any]) -> _R | None:
    record = table.get(key)
    if record is None:
        return None
    data = record.to_dict()
    data.update(changes)
    updated = type(record).from_dict(data)
    table[key] = updated
    return updated
