"""The store contract: every `Store` implementation passes this same suite."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import anyio
import pytest

from llmfence._duration import parse_duration
from llmfence.stores import (
    Admission,
    BudgetScope,
    KeyRecord,
    RateHit,
    Settlement,
    SlotRequest,
    SpendRecord,
    Store,
    TeamRecord,
    UserRecord,
    hash_key,
    mask_key,
)
from llmfence.testing import FakeClock
from tests.conftest import open_store

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 11, 22, 10, 0, 0, tzinfo=UTC).timestamp()


@pytest.fixture(params=["memory", "redis", "redis_cluster", "sqlite"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    opened = await open_store(request, request.param, max_spend_records=50)
    yield opened
    await opened.aclose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


def rid() -> str:
    return uuid.uuid4().hex


def rpm(limit: int, key: str = "rpm:key:k1", cost: int = 1, window: float = 60.0) -> RateHit:
    return RateHit(key, "requests", "key", "sk-...k1", limit, cost, window)


def tpm(limit: int, cost: int, key: str = "tpm:key:k1") -> RateHit:
    return RateHit(key, "tokens", "key", "sk-...k1", limit, cost)


def budget(key: str, limit: int | None, period_end: float | None = None) -> BudgetScope:
    level = key.split(":", 1)[0]
    return BudgetScope(key, level, key.split(":", 1)[-1], limit, period_end)


def slot(limit: int, key: str = "parallel:key:k1", ttl: float = 600.0) -> SlotRequest:
    return SlotRequest(key, "key", "sk-...k1", limit, ttl)


# -- records ---------------------------------------------------------------------------------


async def test_key_records(store: Store, clock: FakeClock) -> None:
    plain = "sk-" + "a" * 40
    record = KeyRecord(
        key_hash=hash_key(plain),
        key_masked=mask_key(plain),
        user_id="alice",
        team_id="core",
        max_budget=10_000,
        budget_duration="30d",
        rpm_limit=5,
        models=("gpt-4o", "beta-models"),
        metadata={"env": "test"},
        model_max_budget={"gpt-4o": 500},
        created_at=clock.now(),
        expires=clock.now() + 3600,
    )
    assert await store.create_key(record)
    assert not await store.create_key(record)
    assert await store.get_key(record.key_hash) == record
    assert await store.get_key(hash_key("sk-other")) is None

    other = KeyRecord(key_hash=hash_key("sk-b"), key_masked="sk-...b", user_id="bob")
    assert await store.create_key(other)
    assert {k.key_hash for k in await store.list_keys()} == {record.key_hash, other.key_hash}
    assert [k.key_hash for k in await store.list_keys(user_id="alice")] == [record.key_hash]
    assert [k.key_hash for k in await store.list_keys(team_id="core")] == [record.key_hash]
    assert await store.list_keys(user_id="alice", team_id="other") == []

    updated = await store.update_key(record.key_hash, {"rpm_limit": 9, "user_id": "carol"})
    assert updated is not None
    assert updated.rpm_limit == 9
    assert updated.max_budget == 10_000
    assert await store.get_key(record.key_hash) == updated
    assert await store.list_keys(user_id="alice") == []
    assert [k.key_hash for k in await store.list_keys(user_id="carol")] == [record.key_hash]
    assert await store.update_key(hash_key("sk-none"), {"rpm_limit": 1}) is None

    assert await store.delete_key(record.key_hash)
    assert not await store.delete_key(record.key_hash)
    assert await store.get_key(record.key_hash) is None
    assert await store.list_keys(team_id="core") == []


async def test_user_and_team_records(store: Store) -> None:
    user = UserRecord(user_id="krrish@berri.ai", max_budget=0, models=("azure-models",))
    assert await store.create_user(user)
    assert not await store.create_user(user)
    assert await store.get_user(user.user_id) == user
    changed = await store.update_user(user.user_id, {"tpm_limit": 20, "budget_duration": "10s"})
    assert changed == user.replace(tpm_limit=20, budget_duration="10s")
    assert await store.update_user("nobody", {"tpm_limit": 1}) is None
    assert await store.get_user("nobody") is None

    team = TeamRecord(team_id="core-infra", max_budget=10_000_000_000)
    assert await store.create_team(team)
    assert not await store.create_team(team)
    assert await store.get_team("core-infra") == team
    assert await store.update_team("core-infra", {"rpm_limit": 3}) == team.replace(rpm_limit=3)
    assert await store.update_team("none", {"rpm_limit": 3}) is None


async def test_access_groups_and_projects(store: Store) -> None:
    assert await store.access_groups() == {}
    await store.set_access_group("beta-models", ["text-embedding-ada-002", "mistral"])
    await store.set_access_group("beta-models", ["mistral"])
    await store.set_access_group("azure-models", ["gpt-4o"])
    assert await store.access_groups() == {
        "beta-models": ("mistral",),
        "azure-models": ("gpt-4o",),
    }

    assert await store.get_project("p") is None
    users = {"1234": {"total_budget": 10.0, "current_cost": 0.5, "model_cost": {"gpt-4": 0.5}}}
    await store.set_project("p", users)
    assert await store.get_project("p") == users
    await store.set_project("p", {})
    assert await store.get_project("p") == {}


# -- rate buckets ----------------------------------------------------------------------------


async def test_rpm_admits_exactly_the_limit(store: Store, clock: FakeClock) -> None:
    for i in range(5):
        result = await store.admit(Admission(rid(), clock.now(), rates=(rpm(5),)))
        assert result.admitted
        assert result.rates[0].remaining == 4 - i
        assert result.rates[0].limit == 5
        assert result.rates[0].reset_after == 12 * (i + 1)  # one request drains in 12 s
    refused = await store.admit(Admission(rid(), clock.now(), rates=(rpm(5),)))
    assert refused.refusal is not None
    assert refused.refusal.reason == "requests"
    assert refused.refusal.level == "key"
    assert refused.refusal.limit == 5
    assert refused.refusal.current == 5
    assert refused.refusal.retry_after == 12  # one request's room, not the whole window
    assert refused.rates[0].remaining == 0
    assert refused.rates[0].reset_after == 60


async def test_bucket_drains_at_the_rate(store: Store, clock: FakeClock) -> None:
    clock.set(T0 + 30)  # window edges mean nothing to a bucket
    for _ in range(10):
        assert (await store.admit(Admission(rid(), clock.now(), rates=(rpm(10),)))).admitted
    assert not (await store.admit(Admission(rid(), clock.now(), rates=(rpm(10),)))).admitted
    # 45 s later 7.5 of the 10 have drained (one per 6 s): 7 whole requests fit.
    clock.advance(45)
    results = [await store.admit(Admission(rid(), clock.now(), rates=(rpm(10),))) for _ in range(8)]
    assert [r.admitted for r in results] == [True] * 7 + [False]
    refusal = results[-1].refusal
    assert refusal is not None
    assert refusal.retry_after == 3  # the half request still in the bucket drains in 3 s
    # A full window later the bucket is empty: a whole burst again, and no more.
    clock.advance(60)
    for _ in range(10):
        assert (await store.admit(Admission(rid(), clock.now(), rates=(rpm(10),)))).admitted
    assert not (await store.admit(Admission(rid(), clock.now(), rates=(rpm(10),)))).admitted


async def test_retry_after_is_when_it_fits(store: Store, clock: FakeClock) -> None:
    clock.set(T0 + 50)
    for _ in range(4):
        await store.admit(Admission(rid(), clock.now(), rates=(rpm(4),)))
    refused = await store.admit(Admission(rid(), clock.now(), rates=(rpm(4),)))
    assert refused.refusal is not None
    assert refused.refusal.retry_after is not None
    clock.advance(refused.refusal.retry_after)
    assert (await store.admit(Admission(rid(), clock.now(), rates=(rpm(4),)))).admitted


async def test_cost_larger_than_the_limit_never_fits(store: Store, clock: FakeClock) -> None:
    result = await store.admit(Admission(rid(), clock.now(), rates=(tpm(100, 101),)))
    assert result.refusal is not None
    assert result.refusal.reason == "tokens"
    assert result.refusal.retry_after is None
    assert result.refusal.requested == 101


async def test_limit_change_keeps_usage(store: Store, clock: FakeClock) -> None:
    for _ in range(5):
        assert (await store.admit(Admission(rid(), clock.now(), rates=(rpm(10),)))).admitted
    # The limit drops to 6: the 5 already used still count.
    assert (await store.admit(Admission(rid(), clock.now(), rates=(rpm(6),)))).admitted
    assert not (await store.admit(Admission(rid(), clock.now(), rates=(rpm(6),)))).admitted
    # Raised to 8: two more.
    results = [await store.admit(Admission(rid(), clock.now(), rates=(rpm(8),))) for _ in range(3)]
    assert [r.admitted for r in results] == [True, True, False]


async def test_tpm_settles_to_actual_tokens(store: Store, clock: FakeClock) -> None:
    first = rid()
    assert (await store.admit(Admission(first, clock.now(), rates=(tpm(1000, 800),)))).admitted
    assert not (await store.admit(Admission(rid(), clock.now(), rates=(tpm(1000, 300),)))).admitted
    # The call used only 100 tokens: 700 come back.
    assert await store.settle(Settlement(first, clock.now(), cost=0, tokens=100))
    result = await store.admit(Admission(rid(), clock.now(), rates=(tpm(1000, 900),)))
    assert result.admitted
    assert result.rates[0].remaining == 0
    # A top-up: settle above the reservation.
    second = rid()
    clock.advance(60)  # the bucket is empty again
    assert (await store.admit(Admission(second, clock.now(), rates=(tpm(1000, 10),)))).admitted
    await store.settle(Settlement(second, clock.now(), cost=0, tokens=600))
    after = await store.admit(Admission(rid(), clock.now(), rates=(tpm(1000, 1),)))
    assert after.rates[0].remaining == 1000 - 600 - 1


async def test_separate_scopes_do_not_share_windows(store: Store, clock: FakeClock) -> None:
    assert (await store.admit(Admission(rid(), clock.now(), rates=(rpm(1, "rpm:a"),)))).admitted
    assert (await store.admit(Admission(rid(), clock.now(), rates=(rpm(1, "rpm:b"),)))).admitted
    result = await store.admit(
        Admission(rid(), clock.now(), rates=(rpm(1, "rpm:a"), rpm(5, "rpm:c")))
    )
    assert result.refusal is not None
    # All or nothing: rpm:c was not hit.
    check = await store.admit(Admission(rid(), clock.now(), rates=(rpm(5, "rpm:c"),)))
    assert check.rates[0].remaining == 4


# -- budgets ---------------------------------------------------------------------------------


async def test_budget_reservation_is_all_or_nothing(store: Store, clock: FakeClock) -> None:
    scopes = (budget("global", 1_000_000), budget("user:alice", 100), budget("key:h1", None))
    first = await store.admit(Admission(rid(), clock.now(), budgets=scopes, cost=60))
    assert first.admitted
    assert first.headroom == 100
    assert [b.spent for b in first.budgets] == [60, 60, 60]
    second = await store.admit(Admission(rid(), clock.now(), budgets=scopes, cost=50))
    assert second.refusal is not None
    assert second.refusal.reason == "budget"
    assert second.refusal.level == "user"
    assert second.refusal.label == "alice"
    assert second.refusal.current == 60
    assert second.refusal.limit == 100
    assert second.refusal.requested == 50
    assert second.refusal.resets_at is None
    assert second.refusal.retry_after is None
    assert second.headroom == 40
    states = await store.budgets(scopes, clock.now())
    assert [s.spent for s in states] == [60, 60, 60]  # nothing of the refused 50 anywhere


async def test_budget_exactly_full_is_allowed(store: Store, clock: FakeClock) -> None:
    scope = (budget("user:u", 100),)
    assert (await store.admit(Admission(rid(), clock.now(), budgets=scope, cost=100))).admitted
    assert not (await store.admit(Admission(rid(), clock.now(), budgets=scope, cost=1))).admitted
    assert (await store.admit(Admission(rid(), clock.now(), budgets=scope, cost=0))).admitted


async def test_rolling_period_rolls_on_first_touch(store: Store, clock: FakeClock) -> None:
    thirty = parse_duration("30s")

    def scope() -> tuple[BudgetScope, ...]:
        return (budget("key:h", 100, thirty.period_end(clock.now())),)

    assert (await store.admit(Admission(rid(), clock.now(), budgets=scope(), cost=90))).admitted
    clock.advance(29)
    refused = await store.admit(Admission(rid(), clock.now(), budgets=scope(), cost=20))
    assert refused.refusal is not None
    assert refused.refusal.resets_at == pytest.approx(T0 + 30)
    assert refused.refusal.retry_after == pytest.approx(1)
    clock.advance(1)
    rolled = await store.admit(Admission(rid(), clock.now(), budgets=scope(), cost=20))
    assert rolled.admitted
    assert rolled.budgets[0].spent == 20
    assert rolled.budgets[0].resets_at == pytest.approx(T0 + 60)
    assert rolled.budgets[0].total == 0  # totals move on settlement, not reservation


async def test_calendar_period_rolls_at_utc_midnight(store: Store) -> None:
    daily = parse_duration("daily", aligned=True)
    clock = FakeClock(datetime(2026, 11, 22, 23, 59, 0, tzinfo=UTC).timestamp())

    def scope() -> tuple[BudgetScope, ...]:
        return (budget("user:u", 100, daily.period_end(clock.now())),)

    result = await store.admit(Admission(rid(), clock.now(), budgets=scope(), cost=100))
    assert result.budgets[0].resets_at == datetime(2026, 11, 23, tzinfo=UTC).timestamp()
    assert not (await store.admit(Admission(rid(), clock.now(), budgets=scope(), cost=1))).admitted
    clock.advance(60)  # 00:00:00 on the 23rd
    rolled = await store.admit(Admission(rid(), clock.now(), budgets=scope(), cost=1))
    assert rolled.admitted
    assert rolled.budgets[0].resets_at == datetime(2026, 11, 24, tzinfo=UTC).timestamp()


async def test_budget_reads_and_resets(store: Store, clock: FakeClock) -> None:
    end = clock.now() + 10
    scope = budget("team:t", 500, end)
    await store.charge([scope], 120, clock.now())
    await store.charge([scope], 30, clock.now())
    [state] = await store.budgets([scope], clock.now())
    assert (state.spent, state.total, state.limit, state.resets_at) == (150, 150, 500, end)
    clock.advance(11)
    [ended] = await store.budgets([scope], clock.now())
    assert ended.spent == 0
    assert ended.total == 150
    await store.reset_budget("team:t", clock.now() + 100, clock.now())
    [state] = await store.budgets([scope], clock.now())
    assert state.spent == 0
    assert state.resets_at == clock.now() + 100
    [untouched] = await store.budgets([budget("user:nobody", 5, end)], clock.now())
    assert (untouched.spent, untouched.total) == (0, 0)


async def test_settle_refunds_tops_up_and_is_idempotent(store: Store, clock: FakeClock) -> None:
    scopes = (budget("user:u", 1000), budget("global", None))
    first = rid()
    assert (await store.admit(Admission(first, clock.now(), budgets=scopes, cost=300))).admitted
    assert await store.settle(Settlement(first, clock.now(), cost=120))
    assert not await store.settle(Settlement(first, clock.now(), cost=120))
    assert not await store.settle(Settlement(first, clock.now(), cost=999))
    states = await store.budgets(scopes, clock.now())
    assert [(s.spent, s.total) for s in states] == [(120, 120), (120, 120)]

    second = rid()
    assert (await store.admit(Admission(second, clock.now(), budgets=scopes, cost=100))).admitted
    assert await store.settle(Settlement(second, clock.now(), cost=400))  # top-up
    states = await store.budgets(scopes, clock.now())
    assert [(s.spent, s.total) for s in states] == [(520, 520), (520, 520)]
    assert not await store.settle(Settlement("never-admitted", clock.now(), cost=5))


async def test_settle_after_the_period_rolled(store: Store, clock: FakeClock) -> None:
    ten = parse_duration("10s")

    def scope() -> tuple[BudgetScope, ...]:
        return (budget("key:h", 1000, ten.period_end(clock.now())),)

    slow = rid()
    assert (await store.admit(Admission(slow, clock.now(), budgets=scope(), cost=500))).admitted
    clock.advance(11)
    # Another request rolls the period: the 500 reserved went with the old one.
    assert (await store.admit(Admission(rid(), clock.now(), budgets=scope(), cost=100))).admitted
    assert await store.settle(Settlement(slow, clock.now(), cost=200))
    [state] = await store.budgets(scope(), clock.now())
    assert state.spent == 100 + 200  # the whole actual cost lands in the new period
    assert state.total == 200


async def test_refund_never_goes_negative(store: Store, clock: FakeClock) -> None:
    scope = (budget("user:u", None),)
    request_id = rid()
    await store.admit(Admission(request_id, clock.now(), budgets=scope, cost=100))
    await store.reset_budget("user:u", None, clock.now())  # an admin reset meanwhile
    await store.settle(Settlement(request_id, clock.now(), cost=10))
    [state] = await store.budgets(scope, clock.now())
    assert state.spent == 10


async def test_large_amounts_stay_exact(store: Store, clock: FakeClock) -> None:
    big = 4_000_000_000_000_001  # $4M in nano-USD, above 2**51
    scope = (budget("global", 2 * big + 1),)
    request_id = rid()
    assert (await store.admit(Admission(request_id, clock.now(), budgets=scope, cost=big))).admitted
    await store.settle(Settlement(request_id, clock.now(), cost=big + 2))
    [state] = await store.budgets(scope, clock.now())
    assert state.spent == big + 2
    assert state.total == big + 2


# -- leases ----------------------------------------------------------------------------------


async def test_leases(store: Store, clock: FakeClock) -> None:
    held = [rid() for _ in range(3)]
    for request_id in held:
        assert (await store.admit(Admission(request_id, clock.now(), slots=(slot(3),)))).admitted
    refused = await store.admit(Admission(rid(), clock.now(), slots=(slot(3),)))
    assert refused.refusal is not None
    assert refused.refusal.reason == "parallel_requests"
    assert refused.refusal.current == 3
    assert refused.refusal.retry_after is not None
    await store.settle(Settlement(held[0], clock.now(), cost=0))
    assert (await store.admit(Admission(rid(), clock.now(), slots=(slot(3),)))).admitted
    await store.release(held[1], ["parallel:key:k1"])
    assert (await store.admit(Admission(rid(), clock.now(), slots=(slot(3),)))).admitted
    assert not (await store.admit(Admission(rid(), clock.now(), slots=(slot(3),)))).admitted


async def test_expired_leases_free_themselves(store: Store, clock: FakeClock) -> None:
    for _ in range(2):
        assert (await store.admit(Admission(rid(), clock.now(), slots=(slot(2, ttl=30),)))).admitted
    assert not (await store.admit(Admission(rid(), clock.now(), slots=(slot(2, ttl=30),)))).admitted
    clock.advance(31)  # the workers holding them died
    assert (await store.admit(Admission(rid(), clock.now(), slots=(slot(2, ttl=30),)))).admitted


async def test_zero_parallel_limit_never_admits(store: Store, clock: FakeClock) -> None:
    refused = await store.admit(Admission(rid(), clock.now(), slots=(slot(0),)))
    assert refused.refusal is not None
    assert refused.refusal.retry_after is None


async def test_refusal_order_and_nothing_taken(store: Store, clock: FakeClock) -> None:
    scopes = (budget("user:u", 10),)

    def admission() -> Admission:
        return Admission(
            rid(),
            clock.now(),
            rates=(rpm(5), tpm(1000, 10)),
            slots=(slot(5),),
            budgets=scopes,
            cost=20,
        )

    result = await store.admit(admission())
    assert result.refusal is not None
    assert result.refusal.reason == "budget"
    # Nothing was taken by the refused request: windows, leases and budget untouched.
    ok = await store.admit(
        Admission(rid(), clock.now(), rates=(rpm(5), tpm(1000, 10)), slots=(slot(1),))
    )
    assert ok.admitted
    assert [r.remaining for r in ok.rates] == [4, 990]
    for _ in range(4):
        await store.admit(Admission(rid(), clock.now(), rates=(rpm(5),)))
    refused = await store.admit(admission())
    assert refused.refusal is not None
    assert refused.refusal.reason == "requests"


# -- spend records ---------------------------------------------------------------------------


def record(i: int, *, model: str = "gpt-4o", user: str = "alice", ts: float = T0) -> SpendRecord:
    return SpendRecord(
        request_id=f"r{i}",
        timestamp=ts + i,
        model=model,
        cost=1000 + i,
        input_tokens=10,
        output_tokens=5,
        key_hash="h1" if i % 2 else "h2",
        key_masked="sk-...h1",
        user_id=user,
        team_id="core",
        end_user="eu",
        provenance="provider-reported",
        price_source="genai-prices",
        status=200,
        latency_ms=12.5,
        path="/v1/chat/completions",
    )


async def test_spend_records_and_totals(store: Store, clock: FakeClock) -> None:
    for i in range(10):
        await store.settle(
            Settlement(
                f"r{i}", clock.now(), cost=0, record=record(i, model="m" if i < 3 else "gpt-4o")
            )
        )
    records = await store.spend_records()
    assert [r.request_id for r in records] == [f"r{i}" for i in reversed(range(10))]
    assert records[0] == record(9)
    assert len(await store.spend_records(key_hash="h1")) == 5
    assert [r.request_id for r in await store.spend_records(model="m")] == ["r2", "r1", "r0"]
    assert len(await store.spend_records(user_id="alice", team_id="core")) == 10
    assert await store.spend_records(user_id="bob") == []
    window = await store.spend_records(start=T0 + 2, end=T0 + 4)
    assert [r.request_id for r in window] == ["r4", "r3", "r2"]
    assert len(await store.spend_records(limit=3)) == 3

    totals = await store.spend_totals("global")
    assert totals.requests == 10
    assert totals.cost == sum(1000 + i for i in range(10))
    assert totals.input_tokens == 100
    assert totals.output_tokens == 50
    assert (await store.spend_totals("model", "m")).requests == 3
    assert (await store.spend_totals("key", "h1")).requests == 5
    assert (await store.spend_totals("user", "alice")).requests == 10
    assert (await store.spend_totals("team", "core")).requests == 10
    assert (await store.spend_totals("end_user", "eu")).requests == 10
    assert (await store.spend_totals("user", "nobody")).requests == 0


async def test_spend_log_is_bounded_but_totals_are_not(store: Store, clock: FakeClock) -> None:
    for i in range(80):  # the fixture keeps 50
        await store.settle(Settlement(f"r{i}", clock.now(), cost=0, record=record(i)))
    records = await store.spend_records(limit=1000)
    assert len(records) == 50
    assert records[0].request_id == "r79"
    assert (await store.spend_totals("global")).requests == 80


async def test_settle_appends_the_record_with_the_settlement(
    store: Store, clock: FakeClock
) -> None:
    request_id = rid()
    scopes = (budget("user:alice", 10_000),)
    await store.admit(Admission(request_id, clock.now(), budgets=scopes, cost=5000))
    spent = SpendRecord(request_id=request_id, timestamp=clock.now(), model="gpt-4o", cost=1234)
    assert await store.settle(Settlement(request_id, clock.now(), cost=1234, record=spent))
    assert (await store.spend_records())[0] == spent
    [state] = await store.budgets(scopes, clock.now())
    assert state.spent == 1234


# -- concurrency bounds ----------------------------------------------------------------------


async def test_concurrent_reservations_never_exceed_the_budget(
    store: Store, clock: FakeClock
) -> None:
    limit = 1_000_000
    rng = random.Random(7)
    sizes = [rng.randint(1, 5_000) for _ in range(1000)]
    admitted: list[int] = []
    scopes = (budget("global", None), budget("key:h", limit))

    async def reserve(size: int) -> None:
        result = await store.admit(Admission(rid(), clock.now(), budgets=scopes, cost=size))
        if result.admitted:
            admitted.append(size)

    async with anyio.create_task_group() as tg:
        for size in sizes:
            tg.start_soon(reserve, size)
    [_, state] = await store.budgets(scopes, clock.now())
    assert sum(admitted) <= limit
    assert state.spent == sum(admitted)  # exactly what was admitted, nothing lost or doubled
    assert len(admitted) < len(sizes)  # the budget did bind (sum of sizes is ~2.5M)


async def test_concurrent_rpm_hits_admit_exactly_n(store: Store, clock: FakeClock) -> None:
    admitted = 0

    async def hit() -> None:
        nonlocal admitted
        if (await store.admit(Admission(rid(), clock.now(), rates=(rpm(137),)))).admitted:
            admitted += 1

    async with anyio.create_task_group() as tg:
        for _ in range(1000):
            tg.start_soon(hit)
    assert admitted == 137


async def test_concurrent_leases_never_exceed_the_limit(store: Store, clock: FakeClock) -> None:
    limit = 7
    held = 0
    peak = 0
    admitted = 0

    async def worker() -> None:
        nonlocal held, peak, admitted
        request_id = rid()
        result = await store.admit(Admission(request_id, clock.now(), slots=(slot(limit),)))
        if not result.admitted:
            return
        admitted += 1
        held += 1
        peak = max(peak, held)
        await anyio.sleep(0.01)
        held -= 1
        await store.settle(Settlement(request_id, clock.now(), cost=0))

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(worker)
    assert peak <= limit
    assert admitted >= limit


async def test_concurrent_acquisitions_hold_exactly_the_limit(
    store: Store, clock: FakeClock
) -> None:
    results = []

    async def acquire() -> None:
        results.append(await store.admit(Admission(rid(), clock.now(), slots=(slot(13),))))

    async with anyio.create_task_group() as tg:
        for _ in range(200):
            tg.start_soon(acquire)
    assert sum(r.admitted for r in results) == 13


async def test_a_caller_slightly_behind_never_wipes_a_window(store: Store) -> None:
    boundary = 1_795_000_020.0  # a multiple of 60 s
    for _ in range(9):
        assert (await store.admit(Admission(rid(), boundary - 1, rates=(rpm(10),)))).admitted
    assert (await store.admit(Admission(rid(), boundary + 0.01, rates=(rpm(10),)))).admitted
    # Another host, 20 ms behind, is still in the previous window by its clock.
    behind = await store.admit(Admission(rid(), boundary - 0.01, rates=(rpm(10),)))
    assert behind.refusal is not None
    assert behind.rates[0].remaining == 0
    ahead = await store.admit(Admission(rid(), boundary + 0.02, rates=(rpm(10),)))
    assert ahead.refusal is not None


async def test_tokens_settle_in_the_window_they_were_counted_in_despite_skew(
    store: Store,
) -> None:
    boundary = 1_795_000_020.0
    assert (await store.admit(Admission(rid(), boundary + 0.01, rates=(tpm(100, 10),)))).admitted
    late = rid()
    # Counted in the current window although its clock is behind.
    assert (await store.admit(Admission(late, boundary - 0.01, rates=(tpm(100, 80),)))).admitted
    await store.settle(Settlement(late, boundary + 0.02, cost=0, tokens=20))
    check = await store.admit(Admission(rid(), boundary + 0.03, rates=(tpm(100, 1),)))
    assert check.rates[0].remaining == 100 - 10 - 20 - 1


async def test_refunding_request_hits(store: Store, clock: FakeClock) -> None:
    refused_later = rid()
    admission = Admission(refused_later, clock.now(), rates=(rpm(2), tpm(1000, 100)))
    assert (await store.admit(admission)).admitted
    assert await store.settle(
        Settlement(refused_later, clock.now(), cost=0, tokens=0, refund_requests=True)
    )
    check = await store.admit(Admission(rid(), clock.now(), rates=(rpm(2), tpm(1000, 1))))
    assert [r.remaining for r in check.rates] == [1, 999]  # both hits came back
    # Without the flag a settlement keeps the request hit.
    kept = rid()
    await store.admit(Admission(kept, clock.now(), rates=(rpm(2),)))
    await store.settle(Settlement(kept, clock.now(), cost=0))
    assert not (await store.admit(Admission(rid(), clock.now(), rates=(rpm(2),)))).admitted
