"""`Fence`'s keys, users and teams: creating them in the store, checked, in storage form."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

from ._core.auth import Authenticator
from ._core.checks import checked_limit
from ._duration import parse_duration
from ._money import usd_to_nano
from .exceptions import ConfigurationError
from .stores import KeyRecord, Store, TeamRecord, UserRecord, hash_key, mask_key

__all__ = ["RecordsMixin"]

_MIN_KEY_LENGTH = 20


class RecordsMixin:
    """Creates virtual keys, users and teams (the admin API's `/key/generate`, `/user/new`,
    `/team/new` go through here)."""

    store: Store
    authenticator: Authenticator
    clock: Callable[[], float]

    async def generate_key(
        self,
        *,
        key: str | None = None,
        user_id: str | None = None,
        team_id: str | None = None,
        key_alias: str | None = None,
        max_budget: float | Decimal | None = None,
        budget_duration: str | None = None,
        model_max_budget: Mapping[str, float | Decimal] | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        max_parallel_requests: int | None = None,
        models: Iterable[str] = (),
        duration: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> tuple[str, KeyRecord]:
        """Create a virtual key; returns the plain key (shown once) and its stored record.

        Args:
            key: A caller-chosen key for migrations (`sk-` and at least 20 characters);
                default a new random `sk-` key.
            duration: Key lifetime (`"30d"`…); `None` never expires.

        Raises:
            ConfigurationError: A field is invalid, or the key already exists.
        """
        now = self.clock()
        plain = key if key is not None else "sk-" + secrets.token_urlsafe(32)
        if not plain.startswith("sk-") or len(plain) < _MIN_KEY_LENGTH:
            raise ConfigurationError("a key must start with 'sk-' and be at least 20 characters")
        record = KeyRecord(
            key_hash=hash_key(plain),
            key_masked=mask_key(plain),
            user_id=user_id,
            team_id=team_id,
            key_alias=key_alias,
            model_max_budget={m: usd_to_nano(v) for m, v in (model_max_budget or {}).items()},
            expires=None if duration is None else parse_duration(duration).period_end(now),
            **self._limit_fields(
                max_budget,
                budget_duration,
                rpm_limit,
                tpm_limit,
                max_parallel_requests,
                models,
                metadata,
            ),
        )
        if not await self.store.create_key(record):
            raise ConfigurationError("that key already exists")
        self.authenticator.invalidate_key(record.key_hash)
        return plain, record

    async def new_user(
        self,
        user_id: str,
        *,
        team_id: str | None = None,
        max_budget: float | Decimal | None = None,
        budget_duration: str | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        max_parallel_requests: int | None = None,
        models: Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> UserRecord:
        """Create a user whose budget and limits all of its keys share.

        Raises:
            ConfigurationError: A field is invalid, or the user exists.
        """
        record = UserRecord(
            user_id=user_id,
            team_id=team_id,
            **self._limit_fields(
                max_budget,
                budget_duration,
                rpm_limit,
                tpm_limit,
                max_parallel_requests,
                models,
                metadata,
            ),
        )
        if not await self.store.create_user(record):
            raise ConfigurationError(f"user {user_id!r} already exists")
        self.authenticator.invalidate_user(user_id)
        return record

    async def new_team(
        self,
        team_id: str,
        *,
        max_budget: float | Decimal | None = None,
        budget_duration: str | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        max_parallel_requests: int | None = None,
        models: Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> TeamRecord:
        """Create a team whose budget and limits all of its keys share.

        Raises:
            ConfigurationError: A field is invalid, or the team exists.
        """
        record = TeamRecord(
            team_id=team_id,
            **self._limit_fields(
                max_budget,
                budget_duration,
                rpm_limit,
                tpm_limit,
                max_parallel_requests,
                models,
                metadata,
            ),
        )
        if not await self.store.create_team(record):
            raise ConfigurationError(f"team {team_id!r} already exists")
        self.authenticator.invalidate_team(team_id)
        return record

    def _limit_fields(
        self,
        max_budget: float | Decimal | None,
        budget_duration: str | None,
        rpm_limit: int | None,
        tpm_limit: int | None,
        max_parallel_requests: int | None,
        models: Iterable[str],
        metadata: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        """The fields keys, users and teams share, checked and in storage form."""
        return {
            "max_budget": _nano(max_budget),
            "budget_duration": _checked_duration(budget_duration),
            "rpm_limit": checked_limit("rpm_limit", rpm_limit),
            "tpm_limit": checked_limit("tpm_limit", tpm_limit),
            "max_parallel_requests": checked_limit("max_parallel_requests", max_parallel_requests),
            "models": tuple(models),
            "metadata": dict(metadata or {}),
            "created_at": self.clock(),
        }


def _nano(usd: float | Decimal | None) -> int | None:
    if usd is None:
        return None
    nano = usd_to_nano(usd)
    if nano < 0:
        raise ConfigurationError("a budget must not be negative")
    return nano


def _checked_duration(value: str | None) -> str | None:
    if value is not None:
        parse_duration(value)
    return value
