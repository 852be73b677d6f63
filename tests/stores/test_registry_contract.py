"""The registry's contract beyond keys, on every store: users and teams listed and deleted,
customers, budget tiers, new key fields, and the spend log's `request_id` filter."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from llmfence.stores import (
    BudgetTier,
    CustomerRecord,
    KeyRecord,
    Settlement,
    SpendRecord,
    SQLiteStore,
    Store,
    TeamRecord,
    UserRecord,
    hash_key,
    mask_key,
)

pytestmark = pytest.mark.anyio
T0 = 1_795_000_000.0


async def test_users_and_teams_are_listed_oldest_first_and_deleted(store: Store) -> None:
    for name in ("u1", "u2", "u3"):
        assert await store.create_user(UserRecord(user_id=name, created_at=T0))
    assert await store.create_team(TeamRecord(team_id="t1", team_alias="Core"))
    assert await store.create_team(TeamRecord(team_id="t2"))
    assert [u.user_id for u in await store.list_users()] == ["u1", "u2", "u3"]
    assert [t.team_id for t in await store.list_teams()] == ["t1", "t2"]
    assert await store.delete_user("u2")
    assert not await store.delete_user("u2")
    assert await store.get_user("u2") is None
    assert [u.user_id for u in await store.list_users()] == ["u1", "u3"]
    assert await store.delete_team("t1")
    assert not await store.delete_team("t1")
    assert [t.team_id for t in await store.list_teams()] == ["t2"]
    # A deleted id is free again, and listed again (last).
    assert await store.create_user(UserRecord(user_id="u2"))
    assert [u.user_id for u in await store.list_users()] == ["u1", "u3", "u2"]


async def test_team_members_and_alias_round_trip(store: Store) -> None:
    members = {"alice": {"role": "user", "max_budget": 5_000_000_000, "budget_duration": "1d"}}
    team = TeamRecord(team_id="t1", team_alias="Core", members=members, budget_id="gold")
    assert await store.create_team(team)
    assert await store.get_team("t1") == team
    updated = await store.update_team("t1", {"members": {**members, "bob": {"role": "admin"}}})
    assert updated is not None
    assert set(updated.members) == {"alice", "bob"}
    assert updated.members["alice"]["max_budget"] == 5_000_000_000
    assert await store.get_team("t1") == updated


async def test_customers(store: Store) -> None:
    record = CustomerRecord(
        user_id="bob@example.com",
        alias="Bob",
        max_budget=2_000_000_000,
        budget_duration="30d",
        rpm_limit=3,
        tpm_limit=1000,
        budget_id="gold",
        metadata={"plan": "pro"},
        created_at=T0,
    )
    assert await store.create_customer(record)
    assert not await store.create_customer(record.replace(alias="other"))
    assert await store.get_customer("bob@example.com") == record
    assert await store.get_customer("nobody") is None
    blocked = await store.update_customer("bob@example.com", {"blocked": True})
    assert blocked == record.replace(blocked=True)
    assert await store.get_customer("bob@example.com") == blocked
    assert await store.update_customer("nobody", {"blocked": True}) is None
    assert await store.create_customer(CustomerRecord(user_id="carol"))
    assert [c.user_id for c in await store.list_customers()] == ["bob@example.com", "carol"]
    assert await store.delete_customer("carol")
    assert not await store.delete_customer("carol")
    assert [c.user_id for c in await store.list_customers()] == ["bob@example.com"]


async def test_budget_tiers(store: Store) -> None:
    tier = BudgetTier(
        budget_id="gold", max_budget=10**10, budget_duration="30d", rpm_limit=100, created_at=T0
    )
    assert await store.create_budget_tier(tier)
    assert not await store.create_budget_tier(tier.replace(rpm_limit=1))
    assert await store.get_budget_tier("gold") == tier
    changed = await store.update_budget_tier("gold", {"rpm_limit": 5, "max_budget": None})
    assert changed == tier.replace(rpm_limit=5, max_budget=None)
    assert await store.get_budget_tier("gold") == changed
    assert await store.update_budget_tier("none", {"rpm_limit": 5}) is None
    assert await store.create_budget_tier(BudgetTier(budget_id="free", max_budget=0))
    assert [t.budget_id for t in await store.list_budget_tiers()] == ["gold", "free"]
    assert await store.delete_budget_tier("gold")
    assert not await store.delete_budget_tier("gold")
    assert await store.get_budget_tier("gold") is None
    assert [t.budget_id for t in await store.list_budget_tiers()] == ["free"]


async def test_new_key_fields_round_trip(store: Store) -> None:
    plain = "sk-" + "r" * 40
    record = KeyRecord(
        key_hash=hash_key(plain),
        key_masked=mask_key(plain),
        blocked=True,
        counter_id="f" * 64,
        budget_id="gold",
    )
    assert await store.create_key(record)
    assert await store.get_key(record.key_hash) == record
    assert record.scope_id == "f" * 64
    unblocked = await store.update_key(record.key_hash, {"blocked": False})
    assert unblocked == record.replace(blocked=False)
    assert [k.key_hash for k in await store.list_keys()] == [record.key_hash]


async def test_spend_records_filter_by_request_id(store: Store) -> None:
    for n in range(3):
        spend = SpendRecord(request_id=f"req-{n}", timestamp=T0 + n, model="gpt-4o", cost=n)
        await store.settle(Settlement(f"req-{n}", T0 + n, n, record=spend))
    [found] = await store.spend_records(request_id="req-1")
    assert (found.request_id, found.cost) == ("req-1", 1)
    assert await store.spend_records(request_id="req-1", model="other") == []
    assert await store.spend_records(request_id="nope") == []
    assert len(await store.spend_records()) == 3


async def test_a_version_1_sqlite_file_gets_the_registry_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    store = SQLiteStore(path)
    await store.create_user(UserRecord(user_id="kept"))
    await store.aclose()
    # What version 1 wrote: no registry table. (sqlite3's `with` commits but never closes.)
    with closing(sqlite3.connect(path)) as raw, raw:
        raw.execute("DROP TABLE registry")
        raw.execute("PRAGMA user_version = 1")
    store = SQLiteStore(path)
    try:
        assert await store.get_user("kept") is not None
        assert await store.create_customer(CustomerRecord(user_id="new"))
        assert [c.user_id for c in await store.list_customers()] == ["new"]
    finally:
        await store.aclose()
