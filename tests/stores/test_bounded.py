"""Bounded memory: state grows with what the operator created, not with what clients send.

Many distinct end users with budgets and rate limits leave nothing behind once their periods
have ended (MemoryStore: after a sweep; RedisStore: their keys carry TTLs), the answers a swept
store gives are those of one never swept, and the operator's levels keep their totals.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmfence.stores import (
    Admission,
    AdmissionResult,
    BudgetScope,
    BudgetState,
    MemoryStore,
    RateHit,
    RedisStore,
    Settlement,
    SpendRecord,
    Store,
)
from llmfence.stores._memory_state import ENDED_GRACE as _ENDED_GRACE
from llmfence.stores._redis_keys import scoped

pytestmark = pytest.mark.anyio
T0 = 1_795_000_000.0
DAY = 86_400.0
OPERATOR = ("global", "team:t", "user:u", "key:k")


def scopes(end_user: str, now: float, *, period: bool = True) -> tuple[BudgetScope, ...]:
    """The operator's four levels (a daily global budget, the rest without a period) and
    an end user's counter, daily or without a period."""
    end = T0 + DAY * (1 + int((now - T0) // DAY))
    return (
        BudgetScope("global", "global", "global", None, end),
        BudgetScope("team:t", "team", "t", 10**12),
        BudgetScope("user:u", "user", "u", 10**12),
        BudgetScope("key:k", "key", "sk-...k", 10**12),
        BudgetScope(f"end_user:{end_user}", "end_user", end_user, 5_000, end if period else None),
    )


def rates(end_user: str) -> tuple[RateHit, ...]:
    return (
        RateHit(f"rpm:60000:end_user:{end_user}", "requests", "end_user", end_user, 5, 1),
        RateHit(f"tpm:60000:end_user:{end_user}", "tokens", "end_user", end_user, 1000, 50),
    )


async def serve(store: Store, end_user: str, now: float, cost: int, *, period: bool = True) -> None:
    """One admitted request of an end user, settled at its cost with a spend record."""
    rid = f"r-{end_user}-{now}"
    admission = Admission(rid, now, rates(end_user), (), scopes(end_user, now, period=period), 100)
    assert (await store.admit(admission)).admitted
    record = SpendRecord(
        request_id=rid, timestamp=now, model="m", cost=cost, key_hash="k", user_id="u",
        team_id="t", end_user=end_user,
    )  # fmt: skip
    await store.settle(Settlement(rid, now, cost, tokens=40, record=record))


async def operator_totals(store: Store, now: float) -> list[int]:
    states = await store.budgets(scopes("nobody", now)[:4], now)
    return [state.total for state in states]


async def test_memory_end_users_are_swept_after_their_periods_end() -> None:
    store = MemoryStore()
    for i in range(500):
        await serve(store, f"eu{i}", T0 + i, cost=7)
    # A refused end user leaves a zero counter behind, whose period runs (its reset time is
    # an answer); a refused one without a period reads as a missing one.
    refused = Admission("x", T0, (), (), scopes("poor", T0), 10**9)
    assert not (await store.admit(refused)).admitted
    refused = Admission("y", T0, (), (), scopes("poorer", T0, period=False), 10**9)
    assert not (await store.admit(refused)).admitted
    assert len(store._budgets) == 4 + 502
    assert len(store._buckets) == 2 * 500
    before = await operator_totals(store, T0 + 600)
    store._sweep(T0 + 600)  # the periods still run
    assert len(store._budgets) == 4 + 501
    assert "end_user:poorer" not in store._budgets
    later = T0 + DAY + _ENDED_GRACE
    store._sweep(later)
    assert set(store._budgets) == set(OPERATOR)
    assert not store._buckets
    assert await operator_totals(store, later) == before == [3500] * 4


async def test_memory_keeps_what_a_live_reservation_holds() -> None:
    store = MemoryStore()
    admission = Admission("slow", T0, (), (), scopes("eu", T0), 100, ttl=3 * DAY)
    assert (await store.admit(admission)).admitted
    late = T0 + DAY + _ENDED_GRACE
    store._sweep(late)  # the reservation lives three days: its counter stays
    assert "end_user:eu" in store._budgets
    assert await store.settle(Settlement("slow", late - 1, 30))
    store._sweep(late)
    assert "end_user:eu" not in store._budgets
    assert await operator_totals(store, late) == [30] * 4


async def test_memory_end_users_without_a_period_keep_their_spend() -> None:
    store = MemoryStore()
    await serve(store, "spender", T0, cost=9, period=False)
    await serve(store, "free", T0, cost=0, period=False)
    store._sweep(T0 + 10 * DAY)
    assert "end_user:spender" in store._budgets  # spend that never resets is the budget
    assert "end_user:free" not in store._budgets


async def test_memory_sweeps_on_their_own_in_amortized_time() -> None:
    store = MemoryStore()
    for day in range(3):
        for i in range(3000):
            await serve(store, f"d{day}-{i}", T0 + day * DAY + i / 10, cost=1)
    # Each day's end users go within a day or two of sweeps; never all three days' worth.
    assert len(store._budgets) < 4 + 2 * 3000
    counts = store.entry_counts()
    assert counts["budgets"] == len(store._budgets)


async def test_memory_end_user_spend_totals_are_bounded() -> None:
    store = MemoryStore(max_spend_records=10)
    for i in range(1500):
        await serve(store, f"eu{i}", T0, cost=1)
    assert len(store._end_user_totals) == 1000
    assert (await store.spend_totals("end_user", "eu1499")).requests == 1
    assert (await store.spend_totals("end_user", "eu0")).requests == 0
    assert (await store.spend_totals("key", "k")).requests == 1500
    assert (await store.spend_totals("global")).cost == 1500


# -- a swept store answers as an unswept one does -------------------------------------------

_step = st.tuples(
    st.sampled_from(["admit", "settle", "charge", "read", "sweep"]),
    st.integers(0, 5),  # which end user
    st.booleans(),  # with a period
    st.integers(0, 3000),  # cost
    st.floats(0, 3 * 3600, allow_nan=False),  # time forward (s)
)


def _state(state: BudgetState) -> BudgetState:
    """A level's state with an end user's all-time total left out: no answer shows it."""
    return dataclasses.replace(state, total=0) if state.level == "end_user" else state


def _normalize(value: object) -> object:
    if isinstance(value, list):
        return [_state(v) for v in value]
    if isinstance(value, AdmissionResult):
        return dataclasses.replace(value, budgets=tuple(map(_state, value.budgets)))
    return value


def _scopes_hourly(end_user: str, now: float, period: bool) -> tuple[BudgetScope, ...]:
    end = T0 + 3600 * (1 + int((now - T0) // 3600))
    return (
        BudgetScope("key:k", "key", "k", 20_000, end),
        BudgetScope("user:u", "user", "u", None),
        BudgetScope(f"end_user:e{end_user}", "end_user", f"e{end_user}", 5_000,
                    end if period else None),
    )  # fmt: skip


# Generation is cheap, but a loaded 2-core machine must not fail the health check.
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_step, min_size=1, max_size=60))
async def test_memory_sweeps_change_no_answer(
    steps: list[tuple[str, int, bool, int, float]],
) -> None:
    swept, plain = MemoryStore(), MemoryStore()
    now = T0
    pending: list[str] = []
    for n, (op, who, period, cost, forward) in enumerate(steps):
        now += forward
        scope = _scopes_hourly(str(who), now, period)
        answers = []
        for store in (swept, plain):
            if op == "admit":
                rate = (RateHit(f"rpm:e{who}", "requests", "end_user", f"e{who}", 3, 1),)
                result = await store.admit(Admission(f"r{n}", now, rate, (), scope, cost, 7200))
                answers.append(_normalize(result))
            elif op == "settle":
                rid = pending[cost % len(pending)] if pending else "none"
                answers.append(await store.settle(Settlement(rid, now, cost // 2, tokens=1)))
            elif op == "charge":
                await store.charge(scope, cost, now)
            elif op == "read":
                answers.append(_normalize(await store.budgets(scope, now)))
        if op == "admit" and isinstance(answers[0], AdmissionResult) and answers[0].admitted:
            pending.append(f"r{n}")
        if op == "sweep":
            swept._sweep(now)
        assert answers[:1] == answers[1:], (op, n)
        final = _scopes_hourly("0", now, True)[:2]
        assert await swept.budgets(final, now) == await plain.budgets(final, now)


# -- RedisStore: end users' keys expire ------------------------------------------------------


async def _ttls(store: RedisStore, pattern: str) -> dict[str, int]:
    async def call(client: Any) -> dict[str, int]:
        keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
        return {(k.decode() if isinstance(k, bytes) else k): await client.pttl(k) for k in keys}

    return await store._run("test", call)


async def test_redis_end_user_keys_carry_ttls(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    try:
        for i in range(50):
            await serve(store, f"eu{i}", T0 + i, cost=7)
        await serve(store, "spender", T0, cost=9, period=False)
        await serve(store, "free", T0, cost=0, period=False)
        refused = Admission("x", T0, (), (), scopes("poor", T0), 10**9)
        assert not (await store.admit(refused)).admitted
        budgets = await _ttls(store, "{llmfence:*}:budget:*")
        buckets = await _ttls(store, "{llmfence:*}:bucket:*")
        operator = {scoped("llmfence", "budget", name) for name in OPERATOR}
        for key, ttl in budgets.items():
            if key in operator or key.endswith(":spender"):
                assert ttl == -1, key  # kept for ever: the operator's totals, a lifetime budget
            else:
                # A while after the period ends (a day from T0 by the caller's clock), and
                # never before the reservation it may hold (a day) is gone.
                assert 0 < ttl <= (2 * DAY + 120) * 1000, (key, ttl)
        assert len(budgets) == 4 + 50 + 3
        assert buckets
        assert all(0 < ttl <= 120_000 for ttl in buckets.values())
        assert await operator_totals(store, T0 + 60) == [7 * 50 + 9] * 4
    finally:
        await store.aclose()


async def test_redis_expired_end_users_are_gone_and_operators_stay(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    try:
        for i in range(30):
            await serve(store, f"eu{i}", T0, cost=5)

        async def expire_now(client: Any) -> None:
            # What Redis does on its own clock when the TTLs run out.
            async for key in client.scan_iter(match="{llmfence*"):
                if await client.pttl(key) > 0:
                    await client.delete(key)

        await store._run("test", expire_now)
        left = await _ttls(store, "{llmfence:*}:budget:*")
        assert set(left) == {scoped("llmfence", "budget", name) for name in OPERATOR}
        later = T0 + DAY + 120
        assert await operator_totals(store, later) == [150] * 4
        # An expired end user reads as a new one: nothing spent in a new period.
        state = (await store.budgets(scopes("eu1", later)[4:], later))[0]
        assert (state.spent, state.total) == (0, 0)
        await serve(store, "eu1", later, cost=3)
    finally:
        await store.aclose()


async def test_both_stores_answer_alike_after_a_period(store: Store) -> None:
    for i in range(20):
        await serve(store, f"eu{i}", T0, cost=11)
    later = T0 + DAY + 2 * _ENDED_GRACE
    if isinstance(store, MemoryStore):
        store._sweep(later)
        assert set(store._budgets) == set(OPERATOR)
    state = (await store.budgets(scopes("eu3", later)[4:], later))[0]
    assert state.spent == 0
    assert await operator_totals(store, later) == [220] * 4
    await serve(store, "eu3", later, cost=2)


async def test_redis_end_user_spend_totals_are_bounded(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url, max_spend_records=10)
    try:
        for i in range(1100):
            record = SpendRecord(
                request_id=f"r{i}", timestamp=T0 + i, model="m", cost=1, key_hash="k",
                end_user=f"eu{i}",
            )  # fmt: skip
            await store.settle(Settlement(f"r{i}", T0 + i, 1, record=record))
        assert (await store.spend_totals("end_user", "eu1099")).requests == 1
        assert (await store.spend_totals("end_user", "eu0")).requests == 0
        assert (await store.spend_totals("key", "k")).requests == 1100
        assert (await store.spend_totals("global")).cost == 1100

        async def fields(client: Any) -> int:
            return int(await client.hlen("{llmfence:spend}:totals"))

        assert await store._run("test", fields) == 1000 + 3  # global, key, model
    finally:
        await store.aclose()


async def test_route_counters_per_address_are_client_named() -> None:
    store = MemoryStore()
    scope = BudgetScope("route:chat:budget:1d:ip:10.0.0.1", "ip", "10.0.0.1", 100, T0 + DAY)
    await store.charge((scope,), 5, T0)
    store._sweep(T0 + DAY + _ENDED_GRACE)
    assert not store._budgets
