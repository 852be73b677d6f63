"""Three gateways on one Redis Cluster share a tight whole-app budget (`max_budget`): each admits
the global level from slices of it (`llmfence.stores._redis_slices`). Under a concurrent burst
spread over them, spend never passes the budget; once they shut down (which returns their
slices), `/global/spend` is exactly the sum of the spend records."""

from __future__ import annotations

import random
from contextlib import AsyncExitStack
from decimal import Decimal

import anyio
import httpx
import pytest

from llmfence import Fence, RedisStore
from llmfence.testing import FakeClock, mock_llm_app

from .conftest import CHAT, T0, auth, chat_body, client_for

pytestmark = pytest.mark.anyio

MASTER = "sk-master-key"
PER_CALL = 14 * 1500 + 100 * 2000  # nano-USD projected: 14 prompt tokens, 100 allowed
BUDGET = 25 * PER_CALL  # the whole app's budget: some 25 calls' projections


def gateway(url: str, clock: FakeClock) -> tuple[Fence, RedisStore]:
    store = RedisStore.from_url(url, cluster=True, timeout=10.0)
    fence = Fence(store=store, master_key=MASTER, max_budget=BUDGET / 1e9, clock=clock.now)
    return fence, store


async def test_three_gateways_keep_a_tight_global_budget(redis_cluster_url: str) -> None:
    clock = FakeClock(T0)
    gateways = [gateway(redis_cluster_url, clock) for _ in range(3)]
    statuses: list[int] = []
    rng = random.Random(7)
    async with AsyncExitStack() as stack:
        clients: list[httpx.AsyncClient] = []
        for fence, _store in gateways:
            app = mock_llm_app()
            fence.install(app, admin=True)
            clients.append(await stack.enter_async_context(client_for(app)))

        async def call(i: int) -> None:
            # Short answers cost less than projected: more calls fit than the projection says.
            body = chat_body(max_tokens=rng.choice([20, 60, 100]))
            response = await clients[i % 3].post(CHAT, json=body, headers=auth(MASTER))
            statuses.append(response.status_code)

        async with anyio.create_task_group() as tasks:
            for i in range(240):
                tasks.start_soon(call, i)
    # The gateways' lifespans ended: their slices are returned.
    assert set(statuses) == {200, 429}
    reader, store = gateway(redis_cluster_url, clock)
    app = mock_llm_app()
    reader.install(app, admin=True)
    try:
        async with client_for(app) as client:
            spend = (await client.get("/global/spend", headers=auth(MASTER))).json()
            logs = await client.get("/spend/logs", params={"limit": 10_000}, headers=auth(MASTER))
        records = logs.json()
        assert len(records) == statuses.count(200)
        recorded = sum(Decimal(str(record["spend"])) for record in records)
        spent = Decimal(str(spend["spend"]))
        assert spent == Decimal(str(spend["total_spend"])) == recorded
        assert spent * 10**9 <= BUDGET
        assert spent * 10**9 > BUDGET - 4 * PER_CALL  # the budget was used, not stranded
    finally:
        await store.aclose()
        for _fence, opened in gateways:
            await opened.aclose()
