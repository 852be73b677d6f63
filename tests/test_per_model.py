"""Per-model limits on keys: LiteLLM's `model_rpm_limit`, `model_tpm_limit` and both shapes of
`model_max_budget`, through the admin API and `Fence.generate_key`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from llmfence import ConfigurationError, Fence, Store
from llmfence.stores import BudgetScope
from llmfence.testing import FakeClock, mock_llm_app

from .middleware.conftest import CHAT, auth, chat_body, client_for

pytestmark = pytest.mark.anyio
MASTER = "sk-master-key-123"
T0 = 1_795_000_000.0
Admin = tuple[Fence, httpx.AsyncClient, FakeClock]


@pytest.fixture
async def admin(store: Store) -> AsyncIterator[Admin]:
    clock = FakeClock(T0)
    app = mock_llm_app()
    fence = Fence(store=store, master_key=MASTER, clock=clock.now)
    fence.install(app, admin=True)
    async with client_for(app) as client:
        yield fence, client, clock


async def generate(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await client.post("/key/generate", json=fields, headers=auth(MASTER))
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def statuses(client: httpx.AsyncClient, key: str, model: str, count: int) -> list[int]:
    body = {**chat_body("Hi", max_tokens=5), "model": model}
    return [
        (await client.post(CHAT, json=body, headers=auth(key))).status_code for _ in range(count)
    ]


@pytest.mark.parametrize("where", ["top", "metadata"])
async def test_model_rpm_limit(admin: Admin, where: str) -> None:
    _fence, client, _clock = admin
    limits = {"gpt-4o-mini": 2}
    fields = (
        {"model_rpm_limit": limits} if where == "top" else {"metadata": {"model_rpm_limit": limits}}
    )
    key = (await generate(client, **fields))["key"]
    assert await statuses(client, key, "gpt-4o-mini", 3) == [200, 200, 429]
    # The snapshot is the same model; another model is not limited.
    assert await statuses(client, key, "gpt-4o-mini-2024-07-18", 1) == [429]
    assert await statuses(client, key, "gpt-4o", 3) == [200, 200, 200]
    info = await client.get("/key/info", params={"key": key}, headers=auth(MASTER))
    assert info.json()["info"]["model_rpm_limit"] == limits


async def test_model_tpm_limit(admin: Admin) -> None:
    _fence, client, _clock = admin
    key = (await generate(client, model_tpm_limit={"gpt-4o-mini": 60}))["key"]
    body = {**chat_body("Hi", max_tokens=40), "model": "gpt-4o-mini"}
    first = await client.post(CHAT, json=body, headers=auth(key))
    second = await client.post(CHAT, json=body, headers=auth(key))
    assert first.status_code == 200
    assert second.status_code == 429
    assert second.json()["error"]["type"] == "tokens"
    assert "gpt-4o-mini on sk-" in second.json()["error"]["message"]


async def test_litellms_model_max_budget_shape_has_its_own_period(admin: Admin) -> None:
    fence, client, clock = admin
    budgets = {"gpt-4o-mini": {"budget_limit": "0.00001", "time_period": "1d"}, "gpt-4o": 1}
    created = await generate(client, model_max_budget=budgets, budget_duration="30d")
    key = created["key"]
    assert created["model_max_budget"] == {
        "gpt-4o-mini": {"budget_limit": 0.00001, "time_period": "1d"},
        "gpt-4o": 1.0,
    }
    spent = await statuses(client, key, "gpt-4o-mini", 6)
    assert spent[0] == 200
    assert spent[-1] == 429
    clock.advance(86_400)  # a day later the model's own period rolled; the key's has not
    assert (await statuses(client, key, "gpt-4o-mini", 1)) == [200]
    [record] = await fence.store.list_keys()
    assert record.model_budget_duration == {"gpt-4o-mini": "1d"}


async def test_python_api_takes_both_shapes(store: Store) -> None:
    fence = Fence(store=store, master_key=MASTER)
    _, record = await fence.generate_key(
        model_max_budget={"a": 0.5, "b": {"budget_limit": 0.25, "time_period": "1d"}},
        model_rpm_limit={"a": 3},
        model_tpm_limit={"b": 1000},
    )
    assert record.model_max_budget == {"a": 500_000_000, "b": 250_000_000}
    assert record.model_budget_duration == {"b": "1d"}
    assert (record.model_rpm_limit, record.model_tpm_limit) == ({"a": 3}, {"b": 1000})
    stored = await store.get_key(record.key_hash)
    assert stored == record
    with pytest.raises(ConfigurationError):
        await fence.generate_key(model_rpm_limit={"a": -1})
    with pytest.raises(ConfigurationError):
        await fence.generate_key(model_max_budget={"a": {"time_period": "1d"}})


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model_rpm_limit": {"m": -1}}, "model_rpm_limit"),
        ({"model_tpm_limit": {"m": "x"}}, "model_tpm_limit"),
        ({"model_max_budget": {"m": {"budget_limit": "x"}}}, "model_max_budget"),
        ({"model_max_budget": {"m": {"budget_limit": 1, "time_period": "soon"}}}, None),
        ({"model_max_budget": {"m": {"budget_limit": 1, "other": 1}}}, "model_max_budget"),
    ],
)
async def test_bad_per_model_fields_are_400(
    admin: Admin, fields: dict[str, Any], param: str | None
) -> None:
    _fence, client, _clock = admin
    response = await client.post("/key/generate", json=fields, headers=auth(MASTER))
    assert response.status_code == 400
    if param is not None:
        assert response.json()["error"]["param"] == param


async def test_per_model_budget_counts_every_name_of_the_model(admin: Admin) -> None:
    fence, client, _clock = admin
    created = await generate(client, model_max_budget={"gpt-4o": 0.0004})
    key = created["key"]
    names = ["gpt-4o-2024-08-06", "openai/gpt-4o", "GPT-4o", "gpt-4o-2024-11-20"] * 3
    results = [(await statuses(client, key, name, 1))[0] for name in names]
    assert 429 in results
    records = await fence.store.spend_records()
    scope = BudgetScope(f"key_model:{records[0].key_hash}:gpt-4o", "model", "gpt-4o")
    [state] = await fence.store.budgets([scope], 0)
    assert 0 < state.spent <= 400_000


async def test_daily_limits_on_keys_users_and_teams(store: Store) -> None:
    clock = FakeClock(T0)
    app = mock_llm_app()
    fence = Fence(store=store, master_key=MASTER, clock=clock.now)
    fence.install(app)
    await fence.new_team("t", tpd_limit=100_000)
    await fence.new_user("u", team_id="t", rpd_limit=3)
    key, record = await fence.generate_key(user_id="u", rpm_limit=100, rpd_limit=5)
    assert (record.rpd_limit, record.tpd_limit) == (5, None)
    async with client_for(app) as client:
        results = [await client.post(CHAT, json=chat_body(), headers=auth(key)) for _ in range(4)]
        assert [r.status_code for r in results] == [200, 200, 200, 429]
        assert "user u on requests per day" in results[-1].json()["error"]["message"]
        assert int(results[-1].headers["retry-after"]) > 3600  # a day's bucket refills slowly
        clock.advance(86_400)
        again = await client.post(CHAT, json=chat_body(), headers=auth(key))
    assert again.status_code == 200
    with pytest.raises(ConfigurationError, match="at most"):
        await fence.generate_key(tpd_limit=10**9)
