"""The engine under attack: cancellation at every point, failing stores, joined engines, shadow
and clamping, stale principals, hostile input.

A test marked `xfail(strict=True)` pins a bug found in the one-engine rewrite (252488b): its
reason names the bug, and it starts passing (and failing the suite) when the bug is fixed.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import random
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmfence import (
    BudgetGuardMiddleware,
    Fence,
    KeyAuthMiddleware,
    MemoryStore,
    ParallelRequestLimitMiddleware,
    RedisStore,
    RequestRateLimitMiddleware,
    SpendRecorderMiddleware,
    Store,
)
from llmfence._core.context import new_request_id
from llmfence._core.plan import Plan
from llmfence.exceptions import StoreError
from llmfence.middleware import _http
from llmfence.middleware._base import FenceMiddleware
from llmfence.middleware._paths import PathRules
from llmfence.stores import (
    Admission,
    AdmissionResult,
    BudgetScope,
    RateState,
    Settlement,
)
from llmfence.testing import FakeClock, mock_llm_app

from .conftest import CHAT, MODEL, T0, chat_body

pytestmark = pytest.mark.anyio
MASTER = "sk-master-key"


# -- a raw ASGI client: chunked bodies, cancellation at a chosen message ---------------------


def http_scope(path: str, key: str | None, headers: Sequence[tuple[bytes, bytes]]) -> Scope:
    raw = [*headers, (b"content-type", b"application/json")]
    if key is not None:
        raw.append((b"authorization", f"Bearer {key}".encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": raw,
        "client": ("127.0.0.1", 40000),
        "server": ("gateway", 80),
    }


async def drive(
    app: ASGIApp,
    body: dict[str, Any] | bytes,
    *,
    key: str | None = None,
    path: str = CHAT,
    chunks: int = 1,
    disconnect_after: int | None = None,
    stall_after: int | None = None,
    cancel_on: Callable[[Message], bool] | None = None,
    scope: anyio.CancelScope | None = None,
    headers: Sequence[tuple[bytes, bytes]] = (),
) -> list[Message]:
    """Send `body` in `chunks` messages and collect what the app sends back.

    After the body the client stays connected (`receive` waits) unless `disconnect_after`
    says after how many body messages it leaves (`stall_after`: after how many it stops
    sending). `cancel_on` cancels the request's task (what a server does on a disconnect)
    right after the message it matches has been sent; `scope` lets a store wrapper cancel it
    from inside a store call.
    """
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    size = max(1, -(-len(raw) // chunks))
    parts = [raw[i : i + size] for i in range(0, len(raw), size)] or [b""]
    incoming: list[Message] = [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]
    if disconnect_after is not None:
        incoming = [*incoming[:disconnect_after], {"type": "http.disconnect"}]
    if stall_after is not None:
        incoming = incoming[:stall_after]
    sent: list[Message] = []
    cancel = scope or anyio.CancelScope()
    with cancel:

        async def receive() -> Message:
            if incoming:
                return incoming.pop(0)
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            sent.append(message)
            if cancel_on is not None and cancel_on(message):
                cancel.cancel()
                await anyio.lowlevel.checkpoint()

        await app(http_scope(path, key, headers), receive, send)
    return sent


def status(sent: list[Message]) -> int:
    return int(sent[0]["status"]) if sent else 0


def header(sent: list[Message], name: str) -> str | None:
    for key, value in sent[0]["headers"] if sent else ():
        if key.decode().lower() == name:
            return str(value.decode())
    return None


def mid_stream(message: Message) -> bool:
    return message["type"] == "http.response.body" and bool(message.get("more_body", False))


def after_last_byte(message: Message) -> bool:
    return message["type"] == "http.response.body" and not message.get("more_body", False)


async def total(store: Store, counter: str) -> int:
    [state] = await store.budgets([BudgetScope(counter, "x", "x")], 0)
    return state.total


async def spent(store: Store, counter: str, now: float) -> int:
    [state] = await store.budgets([BudgetScope(counter, "x", "x")], now)
    return state.spent


def big_prompt() -> str:
    """An uncached prompt long enough for the token counter to move it to a worker thread."""
    rng = random.Random()
    return " ".join(f"{rng.random():.12f}" for _ in range(2500))


# -- store wrappers: a real store, with one fault injected --------------------------------


class Wrapped:
    """A real store behind a thin proxy; subclasses override one call to inject a fault."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


class CancelAfterAdmit(Wrapped):
    """The store applies the next admission, then the request's task is cancelled before the
    reply comes back (a disconnect while Redis answers)."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.scope: anyio.CancelScope | None = None

    async def admit(self, admission: Admission) -> AdmissionResult:
        result = await self.store.admit(admission)
        if self.scope is not None:
            scope, self.scope = self.scope, None
            scope.cancel()
            await anyio.lowlevel.checkpoint()
        return result


class LostAdmitReply(Wrapped):
    """The store applies the next admission, and its reply is lost (a timeout)."""

    losses = 1

    async def admit(self, admission: Admission) -> AdmissionResult:
        result = await self.store.admit(admission)
        if self.losses:
            self.losses -= 1
            raise StoreError("reply lost")
        return result


class CancelDuringSettle(Wrapped):
    """The request's task is cancelled while its settlement is on its way to the store."""

    def __init__(self, store: Store, scope: anyio.CancelScope) -> None:
        super().__init__(store)
        self.scope = scope

    async def settle(self, settlement: Settlement) -> bool:
        self.scope.cancel()
        await anyio.lowlevel.checkpoint()
        result: bool = await self.store.settle(settlement)
        return result


class FailingSettle(Wrapped):
    """Every settlement fails."""

    async def settle(self, settlement: Settlement) -> bool:
        raise StoreError("settle failed")


class HangingAdmit(Wrapped):
    """A store that never answers an admission; it does not bound its own calls."""

    bounds_call_time = False

    async def admit(self, admission: Admission) -> AdmissionResult:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")


class GatedKeyRead(Wrapped):
    """The next key read returns what the store held, but only once the test says so."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.armed = False
        self.reading = anyio.Event()
        self.gate = anyio.Event()

    async def get_key(self, key_hash: str) -> Any:
        record = await self.store.get_key(key_hash)
        if self.armed:
            self.armed = False
            self.reading.set()
            await self.gate.wait()
        return record


class BrokenDriver(Wrapped):
    """A third-party store whose driver raises its own error (not `StoreError`) on key reads."""

    async def get_key(self, key_hash: str) -> Any:
        raise ConnectionError("connection reset by peer")


# -- cancellation at every point, on both stores --------------------------------------------


async def guarded_key(fence: Fence) -> tuple[str, str]:
    key, record = await fence.generate_key(max_parallel_requests=1, rpm_limit=2, max_budget=1.0)
    return key, f"key:{record.key_hash}"


async def test_a_cancel_mid_stream_settles_once_and_frees_the_lease(store: Store) -> None:
    fence = Fence(store=store, master_key=MASTER, clock=FakeClock(T0).now)
    key, counter = await guarded_key(fence)
    app = fence.wrap(mock_llm_app())
    body = chat_body(stream=True)
    sent = await drive(app, body, key=key, cancel_on=mid_stream, headers=[(b"x-mock-chunks", b"8")])
    assert status(sent) == 200
    [record] = await store.spend_records()
    assert (record.status, record.provenance) == (499, "estimated")
    assert record.input_tokens > 0
    assert record.output_tokens > 0
    assert await total(store, counter) == await total(store, "global") == record.cost
    # The lease came back and the request counted once: the key's next call is admitted.
    assert status(await drive(app, chat_body(), key=key)) == 200
    assert len(await store.spend_records()) == 2


async def test_a_cancel_after_the_last_byte_still_settles_exactly_once(store: Store) -> None:
    fence = Fence(store=store, master_key=MASTER, clock=FakeClock(T0).now)
    key, counter = await guarded_key(fence)
    app = fence.wrap(mock_llm_app())
    sent = await drive(app, chat_body(stream=True), key=key, cancel_on=after_last_byte)
    assert status(sent) == 200
    [record] = await store.spend_records()
    assert (record.status, record.provenance) == (200, "provider-reported")
    assert await total(store, counter) == record.cost
    assert status(await drive(app, chat_body(), key=key)) == 200


async def test_a_cancel_after_the_store_applied_the_admission_gives_everything_back(
    store: Store,
) -> None:
    wrapper = CancelAfterAdmit(store)
    fence = Fence(store=wrapper, master_key=MASTER, clock=FakeClock(T0).now)
    key, counter = await guarded_key(fence)
    app = fence.wrap(mock_llm_app())
    wrapper.scope = anyio.CancelScope()
    assert await drive(app, chat_body(), key=key, scope=wrapper.scope) == []
    assert await store.spend_records() == []
    assert await total(store, counter) == 0
    # Lease, RPM hit and budget reservation all came back: two more calls fit in rpm_limit=2.
    assert [status(await drive(app, chat_body(), key=key)) for _ in range(3)] == [200, 200, 429]


async def test_a_cancel_while_the_body_is_read_reserves_nothing(store: Store) -> None:
    fence = Fence(store=store, master_key=MASTER, clock=FakeClock(T0).now)
    key, _ = await guarded_key(fence)
    app = fence.wrap(mock_llm_app())
    async with anyio.create_task_group() as group:
        group.start_soon(
            functools.partial(drive, app, chat_body(), key=key, chunks=3, stall_after=1)
        )
        await anyio.wait_all_tasks_blocked()  # the engine waits for the rest of the body
        group.cancel_scope.cancel()
    assert await store.spend_records() == []
    assert [status(await drive(app, chat_body(), key=key)) for _ in range(3)] == [200, 200, 429]


async def test_a_redis_settlement_is_shielded_from_a_cancel(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    scope = anyio.CancelScope()
    fence = Fence(store=CancelDuringSettle(store, scope), master_key=MASTER)
    key, counter = await guarded_key(fence)
    app = fence.wrap(mock_llm_app())
    await drive(app, chat_body(), key=key, scope=scope)
    [record] = await store.spend_records()
    assert record.status == 200
    assert await total(store, counter) == record.cost
    fence_again = Fence(store=store, master_key=MASTER)
    assert status(await drive(fence_again.wrap(mock_llm_app()), chat_body(), key=key)) == 200
    await store.aclose()


async def test_a_large_prompt_settlement_over_redis_survives_a_cancel(redis_url: str) -> None:
    store = RedisStore.from_url(redis_url)
    limiter = ParallelRequestLimitMiddleware(mock_llm_app(), store=store, limit=1)
    app = SpendRecorderMiddleware(limiter, store=store)
    body = chat_body(big_prompt(), stream=True)
    await drive(app, body, cancel_on=mid_stream)
    assert len(await store.spend_records()) == 1
    assert status(await drive(app, chat_body())) == 200
    await store.aclose()


async def test_a_large_prompt_settlement_over_memory_survives_a_cancel() -> None:
    store = MemoryStore()
    limiter = ParallelRequestLimitMiddleware(mock_llm_app(), store=store, limit=1)
    app = SpendRecorderMiddleware(limiter, store=store)
    body = chat_body(big_prompt(), stream=True)
    await drive(app, body, cancel_on=mid_stream)
    assert len(await store.spend_records()) == 1
    assert status(await drive(app, chat_body())) == 200


async def test_a_crowd_of_finished_and_cancelled_requests_leaves_no_trace(store: Store) -> None:
    fence = Fence(store=store, master_key=MASTER, max_budget=100.0)
    key, record = await fence.generate_key(max_parallel_requests=4)
    app = fence.wrap(mock_llm_app())
    hooks = [mid_stream, after_last_byte, None]
    answers: dict[int, list[Message]] = {}

    async def one(i: int) -> None:
        body = chat_body(f"call {i}", stream=i % 2 == 0)
        answers[i] = await drive(app, body, key=key, cancel_on=hooks[i % 3])

    async with anyio.create_task_group() as group:
        for i in range(24):
            group.start_soon(one, i)
    served = [i for i, sent in answers.items() if status(sent) == 200]
    assert served
    assert {status(sent) for sent in answers.values()} <= {200, 429}
    records = await store.spend_records()
    ids = {str(header(answers[i], "x-llmfence-request-id")) for i in served}
    assert sorted(r.request_id for r in records) == sorted(ids)  # one record per served call
    assert await total(store, "global") == sum(r.cost for r in records)
    assert await total(store, f"key:{record.key_hash}") == sum(r.cost for r in records)
    # Not one lease is left behind: with a limit of 1, the key is admitted again.
    await store.update_key(record.key_hash, {"max_parallel_requests": 1})
    fence.authenticator.invalidate_key(record.key_hash)
    assert status(await drive(app, chat_body(), key=key)) == 200


# -- a store that fails or hangs ------------------------------------------------------------


async def test_a_failing_settlement_never_breaks_the_response(store: Store) -> None:
    fence = Fence(store=FailingSettle(store), master_key=MASTER)
    app = fence.wrap(mock_llm_app())
    sent = await drive(app, chat_body(stream=True), key=MASTER)
    assert status(sent) == 200
    assert sent[-1]["type"] == "http.response.body"
    assert not sent[-1].get("more_body", False)
    assert fence.meter.degraded_count == 1


@pytest.mark.parametrize(("policy", "expected"), [("fail_closed", 503), ("fail_open", 200)])
async def test_a_hanging_admission_is_cut_by_the_store_timeout(policy: str, expected: int) -> None:
    fence = Fence(
        store=HangingAdmit(MemoryStore()),
        master_key=MASTER,
        store_timeout=0.01,
        budgets_on_store_error=policy,
    )
    sent = await drive(fence.wrap(mock_llm_app()), chat_body(), key=MASTER)
    assert status(sent) == expected
    if expected == 503:
        assert header(sent, "retry-after") == "1"
    else:
        assert header(sent, "x-llmfence-degraded") == "store-unavailable"
    assert fence.meter.degraded_count == 1


async def test_a_store_driver_error_during_auth_is_a_503() -> None:
    fence = Fence(store=BrokenDriver(MemoryStore()), master_key=MASTER)
    sent = await drive(fence.wrap(mock_llm_app()), chat_body(), key="sk-" + "k" * 40)
    assert status(sent) == 503
    assert fence.meter.degraded_count == 1


# -- engines joined across a foreign middleware ---------------------------------------------


def cors(app: ASGIApp) -> ASGIApp:
    return CORSMiddleware(app, allow_origins=["*"])


async def test_a_refusal_in_a_joined_engine_gives_back_the_outer_reservations() -> None:
    store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER)
    key, record = await fence.generate_key(max_budget=0.000001)
    inner = BudgetGuardMiddleware(SpendRecorderMiddleware(mock_llm_app(), store=store), store=store)
    app: ASGIApp = ParallelRequestLimitMiddleware(cors(inner), store=store, limit=1)
    app = RequestRateLimitMiddleware(app, store=store, limit=2)
    app = KeyAuthMiddleware(app, authenticator=fence.authenticator)
    refusals = [await drive(app, chat_body(), key=key) for _ in range(3)]
    assert [status(sent) for sent in refusals] == [429] * 3
    assert {header(sent, "x-ratelimit-remaining-requests") for sent in refusals} == {"1"}
    assert all(header(sent, "x-llmfence-request-id") for sent in refusals)
    await store.update_key(record.key_hash, {"max_budget": 10_000_000_000})
    fence.authenticator.invalidate_key(record.key_hash)
    # No RPM hit, lease or reservation of the refused calls was kept.
    assert [status(await drive(app, chat_body(), key=key)) for _ in range(3)] == [200, 200, 429]
    assert len(await store.spend_records()) == 2


async def test_bad_keys_do_not_use_up_an_anonymous_bucket_outside_key_auth() -> None:
    store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER)
    key, _ = await fence.generate_key()
    inner = KeyAuthMiddleware(mock_llm_app(), authenticator=fence.authenticator)
    app = RequestRateLimitMiddleware(cors(inner), store=store, limit=2)
    bad = [status(await drive(app, chat_body(), key=f"sk-{i:040d}")) for i in range(5)]
    assert bad == [401] * 5
    assert [status(await drive(app, chat_body(), key=key)) for _ in range(3)] == [200, 200, 429]


async def test_a_joined_limiter_meters_its_own_paths() -> None:
    async def endpoint(request: Request) -> JSONResponse:
        await request.body()
        return JSONResponse({"ok": True})

    upstream = Starlette(routes=[Route("/summarize", endpoint, methods=["POST"])])
    rules = PathRules(metered=["/summarize"])
    alone = RequestRateLimitMiddleware(upstream, limit=1, paths=rules)
    statuses = [status(await drive(alone, chat_body(), path="/summarize")) for _ in "ab"]
    assert statuses == [200, 429]
    store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER)
    key, _ = await fence.generate_key()
    limiter = RequestRateLimitMiddleware(upstream, store=store, limit=1, paths=rules)
    app = KeyAuthMiddleware(cors(limiter), authenticator=fence.authenticator)
    statuses = [status(await drive(app, chat_body(), path="/summarize", key=key)) for _ in "ab"]
    assert statuses == [200, 429]


async def test_a_joined_key_auth_without_a_store_reads_the_outer_store() -> None:
    store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER)
    key, _ = await fence.generate_key()
    fused = RequestRateLimitMiddleware(
        KeyAuthMiddleware(mock_llm_app(), master_key=MASTER), store=store, limit=5
    )
    assert status(await drive(fused, chat_body(), key=key)) == 200
    joined = RequestRateLimitMiddleware(
        cors(KeyAuthMiddleware(mock_llm_app(), master_key=MASTER)), store=store, limit=5
    )
    assert status(await drive(joined, chat_body(), key=key)) == 200


# -- two checks of one kind in one stack ----------------------------------------------------


async def test_a_shadow_limiter_in_front_does_not_lift_a_real_one() -> None:
    real = RequestRateLimitMiddleware(mock_llm_app(), limit=2, window=120)
    app = RequestRateLimitMiddleware(real, limit=1, window=60, shadow=True)
    assert [status(await drive(app, chat_body())) for _ in range(3)] == [200, 200, 429]


async def test_a_shadow_limiter_behind_a_real_one_never_refuses() -> None:
    shadow = RequestRateLimitMiddleware(mock_llm_app(), limit=1, window=1, shadow=True)
    app = RequestRateLimitMiddleware(shadow, limit=5, window=60)
    assert [status(await drive(app, chat_body())) for _ in range(3)] == [200, 200, 200]


async def test_a_fused_global_budget_holds_behind_an_end_user_guard() -> None:
    tiny = 0.000001  # $1e-6: no call fits
    alone = BudgetGuardMiddleware(mock_llm_app(), max_budget=tiny)
    assert status(await drive(alone, chat_body())) == 429
    app = BudgetGuardMiddleware(
        BudgetGuardMiddleware(mock_llm_app(), max_budget=tiny), max_end_user_budget=10.0
    )
    assert status(await drive(app, chat_body())) == 429


async def test_a_fused_end_user_budget_holds_behind_a_global_guard() -> None:
    app = BudgetGuardMiddleware(
        BudgetGuardMiddleware(mock_llm_app(), max_end_user_budget=0.000001), max_budget=10.0
    )
    assert status(await drive(app, chat_body(user="eve"))) == 429


@pytest.mark.xfail(
    strict=True,
    reason="Meter.admit drops a budget level an earlier (outer) layer already reserved "
    "(ctx.budget_scopes), with the outer layer's limit: a joined guard's global budget is "
    "ignored when the outer guard set no max_budget",
)
async def test_a_joined_global_budget_holds_behind_an_end_user_guard() -> None:
    store = MemoryStore()
    inner = BudgetGuardMiddleware(mock_llm_app(), store=store, max_budget=0.000001)
    app = BudgetGuardMiddleware(cors(inner), store=store, max_end_user_budget=10.0)
    assert status(await drive(app, chat_body())) == 429


async def test_a_second_rpm_layer_does_not_count_each_request_twice() -> None:
    store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER)
    key, _ = await fence.generate_key(rpm_limit=3)
    app = mock_llm_app()
    fence.install(app)
    # A default for keys that set none, added beside the Fence's own stack.
    app.add_middleware(RequestRateLimitMiddleware, meter=fence.meter, limit=60)
    statuses = [status(await drive(app, chat_body(), key=key)) for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


async def test_a_recorded_call_to_an_unknown_model_is_not_free() -> None:
    store = MemoryStore()
    app = SpendRecorderMiddleware(mock_llm_app(), store=store)
    sent = await drive(app, chat_body(model="my-private-llm"))
    records = await store.spend_records()
    assert status(sent) == 400 or all(r.cost > 0 for r in records)


# -- shadow mode and clamping through Meter._admit ------------------------------------------


async def test_shadow_checks_count_report_and_never_refuse(store: Store) -> None:
    fence = Fence(store=store, master_key=MASTER, shadow={"requests", "budget"})
    key, record = await fence.generate_key(rpm_limit=1, max_budget=0.000001)
    app = fence.wrap(mock_llm_app())
    sent = [await drive(app, chat_body(), key=key) for _ in range(3)]
    assert [status(s) for s in sent] == [200] * 3
    assert header(sent[0], "x-llmfence-shadow-refusal") == "budget"
    assert header(sent[2], "x-llmfence-shadow-refusal") == "requests"
    # Headers report the real limit, not the lifted one.
    assert header(sent[2], "x-ratelimit-limit-requests") == "1"
    assert header(sent[2], "x-ratelimit-remaining-requests") == "0"
    records = await store.spend_records()
    assert len(records) == 3
    assert await total(store, f"key:{record.key_hash}") == sum(r.cost for r in records)


async def test_clamping_reserves_and_charges_the_clamped_allowance(store: Store) -> None:
    fence = Fence(store=store, master_key=MASTER, clamp_max_tokens=True, default_max_tokens=50_000)
    key, record = await fence.generate_key(max_budget=0.01)  # $0.01 pays ~5000 output tokens
    app = fence.wrap(mock_llm_app())
    sent = await drive(app, chat_body(), key=key)
    assert status(sent) == 200
    clamped = int(header(sent, "x-llmfence-max-tokens-clamped") or 0)
    assert 0 < clamped < 50_000
    [spend] = await store.spend_records()
    assert spend.provenance == "provider-reported"
    assert await total(store, f"key:{record.key_hash}") == spend.cost


# -- principals, plans and model decisions cached on them -----------------------------------


async def test_a_change_by_another_instance_is_seen_within_cache_ttl() -> None:
    clock = FakeClock(T0)
    store = MemoryStore()
    here = Fence(store=store, master_key=MASTER, clock=clock.now, cache_ttl=5)
    key, record = await here.generate_key(rpm_limit=100)
    app = here.wrap(mock_llm_app())
    assert status(await drive(app, chat_body(), key=key)) == 200
    # Another instance lowers the limit: it writes the store and invalidates its own cache.
    await store.update_key(record.key_hash, {"rpm_limit": 1})
    clock.advance(4)
    assert status(await drive(app, chat_body(), key=key)) == 200  # still cached: allowed
    clock.advance(1.5)  # past cache_ttl (and the RPM window still holds both calls)
    assert status(await drive(app, chat_body(), key=key)) == 429


async def test_an_expiring_key_is_refused_while_its_principal_is_cached() -> None:
    clock = FakeClock(T0)
    fence = Fence(master_key=MASTER, clock=clock.now, cache_ttl=3600)
    key, _ = await fence.generate_key(duration="30s")
    app = fence.wrap(mock_llm_app())
    assert status(await drive(app, chat_body(), key=key)) == 200
    clock.advance(30)
    sent = await drive(app, chat_body(), key=key)
    assert status(sent) == 401
    assert key not in json.dumps(json.loads(sent[1]["body"]))


async def test_an_invalidated_team_limit_applies_to_cached_principals_at_once() -> None:
    fence = Fence(master_key=MASTER, cache_ttl=3600)
    await fence.new_team("blue", rpm_limit=100)
    key, _ = await fence.generate_key(team_id="blue")
    app = fence.wrap(mock_llm_app())
    assert status(await drive(app, chat_body(), key=key)) == 200
    await fence.store.update_team("blue", {"rpm_limit": 1})
    fence.authenticator.invalidate_team("blue")
    assert status(await drive(app, chat_body(), key=key)) == 429


async def test_an_invalidated_access_group_applies_at_once() -> None:
    fence = Fence(master_key=MASTER, cache_ttl=3600)
    await fence.store.set_access_group("chat", [MODEL])
    key, _ = await fence.generate_key(models=["chat"])
    app = fence.wrap(mock_llm_app())
    assert status(await drive(app, chat_body(), key=key)) == 200
    await fence.store.set_access_group("chat", ["gpt-4o"])
    fence.authenticator.invalidate_groups()
    assert status(await drive(app, chat_body(), key=key)) == 403


async def test_a_key_deleted_while_it_is_being_resolved_stops_working() -> None:
    gated = GatedKeyRead(MemoryStore())
    fence = Fence(store=gated, master_key=MASTER, cache_ttl=3600)
    key, record = await fence.generate_key()
    app = fence.wrap(mock_llm_app())
    gated.armed = True
    first: list[Message] = []
    async with anyio.create_task_group() as group:

        async def in_flight() -> None:
            first.extend(await drive(app, chat_body(), key=key))

        group.start_soon(in_flight)
        await gated.reading.wait()
        # What POST /key/delete does, while the request above is reading the key.
        await gated.store.delete_key(record.key_hash)
        fence.authenticator.invalidate_key(record.key_hash)
        gated.gate.set()
    assert status(first) == 200  # it read the key before the delete: fine
    assert status(await drive(app, chat_body(), key=key)) == 401


async def test_an_access_group_change_elsewhere_is_seen_within_cache_ttl() -> None:
    clock = FakeClock(T0)
    store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER, clock=clock.now, cache_ttl=5)
    await store.set_access_group("chat", [MODEL])
    early, _ = await fence.generate_key(models=["chat"])
    late, _ = await fence.generate_key(models=["chat"])
    app = fence.wrap(mock_llm_app())
    assert status(await drive(app, chat_body(), key=early)) == 200  # groups read at T0
    clock.advance(1)
    await store.set_access_group("chat", ["gpt-4o"])  # another instance, at T0 + 1
    clock.advance(3)
    await drive(app, chat_body(), key=late)  # within cache_ttl of the change: either answer
    clock.advance(3)  # T0 + 7: more than cache_ttl after the change
    assert status(await drive(app, chat_body(), key=early)) == 403
    assert status(await drive(app, chat_body(), key=late)) == 403


# -- route guards beside the middlewares ----------------------------------------------------


async def test_a_guard_cancelled_after_its_admission_keeps_nothing_reserved(
    store: Store,
) -> None:
    wrapper = CancelAfterAdmit(store)
    fence = Fence(store=wrapper, master_key=MASTER)
    guard = fence.guard(max_usd=1.0, estimate_usd=0.6, per="user", name="report")
    wrapper.scope = anyio.CancelScope()
    with wrapper.scope:
        async with guard.hold("alice"):
            raise AssertionError("never admitted")
    async with guard.hold("alice") as permit:  # 0.6 more fits in $1 only if 0.6 came back
        assert permit.identity == "alice"


@pytest.mark.parametrize("policy", ["fail_closed", "fail_open"])
async def test_a_guard_whose_admission_reply_is_lost_charges_once(
    store: Store, policy: str
) -> None:
    fence = Fence(store=LostAdmitReply(store), master_key=MASTER, budgets_on_store_error=policy)
    guard = fence.guard(max_usd=1.0, estimate_usd=0.25, per="user", name="report")
    try:
        async with guard.hold("alice") as permit:
            permit.charge(model=MODEL, usage={"prompt_tokens": 1000, "completion_tokens": 0})
    except StoreError:
        assert policy == "fail_closed"
    counter = "route:report:budget:ever:user:alice"
    charged = 0 if policy == "fail_closed" else 1000 * 1500
    assert await total(store, counter) == charged
    assert await spent(store, counter, T0) == charged


async def test_a_guarded_route_cancelled_mid_call_settles_once(store: Store) -> None:
    fence = Fence(store=store, master_key=MASTER)
    key, record = await fence.generate_key()
    entered = anyio.Event()

    @fence.budget(max_usd=1.0, estimate_usd=0.001, per="key", name="slow")
    async def slow(request: Request) -> JSONResponse:
        await fence.charge(request, model=MODEL, usage={"prompt_tokens": 10})
        entered.set()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    app = mock_llm_app()
    app.router.routes.append(Route("/slow", slow, methods=["POST"]))
    fence.install(app)
    async with anyio.create_task_group() as group:
        group.start_soon(functools.partial(drive, app, b"{}", key=key, path="/slow"))
        await entered.wait()
        group.cancel_scope.cancel()
    [spend] = await store.spend_records()
    assert (spend.cost, spend.status) == (10 * 1500, 499)
    assert await total(store, f"key:{record.key_hash}") == 10 * 1500
    assert await total(store, "route:slow:budget:ever:key:" + record.key_hash) == 10 * 1500


# -- request ids and headers ----------------------------------------------------------------


async def test_request_ids_are_unique_and_on_every_metered_answer() -> None:
    store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER)
    key, _ = await fence.generate_key(rpm_limit=2, models=["gpt-4o"])
    app = fence.wrap(mock_llm_app())
    answers = [await drive(app, chat_body(), key=MASTER) for _ in range(20)]
    answers.append(await drive(app, chat_body(), key="sk-" + "z" * 40))  # 401
    answers.append(await drive(app, chat_body(), key=key))  # 403: model
    limited, _ = await fence.generate_key(rpm_limit=1)
    answers += [await drive(app, chat_body(), key=limited) for _ in range(2)]  # 200, 429
    assert [status(a) for a in answers[-4:]] == [401, 403, 200, 429]
    ids = [header(a, "x-llmfence-request-id") for a in answers]
    assert None not in ids
    assert len(set(ids)) == len(ids)
    assert sorted(r.request_id for r in await store.spend_records()) == sorted(
        ids[i] for i in [*range(20), len(ids) - 2]
    )
    refused = answers[-1]
    assert header(refused, "retry-after")
    assert header(refused, "retry-after-ms")
    assert header(refused, "x-ratelimit-remaining-requests") == "0"


async def test_a_bad_body_on_a_metered_path_names_its_request_id() -> None:
    app = Fence(master_key=MASTER).wrap(mock_llm_app())
    sent = await drive(app, b"{not json", key=MASTER)
    assert status(sent) == 400
    assert header(sent, "x-llmfence-request-id")


def _child_request_id(queue: Any) -> None:
    queue.put(new_request_id())


def test_request_ids_stay_unique_across_forked_workers() -> None:
    fork = multiprocessing.get_context("fork")
    queue = fork.Queue()
    child = fork.Process(target=_child_request_id, args=(queue,))
    child.start()
    child.join()
    assert queue.get(timeout=10) != new_request_id()


# -- Fence.wrap over a bare ASGI app --------------------------------------------------------


async def test_wrap_passes_lifespan_and_websocket_scopes_through() -> None:
    seen: list[str] = []

    async def bare(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])
        if scope["type"] == "lifespan":
            message = await receive()
            assert message["type"] == "lifespan.startup"
            await send({"type": "lifespan.startup.complete"})
            return
        await send({"type": "websocket.close", "code": 1000})

    app = Fence(master_key=MASTER).wrap(bare)
    assert isinstance(app, FenceMiddleware)
    assert app.app is bare
    out: list[Message] = []

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        out.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)
    await app({"type": "websocket", "path": CHAT, "headers": []}, receive, send)
    assert seen == ["lifespan", "websocket"]
    assert [m["type"] for m in out] == ["lifespan.startup.complete", "websocket.close"]


# -- request bodies: chunks, more_body, disconnects -----------------------------------------


class Echo:
    """An upstream that records the body it was given and answers with a fixed usage."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.bodies.append(body)
        out = b'{"usage": {"prompt_tokens": 3, "completion_tokens": 4}}'
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})


async def test_a_body_in_many_chunks_reaches_the_app_byte_for_byte() -> None:
    echo = Echo()
    store = MemoryStore()
    app = Fence(store=store, master_key=MASTER).wrap(echo)
    raw = json.dumps(chat_body("é€𝄞" * 100, max_tokens=10), ensure_ascii=False).encode()
    assert status(await drive(app, raw, key=MASTER, chunks=len(raw))) == 200
    assert echo.bodies == [raw]
    [record] = await store.spend_records()
    assert (record.input_tokens, record.output_tokens) == (3, 4)


async def test_empty_chunks_and_a_trailing_empty_message_are_one_body() -> None:
    echo = Echo()
    app = Fence(master_key=MASTER).wrap(echo)
    raw = json.dumps(chat_body(max_tokens=10)).encode()
    messages: list[Message] = [
        {"type": "http.request", "body": b"", "more_body": True},
        {"type": "http.request", "body": raw[:7], "more_body": True},
        {"type": "http.request", "body": b"", "more_body": True},
        {"type": "http.request", "body": raw[7:], "more_body": True},
        {"type": "http.request", "more_body": False},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await app(http_scope(CHAT, MASTER, ()), receive, send)
    assert status(sent) == 200
    assert echo.bodies == [raw]


async def test_a_client_leaving_while_its_body_is_read_never_reaches_the_app() -> None:
    echo = Echo()
    store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER)
    key, _ = await fence.generate_key(max_parallel_requests=1, rpm_limit=1)
    app = fence.wrap(echo)
    sent = await drive(app, chat_body(), key=key, chunks=4, disconnect_after=2)
    assert status(sent) == 400
    assert echo.bodies == []
    assert await store.spend_records() == []
    assert status(await drive(app, chat_body(max_tokens=5), key=key)) == 200


async def test_a_body_over_the_cap_in_small_chunks_is_a_413() -> None:
    echo = Echo()
    app = Fence(master_key=MASTER, max_body_size=1000).wrap(echo)
    raw = json.dumps(chat_body("x" * 2000)).encode()
    sent = await drive(app, raw, key=MASTER, chunks=40)
    assert status(sent) == 413
    assert echo.bodies == []


# -- memory under hostile input -------------------------------------------------------------


async def test_per_principal_caches_stay_bounded_under_many_models() -> None:
    store = MemoryStore()
    fence = Fence(
        store=store,
        master_key=MASTER,
        fallback_price={"input": 1, "output": 1},
        clock=FakeClock(T0).now,  # one principal throughout
    )
    key, record = await fence.generate_key(models=["m-*"], model_max_budget={"m-0": 1.0})
    app = fence.wrap(Echo())
    for i in range(600):
        assert status(await drive(app, chat_body(model=f"m-{i}", max_tokens=5), key=key)) == 200
    principal = await fence.authenticator.authenticate(key)
    assert len(principal.models) <= 256
    plans = [plan for plan in principal.plans.values() if isinstance(plan, Plan)]
    assert plans
    assert all(len(plan._models) <= 256 for plan in plans)
    assert await total(store, f"key_model:{record.key_hash}:m-0") > 0


async def test_path_and_header_caches_stay_bounded() -> None:
    rules = PathRules()
    for i in range(10_000):
        rules.classify(f"/v1/{i}/chat/completions")
    assert len(rules._seen) <= PathRules._CACHE_SIZE
    states = [
        RateState(f"k{i}", "requests", "key", i + 1, 0, i / 1000, 60.0) for i in range(10_000)
    ]
    for start in range(0, len(states), 100):
        _http.rate_limit_headers(states[start : start + 100])
    assert len(_http._POLICIES) <= _http._MAX_POLICIES
    assert len(_http._RESETS) <= _http._MAX_POLICIES


async def test_an_end_user_id_cannot_be_megabytes_long() -> None:
    store = MemoryStore()
    app = Fence(store=store, master_key=MASTER).wrap(Echo())
    sent = await drive(app, chat_body(user="u" * 100_000, max_tokens=5), key=MASTER)
    assert status(sent) == 400 or max(len(name) for name in store._budgets) <= 1024
