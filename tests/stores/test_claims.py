"""The claim rule (`ClaimStore.claim`), on every store: a name is its first caller's until it
expires, whoever else asks, at once or later."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from llmfence.stores import ClaimStore, MemoryStore, SQLiteStore, Store
from tests.conftest import open_store

pytestmark = pytest.mark.anyio

T0 = 1_800_000_000.0


@pytest.fixture(params=["memory", "redis", "redis_cluster", "sqlite"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    opened = await open_store(request, request.param)
    yield opened
    await opened.aclose()


async def test_every_store_plays_the_claim_role(store: Store) -> None:
    assert isinstance(store, ClaimStore)


async def test_the_first_caller_takes_a_name_and_later_ones_do_not(store: Store) -> None:
    assert await store.claim("alert:a", T0 + 60, T0) is True
    assert await store.claim("alert:a", T0 + 60, T0 + 1) is False
    assert await store.claim("alert:a", T0 + 120, T0 + 59) is False  # a later expiry: still held
    assert await store.claim("alert:b", T0 + 60, T0 + 1) is True  # another name is free


async def test_a_name_is_free_again_once_its_claim_expired(store: Store) -> None:
    # Redis counts its TTL in real milliseconds, so the expiry is a short real one.
    assert await store.claim("alert:a", T0 + 0.3, T0) is True
    await anyio.sleep(0.4)
    assert await store.claim("alert:a", T0 + 60.4, T0 + 0.4) is True
    assert await store.claim("alert:a", T0 + 60.4, T0 + 0.5) is False


async def test_a_claim_that_expires_by_now_is_never_granted(store: Store) -> None:
    assert await store.claim("alert:a", T0, T0) is False
    assert await store.claim("alert:a", T0 - 1, T0) is False
    assert await store.claim("alert:a", T0 + 60, T0) is True  # and took nothing


async def test_of_many_concurrent_callers_exactly_one_takes_a_name(store: Store) -> None:
    wins: list[bool] = []

    async def one() -> None:
        wins.append(await store.claim("alert:race", T0 + 60, T0))

    async with anyio.create_task_group() as tasks:
        for _ in range(20):
            tasks.start_soon(one)
    assert sorted(wins) == [False] * 19 + [True]


async def test_names_are_taken_as_given(store: Store) -> None:
    odd = "alert:{user}:ünïcode:" + "x" * 300
    assert await store.claim(odd, T0 + 60, T0) is True
    assert await store.claim(odd, T0 + 60, T0) is False
    assert await store.claim(odd + "y", T0 + 60, T0) is True


async def test_two_sqlite_stores_over_one_file_share_claims(tmp_path: object) -> None:
    path = f"{tmp_path}/shared.db"
    first, second = SQLiteStore(path), SQLiteStore(path)
    try:
        assert await first.claim("alert:a", T0 + 60, T0) is True
        assert await second.claim("alert:a", T0 + 60, T0) is False
    finally:
        await first.aclose()
        await second.aclose()


async def test_the_memory_store_sweeps_expired_claims() -> None:
    store = MemoryStore()
    for i in range(1500):
        assert await store.claim(f"alert:{i}", T0 + 1, T0)
    for i in range(3000):
        assert await store.claim(f"alert:late:{i}", T0 + 100, T0 + 50)
    assert len(store._claims) < 4500  # the early ones were swept
    assert await store.claim("alert:7", T0 + 100, T0 + 50)  # expired: free again
