"""`RedisStore`'s records: the registry, the spend log's reads and BudgetManager projects.

Key, user and team records are hashes with one JSON value per field, so an update rewrites only
the fields it changes and no number ever passes through cjson (which keeps 14 significant
digits). Creating, updating and deleting a key record keeps its indexes (by user, by team) right
in the same script. The spend log is written by `settle.lua` and read by `_redis_spendlog`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ._redis_base import text
from ._redis_spendlog import RedisSpendLog
from ._types import (
    BudgetTier,
    CustomerRecord,
    KeyRecord,
    TeamRecord,
    UserRecord,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisRecords", "decode_fields"]

_R = TypeVar("_R", KeyRecord, UserRecord, TeamRecord, CustomerRecord, BudgetTier)
_KEEP_INDEX: Final = ("keep", "", "keep", "")


class RedisRecords(RedisSpendLog):
    """The registry, spend log and project part of `RedisStore`."""

    # -- key, user and team records ----------------------------------------------------------

    async def create_key(self, record: KeyRecord) -> bool:
        """Store a new key record; False if one with that hash exists."""
        keys = [
            self._key("key", record.key_hash),
            self._key("keys"),
            self._key("keys", "seq"),
            self._key("keys", "by_user"),
            self._key("keys", "by_team"),
        ]
        args = [
            record.key_hash,
            *_index_args(record.user_id),
            *_index_args(record.team_id),
            *_fields(record.to_dict()),
        ]
        return bool(await self._script("record_create", keys, args))

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        """The key record stored under a key's hash."""
        return await self._get_record(KeyRecord, self._key("key", key_hash))

    async def update_key(self, key_hash: str, changes: Mapping[str, Any]) -> KeyRecord | None:
        """Change some fields of a key record."""
        keys = [
            self._key("key", key_hash),
            self._key("keys", "by_user"),
            self._key("keys", "by_team"),
        ]
        index = [
            *(_index_args(changes["user_id"]) if "user_id" in changes else ("keep", "")),
            *(_index_args(changes["team_id"]) if "team_id" in changes else ("keep", "")),
        ]
        return await self._update_record(KeyRecord, keys, key_hash, index, changes)

    async def delete_key(self, key_hash: str) -> bool:
        """Delete a key record; False if there was none."""
        keys = [
            self._key("key", key_hash),
            self._key("keys"),
            self._key("keys", "by_user"),
            self._key("keys", "by_team"),
        ]
        return bool(await self._script("record_delete", keys, [key_hash]))

    async def list_keys(
        self, *, user_id: str | None = None, team_id: str | None = None
    ) -> list[KeyRecord]:
        """Key records, all of them or those of one user and/or team, oldest first."""
        keys = [self._key("keys")]
        if user_id is not None:
            keys.append(self._key("keys", "by_user"))
            args = ["index", user_id]
        elif team_id is not None:
            keys.append(self._key("keys", "by_team"))
            args = ["index", team_id]
        else:
            args = ["all", ""]
        reply = await self._script("list_keys", keys, [*args, self._key("key", "")])
        records = [KeyRecord.from_dict(decode_fields(fields)) for fields in reply[1::2]]
        # The index only narrows the search; the records' own fields decide, as in MemoryStore.
        return [
            record
            for record in records
            if (user_id is None or record.user_id == user_id)
            and (team_id is None or record.team_id == team_id)
        ]

    async def create_user(self, record: UserRecord) -> bool:
        """Store a new user; False if the id is taken."""
        return await self._create_record(self._key("user", record.user_id), record, "users")

    async def get_user(self, user_id: str) -> UserRecord | None:
        """A user record by id."""
        return await self._get_record(UserRecord, self._key("user", user_id))

    async def update_user(self, user_id: str, changes: Mapping[str, Any]) -> UserRecord | None:
        """Change some fields of a user."""
        keys = [self._key("user", user_id)]
        return await self._update_record(UserRecord, keys, user_id, _KEEP_INDEX, changes)

    async def create_team(self, record: TeamRecord) -> bool:
        """Store a new team; False if the id is taken."""
        return await self._create_record(self._key("team", record.team_id), record, "teams")

    async def get_team(self, team_id: str) -> TeamRecord | None:
        """A team record by id."""
        return await self._get_record(TeamRecord, self._key("team", team_id))

    async def update_team(self, team_id: str, changes: Mapping[str, Any]) -> TeamRecord | None:
        """Change some fields of a team."""
        keys = [self._key("team", team_id)]
        return await self._update_record(TeamRecord, keys, team_id, _KEEP_INDEX, changes)

    async def set_access_group(self, name: str, models: Sequence[str]) -> None:
        """Define (or redefine) a model access group."""
        key, value = self._key("access_groups"), json.dumps(list(models))

        async def call(client: Redis) -> None:
            await client.hset(key, name, value)

        await self._run("set_access_group", call)

    async def access_groups(self) -> dict[str, tuple[str, ...]]:
        """Every model access group and its models."""
        key = self._key("access_groups")

        async def call(client: Redis) -> dict[Any, Any]:
            return await client.hgetall(key)

        groups = await self._run("access_groups", call)
        return {text(name): tuple(json.loads(models)) for name, models in groups.items()}

    async def _create_record(
        self,
        key: str,
        record: UserRecord | TeamRecord | CustomerRecord | BudgetTier,
        index: str,
    ) -> bool:
        """Create a record and list its id in its kind's index (`users`, `teams`…), in
        creation order."""
        record_id = _record_id(record)
        keys = [key, self._key(index), self._key(index, "seq")]
        args = [record_id, "none", "", "none", "", *_fields(record.to_dict())]
        return bool(await self._script("record_create", keys, args))

    async def _get_record(self, cls: type[_R], key: str) -> _R | None:
        fields = await self._read_record(key)
        if not fields:
            return None
        return cls.from_dict({text(name): json.loads(value) for name, value in fields.items()})

    async def _update_record(
        self,
        cls: type[_R],
        keys: list[str],
        record_id: str,
        index: Sequence[str],
        changes: Mapping[str, Any],
    ) -> _R | None:
        # Fields a record does not have would be dropped by `from_dict` anyway; not storing
        # them keeps the hash exactly the record.
        names = {field.name for field in dataclasses.fields(cls)}
        known: dict[str, Any] = {name: value for name, value in changes.items() if name in names}
        args = [record_id, *index, *_fields(known)]
        reply = await self._script("record_update", keys, args)
        return None if reply is None else cls.from_dict(decode_fields(reply))

    # -- BudgetManager project documents -----------------------------------------------------

    async def get_project(self, project_name: str) -> dict[str, Any] | None:
        """A BudgetManager project's user dict, or None."""
        key = self._key("project", project_name)

        async def call(client: Redis) -> Any:
            return await client.get(key)

        document = await self._run("get_project", call)
        if document is None:
            return None
        loaded: dict[str, Any] = json.loads(document)
        return loaded

    async def set_project(self, project_name: str, user_dict: Mapping[str, Any]) -> None:
        """Replace a BudgetManager project's user dict (stored as one JSON document)."""
        key, document = self._key("project", project_name), json.dumps(user_dict, default=_jsonable)

        async def call(client: Redis) -> None:
            await client.set(key, document)

        await self._run("set_project", call)


def _record_id(record: UserRecord | TeamRecord | CustomerRecord | BudgetTier) -> str:
    if isinstance(record, TeamRecord):
        return record.team_id
    if isinstance(record, BudgetTier):
        return record.budget_id
    return record.user_id


def _index_args(value: Any) -> tuple[str, str]:
    # Only string ids are indexed: no string lookup could match any other value.
    return ("set", value) if isinstance(value, str) else ("none", "")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _fields(data: Mapping[str, Any]) -> list[str]:
    # One JSON value per hash field: an update rewrites only the fields it changes, and no
    # number ever passes through cjson (which keeps 14 significant digits).
    pairs: list[str] = []
    for name, value in data.items():
        pairs += [name, json.dumps(value, default=_jsonable)]
    return pairs


def decode_fields(flat: Iterable[Any]) -> dict[str, Any]:
    items = [text(item) for item in flat]
    return {items[i]: json.loads(items[i + 1]) for i in range(0, len(items), 2)}
