"""One store round trip for all checks of a request, and one for its settlement (Redis)."""

from __future__ import annotations

import pytest

from llmfence import Fence, RedisStore
from llmfence.testing import FakeClock, mock_llm_app
from tests.stores.test_redis_store import client_commands

from .conftest import CHAT, auth, chat_body, client_for

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("stream", [False, True])
async def test_a_guarded_request_costs_two_round_trips(redis_url: str, stream: bool) -> None:
    store = RedisStore.from_url(redis_url)
    fence = Fence(
        store=store,
        master_key="sk-master-key",
        max_budget=10.0,
        budget_duration="30d",
        max_end_user_budget=1.0,
        clock=FakeClock(1e9).now,
    )
    app = mock_llm_app()
    fence.install(app)
    await fence.new_team("t", max_budget=5.0, rpm_limit=100, tpm_limit=100_000)
    await fence.new_user("u", team_id="t", max_budget=2.0, rpm_limit=50)
    key, _ = await fence.generate_key(
        user_id="u",
        rpm_limit=10,
        tpm_limit=50_000,
        max_parallel_requests=4,
        max_budget=1.0,
        model_max_budget={"gpt-3.5-turbo-0613": 0.5},
    )
    body = chat_body(user="eve", stream=stream, max_tokens=100)
    async with client_for(app) as client:
        # The first request loads the key, user and team records into the auth cache.
        assert (await client.post(CHAT, json=body, headers=auth(key))).status_code == 200

        async def second() -> None:
            response = await client.post(CHAT, json=body, headers=auth(key))
            assert response.status_code == 200

        commands = await client_commands(redis_url, second)
    # RPM at 3 levels, TPM at 3, leases at 1, budgets at 6 levels: one script call to admit
    # them all, one to settle and write the spend record.
    assert commands == ["EVALSHA", "EVALSHA"]
    await store.aclose()
