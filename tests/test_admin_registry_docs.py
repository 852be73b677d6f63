"""Issue 13's registry routes seen from outside the admin API: in a FastAPI app's OpenAPI, a
regenerated key's grace period against the key cache of this and another instance, a
customer's block reaching the requests at once, and the spend report from Python."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from llmfence import Fence, Store
from llmfence.exceptions import ConfigurationError
from llmfence.stores import CustomerRecord
from llmfence.testing import FakeClock, mock_llm_app

from .middleware.conftest import CHAT, auth, chat_body, client_for

pytestmark = pytest.mark.anyio
MASTER = "sk-master-key-123"
T0 = 1_795_000_000.0


def gateway(store: Store, clock: FakeClock, cache_ttl: float = 60.0) -> tuple[Fence, FastAPI]:
    app = FastAPI()
    app.mount("/v1", mock_llm_app())
    fence = Fence(store=store, master_key=MASTER, cache_ttl=cache_ttl, clock=clock.now)
    fence.install(app, admin=True)
    return fence, app


async def call(client: httpx.AsyncClient, key: str, **extra: Any) -> int:
    response = await client.post(CHAT, json=chat_body(**extra), headers=auth(key))
    return response.status_code


async def test_the_registry_routes_are_in_the_openapi_schema(store: Store) -> None:
    _, app = gateway(store, FakeClock(T0))
    async with client_for(app) as client:
        schema = (await client.get("/openapi.json")).json()
    paths = schema["paths"]
    for path in ("/key/regenerate", "/key/list", "/team/member_add", "/customer/new",
                 "/customer/info", "/budget/new", "/budget/list", "/spend/report"):  # fmt: skip
        assert path in paths, path
    body = paths["/team/member_add"]["post"]["requestBody"]["content"]["application/json"]
    assert {"team_id", "member", "max_budget_in_team"} <= set(body["schema"]["properties"])
    query = {p["name"] for p in paths["/spend/report"]["get"]["parameters"]}
    assert query == {"start_date", "end_date", "group_by"}


async def test_a_grace_period_ends_on_time_here_and_within_the_cache_ttl_elsewhere(
    store: Store,
) -> None:
    clock = FakeClock(T0)
    here, app_here = gateway(store, clock, cache_ttl=60.0)
    _, app_there = gateway(store, clock, cache_ttl=5.0)
    old, _ = await here.generate_key()
    async with client_for(app_here) as a, client_for(app_there) as b:
        assert await call(a, old) == 200
        assert await call(b, old) == 200  # now cached there too
        new, _ = await here.regenerate_key(old, grace_period="30s")
        clock.advance(31)
        # This instance dropped its cached copy: the grace ends on time, however long the
        # cache keeps records.
        assert await call(a, old) == 401
        # Another instance sees the change within its own cache_ttl (5 s), as any admin
        # change: its copy had expired already.
        assert await call(b, old) == 401
        assert await call(a, new) == 200
        assert await call(b, new) == 200


async def test_a_blocked_customer_is_refused_at_once_and_others_cost_no_lookup(
    store: Store,
) -> None:
    clock = FakeClock(T0)
    fence, app = gateway(store, clock)
    key, _ = await fence.generate_key()
    await fence.new_customer("bob")
    async with client_for(app) as client:
        assert await call(client, key, user="bob") == 200  # bob is cached now
        await fence.block_customers(["bob"])
        assert await call(client, key, user="bob") == 400
        await fence.unblock_customers(["bob"])
        assert await call(client, key, user="bob") == 200
    # A request that names no customer never asks the store for one.
    asked: list[str] = []
    real = store.get_customer

    async def counting(user_id: str) -> CustomerRecord | None:
        asked.append(user_id)
        return await real(user_id)

    store.get_customer = counting  # type: ignore[method-assign]
    async with client_for(app) as client:
        assert await call(client, key) == 200
        assert await call(client, key, user="carol") == 200
        assert await call(client, key, user="carol") == 200
    assert asked == ["carol"]  # once, then cached (unknown ids too)


async def test_the_spend_report_from_python(store: Store) -> None:
    clock = FakeClock(T0)
    fence, app = gateway(store, clock)
    key, _ = await fence.generate_key(team_id="t1")
    async with client_for(app) as client:
        assert await call(client, key) == 200
    [day] = await fence.spend_report(T0 - 60, T0 + 60, group_by="team")
    assert [team["team_name"] for team in day["teams"]] == ["t1"]
    assert day["teams"][0]["total_spend"] > 0
    with pytest.raises(ConfigurationError):
        await fence.spend_report(T0, T0, group_by="planet")


async def test_a_regenerated_key_reads_its_own_info_with_the_spend_it_carried(
    store: Store,
) -> None:
    fence, app = gateway(store, FakeClock(T0))
    old, _ = await fence.generate_key(max_budget=5)
    async with client_for(app) as client:
        assert await call(client, old) == 200
        new, _ = await fence.regenerate_key(old)
        for params in ({"key": new}, {}):
            own = await client.get("/key/info", params=params, headers=auth(new))
            assert own.status_code == 200, own.text
            assert own.json()["info"]["spend"] > 0
        logs = await client.get("/spend/logs", headers=auth(new))
        assert len(logs.json()) == 1
