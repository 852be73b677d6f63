"""Lazy counting decides every admission as exact counting does (`_core.lazy`).

Hypothesis draws limits (TPM per minute and per day, a model's TPM, RPM, key, model, end-user
and whole-app budgets; tight and loose), a default output allowance, clamping on or off, and a
sequence of chat requests (prompt sizes from empty to a few thousand tokens, ASCII and not,
`max_tokens` or none, two models, end users, time passing on a fake clock, and responses with
usage, without usage, streamed without usage, or failed). The sequence runs through two
`Fence`s over two stores of the same kind, one with `lazy_counting=True`, one counting every
prompt; each request is settled before the next. Every answer (status, error body, retry
headers, the `max_tokens` clamped and the body the upstream received) must be the same, and
so must the final state: every rate bucket, budget and spend record.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import astuple, dataclass, replace
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmfence import Fence, MemoryStore, Store
from llmfence._request import parse_request
from llmfence._tokens import TokenCounter
from llmfence.stores import Admission, BudgetScope, RateHit
from llmfence.stores._types import hash_key
from llmfence.testing import FakeClock

from .conftest import open_store

pytestmark = pytest.mark.anyio

T0 = 1_795_000_000.0
CHAT = "/v1/chat/completions"
KEY = "sk-lazy-counting-" + "k" * 32
MODELS = ("gpt-4o-mini", "gpt-3.5-turbo-0613")
USERS = (None, "ann", "bob")
WORDS = ("the", "limit", "token", "budget", "window", "fence", "prompt", "answer", "of", "a")
FOREIGN = ("日本語", "données", "🦜", "Ωμέγα", "e\u0301")
COUNTER = TokenCounter()
# Headers that say what was decided. `x-ratelimit-remaining-tokens` and the `RateLimit`
# fields are not among them: far from a limit they count the bound (see `_core.lazy`).
DECISION_HEADERS = (
    "retry-after",
    "retry-after-ms",
    "x-should-retry",
    "x-llmfence-max-tokens-clamped",
    "x-llmfence-shadow-refusal",
)


@dataclass(frozen=True)
class Limits:
    """A key's limits and the app's options."""

    tpm: int | None
    tpd: int | None
    model_tpm: int | None
    rpm: int | None
    key_budget: float | None
    model_budget: float | None
    global_budget: float | None
    end_user_budget: float | None
    end_user_tpm: int | None
    default_max_tokens: int
    clamp: bool


@dataclass(frozen=True)
class Call:
    """One request: seconds after the previous, its prompt, and how the upstream answers."""

    gap: float
    words: int
    foreign: bool
    max_tokens: int | None
    model: str
    user: str | None
    completion: int
    mode: str  # "usage", "no-usage", "stream", "error"


def tokens(*values: int | None) -> st.SearchStrategy[int | None]:
    return st.sampled_from(values)


limits = st.builds(
    Limits,
    tpm=tokens(None, 300, 2_000, 8_000, 30_000, 60_000, 120_000, 10**7),
    tpd=tokens(None, 5_000, 50_000, 200_000, 10**8),
    model_tpm=tokens(None, 1_000, 6_000, 80_000, 10**7),
    rpm=st.sampled_from([None, 2, 5, 10_000]),
    key_budget=st.sampled_from([None, 0.0004, 0.002, 0.01, 0.05, 100.0]),
    model_budget=st.sampled_from([None, 0.001, 0.03, 100.0]),
    global_budget=st.sampled_from([None, 0.003, 0.04, 100.0]),
    end_user_budget=st.sampled_from([None, 0.0008, 0.02, 100.0]),
    end_user_tpm=tokens(None, 1_500, 50_000, 10**7),
    default_max_tokens=st.sampled_from([16, 256, 4096]),
    clamp=st.booleans(),
)
calls = st.builds(
    Call,
    gap=st.sampled_from([0.0, 0.5, 7.0, 30.0, 61.0, 3600.0]),
    words=st.sampled_from([0, 3, 40, 300, 1_500, 4_000]) | st.integers(0, 2_000),
    foreign=st.booleans(),
    max_tokens=st.none() | st.sampled_from([1, 20, 500, 3_000]) | st.integers(1, 5_000),
    model=st.sampled_from(MODELS),
    user=st.sampled_from(USERS),
    completion=st.integers(0, 400) | st.sampled_from([3_000, 20_000]),
    mode=st.sampled_from(["usage", "usage", "usage", "no-usage", "stream", "error"]),
)


def prompt(call: Call, serial: int) -> str:
    pool = WORDS + FOREIGN if call.foreign else WORDS
    return f"{serial} " + " ".join(pool[(i * 7 + serial) % len(pool)] for i in range(call.words))


def upstream(received: list[int | None], during: Callable[[], None] | None = None) -> Starlette:
    """An upstream reporting the exact prompt tokens and the completion a call asks for;
    `during` is called while it answers (the request admitted, not yet settled)."""

    async def handle(request: Request) -> Response:
        raw = await request.body()
        parsed = parse_request(raw, CHAT)
        received.append(parsed.max_output_tokens)
        if during is not None:
            during()
        mode = request.headers["x-mode"]
        completion = int(request.headers["x-completion"])
        if parsed.max_output_tokens is not None:
            completion = min(completion, parsed.max_output_tokens)
        if mode == "error":
            return JSONResponse({"error": {"message": "upstream failed", "type": "x"}}, 500)
        choice = {"index": 0, "message": {"role": "assistant", "content": "ok " * completion}}
        body: dict[str, Any] = {"id": "c", "object": "chat.completion", "choices": [choice]}
        if mode == "stream":
            delta = {"choices": [{"index": 0, "delta": {"content": " ok" * completion}}]}
            events = f"data: {json.dumps(delta)}\n\ndata: [DONE]\n\n"
            return Response(events, media_type="text/event-stream")
        if mode == "usage":
            prompt_tokens = COUNTER.count(parsed)
            body["usage"] = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            }
        return JSONResponse(body)

    return Starlette(routes=[Route(CHAT, handle, methods=["POST"])])


@asynccontextmanager
async def gateway(
    store: Store,
    clock: FakeClock,
    limits: Limits,
    lazy: bool,
    during: Callable[[], None] | None = None,
) -> AsyncIterator[tuple[httpx.AsyncClient, list[int | None]]]:
    received: list[int | None] = []
    app = upstream(received, during)
    fence = Fence(
        store=store,
        master_key="sk-master-key",
        max_budget=limits.global_budget,
        max_end_user_budget=limits.end_user_budget,
        end_user_tpm_limit=limits.end_user_tpm,
        default_max_tokens=limits.default_max_tokens,
        clamp_max_tokens=limits.clamp,
        lazy_counting=lazy,
        clock=clock.now,
    )
    fence.install(app)
    model_tpm = dict.fromkeys(MODELS, limits.model_tpm) if limits.model_tpm else None
    await fence.generate_key(
        key=KEY,
        tpm_limit=limits.tpm,
        tpd_limit=limits.tpd,
        rpm_limit=limits.rpm,
        max_budget=limits.key_budget,
        model_tpm_limit=model_tpm,
        model_max_budget={MODELS[0]: limits.model_budget} if limits.model_budget else None,
    )
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            yield client, received


async def answer(client: httpx.AsyncClient, call: Call, serial: int) -> tuple[Any, ...]:
    body: dict[str, Any] = {
        "model": call.model,
        "messages": [{"role": "user", "content": prompt(call, serial)}],
    }
    if call.max_tokens is not None:
        body["max_tokens"] = call.max_tokens
    if call.user is not None:
        body["user"] = call.user
    if call.mode == "stream":
        body["stream"] = True
    headers = {
        "authorization": f"Bearer {KEY}",
        "x-mode": call.mode,
        "x-completion": str(call.completion),
    }
    response = await client.post(CHAT, json=body, headers=headers)
    decided = tuple(response.headers.get(name) for name in DECISION_HEADERS)
    return response.status_code, response.content, decided


async def state(store: Store, now: float) -> tuple[Any, ...]:
    """Every rate bucket, budget and spend record the calls can have touched."""
    owner = hash_key(KEY)
    rates = [f"rpm:60000:key:{owner}", f"tpm:60000:key:{owner}", f"tpm:86400000:key:{owner}"]
    rates += [f"tpm:60000:model:key:{owner}:{model}" for model in MODELS]
    rates += [f"{kind}:60000:end_user:{user}" for kind in ("rpm", "tpm") for user in USERS[1:]]
    # A probe that takes nothing, of limit 1 and a window so long that nothing is clipped or
    # drained away: its reset time is the bucket's level, to the unit-millisecond.
    probe = tuple(RateHit(key, "tokens", "key", "probe", 1, 0, 1e9) for key in rates)
    buckets = await store.admit(Admission("probe", now, rates=probe))
    scopes = [BudgetScope("global", "global", "app"), BudgetScope(f"key:{owner}", "key", "k")]
    scopes += [BudgetScope(f"key_model:{owner}:{MODELS[0]}", "model", "m")]
    scopes += [BudgetScope(f"end_user:{user}", "end_user", "u") for user in USERS[1:]]
    budgets = await store.budgets(scopes, now)
    records = await store.spend_records(limit=10_000)
    return (
        [(s.key, s.reset_after) for s in buckets.rates],
        [(b.key, b.spent, b.total, b.resets_at) for b in budgets],
        [
            (r.timestamp, r.model, r.cost, r.input_tokens, r.output_tokens, r.status)
            for r in records
        ],
        [(r.provenance, r.price_source, r.end_user, r.key_hash) for r in records],
    )


def memory_state(store: Store) -> tuple[Any, ...]:
    """MemoryStore's whole ledger, exactly (levels in unit-milliseconds, spend in nano-USD)."""
    assert isinstance(store, MemoryStore)
    buckets = {key: astuple(bucket) for key, bucket in store._buckets.items()}
    budgets = {key: astuple(budget) for key, budget in store._budgets.items()}
    return buckets, budgets


async def run_both(
    request: pytest.FixtureRequest, kind: str, limits: Limits, sequence: list[Call], run: int
) -> None:
    # Global budget slices (on by default on a cluster) word a refusal by the slice an instance
    # holds; lazy and exact counting are compared on the per-request path, which slices have
    # their own tests for (tests/stores/test_redis_slices.py).
    options = {"global_slices": False} if kind == "redis_cluster" else {}
    lazy_store = await open_store(request, kind, name=f"lazy{run}", **options)
    exact_store = await open_store(request, kind, name=f"exact{run}", **options)
    clock = FakeClock(T0)
    try:
        async with (
            gateway(lazy_store, clock, limits, lazy=True) as (lazy, lazy_received),
            gateway(exact_store, clock, limits, lazy=False) as (exact, exact_received),
        ):
            for serial, call in enumerate(sequence):
                clock.advance(call.gap)
                answered = await answer(lazy, call, serial)
                assert answered == await answer(exact, call, serial), (serial, call)
                assert lazy_received == exact_received
                status, _, (*_, clamped, _) = answered
                event(f"answered {status}" + (", clamped" if clamped else ""))
        now = clock.advance(1.0)
        assert await state(lazy_store, now) == await state(exact_store, now)
        if kind == "memory":
            assert memory_state(lazy_store) == memory_state(exact_store)
    finally:
        await lazy_store.aclose()
        await exact_store.aclose()


SEQUENCES = st.lists(calls, min_size=1, max_size=14)
_runs = iter(range(10**9))


@settings(max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limits=limits, sequence=SEQUENCES)
async def test_lazy_counting_decides_as_exact_counting_does(
    request: pytest.FixtureRequest, limits: Limits, sequence: list[Call]
) -> None:
    await run_both(request, "memory", limits, sequence, next(_runs))


@pytest.mark.parametrize("kind", ["sqlite", "redis", "redis_cluster"])
@settings(max_examples=12, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limits=limits, sequence=st.lists(calls, min_size=1, max_size=8))
async def test_lazy_counting_decides_as_exact_counting_does_in_every_store(
    request: pytest.FixtureRequest, kind: str, limits: Limits, sequence: list[Call]
) -> None:
    await run_both(request, kind, limits, sequence, next(_runs))


# -- the paths, one by one -------------------------------------------------------------------


async def one(
    limits: Limits, call: Call, *, lazy: bool = True, held: list[Any] | None = None
) -> tuple[httpx.Response, Store]:
    """One call through a new gateway; `held`: gets the store's state while the call runs."""
    store = MemoryStore()
    during = None if held is None else lambda: held.append(memory_state(store))
    async with gateway(store, FakeClock(T0), limits, lazy, during) as (client, _received):
        response = await client.post(CHAT, json=body_of(call), headers=headers_of(call))
        return response, store


LOOSE = Limits(None, None, None, None, None, None, None, None, None, 4096, False)
LONG = Call(0.0, 400, False, 100, MODELS[0], None, 5, "usage")


def prompt_tokens(call: Call) -> tuple[int, int]:
    """The exact count and the bound of a call's prompt."""
    body = {"model": call.model, "messages": [{"role": "user", "content": prompt(call, 0)}]}
    parsed = parse_request(json.dumps(body).encode(), CHAT)
    return COUNTER.count(parsed), COUNTER.bound(parsed)


async def test_far_from_every_limit_the_headers_count_the_bound() -> None:
    exact, bound = prompt_tokens(LONG)
    response, _ = await one(replace(LOOSE, tpm=100 * bound), LONG)
    assert response.status_code == 200
    remaining = int(response.headers["x-ratelimit-remaining-tokens"])
    assert remaining == 100 * bound - bound - 100 < 100 * bound - exact - 100


async def test_near_a_limit_the_prompt_is_counted_and_the_headers_are_exact() -> None:
    exact, bound = prompt_tokens(LONG)
    # The bound reservation takes more than half of the window: not comfortable.
    limits = replace(LOOSE, tpm=2 * bound + 100)
    response, _ = await one(limits, LONG)
    counted, _ = await one(limits, LONG, lazy=False)
    assert response.status_code == counted.status_code == 200
    assert response.headers["x-ratelimit-remaining-tokens"] == str(2 * bound - exact)
    for name in ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens", "ratelimit"):
        assert response.headers[name] == counted.headers[name]


async def test_a_bound_refused_is_admitted_on_the_exact_count() -> None:
    exact, bound = prompt_tokens(LONG)
    assert exact + 100 < bound  # English: several bytes a token
    limits = replace(LOOSE, tpm=exact + 100)  # the exact reservation fits to the token
    response, _ = await one(limits, LONG)
    assert response.status_code == 200
    assert response.headers["x-ratelimit-remaining-tokens"] == "0"
    refused, _ = await one(replace(limits, tpm=exact + 99), LONG)
    assert refused.status_code == 429
    assert refused.json()["error"]["type"] == "tokens"


async def test_a_clamped_allowance_is_the_one_exact_counting_gives() -> None:
    exact, _ = prompt_tokens(LONG)
    call = replace(LONG, max_tokens=None)
    limits = replace(LOOSE, tpm=exact + 500)
    for lazy in (True, False):
        response, _ = await one(limits, call, lazy=lazy)
        assert response.headers["x-llmfence-max-tokens-clamped"] == "500"


async def test_a_response_without_usage_is_recorded_with_the_exact_prompt() -> None:
    exact, _ = prompt_tokens(LONG)
    response, store = await one(LOOSE, replace(LONG, mode="no-usage"))
    assert response.status_code == 200
    [record] = await store.spend_records()
    assert (record.input_tokens, record.provenance) == (exact, "reservation-only")


async def test_lazy_counting_off_counts_every_prompt_first() -> None:
    exact, bound = prompt_tokens(LONG)
    response, _ = await one(replace(LOOSE, tpm=100 * bound), LONG, lazy=False)
    assert response.headers["x-ratelimit-remaining-tokens"] == str(100 * bound - exact - 100)


async def test_near_a_limit_the_store_holds_the_exact_reservation_while_a_call_runs() -> None:
    _, bound = prompt_tokens(LONG)
    limits = replace(LOOSE, tpm=2 * bound + 100)  # not comfortable
    lazy: list[Any] = []
    counted: list[Any] = []
    await one(limits, LONG, held=lazy)
    await one(limits, LONG, lazy=False, held=counted)
    assert lazy == counted != []


async def test_far_from_every_limit_the_store_holds_the_bound_while_a_call_runs() -> None:
    exact, bound = prompt_tokens(LONG)
    limits = replace(LOOSE, tpm=100 * bound)
    lazy: list[Any] = []
    counted: list[Any] = []
    await one(limits, LONG, held=lazy)
    await one(limits, LONG, lazy=False, held=counted)
    [(buckets, _)] = lazy
    [(exact_buckets, _)] = counted
    [tpm] = [key for key in buckets if key.startswith("tpm:")]
    level, exact_level = buckets[tpm][1], exact_buckets[tpm][1]
    assert level - exact_level == (bound - exact) * 60_000


class Calls:
    """Counts a store's admissions and settlements (wrapping the instance's methods)."""

    def __init__(self, store: Store) -> None:
        self.log: list[str] = []
        admit, settle = store.admit, store.settle

        async def counted_admit(admission: Admission) -> Any:
            self.log.append("admit")
            return await admit(admission)

        async def counted_settle(settlement: Any) -> bool:
            self.log.append("settle")
            return await settle(settlement)

        store.admit = counted_admit  # type: ignore[method-assign]
        store.settle = counted_settle  # type: ignore[method-assign]


async def test_a_bound_above_half_a_limit_is_counted_before_any_store_call() -> None:
    exact, bound = prompt_tokens(LONG)
    store = MemoryStore()
    calls = Calls(store)
    limits = replace(LOOSE, tpm=2 * bound)  # the bound reservation is above half of it
    async with gateway(store, FakeClock(T0), limits, True) as (client, _):
        response = await client.post(CHAT, json=body_of(LONG), headers=headers_of(LONG))
    assert response.headers["x-ratelimit-remaining-tokens"] == str(2 * bound - exact - 100)
    assert calls.log == ["admit", "settle"]


async def test_a_bound_that_takes_over_half_the_room_left_goes_back_before_the_app() -> None:
    exact, bound = prompt_tokens(LONG)
    tpm = 4 * (bound + 100)  # half of the limit would hold the bound reservation
    first = replace(LONG, max_tokens=None, completion=5 * (bound + 100) // 2 - exact)
    figures = []
    for lazy in (True, False):
        store = MemoryStore()
        async with gateway(store, FakeClock(T0), replace(LOOSE, tpm=tpm), lazy) as (client, _):
            await client.post(CHAT, json=body_of(first), headers=headers_of(first))
            calls = Calls(store)  # the window now has 1.5 reservations of room left
            response = await client.post(CHAT, json=body_of(LONG), headers=headers_of(LONG))
        assert response.status_code == 200
        figures.append(response.headers["x-ratelimit-remaining-tokens"])
        if lazy:
            assert calls.log == ["admit", "settle", "admit", "settle"]
    assert figures[0] == figures[1]


def body_of(call: Call) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": call.model,
        "messages": [{"role": "user", "content": prompt(call, 0)}],
    }
    if call.max_tokens is not None:
        body["max_tokens"] = call.max_tokens
    return body


def headers_of(call: Call) -> dict[str, str]:
    completion = str(call.completion)
    return {"authorization": f"Bearer {KEY}", "x-mode": call.mode, "x-completion": completion}
