"""The admin API beyond create/info (issue 13): listing, updating and deleting; key rotation
and blocking; team members' budgets; registered customers; budget tiers; request ids in the
spend log and the spend report; coherent records. On every store (the `store` fixture)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from llmfence import Fence, Store
from llmfence.testing import FakeClock, mock_llm_app

from .middleware.conftest import CHAT, auth, chat_body, client_for

pytestmark = pytest.mark.anyio
MASTER = "sk-master-key-123"
T0 = 1_795_000_000.0  # 2026-11-18T11:06:40Z
Admin = tuple[Fence, httpx.AsyncClient, FakeClock]


@pytest.fixture
async def admin(store: Store) -> AsyncIterator[Admin]:
    clock = FakeClock(T0)
    app = mock_llm_app()
    fence = Fence(store=store, master_key=MASTER, cache_ttl=60.0, clock=clock.now)
    fence.install(app, admin=True)
    async with client_for(app) as client:
        client.headers.update(auth(MASTER))
        yield fence, client, clock


async def post(client: httpx.AsyncClient, path: str, status: int = 200, **body: Any) -> Any:
    response = await client.post(path, json=body)
    assert response.status_code == status, (path, response.text)
    return response.json()


async def call(client: httpx.AsyncClient, key: str, **extra: Any) -> httpx.Response:
    return await client.post(CHAT, json=chat_body(**extra), headers=auth(key))


# -- keys ------------------------------------------------------------------------------------


async def test_key_list_pages_and_filters(admin: Admin) -> None:
    _, client, _ = admin
    await post(client, "/user/new", user_id="alice")
    for alias in ("a", "b", "c"):
        await post(client, "/key/generate", key_alias=alias, user_id="alice")
    await post(client, "/key/generate", key_alias="d")
    listed = (await client.get("/key/list", params={"size": 2})).json()
    assert (listed["total_count"], listed["total_pages"], listed["current_page"]) == (5, 3, 1)
    assert all(len(token) == 64 for token in listed["keys"])  # hashes, never keys
    mine = await client.get(
        "/key/list", params={"user_id": "alice", "return_full_object": "true", "size": 10}
    )
    # /user/new gave alice a first key (no alias).
    assert [k["key_alias"] for k in mine.json()["keys"]] == [None, "a", "b", "c"]
    by_alias = (await client.get("/key/list", params={"key_alias": "d"})).json()
    assert by_alias["total_count"] == 1
    # A hash from the list finds the key in the other key routes.
    token = by_alias["keys"][0]
    assert (await post(client, "/key/block", key=token))["blocked"] is True


async def test_block_and_unblock_a_key(admin: Admin) -> None:
    _, client, _ = admin
    key = (await post(client, "/key/generate"))["key"]
    assert (await call(client, key)).status_code == 200
    blocked = await post(client, "/key/block", key=key)
    assert blocked["blocked"] is True
    assert key not in str(blocked)
    assert (await client.get("/key/info", params={"key": key})).json()["info"]["blocked"]
    refused = await call(client, key)
    assert refused.status_code == 401
    assert refused.json()["error"]["message"] == (
        "Key is blocked. Update via `/key/unblock` if you're an admin."
    )
    assert (await post(client, "/key/unblock", key=key))["blocked"] is False
    assert (await call(client, key)).status_code == 200
    await post(client, "/key/block", 404, key="sk-" + "x" * 30)


async def test_regenerate_carries_spend_and_limits_and_ends_the_grace(admin: Admin) -> None:
    _, client, clock = admin
    old = await post(client, "/key/generate", rpm_limit=3, max_budget=10, key_alias="ci")
    assert (await call(client, old["key"])).status_code == 200
    spent = (await client.get("/key/info", params={"key": old["key"]})).json()["info"]["spend"]
    assert spent > 0
    new = await post(client, "/key/regenerate", key=old["key"], grace_period="1h")
    assert new["key"] != old["key"]
    assert new["key"].startswith("sk-")
    assert (new["key_alias"], new["rpm_limit"], new["max_budget"]) == ("ci", 3, 10.0)
    assert new["spend"] == spent  # the budget carried over
    # The old key works for the grace period: both share one RPM window (3 a minute).
    assert (await call(client, old["key"])).status_code == 200
    assert (await call(client, new["key"])).status_code == 200
    assert (await call(client, new["key"])).status_code == 429
    logs = (await client.get("/spend/logs", params={"api_key": new["key"]})).json()
    assert len(logs) == 3  # the old key's records are the new key's
    clock.advance(3600)
    assert (await call(client, old["key"])).status_code == 401
    assert (await call(client, new["key"])).status_code == 200
    # Without a grace period the old key stops at once.
    newer = await post(client, "/key/regenerate", key=new["key"])
    assert (await call(client, new["key"])).status_code == 401
    assert (await call(client, newer["key"])).status_code == 200
    await post(client, "/key/regenerate", 400, key=newer["key"], grace_period="soon")
    await post(client, "/key/regenerate", 404, key=new["key"])


async def test_key_aliases_are_unique(admin: Admin) -> None:
    _, client, _ = admin
    first = await post(client, "/key/generate", key_alias="prod")
    refused = await post(client, "/key/generate", 400, key_alias="prod")
    assert "already exists" in refused["error"]["message"]
    other = await post(client, "/key/generate", key_alias="dev")
    await post(client, "/key/update", 400, key=other["key"], key_alias="prod")
    await post(client, "/key/update", key=first["key"], key_alias="prod")  # its own alias


# -- coherent records ------------------------------------------------------------------------


async def test_referenced_users_and_teams_must_exist(admin: Admin, store: Store) -> None:
    _, client, _ = admin
    missing = await post(client, "/key/generate", 404, user_id="ghost")
    assert "does not exist" in missing["error"]["message"]
    await post(client, "/key/generate", 404, team_id="ghost-team")
    await post(client, "/user/new", 404, user_id="u1", team_id="ghost-team")
    await post(client, "/key/generate", 404, budget_id="no-such-tier")
    created = await post(client, "/key/generate", user_id="ghost", create_missing=True)
    assert created["user_id"] == "ghost"
    assert await store.get_user("ghost") is not None
    await post(client, "/user/new", user_id="u1", team_id="t9", create_missing=True)
    assert await store.get_team("t9") is not None


async def test_user_new_key_carries_team_and_metadata_and_own_budget(admin: Admin) -> None:
    _, client, _ = admin
    team = await post(
        client, "/team/new", team_id="t1", team_alias="Core", max_budget=5, budget_duration="1d"
    )
    assert team["team_alias"] == "Core"
    assert "team_alias" not in team["metadata"]
    assert team["budget_reset_at"] == "2026-11-19T11:06:40Z"
    info = (await client.get("/team/info", params={"team_id": "t1"})).json()
    assert info["team_info"]["team_alias"] == "Core"
    user = await post(
        client,
        "/user/new",
        user_id="u1",
        team_id="t1",
        metadata={"dept": "ml"},
        max_budget=2,
        budget_duration="30d",
    )
    assert (user["max_budget"], user["budget_duration"]) == (2.0, "30d")
    assert user["budget_reset_at"] == "2026-12-18T11:06:40Z"  # the user's, not the key's
    key = (await client.get("/key/info", params={"key": user["key"]})).json()["info"]
    assert (key["team_id"], key["metadata"]) == ("t1", {"dept": "ml"})


# -- users and teams -------------------------------------------------------------------------


async def test_user_list_update_and_delete(admin: Admin) -> None:
    _, client, _ = admin
    for name in ("u1", "u2", "u3"):
        await post(client, "/user/new", user_id=name)
    listed = (await client.get("/user/list", params={"page_size": 2})).json()
    assert [u["user_id"] for u in listed["users"]] == ["u1", "u2"]
    assert (listed["total"], listed["total_pages"]) == (3, 2)
    updated = await post(client, "/user/update", user_id="u1", max_budget=0, rpm_limit=9)
    assert (updated["max_budget"], updated["rpm_limit"]) == (0.0, 9)
    key = (await client.get("/key/list", params={"user_id": "u1"})).json()["keys"][0]
    # The user's new budget applies to its key at once.
    u1_key = (await post(client, "/key/generate", user_id="u1"))["key"]
    assert (await call(client, u1_key)).status_code == 429
    await post(client, "/user/update", 404, user_id="nobody", max_budget=1)
    await post(client, "/user/update", 400, user_id="u1", max_budget=-1)
    assert (await post(client, "/user/delete", user_ids=["u1", "u2"])) == {
        "deleted_users": ["u1", "u2"]
    }
    assert (await call(client, u1_key)).status_code == 401  # its keys went with it
    await post(client, "/key/block", 404, key=key)
    await post(client, "/user/delete", 404, user_ids=["u3", "u1"])
    assert [u["user_id"] for u in (await client.get("/user/list")).json()["users"]] == ["u3"]


async def test_team_list_update_and_delete(admin: Admin) -> None:
    _, client, _ = admin
    await post(client, "/team/new", team_id="t1")
    await post(client, "/team/new", team_id="t2")
    key = (await post(client, "/key/generate", team_id="t1"))["key"]
    assert [t["team_id"] for t in (await client.get("/team/list")).json()] == ["t1", "t2"]
    updated = await post(client, "/team/update", team_id="t1", team_alias="One", max_budget=0)
    assert (updated["data"]["team_alias"], updated["data"]["max_budget"]) == ("One", 0.0)
    assert (await call(client, key)).status_code == 429
    await post(client, "/team/update", 404, team_id="t9", max_budget=1)
    assert await post(client, "/team/delete", team_ids=["t1"]) == {"deleted_teams": ["t1"]}
    assert (await call(client, key)).status_code == 401
    assert [t["team_id"] for t in (await client.get("/team/list")).json()] == ["t2"]
    await post(client, "/team/delete", 404, team_ids=["t1"])
    await post(client, "/team/delete", 400, team_ids=[])


async def test_team_member_budget_applies_to_that_user_on_team_keys(admin: Admin) -> None:
    _, client, _ = admin
    await post(client, "/team/new", team_id="t1", max_budget=100)
    added = await post(
        client,
        "/team/member_add",
        team_id="t1",
        member={"role": "user", "user_id": "alice"},
        max_budget_in_team=0,
    )
    assert added["members_with_roles"] == [{"user_id": "alice", "role": "user"}]
    assert added["updated_team_memberships"][0]["max_budget_in_team"] == 0.0
    assert [u["user_id"] for u in added["updated_users"]] == ["alice"]  # created, as LiteLLM
    await post(
        client, "/team/member_add", team_id="t1", member=[{"role": "admin", "user_id": "bob"}]
    )
    alice_team = (await post(client, "/key/generate", team_id="t1", user_id="alice"))["key"]
    alice_own = (await post(client, "/key/generate", user_id="alice"))["key"]
    bob_team = (await post(client, "/key/generate", team_id="t1", user_id="bob"))["key"]
    refused = await call(client, alice_team)
    assert refused.status_code == 429
    assert "alice in team t1" in refused.json()["error"]["message"]
    assert (await call(client, alice_own)).status_code == 200  # not a team key
    assert (await call(client, bob_team)).status_code == 200  # no budget of his own
    teams = (await client.get("/team/list", params={"user_id": "bob"})).json()
    assert [t["team_id"] for t in teams] == ["t1"]
    removed = await post(client, "/team/member_delete", team_id="t1", user_id="alice")
    assert [m["user_id"] for m in removed["members_with_roles"]] == ["bob"]
    assert (await call(client, alice_team)).status_code == 200
    await post(client, "/team/member_delete", 404, team_id="t1", user_id="alice")
    await post(client, "/team/member_add", 404, team_id="t9", member={"user_id": "x"})
    await post(client, "/team/member_add", 400, team_id="t1", member={"role": "user"})


# -- customers -------------------------------------------------------------------------------


async def test_customer_budget_limits_and_blocking(admin: Admin) -> None:
    _, client, _ = admin
    key = (await post(client, "/key/generate"))["key"]
    created = await post(client, "/customer/new", user_id="broke", max_budget=0, alias="B")
    assert (created["user_id"], created["alias"], created["blocked"]) == ("broke", "B", False)
    assert created["litellm_budget_table"]["max_budget"] == 0.0
    await post(client, "/customer/new", 400, user_id="broke")
    await post(client, "/customer/new", user_id="slow", rpm_limit=1)
    assert (await call(client, key, user="broke")).status_code == 429
    assert (await call(client, key, user="slow")).status_code == 200
    assert (await call(client, key, user="slow")).status_code == 429
    assert (await call(client, key, user="anyone-else")).status_code == 200
    info = (await client.get("/customer/info", params={"end_user_id": "slow"})).json()
    assert info["spend"] > 0
    assert info["litellm_budget_table"]["rpm_limit"] == 1
    assert (await client.get("/customer/info", params={"end_user_id": "x"})).status_code == 404

    assert await post(client, "/customer/block", user_ids=["broke", "slow"]) == {
        "blocked_users": ["broke", "slow"]
    }
    refused = await call(client, key, user="broke")
    assert refused.status_code == 400
    assert refused.json()["error"]["message"] == (
        "User blocked from making LLM API Calls. User=broke"
    )
    unblocked = await post(client, "/customer/unblock", user_ids=["broke"])
    assert unblocked == {"unblocked_users": ["broke"]}
    await post(client, "/customer/update", user_id="broke", max_budget=10)
    assert (await call(client, key, user="broke")).status_code == 200
    await post(client, "/customer/update", 404, user_id="nobody", max_budget=1)
    listed = (await client.get("/customer/list")).json()
    assert [c["user_id"] for c in listed] == ["broke", "slow"]
    deleted = await post(client, "/customer/delete", user_ids=["slow"])
    assert deleted == {"deleted_customers": ["slow"]}
    assert (await call(client, key, user="slow")).status_code == 200  # blocked no more
    await post(client, "/customer/delete", 404, user_ids=["slow"])


# -- budget tiers ----------------------------------------------------------------------------


async def test_budget_tiers_apply_to_keys_users_and_customers(admin: Admin) -> None:
    _, client, _ = admin
    tier = await post(client, "/budget/new", budget_id="basic", rpm_limit=1, max_budget=100)
    assert (tier["budget_id"], tier["rpm_limit"], tier["max_budget"]) == ("basic", 1, 100.0)
    await post(client, "/budget/new", 400, budget_id="basic")
    key = (await post(client, "/key/generate", budget_id="basic"))["key"]
    assert (await call(client, key)).status_code == 200
    assert (await call(client, key)).status_code == 429
    # Changing the tier changes every key that names it.
    await post(client, "/budget/update", budget_id="basic", rpm_limit=3)
    assert (await call(client, key)).status_code == 200
    await post(client, "/budget/new", budget_id="none", max_budget=0)
    await post(client, "/user/new", user_id="u1", budget_id="none")
    user_key = (await post(client, "/key/generate", user_id="u1"))["key"]
    assert (await call(client, user_key)).status_code == 429
    await post(client, "/customer/new", user_id="c1", budget_id="none")
    open_key = (await post(client, "/key/generate"))["key"]
    assert (await call(client, open_key, user="c1")).status_code == 429
    await post(client, "/budget/update", budget_id="none", max_budget=50)
    assert (await call(client, user_key)).status_code == 200
    assert (await call(client, open_key, user="c1")).status_code == 200

    info = await post(client, "/budget/info", budgets=["basic", "none"])
    assert [b["budget_id"] for b in info] == ["basic", "none"]
    assert [b["budget_id"] for b in (await client.get("/budget/list")).json()] == [
        "basic",
        "none",
    ]
    await post(client, "/budget/info", 404, budgets=["gone"])
    assert (await post(client, "/budget/delete", id="basic"))["budget_id"] == "basic"
    await post(client, "/budget/delete", 404, id="basic")
    await post(client, "/budget/update", 404, budget_id="basic", rpm_limit=1)
    await post(client, "/customer/new", 404, user_id="c2", budget_id="basic")


# -- spend -----------------------------------------------------------------------------------


async def test_spend_logs_find_a_request_by_its_id(admin: Admin) -> None:
    _, client, _ = admin
    key = (await post(client, "/key/generate"))["key"]
    first = await call(client, key)
    await call(client, key)
    request_id = first.headers["x-llmfence-request-id"]
    found = (await client.get("/spend/logs", params={"request_id": request_id})).json()
    assert [entry["request_id"] for entry in found] == [request_id]
    assert (await client.get("/spend/logs", params={"request_id": "nope"})).json() == []


async def test_spend_report_groups_by_day_and_level(admin: Admin) -> None:
    _, client, clock = admin
    await post(client, "/team/new", team_id="t1")
    k1 = await post(client, "/key/generate", team_id="t1", user_id="u1", create_missing=True)
    k2 = await post(client, "/key/generate")
    await call(client, k1["key"], user="eve")
    await call(client, k2["key"])
    clock.advance(86_400)
    await call(client, k1["key"], user="eve")
    params = {"start_date": "2026-11-18", "end_date": "2026-11-19"}
    teams = (await client.get("/spend/report", params={**params, "group_by": "team"})).json()
    assert [day["group_by_day"] for day in teams] == [
        "2026-11-18T00:00:00+00:00",
        "2026-11-19T00:00:00+00:00",
    ]
    assert {t["team_name"] for t in teams[0]["teams"]} == {"t1", None}
    assert teams[1]["teams"][0]["metadata"][0]["model"] == "gpt-3.5-turbo-0613"
    keys = await client.get("/global/spend/report", params={**params, "group_by": "api_key"})
    assert {k["api_key"] for k in keys.json()[0]["api_keys"]} == {k1["key_name"], k2["key_name"]}
    for group_by, plural, field, names in (
        ("customer", "customers", "customer", {"eve", None}),
        ("user", "users", "user_id", {"u1", None}),
        ("model", "models", "model", {"gpt-3.5-turbo-0613"}),
    ):
        report = await client.get("/spend/report", params={**params, "group_by": group_by})
        assert {g[field] for g in report.json()[0][plural]} == names, group_by
    day_two = {"start_date": "2026-11-19", "end_date": "2026-11-19", "group_by": "team"}
    assert len((await client.get("/spend/report", params=day_two)).json()) == 1
    bad = await client.get("/spend/report", params={**params, "group_by": "planet"})
    assert bad.status_code == 400
    assert (await client.get("/spend/report")).status_code == 400


# -- the same from Python --------------------------------------------------------------------


async def test_the_same_operations_from_python(admin: Admin) -> None:
    fence, client, _ = admin
    await fence.new_team("t1", team_alias="Core")
    await fence.new_user("u1", team_id="t1")
    plain, record = await fence.generate_key(user_id="u1", key_alias="py")
    assert [k.key_alias for k in await fence.list_keys(user_id="u1")] == ["py"]
    await fence.block_key(plain)
    assert (await call(client, plain)).status_code == 401
    await fence.unblock_key(plain)
    new_plain, new_record = await fence.regenerate_key(plain, grace_period="1h")
    assert new_record.counter_id == record.key_hash
    assert (await call(client, new_plain)).status_code == 200
    await fence.update_user("u1", max_budget=0)
    assert (await call(client, new_plain)).status_code == 429
    await fence.add_team_member("t1", "u2", max_budget_in_team=1.5)
    assert (await fence.update_team("t1", team_alias="C")).team_alias == "C"
    await fence.new_budget("gold", rpm_limit=5)
    await fence.new_customer("bob", budget_id="gold")
    assert (await fence.get_customer("bob")).budget_id == "gold"
    assert await fence.block_customers(["bob"]) == ["bob"]
    assert (await call(client, new_plain, user="bob")).status_code == 400
    assert (await fence.update_budget("gold", rpm_limit=6)).rpm_limit == 6
    assert [b.budget_id for b in await fence.list_budgets()] == ["gold"]
    assert await fence.delete_customers(["bob"]) == ["bob"]
    assert await fence.delete_users(["u1", "u2"]) == ["u1", "u2"]
    assert await fence.delete_teams(["t1"]) == ["t1"]
    assert await fence.list_keys() == []
