"""The store protocols: `Store` is its roles together, and a backend may implement only some."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from llmfence import Store as PublicStore
from llmfence.stores import (
    Admission,
    AdmissionResult,
    BudgetScope,
    BudgetState,
    BudgetTierStore,
    ClaimStore,
    CustomerStore,
    KeyRecord,
    LedgerStore,
    Lifecycle,
    MemoryStore,
    ProjectStore,
    RedisStore,
    RegistryStore,
    Settlement,
    SpendLogStore,
    Store,
    TeamRecord,
    UserRecord,
)

ROLES = (
    Lifecycle,
    LedgerStore,
    RegistryStore,
    CustomerStore,
    BudgetTierStore,
    SpendLogStore,
    ProjectStore,
    ClaimStore,
)


class RateLimitOnly:
    """A backend that only rate-limits: the ledger and the registry, nothing else."""

    async def admit(self, admission: Admission) -> AdmissionResult:
        return AdmissionResult(None)

    async def settle(self, settlement: Settlement) -> bool:
        return False  # the record has nowhere to go, and that is allowed

    async def release(self, request_id: str, slot_keys: Sequence[str]) -> None:
        pass

    async def charge(self, scopes: Sequence[BudgetScope], cost: int, now: float) -> None:
        pass

    async def budgets(self, scopes: Sequence[BudgetScope], now: float) -> list[BudgetState]:
        return []

    async def reset_budget(self, key: str, period_end: float | None, now: float) -> None:
        pass

    async def create_key(self, record: KeyRecord) -> bool:
        return False

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        return None

    async def update_key(self, key_hash: str, changes: Mapping[str, Any]) -> KeyRecord | None:
        return None

    async def delete_key(self, key_hash: str) -> bool:
        return False

    async def list_keys(
        self, *, user_id: str | None = None, team_id: str | None = None
    ) -> list[KeyRecord]:
        return []

    async def create_user(self, record: UserRecord) -> bool:
        return False

    async def get_user(self, user_id: str) -> UserRecord | None:
        return None

    async def update_user(self, user_id: str, changes: Mapping[str, Any]) -> UserRecord | None:
        return None

    async def create_team(self, record: TeamRecord) -> bool:
        return False

    async def get_team(self, team_id: str) -> TeamRecord | None:
        return None

    async def update_team(self, team_id: str, changes: Mapping[str, Any]) -> TeamRecord | None:
        return None

    async def delete_user(self, user_id: str) -> bool:
        return False

    async def list_users(self) -> list[UserRecord]:
        return []

    async def delete_team(self, team_id: str) -> bool:
        return False

    async def list_teams(self) -> list[TeamRecord]:
        return []

    async def set_access_group(self, name: str, models: Sequence[str]) -> None:
        pass

    async def access_groups(self) -> dict[str, tuple[str, ...]]:
        return {}

    async def ping(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


def test_store_is_every_role_together() -> None:
    assert PublicStore is Store
    for role in ROLES:
        assert issubclass(Store, role)
    # Store adds nothing of its own: its methods are exactly its roles' methods.
    names = {name for role in ROLES for name in vars(role) if not name.startswith("_")}
    assert {name for name in dir(Store) if not name.startswith("_")} == names
    assert {"admit", "settle", "create_key", "spend_records", "get_project", "ping"} <= names
    assert not {name for name in vars(Store) if not name.startswith("_")}


@pytest.mark.parametrize(
    "store", [MemoryStore(), RedisStore.from_url("redis://127.0.0.1:1/0")], ids=["memory", "redis"]
)
def test_the_shipped_stores_play_every_role(store: object) -> None:
    # Nothing is connected: the checks only look at methods.
    for role in (*ROLES, Store):
        assert isinstance(store, role), role.__name__


def test_a_rate_limit_only_backend_needs_two_roles() -> None:
    backend = RateLimitOnly()
    ledger: LedgerStore = backend
    registry: RegistryStore = backend
    assert isinstance(ledger, LedgerStore)
    assert isinstance(registry, RegistryStore)
    assert not isinstance(backend, SpendLogStore)
    assert not isinstance(backend, ProjectStore)
    assert not isinstance(backend, CustomerStore)
    assert not isinstance(backend, Store)
