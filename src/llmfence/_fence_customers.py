"""`Fence`'s registered customers (LiteLLM's end users), budget tiers and spend reports.

A customer is an id request bodies name in `user`: its own budget and limits apply to every
request that names it, and a blocked one is refused (400, as LiteLLM). A budget tier is a
reusable amount, period and RPM/TPM limits that keys, users and customers name by
`budget_id`; changing the tier changes every record that names it (where the record sets no
value of its own). Each is also an admin API route (`/customer/*`, `/budget/*`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

from ._admin_spend import GROUPS, spend_report
from ._core.auth import Authenticator
from ._fence_ops import RecordConflictError, RecordNotFoundError, checked_changes
from ._fields import (
    budget_nano,
    checked_duration,
    checked_limit,
    checked_metadata,
    checked_name,
)
from .exceptions import ConfigurationError
from .stores import BudgetTier, CustomerRecord, Store

__all__ = ["CustomersMixin", "ensure_budget"]


async def ensure_budget(store: Store, budget_id: str | None) -> None:
    """Check that a budget tier a record names exists.

    Raises:
        RecordNotFoundError: It does not.
    """
    if budget_id is not None and await store.get_budget_tier(budget_id) is None:
        raise RecordNotFoundError(f"Budget {budget_id!r} does not exist: create it first.")


class CustomersMixin:
    """Registered customers and budget tiers."""

    store: Store
    authenticator: Authenticator
    clock: Callable[[], float]

    # -- customers ---------------------------------------------------------------------------

    async def new_customer(
        self,
        user_id: str,
        *,
        alias: str | None = None,
        blocked: bool = False,
        max_budget: float | Decimal | None = None,
        budget_duration: str | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        budget_id: str | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> CustomerRecord:
        """Register a customer: the end user a request body names in `user`.

        Args:
            user_id: The id bodies name (`"user": "bob@example.com"`).
            max_budget: Its own budget in USD, in place of `max_end_user_budget`.
            budget_duration: How often that budget resets.
            rpm_limit: Its own requests per minute, in place of `end_user_rpm_limit`.
            tpm_limit: Its own tokens per minute, in place of `end_user_tpm_limit`.
            budget_id: A budget tier giving what it sets none of (its amount, period, RPM and
                TPM; a tier's `max_parallel_requests` is for keys and users).
            blocked: Refuse its requests (400) until unblocked.

        Raises:
            RecordConflictError: The customer exists.
            RecordNotFoundError: No such budget tier.
            ConfigurationError: A field is invalid.
        """
        record = CustomerRecord(
            user_id=checked_name("user_id", user_id),
            alias=None if alias is None else checked_name("alias", alias),
            blocked=bool(blocked),
            max_budget=budget_nano(max_budget),
            budget_duration=checked_duration(budget_duration),
            rpm_limit=checked_limit("rpm_limit", rpm_limit),
            tpm_limit=checked_limit("tpm_limit", tpm_limit),
            budget_id=None if budget_id is None else checked_name("budget_id", budget_id),
            metadata=checked_metadata("metadata", metadata),
            created_at=self.clock(),
        )
        return await self.create_customer_record(record)

    async def create_customer_record(self, record: CustomerRecord) -> CustomerRecord:
        """Store a checked customer record."""
        await ensure_budget(self.store, record.budget_id)
        if not await self.store.create_customer(record):
            raise RecordConflictError(f"Customer {record.user_id!r} already exists.")
        self.authenticator.customers.forget(record.user_id)
        return record

    async def get_customer(self, user_id: str) -> CustomerRecord:
        """A registered customer.

        Raises:
            RecordNotFoundError: There is none.
        """
        record = await self.store.get_customer(user_id)
        if record is None:
            raise RecordNotFoundError(f"Customer {user_id!r} was not found.")
        return record

    async def list_customers(self) -> list[CustomerRecord]:
        """Every registered customer, oldest first."""
        return await self.store.list_customers()

    async def update_customer(self, user_id: str, **changes: Any) -> CustomerRecord:
        """Change some fields of a customer (`max_budget=`, `blocked=`, `budget_id=`…).

        Raises:
            RecordNotFoundError: No such customer (or budget tier).
        """
        return await self.apply_customer_changes(user_id, checked_changes(changes))

    async def apply_customer_changes(
        self, user_id: str, changes: Mapping[str, Any]
    ) -> CustomerRecord:
        """Store checked changes (in storage form) to a customer."""
        await ensure_budget(self.store, changes.get("budget_id"))
        updated = await self.store.update_customer(user_id, changes)
        self.authenticator.customers.forget(user_id)
        if updated is None:
            raise RecordNotFoundError(f"Customer {user_id!r} was not found.")
        return updated

    async def delete_customers(self, user_ids: Iterable[str]) -> list[str]:
        """Delete customers; returns the ids deleted.

        Raises:
            RecordNotFoundError: One of them does not exist (nothing is deleted).
        """
        ids = [await self._customer_id(user_id) for user_id in user_ids]
        for user_id in ids:
            await self.store.delete_customer(user_id)
            self.authenticator.customers.forget(user_id)
        return ids

    async def block_customers(self, user_ids: Iterable[str]) -> list[str]:
        """Block customers: requests naming them are refused (400). Returns their ids.

        Raises:
            RecordNotFoundError: One of them does not exist (nothing is changed).
        """
        return await self._set_blocked(user_ids, True)

    async def unblock_customers(self, user_ids: Iterable[str]) -> list[str]:
        """Unblock customers; returns their ids."""
        return await self._set_blocked(user_ids, False)

    async def _set_blocked(self, user_ids: Iterable[str], blocked: bool) -> list[str]:
        ids = [await self._customer_id(user_id) for user_id in user_ids]
        for user_id in ids:
            await self.apply_customer_changes(user_id, {"blocked": blocked})
        return ids

    async def _customer_id(self, user_id: str) -> str:
        return (await self.get_customer(user_id)).user_id

    # -- budget tiers ------------------------------------------------------------------------

    async def new_budget(
        self,
        budget_id: str,
        *,
        max_budget: float | Decimal | None = None,
        budget_duration: str | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        max_parallel_requests: int | None = None,
    ) -> BudgetTier:
        """Create a budget tier that keys, users and customers name by `budget_id`.

        Raises:
            RecordConflictError: The tier exists.
            ConfigurationError: A field is invalid.
        """
        tier = BudgetTier(
            budget_id=checked_name("budget_id", budget_id),
            max_budget=budget_nano(max_budget),
            budget_duration=checked_duration(budget_duration),
            rpm_limit=checked_limit("rpm_limit", rpm_limit),
            tpm_limit=checked_limit("tpm_limit", tpm_limit),
            max_parallel_requests=checked_limit("max_parallel_requests", max_parallel_requests),
            created_at=self.clock(),
        )
        return await self.create_budget_record(tier)

    async def create_budget_record(self, tier: BudgetTier) -> BudgetTier:
        """Store a checked budget tier."""
        if not await self.store.create_budget_tier(tier):
            raise RecordConflictError(f"Budget {tier.budget_id!r} already exists.")
        return tier

    async def get_budget(self, budget_id: str) -> BudgetTier:
        """A budget tier.

        Raises:
            RecordNotFoundError: There is none.
        """
        tier = await self.store.get_budget_tier(budget_id)
        if tier is None:
            raise RecordNotFoundError(f"Budget {budget_id!r} was not found.")
        return tier

    async def list_budgets(self) -> list[BudgetTier]:
        """Every budget tier, oldest first."""
        return await self.store.list_budget_tiers()

    async def update_budget(self, budget_id: str, **changes: Any) -> BudgetTier:
        """Change a budget tier; every key, user and customer naming it follows.

        Raises:
            RecordNotFoundError: No such tier.
        """
        return await self.apply_budget_changes(budget_id, checked_changes(changes))

    async def apply_budget_changes(self, budget_id: str, changes: Mapping[str, Any]) -> BudgetTier:
        """Store checked changes (in storage form) to a budget tier."""
        updated = await self.store.update_budget_tier(budget_id, changes)
        self.authenticator.invalidate_all()  # every principal and customer naming it
        if updated is None:
            raise RecordNotFoundError(f"Budget {budget_id!r} was not found.")
        return updated

    async def delete_budget(self, budget_id: str) -> BudgetTier:
        """Delete a budget tier (records naming it keep only their own values).

        Raises:
            RecordNotFoundError: No such tier.
        """
        tier = await self.get_budget(budget_id)
        await self.store.delete_budget_tier(budget_id)
        self.authenticator.invalidate_all()
        return tier

    # -- spend reports -----------------------------------------------------------------------

    async def spend_report(
        self, start: float, end: float, group_by: str = "team"
    ) -> list[dict[str, Any]]:
        """Spend per UTC day between two Unix times, grouped by `"team"`, `"customer"`,
        `"api_key"`, `"user"` or `"model"` (what `/spend/report` answers), from the spend
        records the store still keeps.

        Raises:
            ConfigurationError: An unknown `group_by`.
        """
        if group_by not in GROUPS:
            raise ConfigurationError(f"group_by must be one of {sorted(GROUPS)}")
        records = await self.store.spend_records(start=start, end=end, limit=1_000_000)
        return spend_report(records, group_by)
