"""`SQLiteStore`'s registry beyond keys: listing and deleting users and teams, customers and
budget tiers.

Customers and tiers live in one `registry` table, as the JSON of their `to_dict()` under
their kind and id, listed in creation order (`rowid`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any, Final, TypeVar

from ._sqlite_base import SQLiteBase, dumps, loads
from ._types import BudgetTier, CustomerRecord, TeamRecord, UserRecord

__all__ = ["SQLiteRegistry"]

_K = TypeVar("_K", CustomerRecord, BudgetTier)
_T = TypeVar("_T", UserRecord, TeamRecord)
_KINDS: Final = {CustomerRecord: "customer", BudgetTier: "budget_tier"}
# Each table's id column, by record type (names from this module only, never from callers).
_TABLES: Final = {UserRecord: ("users", "user_id"), TeamRecord: ("teams", "team_id")}


class SQLiteRegistry(SQLiteBase):
    """Users and teams listed and deleted; customers and budget tiers."""

    async def delete_user(self, user_id: str) -> bool:
        """Delete a user record (not its keys); False if there was none."""
        return await self._write("delete_user", _delete, UserRecord, user_id)

    async def list_users(self) -> list[UserRecord]:
        """Every user record, oldest first."""
        return await self._read("list_users", _list, UserRecord)

    async def delete_team(self, team_id: str) -> bool:
        """Delete a team record (not its keys); False if there was none."""
        return await self._write("delete_team", _delete, TeamRecord, team_id)

    async def list_teams(self) -> list[TeamRecord]:
        """Every team record, oldest first."""
        return await self._read("list_teams", _list, TeamRecord)

    async def create_customer(self, record: CustomerRecord) -> bool:
        """Store a new customer; False if the id is taken."""
        return await self._write("create_customer", _create, record.user_id, record)

    async def get_customer(self, user_id: str) -> CustomerRecord | None:
        """A customer by id."""
        return await self._read("get_customer", _get, CustomerRecord, user_id)

    async def update_customer(
        self, user_id: str, changes: Mapping[str, Any]
    ) -> CustomerRecord | None:
        """Change some fields of a customer."""
        return await self._write("update_customer", _update, CustomerRecord, user_id, dict(changes))

    async def delete_customer(self, user_id: str) -> bool:
        """Delete a customer; False if there was none."""
        return await self._write("delete_customer", _remove, CustomerRecord, user_id)

    async def list_customers(self) -> list[CustomerRecord]:
        """Every customer, oldest first."""
        return await self._read("list_customers", _all, CustomerRecord)

    async def create_budget_tier(self, tier: BudgetTier) -> bool:
        """Store a new tier; False if the id is taken."""
        return await self._write("create_budget_tier", _create, tier.budget_id, tier)

    async def get_budget_tier(self, budget_id: str) -> BudgetTier | None:
        """A tier by id."""
        return await self._read("get_budget_tier", _get, BudgetTier, budget_id)

    async def update_budget_tier(
        self, budget_id: str, changes: Mapping[str, Any]
    ) -> BudgetTier | None:
        """Change some fields of a tier."""
        return await self._write(
            "update_budget_tier", _update, BudgetTier, budget_id, dict(changes)
        )

    async def delete_budget_tier(self, budget_id: str) -> bool:
        """Delete a tier; False if there was none."""
        return await self._write("delete_budget_tier", _remove, BudgetTier, budget_id)

    async def list_budget_tiers(self) -> list[BudgetTier]:
        """Every tier, oldest first."""
        return await self._read("list_budget_tiers", _all, BudgetTier)


# -- the jobs --------------------------------------------------------------------------------


def _delete(db: sqlite3.Connection, kind: type[_T], record_id: str) -> bool:
    table, column = _TABLES[kind]
    return db.execute(f"DELETE FROM {table} WHERE {column} = ?", (record_id,)).rowcount == 1


def _list(db: sqlite3.Connection, kind: type[_T]) -> list[_T]:
    table, _ = _TABLES[kind]
    rows = db.execute(f"SELECT record FROM {table} ORDER BY rowid")
    return [kind.from_dict(loads(record)) for (record,) in rows]


def _create(db: sqlite3.Connection, record_id: str, record: CustomerRecord | BudgetTier) -> bool:
    cursor = db.execute(
        "INSERT OR IGNORE INTO registry VALUES (?, ?, ?)",
        (_KINDS[type(record)], record_id, dumps(record.to_dict())),
    )
    return cursor.rowcount == 1


def _get(db: sqlite3.Connection, kind: type[_K], record_id: str) -> _K | None:
    row = db.execute(
        "SELECT record FROM registry WHERE kind = ? AND id = ?", (_KINDS[kind], record_id)
    ).fetchone()
    return None if row is None else kind.from_dict(loads(row[0]))


def _update(
    db: sqlite3.Connection, kind: type[_K], record_id: str, changes: dict[str, Any]
) -> _K | None:
    record = _get(db, kind, record_id)
    if record is None:
        return None
    updated = kind.from_dict({**record.to_dict(), **changes})
    db.execute(
        "UPDATE registry SET record = ? WHERE kind = ? AND id = ?",
        (dumps(updated.to_dict()), _KINDS[kind], record_id),
    )
    return updated


def _remove(db: sqlite3.Connection, kind: type[_K], record_id: str) -> bool:
    cursor = db.execute("DELETE FROM registry WHERE kind = ? AND id = ?", (_KINDS[kind], record_id))
    return cursor.rowcount == 1


def _all(db: sqlite3.Connection, kind: type[_K]) -> list[_K]:
    rows = db.execute("SELECT record FROM registry WHERE kind = ? ORDER BY rowid", (_KINDS[kind],))
    return [kind.from_dict(loads(record)) for (record,) in rows]
