"""The outbox: bounded, oldest first, backing off while the store fails, dropping what waited
too long (logged and counted), never losing an entry to a cancelled send."""

from __future__ import annotations

import logging

import anyio
import anyio.lowlevel
import pytest

from llmfence._core.outbox import Outbox
from llmfence.exceptions import StoreError
from llmfence.stores import Settlement
from llmfence.testing import FakeClock

pytestmark = pytest.mark.anyio


def settlement(n: int) -> Settlement:
    return Settlement(f"r{n}", 0.0, n)


class Store:
    """Takes settlements while `up`; remembers the ones it took."""

    def __init__(self) -> None:
        self.up = True
        self.taken: list[str] = []
        self.tries = 0

    async def send(self, settlement: Settlement) -> None:
        self.tries += 1
        if not self.up:
            raise StoreError("down")
        self.taken.append(settlement.request_id)


async def test_sends_oldest_first_and_counts() -> None:
    outbox, store = Outbox(), Store()
    outbox.put([settlement(1), settlement(2)])
    outbox.put([settlement(3)])
    assert (outbox.depth, outbox.queued) == (3, 3)
    assert await outbox.drain(store.send)
    assert store.taken == ["r1", "r2", "r3"]
    assert (outbox.depth, outbox.delivered, outbox.dropped) == (0, 3, 0)


async def test_a_failing_store_stops_the_drain_and_backs_off() -> None:
    clock = FakeClock(0.0)
    outbox, store = Outbox(clock=clock.now), Store()
    outbox.put([settlement(1), settlement(2)])
    store.up = False
    assert not await outbox.drain(store.send)
    assert store.tries == 1  # the rest wait behind the first: no timeout per entry
    assert outbox.depth == 2
    assert not outbox.due()  # backing off
    backoffs = []
    for _ in range(8):
        clock.advance(10.0)
        assert outbox.due()
        await outbox.drain(store.send)
        before = clock.now()
        while not outbox.due():
            clock.advance(0.01)
        backoffs.append(clock.now() - before)
    # Doubling from 50 ms (the first failure's), with jitter down to half, capped at 2 s.
    for failure, backoff in enumerate(backoffs, start=2):
        full = min(2.0, 0.05 * 2 ** (failure - 1))
        assert full / 2 - 0.011 <= backoff <= full + 0.011
    store.up = True
    clock.advance(10.0)
    assert await outbox.drain(store.send)
    assert store.taken == ["r1", "r2"]


async def test_a_limit_keeps_a_drain_short() -> None:
    outbox, store = Outbox(), Store()
    outbox.put(settlement(n) for n in range(20))
    assert not await outbox.drain(store.send, limit=8)
    assert (len(store.taken), outbox.depth) == (8, 12)


async def test_bounded_the_oldest_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    outbox = Outbox(capacity=3)
    with caplog.at_level(logging.ERROR, "llmfence.outbox"):
        outbox.put(settlement(n) for n in range(5))
    assert (outbox.depth, outbox.dropped) == (3, 2)
    assert ["r0" in m or "r1" in m for m in caplog.messages] == [True, True]
    store = Store()
    await outbox.drain(store.send)
    assert store.taken == ["r2", "r3", "r4"]


async def test_what_waited_past_max_age_is_dropped_not_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Past the store's tombstone TTL a second send might apply twice: give it up instead.
    clock = FakeClock(0.0)
    outbox, store = Outbox(max_age=300.0, clock=clock.now), Store()
    outbox.put([settlement(1)])
    clock.advance(200.0)
    outbox.put([settlement(2)])
    clock.advance(101.0)
    with caplog.at_level(logging.ERROR, "llmfence.outbox"):
        assert await outbox.drain(store.send)
    assert store.taken == ["r2"]
    assert outbox.dropped == 1
    assert "r1" in caplog.text


async def test_a_cancelled_send_leaves_the_settlement_queued() -> None:
    outbox = Outbox()
    outbox.put([settlement(1)])
    started = anyio.Event()

    async def hang(_: Settlement) -> None:
        started.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(outbox.drain, hang)
        await started.wait()
        tasks.cancel_scope.cancel()
    assert outbox.depth == 1
    store = Store()
    assert await outbox.drain(store.send)
    assert store.taken == ["r1"]


async def test_one_drain_at_a_time() -> None:
    outbox = Outbox()
    outbox.put([settlement(1)])
    release = anyio.Event()
    store = Store()

    async def slow(s: Settlement) -> None:
        await release.wait()
        await store.send(s)

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(outbox.drain, slow)
        await anyio.lowlevel.checkpoint()
        assert not await outbox.drain(store.send)  # the first drain is under way
        release.set()
    assert store.taken == ["r1"]


async def test_run_drains_what_arrives_until_cancelled() -> None:
    outbox, store = Outbox(), Store()
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(outbox.run, store.send)
        await anyio.lowlevel.checkpoint()
        assert outbox.running
        outbox.put([settlement(1)])
        with anyio.fail_after(5):
            while outbox.depth:  # noqa: ASYNC110 - polls another task's progress
                await anyio.sleep(0.01)
        tasks.cancel_scope.cancel()
    assert store.taken == ["r1"]
    assert not outbox.running
