"""RPM and TPM are exact token buckets in every store (see `llmfence.stores._window`).

The measured cases of issue 10 (each refused well-behaved clients under the sliding-window
counter), the bucket's edges (top-ups, lowered limits, skewed clocks), and property tests over
random request sequences. Every test runs on both stores, with times given explicitly in
integer milliseconds as a fake clock would give them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmfence.stores import Admission, AdmissionResult, RateHit, Settlement, Store
from llmfence.stores._types import RateKind
from llmfence.testing import FakeClock

pytestmark = pytest.mark.anyio

T0_MS = 1_795_000_000_000
MINUTE_MS = 60_000


def rid() -> str:
    return uuid.uuid4().hex


async def admit(
    store: Store,
    key: str,
    limit: int,
    now_ms: int,
    *,
    cost: int = 1,
    window_ms: int = MINUTE_MS,
    kind: RateKind = "requests",
    request_id: str | None = None,
) -> AdmissionResult:
    hit = RateHit(key, kind, "key", "sk-...k1", limit, cost, window_ms / 1000)
    return await store.admit(Admission(request_id or rid(), now_ms / 1000, rates=(hit,)))


# -- the cases measured in issue 10 ----------------------------------------------------------


async def test_one_rpm_every_75_seconds_is_always_admitted(store: Store) -> None:
    clock = FakeClock(T0_MS / 1000)
    for _ in range(20):
        hit = RateHit("rpm:key:k1", "requests", "key", "sk-...k1", 1, 1)
        result = await store.admit(Admission(rid(), clock.now(), rates=(hit,)))
        assert result.admitted
        clock.advance(75)


async def test_two_rpm_every_31_seconds_is_always_admitted(store: Store) -> None:
    clock = FakeClock(T0_MS / 1000)
    for _ in range(30):
        hit = RateHit("rpm:key:k1", "requests", "key", "sk-...k1", 2, 1)
        result = await store.admit(Admission(rid(), clock.now(), rates=(hit,)))
        assert result.admitted
        clock.advance(31)


@pytest.mark.parametrize("limit", [1, 3])
async def test_a_hammered_key_is_told_to_wait_at_most_a_window(store: Store, limit: int) -> None:
    interval_ms = MINUTE_MS // limit
    admitted = 0
    due: int | None = None  # when the last refusal said to come back
    for second in range(300):  # one request a second for five minutes
        now_ms = T0_MS + 1000 * second
        result = await admit(store, "rpm:key:k1", limit, now_ms)
        if due is not None:
            assert result.admitted == (now_ms >= due)  # not sooner, and no later
        if result.admitted:
            admitted += 1
            due = None
            continue
        assert result.refusal is not None
        assert result.refusal.retry_after is not None
        # Until the next request's room has drained: never past the window.
        assert 0 < result.refusal.retry_after <= interval_ms / 1000 <= 60
        due = now_ms + round(result.refusal.retry_after * 1000)
    # The burst in the first seconds, then one request per interval.
    assert admitted == limit + 299 * 1000 // interval_ms


# -- the bucket's edges ----------------------------------------------------------------------


async def test_a_top_up_beyond_the_bucket_waits_at_most_a_window(store: Store) -> None:
    request_id = rid()
    first = await admit(store, "tpm:k", 1000, T0_MS, cost=10, kind="tokens", request_id=request_id)
    assert first.admitted
    # The call used five times the limit: the bucket is full, not five windows deep.
    assert await store.settle(Settlement(request_id, T0_MS / 1000, cost=0, tokens=5000))
    refused = await admit(store, "tpm:k", 1000, T0_MS, cost=100, kind="tokens")
    assert refused.refusal is not None
    assert refused.refusal.retry_after == 6.0  # 100 tokens drain in 6 s
    assert refused.rates[0].remaining == 0
    assert refused.rates[0].reset_after == 60.0
    assert (await admit(store, "tpm:k", 1000, T0_MS + 6000, cost=100, kind="tokens")).admitted


async def test_a_late_top_up_counts_in_full(store: Store) -> None:
    # A long stream: reserved 10 tokens, reported 600 two minutes later, when the 10 had long
    # drained. The 590 more than reserved land in the bucket now, none of them drained away.
    request_id = rid()
    await admit(store, "tpm:k", 1000, T0_MS, cost=10, kind="tokens", request_id=request_id)
    later = T0_MS + 2 * MINUTE_MS
    assert await store.settle(Settlement(request_id, later / 1000, cost=0, tokens=600))
    check = await admit(store, "tpm:k", 1000, later, cost=0, kind="tokens")
    assert check.rates[0].remaining == 410
    assert check.rates[0].reset_after == 35.4


async def test_a_refund_never_goes_below_empty(store: Store) -> None:
    request_id = rid()
    await admit(store, "tpm:k", 1000, T0_MS, cost=800, kind="tokens", request_id=request_id)
    # 30 s later 500 of the 800 have drained; giving back 700 empties the bucket, no more.
    assert await store.settle(Settlement(request_id, T0_MS / 1000 + 30, cost=0, tokens=100))
    check = await admit(store, "tpm:k", 1000, T0_MS + 30_000, cost=1000, kind="tokens")
    assert check.admitted


async def test_a_lowered_limit_waits_at_most_a_window(store: Store) -> None:
    for _ in range(10):
        assert (await admit(store, "rpm:k", 10, T0_MS)).admitted
    # Lowered to 1: the ten read as a full bucket of one, which has drained for a second.
    refused = await admit(store, "rpm:k", 1, T0_MS + 1000)
    assert refused.refusal is not None
    assert refused.refusal.retry_after == 59.0
    assert refused.refusal.current == 1
    assert not (await admit(store, "rpm:k", 1, T0_MS + 59_999)).admitted
    assert (await admit(store, "rpm:k", 1, T0_MS + 60_000)).admitted


async def test_a_raised_limit_keeps_what_was_used(store: Store) -> None:
    for _ in range(3):
        assert (await admit(store, "rpm:k", 3, T0_MS)).admitted
    raised = await admit(store, "rpm:k", 6, T0_MS)
    assert raised.admitted
    assert raised.rates[0].remaining == 2
    # The bucket drains at the new rate: a request every 10 s.
    assert raised.rates[0].reset_after == 40.0


async def test_a_caller_behind_neither_wipes_nor_inflates(store: Store) -> None:
    for _ in range(5):
        assert (await admit(store, "rpm:k", 10, T0_MS + 10_000)).admitted
    # Another host, a second behind: it sees the bucket as of its last write.
    behind = await admit(store, "rpm:k", 10, T0_MS + 9_000)
    assert behind.admitted
    assert behind.rates[0].remaining == 4
    assert behind.rates[0].reset_after == 36.0
    # The bucket's time did not move back: nothing drained that had not.
    now = await admit(store, "rpm:k", 10, T0_MS + 10_000)
    assert now.rates[0].remaining == 3
    assert now.rates[0].reset_after == 42.0


async def test_cost_zero_reads_without_taking(store: Store) -> None:
    await admit(store, "tpm:k", 600, T0_MS, cost=300, kind="tokens")
    for _ in range(3):
        read = await admit(store, "tpm:k", 600, T0_MS + 10_000, cost=0, kind="tokens")
        assert read.admitted
        assert (read.rates[0].remaining, read.rates[0].reset_after) == (400, 20.0)


# -- properties ------------------------------------------------------------------------------

WINDOWS_MS = st.sampled_from([1000, 6000, MINUTE_MS, 3_600_000])
PROPERTY = settings(
    max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None
)


@dataclass
class Plan:
    """A bucket (kind, limit, window) and a sequence of hits: (ms after the previous, cost)."""

    kind: RateKind
    limit: int
    window_ms: int
    hits: list[tuple[int, int]]


@st.composite
def plans(draw: st.DrawFn, *, paced: bool = False, over: bool = False) -> Plan:
    kind: RateKind = draw(st.sampled_from(["requests", "tokens"]))
    window_ms = draw(WINDOWS_MS)
    limit = draw(st.integers(1, 12) if kind == "requests" else st.integers(1, 100_000))
    top = limit + 1 if over else limit
    costs = draw(
        st.lists(st.just(1) if kind == "requests" else st.integers(1, top), min_size=1, max_size=30)
    )
    hits = []
    previous = 0
    for cost in costs:
        if paced:
            # At or under the rate: the previous hit has drained by the time this one comes.
            gap = -(-previous * window_ms // limit) + draw(st.sampled_from([0, 0, 1, window_ms]))
        else:
            interval = max(1, window_ms // limit)
            gap = draw(
                st.sampled_from([0, 1, interval - 1, interval, window_ms - 1, window_ms])
                | st.integers(0, 2 * window_ms)
            )
        hits.append((gap, cost))
        previous = cost
    return Plan(kind, limit, window_ms, hits)


@PROPERTY
@given(plan=plans(paced=True), start=st.integers(0, 10**9))
async def test_a_client_at_or_under_its_rate_is_never_refused(
    store: Store, plan: Plan, start: int
) -> None:
    key, now_ms = f"rate:{rid()}", T0_MS + start
    for gap, cost in plan.hits:
        now_ms += gap
        result = await admit(
            store, key, plan.limit, now_ms, cost=cost, window_ms=plan.window_ms, kind=plan.kind
        )
        assert result.admitted, (now_ms, cost, result.refusal)


@PROPERTY
@given(plan=plans(), start=st.integers(0, 10**9))
async def test_no_interval_admits_more_than_the_burst_and_the_rate(
    store: Store, plan: Plan, start: int
) -> None:
    key, now_ms = f"rate:{rid()}", T0_MS + start
    admitted: list[tuple[int, int]] = []
    for gap, cost in plan.hits:
        now_ms += gap
        result = await admit(
            store, key, plan.limit, now_ms, cost=cost, window_ms=plan.window_ms, kind=plan.kind
        )
        if result.admitted:
            admitted.append((now_ms, cost))
    limit, window = plan.limit, plan.window_ms
    for i, (first, _) in enumerate(admitted):
        taken = 0
        for moment, cost in admitted[i:]:
            taken += cost
            # From `first` to `moment`: the burst, plus what drained meanwhile.
            assert taken * window <= limit * window + (moment - first) * limit
            if moment == first:
                assert taken <= limit  # one instant: a burst of the limit at most
            if moment - first < window:
                assert taken < 2 * limit  # any window-long interval: under twice the limit


@PROPERTY
@given(plan=plans(over=True), start=st.integers(0, 10**9))
async def test_retry_after_is_exact_and_within_the_window(
    store: Store, plan: Plan, start: int
) -> None:
    key, now_ms = f"rate:{rid()}", T0_MS + start
    for gap, cost in plan.hits:
        now_ms += gap

        async def attempt(at_ms: int, cost: int = cost) -> AdmissionResult:
            return await admit(
                store, key, plan.limit, at_ms, cost=cost, window_ms=plan.window_ms, kind=plan.kind
            )

        result = await attempt(now_ms)
        if result.refusal is None:
            continue
        retry = result.refusal.retry_after
        if cost > plan.limit:
            assert retry is None  # it can never fit
            continue
        assert retry is not None
        wait_ms = round(retry * 1000)
        assert wait_ms / 1000 == retry
        assert 0 < wait_ms <= plan.window_ms
        # A millisecond sooner is too soon; exactly then, the same request is admitted.
        assert not (await attempt(now_ms + wait_ms - 1)).admitted
        now_ms += wait_ms
        assert (await attempt(now_ms)).admitted


@PROPERTY
@given(plan=plans(), start=st.integers(0, 10**9))
async def test_remaining_and_reset_agree_with_admissions(
    store: Store, plan: Plan, start: int
) -> None:
    key, now_ms = f"rate:{rid()}", T0_MS + start
    limit, window, kind = plan.limit, plan.window_ms, plan.kind

    async def attempt(at_ms: int, cost: int) -> AdmissionResult:
        return await admit(store, key, limit, at_ms, cost=cost, window_ms=window, kind=kind)

    async def read(at_ms: int) -> tuple[int, float]:
        # A hit of cost 0 takes nothing: it reads the state.
        [state] = (await attempt(at_ms, 0)).rates
        return state.remaining, state.reset_after

    for gap, cost in plan.hits:
        now_ms += gap
        await attempt(now_ms, cost)
    # `remaining` whole units fit now, and not one more.
    remaining, _ = await read(now_ms)
    if remaining < limit:
        over = await attempt(now_ms, remaining + 1)
        assert over.refusal is not None
        assert over.refusal.current == limit - remaining
    if remaining:
        fits = await attempt(now_ms, remaining)
        assert fits.admitted
        assert fits.rates[0].remaining == 0
    # The bucket is empty exactly `reset_after` from now, and not a millisecond sooner.
    _, reset_after = await read(now_ms)
    reset_ms = round(reset_after * 1000)
    assert reset_ms / 1000 == reset_after
    assert reset_ms <= window
    if reset_ms:
        assert (await read(now_ms + reset_ms - 1))[0] < limit
    assert await read(now_ms + reset_ms) == (limit, 0.0)
