"""Store faults under load, on two gateway processes sharing one Redis (docs, "Guarantees" and
"Store outages"; issue 11, items 2, 3 and 10).

While Redis is stalled (SIGSTOP) or killed and restarted (its append-only file keeps what it
acknowledged), requests may get `503 store_unavailable` — budgets fail closed — but never a 500;
once Redis answers again "the next request after the store is back works without a restart",
"a refused request is never charged" and "a reservation the store made is never leaked nor
charged twice": a key with `max_parallel_requests=1` is served again (no lease left over), and
every nano-USD spent has its spend record. And on a healthy Redis — a cold start, or a while
after a restart — no request gets a 503 at all.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable

import anyio
import httpx
import pytest

from llmfence import Fence

from .bounds import (
    Load,
    Spec,
    assert_no_server_errors,
    assert_serves,
    assert_spend_equals_records,
    chat,
    eventually,
    fire,
    fire_until,
    upstream_stats,
)
from .conftest import MASTER_KEY, Gateways, new_key
from .processes import AofRedis
from .stores import open_store

pytestmark = [pytest.mark.anyio, pytest.mark.reliability]

# How long a recovery may take once Redis answers again: retries with backoff, not the 600 s of
# a lease's TTL.
RECOVERY = 20.0


class Keys:
    """A test's keys: one with `max_parallel_requests=1` (a leaked lease shows as 429s), one
    with a budget, and one with no limits."""

    def __init__(self, single: str, budgeted: str, free: str) -> None:
        self.single, self.budgeted, self.free = single, budgeted, free
        self.run = uuid.uuid4().hex[:8]

    @classmethod
    async def make(cls, admin: httpx.AsyncClient) -> Keys:
        return cls(
            await new_key(admin, max_parallel_requests=1),
            await new_key(admin, max_budget=1.0),
            await new_key(admin),
        )

    def all(self) -> list[str]:
        return [self.single, self.budgeted, self.free]

    def mix(self, index: int) -> Spec:
        """The i-th request of the load: slow answers, so requests are in flight when the
        fault strikes; a third of them streams."""
        key = self.all()[index % 3]
        # The single-slot key's calls take longer: a fault finds one in flight.
        delay = 1.0 if key == self.single else 0.2
        return chat(key, self.tag(index % 3), delay=delay, stream=index % 3 == 1)

    def tag(self, which: int) -> str:
        """The upstream counter of `self.all()[which]`'s requests."""
        return f"{self.run}-{which}"


async def single_in_flight(upstream: str, keys: Keys) -> None:
    """The upstream is answering a call of the single-slot key right now."""
    counter = (await upstream_stats(upstream)).get(keys.tag(0), {})
    assert counter.get("in_flight", 0) >= 1, counter


async def load_through(
    gateways: Gateways,
    upstream: str,
    keys: Keys,
    fault: Callable[[], None],
    recover: Callable[[], None],
) -> Load:
    """Load on both gateways; after 1 s, as soon as a call of the single-slot key is in flight
    (it holds the key's lease, and its settlement will meet the fault), `fault()`; 2.5 s later,
    `recover()`; then 1.5 s more load."""
    stop = anyio.Event()
    loads: list[Load] = []
    async with gateways.clients() as clients:

        async def run() -> None:
            load = await fire_until(clients, keys.mix, stop, concurrency=24, max_requests=1500)
            loads.append(load)

        async with anyio.create_task_group() as group:
            group.start_soon(run)
            await anyio.sleep(1.0)
            await eventually(lambda: single_in_flight(upstream, keys), within=10.0, every=0.02)
            fault()
            try:
                await anyio.sleep(2.5)
            finally:
                recover()
            await anyio.sleep(1.5)
            stop.set()
    [load] = loads
    return load


async def assert_recovered(gateways: Gateways, keys: Keys, load: Load) -> None:
    """After the fault: the single-slot key is served again (no leaked lease), and the books
    balance (spend == the records, nothing charged for a 503), within `RECOVERY` seconds."""
    async with gateways.admin() as admin, gateways.clients() as clients:
        for client in clients:
            served = functools.partial(assert_serves, client, keys.single, f"{keys.run}-after")
            await eventually(served, within=RECOVERY)
        await eventually(
            lambda: assert_spend_equals_records(admin, keys.all(), refused=load), within=RECOVERY
        )


async def test_a_redis_stall_under_load_leaks_nothing_and_charges_no_refusal(
    faulty_store: AofRedis, faulty_gateways: Gateways, upstream: str
) -> None:
    """Redis stalled (SIGSTOP) for 2.5 s under load, with calls in flight: 503s but no 500s,
    and once it answers again no lease is left over and nothing is charged for a 503 (issue
    11, item 2: admissions queued in the stalled server ran after their refunds had failed)."""
    async with faulty_gateways.admin() as admin:
        keys = await Keys.make(admin)
    stall, resume = faulty_store.stall, faulty_store.resume
    load = await load_through(faulty_gateways, upstream, keys, stall, resume)
    assert_no_server_errors(load, store_unavailable=True)
    assert load.of(status=503), "the stall refused nothing: it did not hit the load"
    await assert_recovered(faulty_gateways, keys, load)


async def test_a_redis_kill_and_restart_under_load_leaks_nothing(
    faulty_store: AofRedis, faulty_gateways: Gateways, upstream: str
) -> None:
    """Redis SIGKILLed under load, with calls in flight, and restarted 2.5 s later on the same
    port and directory (its AOF kept every admission): 503s but no 500s, and then no lease is
    left over and every nano-USD spent has its record (issue 11, item 3: a settlement lost in
    the outage was never sent again)."""
    async with faulty_gateways.admin() as admin:
        keys = await Keys.make(admin)
    kill, start = faulty_store.kill, faulty_store.start
    load = await load_through(faulty_gateways, upstream, keys, kill, start)
    assert_no_server_errors(load, store_unavailable=True)
    assert load.of(status=503), "the kill refused nothing: it did not hit the load"
    await assert_recovered(faulty_gateways, keys, load)


# Not on Redis Cluster: its admissions and settlements take two round trips each (a request's
# home, then its slots), and 600 requests at once on two busy cores then run past the 5 s
# store timeout (measured: 105 to 183 of 600 got 503s under load). docs, "Redis Cluster".
@pytest.mark.parametrize("store_url", ["redis", "sqlite"], indirect=True)
async def test_a_cold_start_serves_a_burst_without_a_503(
    store_url: str, gateway_processes: Gateways
) -> None:
    """600 requests at once at freshly started gateways, on a healthy store: all served."""
    fence = Fence(store=open_store(store_url), master_key=MASTER_KEY)
    key, _ = await fence.generate_key()  # made before the gateways start: they are cold
    await fence.store.aclose()
    gateway_processes.start()
    tag = uuid.uuid4().hex[:8]
    async with gateway_processes.clients() as clients:
        load = await fire(clients, [chat(key, tag) for _ in range(600)], concurrency=600)
    assert_no_server_errors(load)
    assert len(load.of(status=200)) == 600


async def test_requests_after_a_redis_restart_get_no_503(
    faulty_store: AofRedis, faulty_gateways: Gateways
) -> None:
    """Pooled connections that a restart closed are not handed to requests that come later."""
    async with faulty_gateways.admin() as admin:
        key = await new_key(admin)
    tag = uuid.uuid4().hex[:8]
    async with faulty_gateways.clients() as clients:
        # Fill both gateways' connection pools.
        warm = await fire(clients, [chat(key, tag, delay=0.1) for _ in range(96)], concurrency=96)
        assert_no_server_errors(warm, store_unavailable=True)  # a cold start: another test
        faulty_store.restart()
        await anyio.sleep(3.0)  # a while later: not a check, the scenario
        load = await fire(clients, [chat(key, tag) for _ in range(96)], concurrency=48)
    assert_no_server_errors(load)
    assert len(load.of(status=200)) == 96
