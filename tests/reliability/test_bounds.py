"""The bounds under concurrent load, on two gateway processes sharing one store (the docs,
"Guarantees"): spend never passes a budget, a burst admits exactly the RPM limit, in flight never
above max_parallel, every nano-USD spent has its spend record, and no 500s anywhere."""

from __future__ import annotations

import uuid

import pytest

from .bounds import (
    assert_in_flight_within,
    assert_no_server_errors,
    assert_rpm_admits_exactly,
    assert_spend_equals_records,
    assert_within_budget,
    chat,
    fire,
)
from .conftest import Gateways, new_key

pytestmark = [pytest.mark.anyio, pytest.mark.reliability]

BUDGET = 0.0001  # USD: some 7 requests of 8 prompt and 16 output tokens of gpt-4o-mini
RPM = 10  # the bucket refills one request every 6 s, longer than the burst takes
PARALLEL = 3


def tags(*names: str) -> list[str]:
    """Upstream counter names of this test's own (the upstream lives for the session)."""
    run = uuid.uuid4().hex[:8]
    return [f"{run}-{name}" for name in names]


async def test_two_processes_keep_every_bound_under_concurrent_load(
    gateways: Gateways, upstream: str
) -> None:
    """One mixed burst over both processes, JSON and streams: a key with a small budget, a key
    with `rpm_limit` N, a key with `max_parallel_requests` and slow upstream answers, and a key
    with no limits; each bound holds, and the books balance."""
    async with gateways.admin() as admin, gateways.clients() as clients:
        budgeted = await new_key(admin, max_budget=BUDGET)
        rpm = await new_key(admin, rpm_limit=RPM)
        parallel = await new_key(admin, max_parallel_requests=PARALLEL)
        free = await new_key(admin)
        budget_tag, rpm_tag, parallel_tag, free_tag = tags("budget", "rpm", "parallel", "free")
        # Warm both processes up first (a cold start's burst is `test_faults`' subject), and
        # keep the burst within their store connection pools (50 each).
        warm = await fire(clients, [chat(free, free_tag) for _ in range(48)], concurrency=24)
        assert_no_server_errors(warm, store_unavailable=True)
        specs = [chat(budgeted, budget_tag, stream=i % 2 == 1) for i in range(40)]
        specs += [chat(rpm, rpm_tag, stream=i % 3 == 0) for i in range(4 * RPM)]
        specs += [chat(parallel, parallel_tag, delay=0.3, stream=i % 2 == 0) for i in range(30)]
        specs += [chat(free, free_tag, stream=i % 2 == 0) for i in range(40)]
        load = await fire(clients, specs, concurrency=48)

        assert_no_server_errors(load)
        assert_rpm_admits_exactly(load, rpm_tag, RPM)
        await assert_in_flight_within(upstream, parallel_tag, PARALLEL)
        assert all(o.type == "parallel_requests" for o in load.of(parallel_tag) if o.status == 429)
        assert load.of(parallel_tag, 429), "the burst never reached the parallel limit"
        spent = await assert_within_budget(admin, budgeted, BUDGET)
        assert spent > 0
        assert {o.type for o in load.of(budget_tag, 429)} == {"budget_exceeded"}
        assert len(load.of(free_tag, 200)) == 40
        await assert_spend_equals_records(admin, [budgeted, rpm, parallel, free])
