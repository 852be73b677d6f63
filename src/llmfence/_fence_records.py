"""`Fence`'s keys, users and teams: creating them in the store, checked, in storage form."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

from ._core.auth import Authenticator
from ._fields import (
    ModelBudget,
    checked_key,
    checked_name,
    key_expiry,
    limit_fields,
    model_budget_periods,
    model_budgets,
    model_limits,
)
from .exceptions import ConfigurationError
from .stores import KeyRecord, Store, TeamRecord, UserRecord, hash_key, mask_key

__all__ = ["RecordsMixin"]


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
        model_max_budget: Mapping[str, ModelBudget] | None = None,
        model_rpm_limit: Mapping[str, int] | None = None,
        model_tpm_limit: Mapping[str, int] | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        rpd_limit: int | None = None,
        tpd_limit: int | None = None,
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
            model_max_budget: Budgets per model in USD: an amount (the key's period), or
                LiteLLM's `{"budget_limit": 0.5, "time_period": "1d"}` (a period of its own).
            model_rpm_limit: Requests per minute per model (`{"gpt-4o": 10}`).
            model_tpm_limit: Tokens per minute per model.

        Raises:
            ConfigurationError: A field is invalid, or the key already exists.
        """
        now = self.clock()
        plain = checked_key(key) if key is not None else "sk-" + secrets.token_urlsafe(32)
        record = KeyRecord(
            key_hash=hash_key(plain),
            key_masked=mask_key(plain),
            user_id=_name("user_id", user_id),
            team_id=_name("team_id", team_id),
            key_alias=_name("key_alias", key_alias),
            model_max_budget=model_budgets(model_max_budget),
            model_budget_duration=model_budget_periods(model_max_budget),
            model_rpm_limit=model_limits("model_rpm_limit", model_rpm_limit),
            model_tpm_limit=model_limits("model_tpm_limit", model_tpm_limit),
            expires=key_expiry(duration, now),
            **limit_fields(
                max_budget,
                budget_duration,
                rpm_limit,
                tpm_limit,
                max_parallel_requests,
                models,
                metadata,
                created_at=self.clock(),
                rpd_limit=rpd_limit,
                tpd_limit=tpd_limit,
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
        rpd_limit: int | None = None,
        tpd_limit: int | None = None,
        max_parallel_requests: int | None = None,
        models: Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> UserRecord:
        """Create a user whose budget and limits all of its keys share.

        Raises:
            ConfigurationError: A field is invalid, or the user exists.
        """
        record = UserRecord(
            user_id=checked_name("user_id", user_id),
            team_id=_name("team_id", team_id),
            **limit_fields(
                max_budget,
                budget_duration,
                rpm_limit,
                tpm_limit,
                max_parallel_requests,
                models,
                metadata,
                created_at=self.clock(),
                rpd_limit=rpd_limit,
                tpd_limit=tpd_limit,
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
        rpd_limit: int | None = None,
        tpd_limit: int | None = None,
        max_parallel_requests: int | None = None,
        models: Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
    ) -> TeamRecord:
        """Create a team whose budget and limits all of its keys share.

        Raises:
            ConfigurationError: A field is invalid, or the team exists.
        """
        record = TeamRecord(
            team_id=checked_name("team_id", team_id),
            **limit_fields(
                max_budget,
                budget_duration,
                rpm_limit,
                tpm_limit,
                max_parallel_requests,
                models,
                metadata,
                created_at=self.clock(),
                rpd_limit=rpd_limit,
                tpd_limit=tpd_limit,
            ),
        )
        if not await self.store.create_team(record):
            raise ConfigurationError(f"team {team_id!r} already exists")
        self.authenticator.invalidate_team(team_id)
        return record


def _name(name: str, value: str | None) -> str | None:
    return None if value is None else checked_name(name, value)
