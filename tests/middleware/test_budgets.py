from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from llmfence import Fence, Store
from llmfence.stores import BudgetScope
from llmfence.testing import FakeClock, mock_llm_app

from .conftest import CHAT, MODEL, auth, chat_body, client_for

pytestmark = pytest.mark.anyio

# gpt-3.5-turbo-0613: $1.5 / $2 per million tokens; the seed message is 14 prompt tokens.
NANO_IN, NANO_OUT = 1500, 2000


def cost(prompt: int, completion: int) -> int:
    return prompt * NANO_IN + completion * NANO_OUT


async def spent(store: Store, key: str) -> int:
    [state] = await store.budgets([BudgetScope(key, key, key)], 1e12 - 1)
    return state.total


async def test_every_budget_level_refuses(gateway: Any, clock: FakeClock) -> None:
    # Each call projects 14 prompt + 100 allowance = $0.000221.
    per_call = cost(14, 100)
    fence, _app, client = gateway(max_end_user_budget=per_call / 1e9 * 1.5)
    await fence.new_team("t", max_budget=per_call / 1e9 * 10)
    await fence.new_user("u", team_id="t", max_budget=per_call / 1e9 * 10)
    key, _record = await fence.generate_key(user_id="u", max_budget=per_call / 1e9 * 10)
    model_key, _ = await fence.generate_key(model_max_budget={MODEL: per_call / 1e9 * 1.5})
    body = chat_body(max_tokens=100)
    async with client as c:
        end_user = [
            await c.post(CHAT, json={**body, "user": "eve"}, headers=auth(key)) for _ in range(3)
        ]
        per_model = [await c.post(CHAT, json=body, headers=auth(model_key)) for _ in range(3)]
    # Budgets of 1.5 projected calls: the first call costs far less than projected (a short
    # reply), so a second fits; the third cannot.
    assert [r.status_code for r in end_user] == [200, 200, 429]
    assert [r.status_code for r in per_model] == [200, 200, 429]
    assert end_user[-1].json()["error"]["message"].startswith("Budget exceeded for end_user eve:")
    assert (
        per_model[-1]
        .json()["error"]["message"]
        .startswith(f"Budget exceeded for model {MODEL} on sk-...")
    )
    for refused in (end_user[-1], per_model[-1]):
        assert refused.status_code == 429
        assert refused.headers["x-should-retry"] == "false"
        error = refused.json()["error"]
        assert (error["code"], error["type"]) == ("insufficient_quota", "budget_exceeded")


async def test_key_user_team_and_global_levels(gateway: Any) -> None:
    per_call = cost(14, 100)
    for level in ("global", "team", "user", "key"):
        fence, _app, client = gateway(max_budget=per_call * 2 / 1e9 if level == "global" else None)
        limit = per_call * 2 / 1e9
        await fence.new_team(f"t-{level}", max_budget=limit if level == "team" else None)
        await fence.new_user(
            f"u-{level}", team_id=f"t-{level}", max_budget=limit if level == "user" else None
        )
        key, _ = await fence.generate_key(
            user_id=f"u-{level}", max_budget=limit if level == "key" else None
        )
        async with client as c:
            responses = [
                await c.post(CHAT, json=chat_body(max_tokens=100), headers=auth(key))
                for _ in range(6)
            ]
        # Calls cost less than projected (the reply is short), so more than two fit.
        statuses = [r.status_code for r in responses]
        assert statuses[:4] == [200] * 4, level
        assert statuses[-1] == 429, level
        message = responses[-1].json()["error"]["message"]
        assert message.startswith(
            "Budget exceeded for this service"
            if level == "global"
            else f"Budget exceeded for {level} "
        ), (level, message)
        # A fresh global period for the next level.
        await fence.store.reset_budget("global", None, 0)


async def test_budget_resets_with_its_period(gateway: Any, clock: FakeClock) -> None:
    per_call = cost(14, 100)
    fence, _app, client = gateway()
    key, _ = await fence.generate_key(max_budget=per_call / 1e9, budget_duration="30s")
    async with client as c:
        assert (
            await c.post(CHAT, json=chat_body(max_tokens=100), headers=auth(key))
        ).status_code == 200
        refused = await c.post(CHAT, json=chat_body(max_tokens=100), headers=auth(key))
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) == 30
        reset = datetime.fromtimestamp(clock.now() + 30, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert refused.headers["x-llmfence-budget-reset"] == reset
        assert reset in refused.json()["error"]["message"]
        clock.advance(30)
        assert (
            await c.post(CHAT, json=chat_body(max_tokens=100), headers=auth(key))
        ).status_code == 200


async def test_calendar_aligned_budget(store: Store) -> None:
    clock = FakeClock(datetime(2026, 11, 22, 23, 59, tzinfo=UTC).timestamp())
    app = mock_llm_app()
    fence = Fence(
        store=store,
        max_budget=cost(14, 100) / 1e9,
        budget_duration="daily",
        calendar_aligned=True,
        clock=clock.now,
        master_key="sk-master-key",
    )
    fence.install(app)
    async with client_for(app) as c:
        headers = auth("sk-master-key")
        assert (
            await c.post(CHAT, json=chat_body(max_tokens=100), headers=headers)
        ).status_code == 200
        refused = await c.post(CHAT, json=chat_body(max_tokens=100), headers=headers)
        assert refused.headers["x-llmfence-budget-reset"] == "2026-11-23T00:00:00Z"
        clock.advance(60)
        assert (
            await c.post(CHAT, json=chat_body(max_tokens=100), headers=headers)
        ).status_code == 200


async def test_spend_is_the_actual_cost(gateway: Any) -> None:
    fence, _app, client = gateway()
    key, record = await fence.generate_key()
    async with client as c:
        response = await c.post(CHAT, json=chat_body(max_tokens=500), headers=auth(key))
    usage = response.json()["usage"]
    assert await spent(fence.store, f"key:{record.key_hash}") == cost(
        usage["prompt_tokens"], usage["completion_tokens"]
    )
    [log] = await fence.store.spend_records()
    assert log.cost == cost(usage["prompt_tokens"], usage["completion_tokens"])
    assert log.provenance == "provider-reported"
    assert log.key_masked == record.key_masked
    assert log.key_hash == record.key_hash
    assert log.status == 200


async def test_concurrent_requests_never_overspend_a_key_budget(gateway: Any) -> None:
    fence, _app, client = gateway()
    budget_nano = cost(14, 100) * 7 + 1234
    key, record = await fence.generate_key(max_budget=budget_nano / 1e9)
    statuses: list[int] = []
    async with client as c:

        async def call() -> None:
            response = await c.post(CHAT, json=chat_body(max_tokens=100), headers=auth(key))
            statuses.append(response.status_code)

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(call)
    total = await spent(fence.store, f"key:{record.key_hash}")
    assert total <= budget_nano
    assert statuses.count(200) >= 7
    assert statuses.count(200) + statuses.count(429) == 200
    assert (await fence.store.spend_totals("key", record.key_hash)).cost == total


async def test_clamp_max_tokens(gateway: Any) -> None:
    fence, _app, client = gateway(clamp_max_tokens=True)
    # Room for 14 prompt tokens and 10 output tokens, nothing more.
    key, _ = await fence.generate_key(max_budget=cost(14, 10) / 1e9)
    async with client as c:
        response = await c.post(CHAT, json=chat_body(max_tokens=1000), headers=auth(key))
        assert response.status_code == 200
        assert response.headers["x-llmfence-max-tokens-clamped"] == "10"
        assert response.json()["usage"]["completion_tokens"] == 10  # the upstream saw max_tokens=10
        refused = await c.post(CHAT, json=chat_body(max_tokens=1000), headers=auth(key))
    assert refused.status_code == 429


async def test_unknown_models_are_refused_or_priced_by_the_fallback(gateway: Any) -> None:
    fence, _, client = gateway()
    async with client as c:
        response = await c.post(
            CHAT, json={**chat_body(), "model": "my-llama"}, headers=auth("sk-master-key")
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_not_found"
    fence, _app, client = gateway(prices={"my-llama": {"input": 0.2, "output": 0.6}})
    async with client as c:
        ok = await c.post(
            CHAT, json={**chat_body(), "model": "my-llama"}, headers=auth("sk-master-key")
        )
    assert ok.status_code == 200
    [record] = [r for r in await fence.store.spend_records() if r.model == "my-llama"]
    assert record.price_source == "override"
    usage = ok.json()["usage"]
    assert record.cost == -(
        -(usage["prompt_tokens"] * 200_000_000 + usage["completion_tokens"] * 600_000_000)
        // 1_000_000
    )


async def test_a_per_model_budget_holds_under_every_spelling_of_the_model(gateway: Any) -> None:
    fence, _, client = gateway(prices={"gpt-4o": {"input": 2.5, "output": 10}})
    key, _ = await fence.generate_key(model_max_budget={"gpt-4o": 0.0003})
    async with client as c:
        statuses = []
        for model in ("gpt-4o", "openai/gpt-4o", "GPT-4o", "azure/GPT-4O"):
            body = {**chat_body(max_tokens=10), "model": model}
            statuses.append((await c.post(CHAT, json=body, headers=auth(key))).status_code)
    # Each call costs $0.000135 (14 + 10 tokens): two fit the one budget, whatever the spelling.
    assert statuses == [200, 200, 429, 429]


async def test_a_keys_periods_roll_from_its_creation(gateway: Any, clock: FakeClock) -> None:
    fence, _, client = gateway()
    created = clock.now()
    key, _ = await fence.generate_key(max_budget=cost(14, 100) / 1e9, budget_duration="7d")
    clock.advance(2 * 86_400)  # first used two days after it was created
    async with client as c:
        assert (
            await c.post(CHAT, json=chat_body(max_tokens=100), headers=auth(key))
        ).status_code == 200
        refused = await c.post(CHAT, json=chat_body(max_tokens=100), headers=auth(key))
        assert refused.status_code == 429
        reset = datetime.fromtimestamp(created + 7 * 86_400, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert refused.headers["x-llmfence-budget-reset"] == reset
        clock.set(created + 7 * 86_400)
        assert (
            await c.post(CHAT, json=chat_body(max_tokens=100), headers=auth(key))
        ).status_code == 200
