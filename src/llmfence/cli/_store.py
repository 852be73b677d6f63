"""The command line over a store (`--store sqlite:///…`, `redis://…`): `Fence`'s Python
operations run here, and answers shaped as the admin API's (`_admin_shapes`), so the two
backends print the same thing.

Fields are checked as the admin API checks them (`json_fields`), and the same references
must exist (a user's team, a tier): a mistyped id is an error, not a new record, unless
`--create-missing` says so.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, TypeVar

from llmfence._admin_shapes import key_views, level_state, team_view, user_view
from llmfence._admin_views import as_usd
from llmfence._fence import Fence
from llmfence._fence_customers import ensure_budget
from llmfence._fence_ops import ensure_refs
from llmfence._fields import KEY_FIELDS, RECORD_FIELDS, TEAM_FIELDS, USER_FIELDS
from llmfence._fields_json import json_fields
from llmfence.exceptions import LLMFenceError
from llmfence.stores import Store, TeamRecord, UserRecord

from ._ops import OperationError

__all__ = ["StoreBackend"]

_T = TypeVar("_T")
_UPDATES = {
    "user": (*RECORD_FIELDS, "user_id", "team_id", "budget_id"),
    "team": (*RECORD_FIELDS, "team_id", "team_alias", "budget_id"),
}


async def _run(call: Awaitable[_T]) -> _T:
    """An operation's llmfence error (a bad field, a record not found) as an
    `OperationError` with its message."""
    try:
        return await call
    except LLMFenceError as error:
        raise OperationError(getattr(error, "message", None) or str(error)) from error


class StoreBackend:
    """`Fence` operations on `store`, answering as the admin API does."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.fence = Fence(store=store)

    async def aclose(self) -> None:
        await self.store.aclose()

    # -- keys ------------------------------------------------------------------------------

    async def create_key(self, body: dict[str, Any], create_missing: bool) -> dict[str, Any]:
        fields = as_usd(await _run(_sync(json_fields, body, KEY_FIELDS)))
        plain, record = await _run(self.fence.generate_key(**fields, create_missing=create_missing))
        [view] = await key_views(self.fence, [record])
        return {"key": plain, **view}

    async def list_keys(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        records = await self.fence.list_keys(
            user_id=filters.get("user_id"),
            team_id=filters.get("team_id"),
            key_alias=filters.get("key_alias"),
        )
        return await key_views(self.fence, records)

    async def key_info(self, key: str) -> dict[str, Any]:
        [view] = await key_views(self.fence, [await _run(self.fence.find_key(key))])
        return view

    async def rotate_key(self, key: str, grace_period: str | None) -> dict[str, Any]:
        plain, record = await _run(self.fence.regenerate_key(key, grace_period=grace_period))
        [view] = await key_views(self.fence, [record])
        return {"key": plain, **view}

    async def block_key(self, key: str, blocked: bool) -> dict[str, Any]:
        operation = self.fence.block_key if blocked else self.fence.unblock_key
        [view] = await key_views(self.fence, [await _run(operation(key))])
        return view

    async def delete_keys(self, keys: list[str]) -> dict[str, Any]:
        records = [await _run(self.fence.find_key(key)) for key in keys]
        for record in records:
            await self.store.delete_key(record.key_hash)
        return {"deleted_keys": [record.key_masked for record in records]}

    # -- users and teams -------------------------------------------------------------------

    async def _view(self, level: str, record: UserRecord | TeamRecord) -> dict[str, Any]:
        if isinstance(record, UserRecord):
            return user_view(record, await level_state(self.fence, "user", record.user_id, record))
        return team_view(record, await level_state(self.fence, "team", record.team_id, record))

    async def create_record(
        self, level: str, body: dict[str, Any], create_missing: bool
    ) -> dict[str, Any]:
        record: UserRecord | TeamRecord
        if level == "user":
            fields = as_usd(await _run(_sync(json_fields, body, USER_FIELDS)))
            user_id = fields.pop("user_id")
            record = await _run(
                self.fence.new_user(user_id, **fields, create_missing=create_missing)
            )
        else:
            fields = as_usd(await _run(_sync(json_fields, body, TEAM_FIELDS)))
            record = await _run(self.fence.new_team(fields.pop("team_id"), **fields))
        return await self._view(level, record)

    async def list_records(self, level: str, filters: dict[str, Any]) -> list[dict[str, Any]]:
        records: list[UserRecord] | list[TeamRecord]
        if level == "user":
            team = filters.get("team_id")
            records = [
                r for r in await self.fence.list_users() if team is None or r.team_id == team
            ]
        else:
            records = await self.fence.list_teams()
        return [await self._view(level, record) for record in records]

    async def record_info(self, level: str, ident: str) -> dict[str, Any]:
        record: UserRecord | TeamRecord | None
        if level == "user":
            record = await self.store.get_user(ident)
            keys = await self.store.list_keys(user_id=ident) if record else []
        else:
            record = await self.store.get_team(ident)
            keys = await self.store.list_keys(team_id=ident) if record else []
        if record is None:
            raise OperationError(f"{level.capitalize()} {ident!r} was not found.")
        return {
            f"{level}_id": ident,
            f"{level}_info": await self._view(level, record),
            "keys": await key_views(self.fence, keys),
        }

    async def update_record(
        self, level: str, body: dict[str, Any], create_missing: bool
    ) -> dict[str, Any]:
        changes = await _run(_sync(json_fields, body, _UPDATES[level]))
        ident = changes.pop(f"{level}_id")
        await _run(ensure_budget(self.store, changes.get("budget_id")))
        if level == "user":
            if changes.get("team_id"):
                await _run(
                    ensure_refs(
                        self.store,
                        self.fence.authenticator,
                        self.fence.clock(),
                        None,
                        changes["team_id"],
                        create_missing,
                    )
                )
            return await self._view(
                level, await _run(self.fence.apply_user_changes(ident, changes))
            )
        return await self._view(level, await _run(self.fence.apply_team_changes(ident, changes)))

    async def delete_records(self, level: str, ids: list[str]) -> dict[str, Any]:
        if level == "user":
            return {"deleted_users": await _run(self.fence.delete_users(ids))}
        return {"deleted_teams": await _run(self.fence.delete_teams(ids))}

    # -- spend -----------------------------------------------------------------------------

    async def spend_report(self, start: float, end: float, group_by: str) -> list[Any]:
        return await _run(self.fence.spend_report(start, end, group_by))


async def _sync(function: Any, *args: Any) -> Any:
    """A plain call as an awaitable, so `_run` maps its llmfence errors too."""
    return function(*args)
