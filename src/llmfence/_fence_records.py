"""`Fence`'s keys, users and teams: creating them in the store, checked, in storage form."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

from ._core.auth import Authenticator
from ._fence_customers import ensure_budget
from ._fence_ops import RecordConflictError, ensure_alias_free, ensure_refs
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
        soft_budget: float | Decimal | None = None,
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
        budget_id: str | None = None,
        create_missing: bool = True,
    ) -> tuple[str, KeyRecord]:
        """Create a virtual key; returns the plain key (shown once) and its stored record.

        Args:
            soft_budget: USD of spend in a period that is reported, once, to
                `Fence(on_alert=...)`; it never refuses a request (LiteLLM's soft budget).
            key: A caller-chosen key for migrations (`sk-` and at least 20 characters);
                default a new random `sk-` key.
            duration: Key lifetime (`"30d"`…); `None` never expires.
            model_max_budget: Budgets per model in USD: an amount (the key's period), or
                LiteLLM's `{"budget_limit": 0.5, "time_period": "1d"}` (a period of its own).
            model_rpm_limit: Requests per minute per model (`{"gpt-4o": 10}`).
            model_tpm_limit: Tokens per minute per model.
            budget_id: A budget tier giving the key what it sets none of itself.
            create_missing: Create the user and team the key names if they do not exist
                (default; the admin API's `/key/generate` creates them only when asked
                with `"create_missing": true`, and answers 404 otherwise). With False,
                naming one that does not exist is an error.

        Raises:
            ConfigurationError: A field is invalid, or the key already exists
                (`RecordConflictError`, as for a `key_alias` another key holds), or the
                user, team or budget tier named does not exist (`RecordNotFoundError`).
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
            budget_id=_name("budget_id", budget_id),
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
                soft_budget=soft_budget,
            ),
        )
        await ensure_alias_free(self.store, record.key_alias)
        await ensure_budget(self.store, record.budget_id)
        await ensure_refs(
            self.store, self.authenticator, now, record.user_id, record.team_id, create_missing
        )
        if not await self.store.create_key(record):
            raise RecordConflictError("that key already exists")
        self.authenticator.invalidate_key(record.key_hash)
        return plain, record

    async def new_user(
        self,
        user_id: str,
        *,
        team_id: str | None = None,
        max_budget: float | Decimal | None = None,
        soft_budget: float | Decimal | None = None,
        budget_duration: str | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        rpd_limit: int | None = None,
        tpd_limit: int | None = None,
        max_parallel_requests: int | None = None,
        models: Iterable[str] = (),
        metadata: Mapping[str, Any] | None = None,
        budget_id: str | None = None,
        create_missing: bool = True,
    ) -> UserRecord:
        """Create a user whose budget and limits all of its keys share.

        Args:
            budget_id: A budget tier giving the user what it sets none of itself.
            create_missing: Create the team the user names if it does not exist (default;
                `/user/new` only when asked). With False, naming one that does not exist is
                an error.

        Raises:
            ConfigurationError: A field is invalid, or the user exists
                (`RecordConflictError`), or its team or budget tier does not exist
                (`RecordNotFoundError`).
        """
        record = UserRecord(
            user_id=checked_name("user_id", user_id),
            team_id=_name("team_id", team_id),
            budget_id=_name("budget_id", budget_id),
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
                soft_budget=soft_budget,
            ),
        )
        await ensure_budget(self.store, record.budget_id)
        await ensure_refs(
            self.store, self.authenticator, self.clock(), None, record.team_id, create_missing
        )
        if not await self.store.create_user(record):
            raise RecordConflictError(f"user {user_id!r} already exists")
        self.authenticator.invalidate_user(user_id)
        return record

    async def new_team(
        self,
        team_id: str,
        *,
        team_alias: str | None = None,
        max_budget: float | Decimal | None = None,
        soft_budget: float | Decimal | None = None,
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
            team_alias=_name("team_alias", team_alias),
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
                soft_budget=soft_budget,
            ),
        )
        if not await self.store.create_team(record):
            raise RecordConflictError(f"team {team_id!r} already exists")
        self.authenticator.invalidate_team(team_id)
        return record


def _name(name: str, value: str | None) -> str | None:
    return None if value is None else checked_name(name, value)
