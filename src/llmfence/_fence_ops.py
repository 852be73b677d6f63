"""`Fence`'s registry operations beyond creating: listing, updating, deleting, rotating and
blocking keys, users and teams, and team members with budgets of their own.

Each is also an admin API route (`/key/list`, `/key/regenerate`, `/user/delete`,
`/team/member_add`…); both doors check fields with `_fields` and store them in the same form.
Every change invalidates what the key cache holds of it, so it applies at once here and within
`cache_ttl` on other instances.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

from ._core.auth import Authenticator
from ._duration import parse_duration
from ._fields import (
    LIMIT_FIELDS,
    budget_nano,
    checked_duration,
    checked_key,
    checked_limit,
    checked_metadata,
    checked_name,
    daily_limit,
)
from .exceptions import ConfigurationError
from .stores import KeyRecord, Store, TeamRecord, UserRecord, hash_key, mask_key

__all__ = [
    "RecordConflictError",
    "RecordNotFoundError",
    "RegistryMixin",
    "checked_changes",
    "ensure_alias_free",
    "ensure_refs",
]


class RecordNotFoundError(ConfigurationError):
    """A key, user, team, customer or budget tier that does not exist (404 over HTTP)."""

    status_code = 404
    code = "not_found"
    type = "invalid_request_error"


class RecordConflictError(ConfigurationError):
    """An id or alias that is taken (400 over HTTP, as LiteLLM answers)."""

    status_code = 400
    code = "already_exists"
    type = "invalid_request_error"


def checked_changes(changes: Mapping[str, Any]) -> dict[str, Any]:
    """Fields given to an update, in Python form, checked and in the form records store.

    Raises:
        ConfigurationError: A field is invalid.
    """
    out: dict[str, Any] = {}
    for name, value in changes.items():
        if name in ("max_budget", "soft_budget"):
            out[name] = budget_nano(value)
        elif name == "budget_duration":
            out[name] = checked_duration(value)
        elif name in ("rpd_limit", "tpd_limit"):
            out[name] = daily_limit(name, value)
        elif name in LIMIT_FIELDS:
            out[name] = checked_limit(name, value)
        elif name == "models":
            out[name] = tuple(checked_name("a models entry", model) for model in value)
        elif name == "metadata":
            out[name] = checked_metadata(name, value)
        elif name in ("team_id", "user_id", "key_alias", "team_alias", "budget_id", "alias"):
            out[name] = None if value is None else checked_name(name, value)
        elif name == "blocked":
            out[name] = bool(value)
        else:
            raise ConfigurationError(f"unknown field {name!r}")
    return out


async def ensure_refs(
    store: Store,
    authenticator: Authenticator,
    now: float,
    user_id: str | None,
    team_id: str | None,
    create_missing: bool,
) -> None:
    """Check that the user and team a record names exist, or create them (`create_missing`).

    Raises:
        RecordNotFoundError: One does not exist and `create_missing` is false.
    """
    if team_id is not None and await store.get_team(team_id) is None:
        if not create_missing:
            raise RecordNotFoundError(
                f"Team {team_id!r} does not exist: create it first (/team/new), or pass "
                "create_missing=true."
            )
        await store.create_team(TeamRecord(team_id=team_id, created_at=now))
        authenticator.invalidate_team(team_id)
    if user_id is not None and await store.get_user(user_id) is None:
        if not create_missing:
            raise RecordNotFoundError(
                f"User {user_id!r} does not exist: create it first (/user/new), or pass "
                "create_missing=true."
            )
        await store.create_user(UserRecord(user_id=user_id, team_id=team_id, created_at=now))
        authenticator.invalidate_user(user_id)


async def ensure_alias_free(store: Store, alias: str | None, owner: str | None = None) -> None:
    """Refuse a `key_alias` another key holds (a regenerated key's holds its own: `owner` is
    the `scope_id` of the key being written).

    Aliases are checked against the store's keys before the write: admin writes are rare, and
    two writes of one alias at the same instant may both pass.

    Raises:
        RecordConflictError: Another key holds it.
    """
    if alias is None:
        return
    for record in await store.list_keys():
        if record.key_alias == alias and record.scope_id != owner:
            raise RecordConflictError(
                f"Unique key aliases across all keys are required. Key alias={alias} "
                "already exists."
            )


class RegistryMixin:
    """Lists, updates, deletes, rotates and blocks keys, users and teams."""

    store: Store
    authenticator: Authenticator
    clock: Callable[[], float]

    # -- keys --------------------------------------------------------------------------------

    async def find_key(self, key: str) -> KeyRecord:
        """A key's record, by the key itself or by its hash (as `/key/list` shows it).

        Raises:
            RecordNotFoundError: There is none.
        """
        record = await self.store.get_key(hash_key(key))
        if record is None and len(key) == 64:
            record = await self.store.get_key(key)
        if record is None:
            raise RecordNotFoundError("The key was not found.")
        return record

    async def list_keys(
        self,
        *,
        user_id: str | None = None,
        team_id: str | None = None,
        key_alias: str | None = None,
    ) -> list[KeyRecord]:
        """Key records, oldest first: all of them, or those of a user, team or alias."""
        records = await self.store.list_keys(user_id=user_id, team_id=team_id)
        return [r for r in records if key_alias is None or r.key_alias == key_alias]

    async def update_key(self, key: str, **changes: Any) -> KeyRecord:
        """Change some fields of a key (`max_budget=`, `rpm_limit=`, `blocked=`…).

        Raises:
            RecordNotFoundError: No such key.
            RecordConflictError: Its new `key_alias` is another key's.
        """
        record = await self.find_key(key)
        return await self.apply_key_changes(record, checked_changes(changes))

    async def apply_key_changes(self, record: KeyRecord, changes: Mapping[str, Any]) -> KeyRecord:
        """Store checked changes (in storage form) to a key record."""
        if changes.get("key_alias") is not None:
            await ensure_alias_free(self.store, changes["key_alias"], record.scope_id)
        updated = await self.store.update_key(record.key_hash, changes)
        self.authenticator.invalidate_key(record.key_hash)
        if updated is None:
            raise RecordNotFoundError("The key was not found.")
        return updated

    async def block_key(self, key: str) -> KeyRecord:
        """Block a key: its requests get 401 until it is unblocked."""
        return await self.apply_key_changes(await self.find_key(key), {"blocked": True})

    async def unblock_key(self, key: str) -> KeyRecord:
        """Unblock a key."""
        return await self.apply_key_changes(await self.find_key(key), {"blocked": False})

    async def regenerate_key(
        self, key: str, *, grace_period: str | None = None, new_key: str | None = None
    ) -> tuple[str, KeyRecord]:
        """Rotate a key: a new key with the same fields, spend and limits.

        The new key keeps the old one's counters (`KeyRecord.counter_id`), so what it spent
        and its rate windows carry over. The old key is deleted, or with `grace_period`
        (`"24h"`…) keeps working until then and stops (it expires).

        Returns:
            The new plain key (shown once) and its record.

        Raises:
            RecordNotFoundError: No such key.
            ConfigurationError: A bad grace period or `new_key`, or `new_key` exists.
        """
        old = await self.find_key(key)
        now = self.clock()
        grace = None if grace_period is None else parse_duration(grace_period).seconds
        if grace_period is not None and grace is None:
            raise ConfigurationError("grace_period must be a fixed duration such as '24h'")
        plain = checked_key(new_key) if new_key is not None else "sk-" + secrets.token_urlsafe(32)
        record = old.replace(
            key_hash=hash_key(plain), key_masked=mask_key(plain), counter_id=old.scope_id
        )
        if not await self.store.create_key(record):
            raise RecordConflictError("that key already exists")
        if grace:
            expires = now + grace if old.expires is None else min(old.expires, now + grace)
            await self.store.update_key(old.key_hash, {"expires": expires})
        else:
            await self.store.delete_key(old.key_hash)
        self.authenticator.invalidate_key(old.key_hash)
        self.authenticator.invalidate_key(record.key_hash)
        return plain, record

    # -- users and teams ---------------------------------------------------------------------

    async def list_users(self) -> list[UserRecord]:
        """Every user, oldest first."""
        return await self.store.list_users()

    async def update_user(self, user_id: str, **changes: Any) -> UserRecord:
        """Change some fields of a user (`max_budget=`, `budget_duration=`, `team_id=`…).

        Raises:
            RecordNotFoundError: No such user.
        """
        return await self.apply_user_changes(user_id, checked_changes(changes))

    async def apply_user_changes(self, user_id: str, changes: Mapping[str, Any]) -> UserRecord:
        """Store checked changes (in storage form) to a user record."""
        updated = await self.store.update_user(user_id, changes)
        self.authenticator.invalidate_user(user_id)
        if updated is None:
            raise RecordNotFoundError(f"User {user_id!r} was not found.")
        return updated

    async def delete_users(self, user_ids: Iterable[str]) -> list[str]:
        """Delete users and their keys (as LiteLLM does); returns the ids deleted.

        Raises:
            RecordNotFoundError: One of them does not exist (nothing is deleted).
        """
        ids = list(user_ids)
        for user_id in ids:
            if await self.store.get_user(user_id) is None:
                raise RecordNotFoundError(f"User {user_id!r} was not found.")
        for user_id in ids:
            for record in await self.store.list_keys(user_id=user_id):
                await self.store.delete_key(record.key_hash)
            await self.store.delete_user(user_id)
        self.authenticator.invalidate_all()
        return ids

    async def list_teams(self) -> list[TeamRecord]:
        """Every team, oldest first."""
        return await self.store.list_teams()

    async def update_team(self, team_id: str, **changes: Any) -> TeamRecord:
        """Change some fields of a team (`max_budget=`, `team_alias=`…).

        Raises:
            RecordNotFoundError: No such team.
        """
        return await self.apply_team_changes(team_id, checked_changes(changes))

    async def apply_team_changes(self, team_id: str, changes: Mapping[str, Any]) -> TeamRecord:
        """Store checked changes (in storage form) to a team record."""
        updated = await self.store.update_team(team_id, changes)
        self.authenticator.invalidate_team(team_id)
        if updated is None:
            raise RecordNotFoundError(f"Team {team_id!r} was not found.")
        return updated

    async def delete_teams(self, team_ids: Iterable[str]) -> list[str]:
        """Delete teams and their keys (as LiteLLM does); returns the ids deleted.

        Raises:
            RecordNotFoundError: One of them does not exist (nothing is deleted).
        """
        ids = list(team_ids)
        for team_id in ids:
            if await self.store.get_team(team_id) is None:
                raise RecordNotFoundError(f"Team {team_id!r} was not found.")
        for team_id in ids:
            for record in await self.store.list_keys(team_id=team_id):
                await self.store.delete_key(record.key_hash)
            await self.store.delete_team(team_id)
        self.authenticator.invalidate_all()
        return ids

    async def add_team_member(
        self,
        team_id: str,
        user_id: str,
        *,
        role: str = "user",
        max_budget_in_team: float | Decimal | None = None,
        budget_duration: str | None = None,
        create_missing: bool = True,
    ) -> TeamRecord:
        """Add a user to a team, with a budget of its own inside the team.

        `max_budget_in_team` (USD) is charged for the user's requests made with the team's
        keys (keys naming both the team and the user), beside the team's and the user's own
        budgets. A user that does not exist is created (LiteLLM does too) unless
        `create_missing` is false.

        Raises:
            RecordNotFoundError: No such team (or user, with `create_missing=False`).
            ConfigurationError: A bad role, budget or duration.
        """
        if role not in ("admin", "user"):
            raise ConfigurationError("role must be 'admin' or 'user'")
        team = await self.store.get_team(checked_name("team_id", team_id))
        if team is None:
            raise RecordNotFoundError(f"Team {team_id!r} was not found.")
        checked_name("user_id", user_id)
        await ensure_refs(
            self.store, self.authenticator, self.clock(), user_id, None, create_missing
        )
        membership = {
            "role": role,
            "max_budget": budget_nano(max_budget_in_team),
            "budget_duration": checked_duration(budget_duration),
            "created_at": self.clock(),
        }
        return await self.apply_team_changes(
            team_id, {"members": {**team.members, user_id: membership}}
        )

    async def delete_team_member(self, team_id: str, user_id: str) -> TeamRecord:
        """Remove a user from a team (the user and its keys stay).

        Raises:
            RecordNotFoundError: No such team, or the user is not a member.
        """
        team = await self.store.get_team(team_id)
        if team is None or user_id not in team.members:
            raise RecordNotFoundError(f"User {user_id!r} is not a member of team {team_id!r}.")
        members = {k: v for k, v in team.members.items() if k != user_id}
        return await self.apply_team_changes(team_id, {"members": members})
