"""One model identity: snapshots, provider prefixes and deployments cannot escape a key's
budgets and allow-list; end users limited on the metered path, in a namespace per tenant."""

from __future__ import annotations

from typing import Any

import pytest

from llmfence import Store
from llmfence._models import base_model
from llmfence.stores import BudgetScope
from llmfence.testing import FakeClock

from .conftest import CHAT, auth, chat_body

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    ("name", "base"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-11-20", "gpt-4o"),
        ("openai/GPT-4o", "gpt-4o"),
        ("gpt-3.5-turbo-0613", "gpt-3.5-turbo"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet@20241022", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet-latest", "claude-3-5-sonnet"),
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4-1106-preview", "gpt-4-1106-preview"),
    ],
)
def test_base_model(name: str, base: str) -> None:
    assert base_model(name) == base


async def test_snapshots_count_against_the_base_models_budget(gateway: Any) -> None:
    fence, _app, client = gateway()
    key, record = await fence.generate_key(model_max_budget={"gpt-4o": 0.0005})
    statuses = []
    async with client as c:
        for model in ["gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-2024-11-20", "openai/gpt-4o"] * 3:
            body = {**chat_body("Hi", max_tokens=20), "model": model}
            statuses.append((await c.post(CHAT, json=body, headers=auth(key))).status_code)
    assert 429 in statuses
    first_refusal = statuses.index(429)
    assert set(statuses[first_refusal:]) == {429}  # no other name gets past the budget
    [state] = await fence.store.budgets(
        [BudgetScope(f"key_model:{record.key_hash}:gpt-4o", "model", "gpt-4o")], 0
    )
    assert 0 < state.spent <= 500_000


async def test_snapshots_and_prefixes_are_in_the_base_models_allow_list(gateway: Any) -> None:
    fence, _app, client = gateway()
    key, _ = await fence.generate_key(models=["gpt-4o-mini"])
    async with client as c:
        allowed = await c.post(
            CHAT,
            json={**chat_body(), "model": "openai/gpt-4o-mini-2024-07-18"},
            headers=auth(key),
        )
        refused = await c.post(
            CHAT, json={**chat_body(), "model": "gpt-4o-2024-08-06"}, headers=auth(key)
        )
    assert allowed.status_code == 200
    assert refused.status_code == 403


async def test_on_deployment_paths_the_deployment_decides_the_model(gateway: Any) -> None:
    fence, _app, client = gateway(deployments={"prod-big": "gpt-4-32k"})
    key, _ = await fence.generate_key(models=["gpt-4o-mini"])
    path = "/openai/deployments/{}/chat/completions"
    body = {**chat_body(), "model": "gpt-4o-mini"}  # the body claims the allowed model
    async with client as c:
        big = await c.post(path.format("prod-big"), json=body, headers=auth(key))
        named = await c.post(path.format("gpt-4o-mini"), json=body, headers=auth(key))
    assert big.status_code == 403
    assert "gpt-4-32k" in big.json()["error"]["message"]
    assert named.status_code != 403


async def test_end_users_have_rate_limits_on_the_metered_path(gateway: Any) -> None:
    fence, _app, client = gateway(end_user_rpm_limit=2)
    key, _ = await fence.generate_key()
    async with client as c:
        bob = [
            (await c.post(CHAT, json=chat_body(user="bob"), headers=auth(key))).status_code
            for _ in range(3)
        ]
        eve = await c.post(CHAT, json=chat_body(user="eve"), headers=auth(key))
    assert bob == [200, 200, 429]
    assert eve.status_code == 200


@pytest.mark.parametrize(("scope", "shared"), [("global", True), ("team", False), ("key", False)])
async def test_end_user_scope(
    store: Store, clock: FakeClock, gateway: Any, scope: str, shared: bool
) -> None:
    fence, _app, client = gateway(max_end_user_budget=0.0002, end_user_scope=scope)
    await fence.new_team("acme")
    await fence.new_team("globex")
    acme, _ = await fence.generate_key(team_id="acme")
    globex, _ = await fence.generate_key(team_id="globex")
    body = chat_body("Hi", user="bob", max_tokens=40)
    async with client as c:
        spent = [(await c.post(CHAT, json=body, headers=auth(acme))).status_code for _ in range(5)]
        other = await c.post(CHAT, json=body, headers=auth(globex))
    assert 429 in spent  # acme's bob ran out
    assert (other.status_code == 429) is shared  # globex's bob is another end user unless global
