"""Who is calling: API key → key record → user → team, cached, with model access rules.

Nothing here knows ASGI: the middleware hands in the request headers as a mapping of lower-case
names to values and gets a `Principal` back, or an `AuthError` that maps to a 401 or 403.
"""

from __future__ import annotations

import fnmatch
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cachetools import TTLCache

from llmfence.exceptions import LLMFenceError
from llmfence.stores import KeyRecord, Store, TeamRecord, UserRecord, hash_key, mask_key

__all__ = ["AuthError", "Authenticator", "Principal", "api_key_from_headers"]

logger = logging.getLogger("llmfence")
_T = TypeVar("_T")

# Where clients put a key: OpenAI's SDKs (Authorization: Bearer), Anthropic's (x-api-key),
# Azure OpenAI's (api-key) and Google's (x-goog-api-key).
_KEY_HEADERS = ("x-api-key", "api-key", "x-goog-api-key")


class AuthError(LLMFenceError):
    """The caller is not who it must be: no key, an unknown or expired key, a forbidden model."""

    status_code = 401
    code = "invalid_api_key"
    type = "invalid_request_error"

    @classmethod
    def forbidden_model(cls, model: str) -> AuthError:
        """The key may not use this model (403 `model_not_allowed`)."""
        error = cls(f"This key is not allowed to use model {model!r}.", param="model")
        error.status_code = 403
        error.code = "model_not_allowed"
        error.type = "permission_error"
        return error


@dataclass(frozen=True, slots=True)
class Principal:
    """The resolved caller of one request.

    Attributes:
        key_hash: sha256 of the key used, or `None` (master key, or no auth).
        key_masked: The key's display form, e.g. `sk-...Qw8z`.
        key: The key's record (`None` for the master key).
        user: The record of the key's user, if the key has one and it exists.
        team: The record of the key's (or user's) team, if any.
        is_master: Whether the master key was used.
    """

    key_hash: str | None = None
    key_masked: str | None = None
    key: KeyRecord | None = None
    user: UserRecord | None = None
    team: TeamRecord | None = None
    is_master: bool = False

    @property
    def user_id(self) -> str | None:
        """The user this request is charged to."""
        if self.key is not None and self.key.user_id:
            return self.key.user_id
        return None

    @property
    def team_id(self) -> str | None:
        """The team this request is charged to."""
        if self.key is not None and self.key.team_id:
            return self.key.team_id
        return self.user.team_id if self.user is not None else None

    def spend_fields(self) -> dict[str, str | None]:
        """Who a spend record is charged to: key hash, masked key, user and team."""
        return {
            "key_hash": self.key_hash,
            "key_masked": self.key_masked,
            "user_id": self.user_id,
            "team_id": self.team_id,
        }


def api_key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The API key of a request, from any of the headers clients put one in."""
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for name in _KEY_HEADERS:
        value = headers.get(name)
        if value and value.strip():
            return value.strip()
    return None


def model_allowed(model: str, allowed: Sequence[str], groups: Mapping[str, Sequence[str]]) -> bool:
    """Whether `model` is in an allow-list of names, access groups and `fnmatch` patterns."""
    if not allowed:
        return True
    for entry in allowed:
        members = groups.get(entry)
        for pattern in members if members is not None else (entry,):
            if pattern == model or pattern == "*" or fnmatch.fnmatchcase(model, pattern):
                return True
    return False


class Authenticator:
    """Resolves API keys to principals, caching records for a bounded time.

    Records are cached for `cache_ttl` seconds: an admin change made through this process
    invalidates its cache at once (`invalidate_*`); a change made by another instance is seen
    here within `cache_ttl` (default 5 s). Unknown keys are cached too, so a flood of bad keys
    does not reach the store every time.

    Args:
        store: Where key, user and team records live.
        master_key: The key that may do everything, including the admin API.
        access_groups: Model access groups defined in code, merged with the store's.
        cache_ttl: Seconds a record (or an unknown key) is kept.
        cache_size: How many records of each kind are kept.
        clock: Unix time (a fake clock in tests).
    """

    def __init__(
        self,
        store: Store,
        *,
        master_key: str | None = None,
        access_groups: Mapping[str, Iterable[str]] | None = None,
        cache_ttl: float = 5.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._master_hash = hash_key(master_key).encode() if master_key else None
        self._static_groups = {k: tuple(v) for k, v in (access_groups or {}).items()}
        self._clock = clock
        self._keys: TTLCache[str, KeyRecord | None] = TTLCache(cache_size, cache_ttl, timer=clock)
        # Unknown keys are remembered apart, so a flood of made-up keys cannot evict the
        # records of the keys in use.
        self._unknown: TTLCache[str, None] = TTLCache(cache_size, cache_ttl, timer=clock)
        self._users: TTLCache[str, UserRecord | None] = TTLCache(cache_size, cache_ttl, timer=clock)
        self._teams: TTLCache[str, TeamRecord | None] = TTLCache(cache_size, cache_ttl, timer=clock)
        self._groups: TTLCache[str, dict[str, tuple[str, ...]]] = TTLCache(
            1, cache_ttl, timer=clock
        )

    def is_master(self, api_key: str) -> bool:
        """Whether `api_key` is the master key (constant-time)."""
        if self._master_hash is None:
            return False
        return hmac.compare_digest(hash_key(api_key).encode(), self._master_hash)

    async def authenticate(self, api_key: str | None) -> Principal:
        """The principal behind an API key.

        Raises:
            AuthError: No key, or a key that is unknown, deleted or expired.
        """
        if not api_key:
            raise AuthError(
                "You didn't provide an API key. Pass it as 'Authorization: Bearer <key>'."
            )
        if self.is_master(api_key):
            return Principal(key_masked=mask_key(api_key), is_master=True)
        key_hash = hash_key(api_key)
        record = None
        if key_hash not in self._unknown:
            record = await self._cached(self._keys, key_hash, self.store.get_key)
            if record is None:
                self._keys.pop(key_hash, None)
                self._unknown[key_hash] = None
        if record is None:
            raise AuthError(f"Incorrect API key provided: {mask_key(api_key)}.")
        if record.expires is not None and record.expires <= self._clock():
            raise AuthError(f"The API key {record.key_masked} has expired.")
        user = None
        if record.user_id:
            user = await self._cached(self._users, record.user_id, self.store.get_user)
        team_id = record.team_id or (user.team_id if user is not None else None)
        team = None
        if team_id:
            team = await self._cached(self._teams, team_id, self.store.get_team)
        return Principal(key_hash, record.key_masked, record, user, team)

    async def check_model(self, principal: Principal, model: str) -> None:
        """Raise a 403 `AuthError` unless every level of the principal allows `model`."""
        lists = [
            record.models
            for record in (principal.key, principal.user, principal.team)
            if record is not None and record.models
        ]
        if not lists:
            return
        groups = await self.access_groups()
        if not all(model_allowed(model, allowed, groups) for allowed in lists):
            raise AuthError.forbidden_model(model)

    async def access_groups(self) -> dict[str, tuple[str, ...]]:
        """Access groups: those defined in code, then the store's (which win)."""
        groups = self._groups.get("all")
        if groups is None:
            groups = {**self._static_groups, **await self.store.access_groups()}
            self._groups["all"] = groups
        return groups

    def invalidate_key(self, key_hash: str) -> None:
        """Forget a cached key record (after an admin change)."""
        self._keys.pop(key_hash, None)
        self._unknown.pop(key_hash, None)

    def invalidate_user(self, user_id: str) -> None:
        """Forget a cached user record (after an admin change)."""
        self._users.pop(user_id, None)

    def invalidate_team(self, team_id: str) -> None:
        """Forget a cached team record (after an admin change)."""
        self._teams.pop(team_id, None)

    def invalidate_groups(self) -> None:
        """Forget the cached access groups (after an admin change)."""
        self._groups.clear()

    @staticmethod
    async def _cached(
        cache: TTLCache[str, _T | None],
        name: str,
        load: Callable[[str], Awaitable[_T | None]],
    ) -> _T | None:
        if name in cache:
            return cache[name]
        value = await load(name)
        cache[name] = value
        return value
