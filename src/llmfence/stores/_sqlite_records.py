"""`SQLiteStore`'s records: the registry, the spend log and BudgetManager projects.

Key, user and team records are stored as the JSON of their `to_dict()` (a key's user and team
also as columns, to list a user's or a team's keys); only a key's hash and masked form are ever
stored. The spend log keeps the newest `max_spend_records` records (the oldest are deleted as
new ones come), and running totals count every record ever appended, so they outlive the log.
As in the other stores, the totals of end users (whom clients name) are kept for the most
recently counted `max(max_spend_records, 1000)` of them only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypeVar

from ._protocol import SpendGroup
from ._spend import total_key, total_keys
from ._sqlite_base import SQLiteBase, db_int, dumps, loads
from ._types import KeyRecord, SpendRecord, SpendTotals, TeamRecord, UserRecord

__all__ = ["SQLiteRecords", "append_record"]

_R = TypeVar("_R", KeyRecord, UserRecord, TeamRecord)
_END_USER: Final = "end_user:"
_MIN_END_USER_TOTALS: Final = 1000
_FIELDS: Final = len(SpendRecord._fields)
# Each table's id column, by record type (names from this module only, never from callers).
_TABLES: Final = {KeyRecord: ("keys", "key_hash"), UserRecord: ("users", "user_id"),
                  TeamRecord: ("teams", "team_id")}  # fmt: skip


class SQLiteRecords(SQLiteBase):
    """The registry, spend log and project half of `SQLiteStore`."""

    _max_records: int

    # -- key, user and team records ----------------------------------------------------------

    async def create_key(self, record: KeyRecord) -> bool:
        """Store a new key record; False if one with that hash exists."""
        return await self._write("create_key", _create, record)

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        """The key record stored under a key's hash."""
        return await self._read("get_key", _get, KeyRecord, key_hash)

    async def update_key(self, key_hash: str, changes: Mapping[str, Any]) -> KeyRecord | None:
        """Change some fields of a key record."""
        return await self._write("update_key", _update, KeyRecord, key_hash, dict(changes))

    async def delete_key(self, key_hash: str) -> bool:
        """Delete a key record; False if there was none."""
        return await self._write("delete_key", _delete_key, key_hash)

    async def list_keys(
        self, *, user_id: str | None = None, team_id: str | None = None
    ) -> list[KeyRecord]:
        """Key records, all of them or those of one user and/or team."""
        return await self._read("list_keys", _list_keys, user_id, team_id)

    async def create_user(self, record: UserRecord) -> bool:
        """Store a new user; False if the id is taken."""
        return await self._write("create_user", _create, record)

    async def get_user(self, user_id: str) -> UserRecord | None:
        """A user record by id."""
        return await self._read("get_user", _get, UserRecord, user_id)

    async def update_user(self, user_id: str, changes: Mapping[str, Any]) -> UserRecord | None:
        """Change some fields of a user."""
        return await self._write("update_user", _update, UserRecord, user_id, dict(changes))

    async def create_team(self, record: TeamRecord) -> bool:
        """Store a new team; False if the id is taken."""
        return await self._write("create_team", _create, record)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        """A team record by id."""
        return await self._read("get_team", _get, TeamRecord, team_id)

    async def update_team(self, team_id: str, changes: Mapping[str, Any]) -> TeamRecord | None:
        """Change some fields of a team."""
        return await self._write("update_team", _update, TeamRecord, team_id, dict(changes))

    async def set_access_group(self, name: str, models: Sequence[str]) -> None:
        """Define (or redefine) a model access group."""
        await self._write("set_access_group", _set_group, name, dumps(list(models)))

    async def access_groups(self) -> dict[str, tuple[str, ...]]:
        """Every model access group and its models."""
        return await self._read("access_groups", _groups)

    # -- spend records -----------------------------------------------------------------------

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
        where: list[str] = []
        params: list[Any] = []
        if request_id is not None:
            where.append("json_extract(record, '$[0]') = ?")  # the record's first field
            params.append(request_id)
        for column, value in (
            ("key_hash", key_hash),
            ("user_id", user_id),
            ("team_id", team_id),
            ("model", model),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if start is not None:
            where.append("timestamp >= ?")
            params.append(start)
        if end is not None:
            where.append("timestamp <= ?")
            params.append(end)
        sql = "SELECT record FROM spend_log"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        params.append(max(limit, 0))
        return await self._read("spend_records", _spend_records, sql, tuple(params))

    async def spend_totals(self, group: SpendGroup, name: str = "") -> SpendTotals:
        """All-time totals of one group (`"global"` ignores `name`)."""
        table = "end_user_totals" if group == "end_user" else "spend_totals"
        return await self._read("spend_totals", _totals, table, total_key(group, name))

    # -- BudgetManager project documents -----------------------------------------------------

    async def get_project(self, project_name: str) -> dict[str, Any] | None:
        """A BudgetManager project's user dict, or None."""
        return await self._read("get_project", _get_project, project_name)

    async def set_project(self, project_name: str, user_dict: Mapping[str, Any]) -> None:
        """Replace a BudgetManager project's user dict."""
        await self._write("set_project", _set_project, project_name, dumps(dict(user_dict)))


# -- the jobs --------------------------------------------------------------------------------


def _id(record: KeyRecord | UserRecord | TeamRecord) -> str:
    if isinstance(record, KeyRecord):
        return record.key_hash
    if isinstance(record, UserRecord):
        return record.user_id
    return record.team_id


def _create(db: sqlite3.Connection, record: KeyRecord | UserRecord | TeamRecord) -> bool:
    table, column = _TABLES[type(record)]
    if isinstance(record, KeyRecord):
        cursor = db.execute(
            "INSERT OR IGNORE INTO keys VALUES (?, ?, ?, ?)",
            (record.key_hash, record.user_id, record.team_id, dumps(record.to_dict())),
        )
    else:
        cursor = db.execute(
            f"INSERT OR IGNORE INTO {table} ({column}, record) VALUES (?, ?)",
            (_id(record), dumps(record.to_dict())),
        )
    return cursor.rowcount == 1


def _get(db: sqlite3.Connection, kind: type[_R], record_id: str) -> _R | None:
    table, column = _TABLES[kind]
    row = db.execute(
        f"SELECT record FROM {table} WHERE {column} = ?",
        (record_id,),
    ).fetchone()
    return None if row is None else kind.from_dict(loads(row[0]))


def _update(
    db: sqlite3.Connection, kind: type[_R], record_id: str, changes: dict[str, Any]
) -> _R | None:
    record = _get(db, kind, record_id)
    if record is None:
        return None
    data = record.to_dict()
    data.update(changes)
    updated = kind.from_dict(data)
    if isinstance(updated, KeyRecord):
        db.execute(
            "UPDATE keys SET user_id = ?, team_id = ?, record = ? WHERE key_hash = ?",
            (updated.user_id, updated.team_id, dumps(updated.to_dict()), record_id),
        )
    else:
        table, column = _TABLES[kind]
        db.execute(
            f"UPDATE {table} SET record = ? WHERE {column} = ?",
            (dumps(updated.to_dict()), record_id),
        )
    return updated


def _delete_key(db: sqlite3.Connection, key_hash: str) -> bool:
    return db.execute("DELETE FROM keys WHERE key_hash = ?", (key_hash,)).rowcount == 1


def _list_keys(db: sqlite3.Connection, user_id: str | None, team_id: str | None) -> list[KeyRecord]:
    # Named parameters: Python 3.12.0-3.12.3 warn about numbered ones (`?1`) given a tuple.
    rows = db.execute(
        "SELECT record FROM keys WHERE (:user IS NULL OR user_id = :user) AND (:team IS NULL OR "
        "team_id = :team) ORDER BY rowid",
        {"user": user_id, "team": team_id},
    )
    return [KeyRecord.from_dict(loads(record)) for (record,) in rows]


def _set_group(db: sqlite3.Connection, name: str, models: str) -> None:
    db.execute(
        "INSERT INTO access_groups VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET "
        "models = excluded.models",
        (name, models),
    )


def _groups(db: sqlite3.Connection) -> dict[str, tuple[str, ...]]:
    rows = db.execute("SELECT name, models FROM access_groups ORDER BY rowid")
    return {name: tuple(loads(models)) for name, models in rows}


def _get_project(db: sqlite3.Connection, name: str) -> dict[str, Any] | None:
    row = db.execute("SELECT document FROM projects WHERE name = ?", (name,)).fetchone()
    return None if row is None else dict(loads(row[0]))


def _set_project(db: sqlite3.Connection, name: str, document: str) -> None:
    db.execute("INSERT OR REPLACE INTO projects VALUES (?, ?)", (name, document))


def _spend_records(db: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[SpendRecord]:
    # Fields a newer version appended are ignored; fields an older one lacked take defaults.
    return [SpendRecord(*loads(record)[:_FIELDS]) for (record,) in db.execute(sql, params)]


def _totals(db: sqlite3.Connection, table: str, name: str) -> SpendTotals:
    row = db.execute(
        f"SELECT cost, input_tokens, output_tokens, requests FROM {table} WHERE name = ?",
        (name,),
    ).fetchone()
    return SpendTotals() if row is None else SpendTotals(*(int(value) for value in row))


def append_record(db: sqlite3.Connection, record: SpendRecord, keep: int) -> None:
    """Append a record to the log (keeping the newest `keep`) and count it in its totals.

    Runs inside the settlement's transaction: the record and the settlement are one step.
    """
    seq = db.execute(
        "INSERT INTO spend_log (timestamp, model, key_hash, user_id, team_id, record) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (
            record.timestamp,
            record.model,
            record.key_hash,
            record.user_id,
            record.team_id,
            dumps(record),
        ),
    ).lastrowid
    assert seq is not None
    db.execute("DELETE FROM spend_log WHERE seq <= ?", (seq - keep,))
    added = (record.cost, record.input_tokens, record.output_tokens, 1)
    names = total_keys(record)
    for table, group in (
        ("spend_totals", [name for name in names if not name.startswith(_END_USER)]),
        ("end_user_totals", [name for name in names if name.startswith(_END_USER)]),
    ):
        if not group:
            continue
        marks = ", ".join("?" * len(group))
        found = {
            name: (int(c), int(i), int(o), int(r))
            for name, c, i, o, r in db.execute(
                f"SELECT name, cost, input_tokens, output_tokens, requests FROM {table} "
                f"WHERE name IN ({marks})",
                group,
            )
        }
        rows = [
            (
                name,
                *(db_int(a + b) for a, b in zip(found.get(name, (0, 0, 0, 0)), added, strict=True)),
            )
            for name in group
        ]
        if table == "spend_totals":
            db.executemany("INSERT OR REPLACE INTO spend_totals VALUES (?, ?, ?, ?, ?)", rows)
        else:
            # Each end user is stamped with this record's `seq`: the least recent go first.
            db.executemany(
                "INSERT OR REPLACE INTO end_user_totals VALUES (?, ?, ?, ?, ?, ?)",
                [(*row, seq) for row in rows],
            )
            new = sum(name not in found for name in group)
            if new:
                _bound_end_users(db, new, max(keep, _MIN_END_USER_TOTALS))


def _bound_end_users(db: sqlite3.Connection, added: int, bound: int) -> None:
    """Count new end users' totals; past `bound`, drop the least recently counted."""
    count = db.execute(
        "INSERT INTO counts VALUES ('end_user_totals', ?) ON CONFLICT (name) DO UPDATE SET "
        "value = value + excluded.value RETURNING value",
        (added,),
    ).fetchall()[0][0]
    excess = count - bound
    if excess > 0:
        db.execute(
            "DELETE FROM end_user_totals WHERE name IN "
            "(SELECT name FROM end_user_totals ORDER BY used LIMIT ?)",
            (excess,),
        )
        db.execute("UPDATE counts SET value = ? WHERE name = 'end_user_totals'", (bound,))
