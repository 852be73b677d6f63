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
from typing import Any

import anyio
from cachetools import TTLCache

from llmfence._models import same_model
from llmfence.exceptions import LLMFenceError
from llmfence.stores import (
    CustomerRecord,
    KeyRecord,
    Store,
    TeamRecord,
    UserRecord,
    hash_key,
    mask_key,
)

from .registry import Customers, team_member, with_tier

__all__ = ["KEY_HEADERS", "AuthError", "Authenticator", "Principal", "api_key_from_headers"]

logger = logging.getLogger("llmfence")

# Where clients put a key: OpenAI's SDKs (Authorization: Bearer), Anthropic's (x-api-key),
# Azure OpenAI's (api-key) and Google's (x-goog-api-key).
KEY_HEADERS = ("x-api-key", "api-key", "x-goog-api-key")
# Model access decisions kept per principal (models are named by request bodies).
_MAX_MODELS = 256


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

    @classmethod
    def blocked_customer(cls, end_user: str) -> AuthError:
        """A blocked customer (end user) named by the body: 400, as LiteLLM answers."""
        error = cls(f"User blocked from making LLM API Calls. User={end_user}", param="user")
        error.status_code = 400
        error.code = "user_blocked"
        return error


class Principal:
    """The resolved caller of one request.

    One principal is built per key when the key is authenticated and cached with the key's
    record, so what is derived from it (the engine's per-principal plans, model decisions)
    is computed once per key and cache period, not once per request.

    Attributes:
        key_hash: sha256 of the key used, or `None` (master key, or no auth).
        key_masked: The key's display form, e.g. `sk-...Qw8z`.
        key: The key's record (`None` for the master key).
        user: The record of the key's user, if the key has one and it exists.
        team: The record of the key's (or user's) team, if any.
        is_master: Whether the master key was used.
        member: The key's user's own budget inside the key's team (`max_budget_in_team`),
            as a user record, if the team gives it one.

    A regenerated key's `key_hash` is the hash of the key it replaced (`KeyRecord.scope_id`):
    the counters and spend records of a key are kept under it, so they carry over.
    """

    __slots__ = (
        "groups",
        "is_master",
        "key",
        "key_hash",
        "key_masked",
        "member",
        "models",
        "plans",
        "team",
        "user",
    )

    def __init__(
        self,
        key_hash: str | None = None,
        key_masked: str | None = None,
        key: KeyRecord | None = None,
        user: UserRecord | None = None,
        team: TeamRecord | None = None,
        is_master: bool = False,
        member: UserRecord | None = None,
    ) -> None:
        self.key_hash = key_hash
        self.key_masked = key_masked
        self.key = key
        self.user = user
        self.team = team
        self.is_master = is_master
        self.member = member
        self.plans: dict[object, object] = {}
        """Whatever an engine derived from this principal, by engine (see `_core.plan`)."""
        self.models: dict[str, bool] = {}
        """Model access decided so far (bounded: models come from request bodies)."""
        self.groups: object = None
        """The access groups those decisions were made with."""

    def __repr__(self) -> str:
        return f"Principal(key={self.key_masked!r}, user={self.user_id!r}, team={self.team_id!r})"

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
    for name in KEY_HEADERS:
        value = headers.get(name)
        if value and value.strip():
            return value.strip()
    return None


def model_allowed(model: str, allowed: Sequence[str], groups: Mapping[str, Sequence[str]]) -> bool:
    """Whether `model` is in an allow-list of names, access groups and `fnmatch` patterns.

    A name covers the model's other names too (`gpt-4o` covers `gpt-4o-2024-08-06` and
    `openai/gpt-4o`; see `_models`).
    """
    if not allowed:
        return True
    for entry in allowed:
        members = groups.get(entry)
        for pattern in members if members is not None else (entry,):
            if pattern == "*" or same_model(pattern, model) or fnmatch.fnmatchcase(model, pattern):
                return True
    return False


class Authenticator:
    """Resolves API keys to principals, caching them for a bounded time.

    A key's principal (its key, user and team records) is cached for `cache_ttl` seconds: an
    admin change made through this process invalidates it at once (`invalidate_*`); a change
    made by another instance is seen here within `cache_ttl` (default 5 s). Unknown keys are
    cached too, so a flood of bad keys does not reach the store every time.

    Args:
        store: Where key, user and team records live.
        master_key: The key that may do everything, including the admin API.
        access_groups: Model access groups defined in code, merged with the store's.
        cache_ttl: Seconds a record (or an unknown key) is kept.
        cache_size: How many principals (and unknown keys) are kept.
        clock: Unix time (a fake clock in tests).
        call: Runs each store call (the meter's: bounded in time, failures as `StoreError`).
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
        call: Callable[[Awaitable[Any]], Awaitable[Any]] | None = None,
    ) -> None:
        self.store = store
        self._call = call or _direct
        # Bumped by every invalidation: a principal resolved while one happened is not cached
        # (the store may have answered before the change).
        self._generation = 0
        self._master_hash = hash_key(master_key).encode() if master_key else None
        self._static_groups = {k: tuple(v) for k, v in (access_groups or {}).items()}
        self._clock = clock
        # Unknown keys are remembered apart, so a flood of made-up keys cannot evict the
        # records of the keys in use.
        self._unknown: TTLCache[str, None] = TTLCache(cache_size, cache_ttl, timer=clock)
        self._groups: TTLCache[str, dict[str, tuple[str, ...]]] = TTLCache(
            1, cache_ttl, timer=clock
        )
        # Resolved principals by key hash, kept no longer than the records they were built
        # from: what an engine derives from a principal shares the records' staleness bound.
        self._principals: TTLCache[str, Principal] = TTLCache(cache_size, cache_ttl, timer=clock)
        self._flights: dict[str, _Flight] = {}  # lookups under way, by key hash
        self.customers = Customers(store, cache_size, cache_ttl, clock, self._call)
        """Registered customers by the id request bodies name (cached)."""

    def is_master(self, api_key: str) -> bool:
        """Whether `api_key` is the master key (constant-time)."""
        return self._is_master_hash(hash_key(api_key))

    def _is_master_hash(self, key_hash: str) -> bool:
        if self._master_hash is None:
            return False
        return hmac.compare_digest(key_hash.encode(), self._master_hash)

    async def authenticate(self, api_key: str | None) -> Principal:
        """The principal behind an API key (the same object while its records are cached).

        Raises:
            AuthError: No key, or a key that is unknown, deleted or expired.
        """
        if not api_key:
            raise AuthError(
                "You didn't provide an API key. Pass it as 'Authorization: Bearer <key>'."
            )
        key_hash = hash_key(api_key)  # the only hash of the key a request computes
        principal = self._principals.get(key_hash)
        if principal is None:
            principal = await self._lookup(key_hash, api_key)
        record = principal.key
        if record is not None and record.expires is not None and record.expires <= self._clock():
            raise AuthError(f"The API key {record.key_masked} has expired.")
        if record is not None and record.blocked:
            raise AuthError("Key is blocked. Update via `/key/unblock` if you're an admin.")
        return principal

    async def _lookup(self, key_hash: str, api_key: str) -> Principal:
        """Resolve a key the cache does not hold, once for all the requests that ask at once.

        On a cold start every request of a key misses the cache together: without this, each
        sends its own lookups, and hundreds of them queue for the store's connections until
        their deadlines pass (503s on a healthy store). The first request looks the key up;
        the others wait for its answer, or its error (a new lookup if it was cancelled).
        """
        while (flight := self._flights.get(key_hash)) is not None:
            await flight.done.wait()
            if flight.principal is not None:
                return flight.principal
            if flight.error is not None:
                raise flight.error
        flight = self._flights[key_hash] = _Flight()
        try:
            generation = self._generation
            if self._is_master_hash(key_hash):
                principal = Principal(key_masked=mask_key(api_key), is_master=True)
            else:
                principal = await self._resolve(key_hash, api_key)
            if generation == self._generation:
                self._principals[key_hash] = principal
            flight.principal = principal
            return principal
        except Exception as error:
            flight.error = error
            raise
        finally:
            del self._flights[key_hash]
            flight.done.set()

    async def _resolve(self, key_hash: str, api_key: str) -> Principal:
        # Read from the store, not from another cache: the principal is the cache, so a
        # change made by another instance is seen within one `cache_ttl`.
        generation = self._generation
        call, store = self._call, self.store
        record = None if key_hash in self._unknown else await call(store.get_key(key_hash))
        if record is None:
            if generation == self._generation:
                self._unknown[key_hash] = None
            raise AuthError(f"Incorrect API key provided: {mask_key(api_key)}.")
        record = await with_tier(store, call, record)
        user = await call(store.get_user(record.user_id)) if record.user_id else None
        if user is not None:
            user = await with_tier(store, call, user)
        team_id = record.team_id or (user.team_id if user is not None else None)
        team = await call(store.get_team(team_id)) if team_id else None
        member = team_member(team, record.user_id) if team is not None else None
        return Principal(record.scope_id, record.key_masked, record, user, team, member=member)

    async def customer(self, end_user: str) -> CustomerRecord | None:
        """The registered customer a request body names (`user`), or None.

        Raises:
            AuthError: The customer is blocked (400, as LiteLLM answers).
        """
        found = await self.customers.get(end_user)
        if found is not None and found.blocked:
            raise AuthError.blocked_customer(end_user)
        return found

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
        if principal.groups is not groups:
            # Decisions made with access groups since re-read are stale.
            principal.models.clear()
            principal.groups = groups
        allowed = principal.models.get(model)
        if allowed is None:
            allowed = all(model_allowed(model, names, groups) for names in lists)
            if len(principal.models) >= _MAX_MODELS:
                principal.models.clear()
            principal.models[model] = allowed
        if not allowed:
            raise AuthError.forbidden_model(model)

    async def access_groups(self) -> dict[str, tuple[str, ...]]:
        """Access groups: those defined in code, then the store's (which win)."""
        groups = self._groups.get("all")
        if groups is None:
            groups = {**self._static_groups, **await self._call(self.store.access_groups())}
            self._groups["all"] = groups
        return groups

    def invalidate_key(self, key_hash: str) -> None:
        """Forget a cached key record (after an admin change)."""
        self._generation += 1
        self._unknown.pop(key_hash, None)
        self._principals.pop(key_hash, None)

    def invalidate_user(self, user_id: str) -> None:
        """Forget a cached user record (after an admin change)."""
        self._generation += 1
        self._principals.clear()  # every key of the user; admin changes are rare

    def invalidate_team(self, team_id: str) -> None:
        """Forget a cached team record (after an admin change)."""
        self._generation += 1
        self._principals.clear()

    def invalidate_all(self) -> None:
        """Forget every cached principal and customer (after a tier or customer changed)."""
        self._generation += 1
        self._principals.clear()
        self.customers.forget()

    def invalidate_groups(self) -> None:
        """Forget the cached access groups (after an admin change)."""
        self._generation += 1
        self._groups.clear()
        self._principals.clear()  # their model decisions used the old groups


class _Flight:
    """One key lookup under way, and what it found (a principal or an error)."""

    __slots__ = ("done", "error", "principal")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.principal: Principal | None = None
        self.error: Exception | None = None


async def _direct(awaitable: Awaitable[Any]) -> Any:
    return await awaitable
