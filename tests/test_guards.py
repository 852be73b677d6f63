"""Per-route guards: decorators, FastAPI dependencies, `hold()`, and `Fence.charge`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI, Query
from openai.types.chat import ChatCompletion
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Scope

from llmfence import (
    BudgetExceededError,
    ConfigurationError,
    Fence,
    MemoryStore,
    RateLimitExceededError,
    Store,
    StoreError,
    Usage,
)
from llmfence.guards import Permit
from llmfence.stores import Admission, AdmissionResult, BudgetScope, hash_key
from llmfence.testing import FakeClock

pytestmark = pytest.mark.anyio

T0 = 1_795_000_000.0
# "m" costs $1 / $2 per million tokens: 1000 / 2000 nano-USD a token.
PRICES = {"m": {"input": 1, "output": 2}}
USAGE = {"prompt_tokens": 100, "completion_tokens": 50}
USAGE_COST = 100 * 1000 + 50 * 2000  # nano-USD


class Doc(BaseModel):
    text: str


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def fence(store: Store, clock: FakeClock) -> Fence:
    return Fence(store=store, clock=clock.now, master_key="sk-master-key", prices=PRICES)


@asynccontextmanager
async def client_for(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            yield client


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def spent(fence: Fence, counter: str) -> int:
    [state] = await fence.store.budgets([BudgetScope(counter, "x", "x")], fence.clock())
    return state.spent


def assert_refused(response: httpx.Response, code: str, status: int = 429) -> dict[str, Any]:
    assert response.status_code == status
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    return error


# -- the decorator ---------------------------------------------------------------------------


async def test_async_fastapi_endpoint_refused_calls_never_reach_it(fence: Fence) -> None:
    app, calls = FastAPI(), []
    key, _ = await fence.generate_key()

    @app.post("/summarize")
    @fence.limit(rpm=2)
    async def summarize(doc: Doc) -> dict[str, str]:
        calls.append(doc.text)
        return {"summary": doc.text[:3]}

    async with client_for(app) as client:
        replies = [await client.post("/summarize", json={"text": "hello"}, headers=auth(key))]
        replies += [await client.post("/summarize", json={"text": "x"}, headers=auth(key))]
        refused = await client.post("/summarize", json={"text": "y"}, headers=auth(key))
    assert [r.json() for r in replies] == [{"summary": "hel"}, {"summary": "x"}]
    assert calls == ["hello", "x"]
    error = assert_refused(refused, "rate_limit_exceeded")
    assert error["type"] == "requests"
    assert error["message"].startswith("Rate limit reached for key sk-...")
    assert key not in error["message"]
    assert hash_key(key) not in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


async def test_sync_fastapi_endpoint_runs_in_a_thread_and_charges(fence: Fence) -> None:
    app, threads = FastAPI(), []
    key, _ = await fence.generate_key(user_id="alice")

    @app.post("/sync")
    @fence.budget(max_usd=1.0, estimate_usd=0.5, name="sync")
    def sync_endpoint(doc: Doc, request: Request) -> dict[str, int]:
        import threading

        threads.append(threading.current_thread() is threading.main_thread())
        return {"cost": fence.charge_sync(request, model="m", usage=USAGE)}

    async with client_for(app) as client:
        reply = await client.post("/sync", json={"text": "a"}, headers=auth(key))
    assert reply.json() == {"cost": USAGE_COST}
    assert threads == [False]
    assert await spent(fence, "route:sync:budget:ever:user:alice") == USAGE_COST


async def test_starlette_endpoint_gets_rate_limit_headers(fence: Fence) -> None:
    calls = 0

    @fence.limit(rpm=1, tpm=1000, tokens_estimate=10)
    async def endpoint(request: Request) -> Response:
        nonlocal calls
        calls += 1
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/ep", endpoint, methods=["GET"])])
    key, _ = await fence.generate_key()
    async with client_for(app) as client:
        ok = await client.get("/ep", headers=auth(key))
        refused = await client.get("/ep", headers=auth(key))
    assert ok.status_code == 200
    assert calls == 1
    assert ok.headers["x-ratelimit-limit-requests"] == "1"
    assert ok.headers["x-ratelimit-remaining-requests"] == "0"
    assert ok.headers["x-ratelimit-limit-tokens"] == "1000"
    assert ok.headers["x-ratelimit-remaining-tokens"] == "990"
    assert '"key-requests";q=1;w=60' in ok.headers["ratelimit-policy"]
    assert_refused(refused, "rate_limit_exceeded")


async def test_unknown_or_missing_key_is_401(fence: Fence) -> None:
    app = FastAPI()

    @app.get("/ep")
    @fence.limit(rpm=5)
    async def endpoint() -> dict[str, bool]:
        raise AssertionError("never reached")

    async with client_for(app) as client:
        missing = await client.get("/ep")
        unknown = await client.get("/ep", headers=auth("sk-" + "x" * 32))
    for reply in (missing, unknown):
        error = assert_refused(reply, "invalid_api_key", 401)
        assert error["type"] == "invalid_request_error"
    assert "x" * 32 not in unknown.text


async def test_openapi_schema_is_unchanged(fence: Fence) -> None:
    def build(guarded: bool) -> dict[str, Any]:
        app = FastAPI()
        wrap: Callable[[Any], Any] = fence.guard(rpm=5, max_usd=1) if guarded else (lambda f: f)

        @app.post("/items/{item_id}")
        @wrap
        async def create(
            item_id: int, doc: Doc, q: Annotated[str | None, Query(max_length=5)] = None
        ) -> dict[str, str]:
            return {}

        @app.get("/plain")
        @wrap
        def plain(request: Request, limit: int = 10) -> list[int]:
            return []

        return app.openapi()

    assert build(True) == build(False)
    assert "llmfence" not in json.dumps(build(True))


async def test_stacked_guards_are_one_admission(clock: FakeClock) -> None:
    class CountingStore(MemoryStore):
        def __init__(self) -> None:
            super().__init__()
            self.admissions: list[Admission] = []

        async def admit(self, admission: Admission) -> AdmissionResult:
            self.admissions.append(admission)
            return await super().admit(admission)

    store = CountingStore()
    fence = Fence(store=store, clock=clock.now, prices=PRICES)
    app, calls = FastAPI(), []
    key, _ = await fence.generate_key(user_id="alice")

    @app.post("/chat")
    @fence.limit(rpm=10)
    @fence.budget(max_usd=0.0003, estimate_usd=0.0001)
    async def chat(request: Request) -> dict[str, int]:
        calls.append(1)
        return {"cost": await fence.charge(request, model="m", usage=USAGE)}

    async with client_for(app) as client:
        replies = [await client.post("/chat", headers=auth(key)) for _ in range(3)]
    # $0.0002 a call against $0.0003: the second call finds $0.0001 left, enough to start
    # with its $0.0001 estimate; the third finds nothing left.
    assert [r.status_code for r in replies] == [200, 200, 429]
    assert_refused(replies[2], "insufficient_quota")
    assert len(calls) == 2
    assert len(store.admissions) == 3
    first = store.admissions[0]
    assert [h.key.split(":")[2] for h in first.rates] == ["rpm"]
    assert [b.key.split(":")[2] for b in first.budgets] == ["budget"]
    name = f"{__name__}.test_stacked_guards_are_one_admission.<locals>.chat"
    assert first.budgets[0].key == f"route:{name}:budget:ever:user:alice"


@pytest.mark.parametrize("per", ["key", "user", "team"])
async def test_per_key_user_team(fence: Fence, per: Any) -> None:
    app = FastAPI()

    @app.get("/ep")
    @fence.limit(rpm=1, per=per)
    async def endpoint() -> dict[str, bool]:
        return {"ok": True}

    alice_1, _ = await fence.generate_key(user_id="alice", team_id="t")
    alice_2, _ = await fence.generate_key(user_id="alice", team_id="t")
    bob, _ = await fence.generate_key(user_id="bob", team_id="t")
    lone, _ = await fence.generate_key()  # no user, no team: counted by its key
    async with client_for(app) as client:
        codes = [
            (await client.get("/ep", headers=auth(k))).status_code
            for k in (alice_1, alice_2, bob, lone, lone)
        ]
    expected = {
        "key": [200, 200, 200, 200, 429],
        "user": [200, 429, 200, 200, 429],
        "team": [200, 429, 429, 200, 429],
    }
    assert codes == expected[per]


async def test_per_end_user(fence: Fence) -> None:
    app = FastAPI()

    @app.post("/ep")
    @fence.budget(max_usd=1, per="end_user", estimate_usd=0.6, name="eu")
    async def endpoint(doc: Doc) -> dict[str, str]:
        return {"text": doc.text}

    key, _ = await fence.generate_key()
    async with client_for(app) as client:
        by_body = await client.post("/ep", json={"text": "a", "user": "eve"}, headers=auth(key))
        by_query = await client.post("/ep?user=eve", json={"text": "b"}, headers=auth(key))
        other = await client.post("/ep", json={"text": "c", "user": "max"}, headers=auth(key))
        nobody = await client.post("/ep", json={"text": "d"}, headers=auth(key))
    assert by_body.json() == {"text": "a"}  # the body was read once, and still parsed
    error = assert_refused(by_query, "insufficient_quota")
    assert error["message"].startswith("Budget exceeded for end_user eve on route eu:")
    assert by_query.headers["x-should-retry"] == "false"
    assert other.status_code == 200
    assert_refused(nobody, "invalid_request_error", 400)


async def test_per_ip_with_trusted_proxies(store: Store, clock: FakeClock) -> None:
    for proxies, expected in ((0, [200, 429, 429]), (1, [200, 429, 200])):
        fence = Fence(store=store, clock=clock.now, trusted_proxies=proxies)

        @fence.limit(rpm=1, per="ip", name=f"ip{proxies}")
        async def endpoint(request: Request) -> Response:
            return Response("ok")

        app = Starlette(routes=[Route("/ep", endpoint)])
        async with client_for(app) as client:
            codes = [
                (await client.get("/ep", headers={"x-forwarded-for": xff})).status_code
                for xff in ("1.1.1.1, 10.0.0.1", "2.2.2.2, 10.0.0.1", "1.1.1.1, 10.0.0.2")
            ]
        # Behind one proxy the client is the rightmost entry: whatever sits left of it is
        # the client's own claim and changes nothing.
        assert codes == expected
    with pytest.raises(ConfigurationError):
        Fence(trusted_proxies=-1)


async def test_per_callable_sync_and_async(fence: Fence) -> None:
    async def tenant(request: Request) -> str:
        return request.headers["x-tenant"]

    app = FastAPI()

    @app.get("/a")
    @fence.limit(rpm=1, per=lambda request: request.headers["x-tenant"])
    async def a() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/b")
    @fence.limit(rpm=1, per=tenant)
    def b() -> dict[str, bool]:
        return {"ok": True}

    async with client_for(app) as client:
        codes = [
            (await client.get(path, headers={"x-tenant": t})).status_code
            for path in ("/a", "/b")
            for t in ("acme", "acme", "globex")
        ]
    assert codes == [200, 429, 200] * 2


# -- charging --------------------------------------------------------------------------------


async def test_charge_settles_the_reservation(fence: Fence) -> None:
    app = FastAPI()
    key, _ = await fence.generate_key(user_id="alice")
    budget = fence.budget(max_usd=1, estimate_usd=0.01, name="chat")
    completion = ChatCompletion.model_validate(
        {
            "id": "c1",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [],
            "usage": {**USAGE, "total_tokens": 150},
        }
    )
    anthropic = {"model": "m", "usage": {"input_tokens": 10, "output_tokens": 5}}

    @app.post("/charged")
    @budget
    async def charged(request: Request) -> dict[str, int]:
        first = await fence.charge(request, completion)  # an SDK object
        return {"cost": first + await fence.charge(request, anthropic)}  # and a dict

    @app.post("/uncharged")
    @budget
    async def uncharged() -> dict[str, int]:
        return {}

    counter = "route:chat:budget:ever:user:alice"
    async with client_for(app) as client:
        reply = await client.post("/charged", headers=auth(key))
        assert reply.json() == {"cost": USAGE_COST + 10 * 1000 + 5 * 2000}
        assert await spent(fence, counter) == USAGE_COST + 20_000  # not the estimate
        await client.post("/uncharged", headers=auth(key))
    assert await spent(fence, counter) == USAGE_COST + 20_000 + 10_000_000  # the estimate
    records = await fence.store.spend_records()
    assert sorted((r.provenance, r.cost, r.model) for r in records) == [
        ("provider-reported", USAGE_COST + 20_000, "m"),
        ("reservation-only", 10_000_000, ""),
    ]
    assert {r.user_id for r in records} == {"alice"}


async def test_charge_without_a_guard_lands_at_once(fence: Fence) -> None:
    app = FastAPI()
    fence.install(app)  # the middlewares authenticate; the route is not a metered LLM path
    await fence.new_user("alice")
    key, record = await fence.generate_key(user_id="alice")

    @app.post("/tool")
    async def tool(request: Request) -> dict[str, int]:
        return {"cost": await fence.charge(request, model="m", usage=Usage(100, 50))}

    async with client_for(app) as client:
        reply = await client.post("/tool", headers=auth(key))
    assert reply.json() == {"cost": USAGE_COST}
    assert await spent(fence, f"key:{record.key_hash}") == USAGE_COST
    assert await spent(fence, "user:alice") == USAGE_COST
    assert await spent(fence, "global") == USAGE_COST
    [log] = await fence.store.spend_records()
    assert (log.cost, log.key_hash, log.path) == (USAGE_COST, record.key_hash, "/tool")


async def test_charge_needs_a_known_model_and_usage(fence: Fence) -> None:
    request = Request({"type": "http", "headers": [], "path": "/", "query_string": b""})
    with pytest.raises(ConfigurationError):
        await fence.charge(request, usage=USAGE)
    with pytest.raises(ConfigurationError):
        await fence.charge(request)
    assert await fence.charge(request, {"model": "m"}) == 0  # no usage: nothing charged


async def test_streaming_response_settles_when_the_stream_ends(fence: Fence) -> None:
    key, _ = await fence.generate_key(user_id="alice")

    @fence.limit(tpm=1000, tokens_estimate=500, name="stream")
    @fence.budget(max_usd=1, estimate_usd=0.5, name="stream")
    async def endpoint(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"data: 1\n\n"
            await fence.charge(request, model="m", usage=USAGE)  # the usage chunk
            yield b"data: [DONE]\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/stream", endpoint)])
    async with client_for(app) as client:
        reply = await client.get("/stream", headers=auth(key))
        assert reply.headers["x-ratelimit-remaining-tokens"] == "500"
        again = await client.get("/stream", headers=auth(key))
    assert reply.text == again.text == "data: 1\n\ndata: [DONE]\n\n"
    # Both calls were settled with their 150 tokens, not their 500-token estimate.
    assert again.headers["x-ratelimit-remaining-tokens"] == str(1000 - 150 - 500)
    assert await spent(fence, "route:stream:budget:ever:user:alice") == 2 * USAGE_COST


async def test_a_disconnect_still_settles(fence: Fence) -> None:
    started = anyio.Event()
    key, _ = await fence.generate_key(user_id="alice")

    @fence.budget(max_usd=1, estimate_usd=0.25, name="slow")
    async def slow(request: Request) -> Response:
        started.set()
        await anyio.sleep_forever()
        raise AssertionError("cancelled before")

    app = Starlette(routes=[Route("/slow", slow)])
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/slow",
        "headers": [(b"authorization", f"Bearer {key}".encode())],
        "query_string": b"",
    }

    async def receive() -> Message:
        await anyio.sleep_forever()
        raise AssertionError("never")

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent")

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(app, scope, receive, send)
        await started.wait()
        tasks.cancel_scope.cancel()  # what a server does when the client goes away
    [log] = await fence.store.spend_records()
    assert (log.status, log.cost, log.provenance) == (499, 250_000_000, "reservation-only")


async def test_the_middlewares_principal_is_used(fence: Fence) -> None:
    app = FastAPI()
    fence.install(app)
    key, _ = await fence.generate_key(user_id="alice")
    lookups = []
    authenticate = fence.authenticator.authenticate

    async def counting(api_key: str | None) -> Any:
        lookups.append(api_key)
        return await authenticate(api_key)

    fence.authenticator.authenticate = counting  # type: ignore[method-assign]

    @app.get("/ep")
    @fence.limit(rpm=1, per="user", name="mw")
    async def endpoint() -> dict[str, bool]:
        return {"ok": True}

    async with client_for(app) as client:
        codes = [(await client.get("/ep", headers=auth(key))).status_code for _ in range(2)]
    assert codes == [200, 429]
    assert len(lookups) == 2  # once a request, by the auth middleware only


# -- the dependency --------------------------------------------------------------------------


async def test_dependency_form(fence: Fence) -> None:
    app = FastAPI()
    fence.add_exception_handlers(app)
    guard = fence.guard(rpm=2, max_usd=0.0003, estimate_usd=0.0001, name="dep")
    calls = []

    @app.post("/chat")
    # `Depends` as a default: FastAPI cannot resolve local names in postponed annotations.
    async def chat(permit: Permit = Depends(guard)) -> dict[str, int]:  # noqa: B008
        calls.append(permit.identity)
        return {"cost": permit.charge(model="m", usage=USAGE)}

    key, _ = await fence.generate_key(user_id="alice")
    async with client_for(app) as client:
        first = await client.post("/chat", headers=auth(key))
        assert await spent(fence, "route:dep:budget:ever:user:alice") == USAGE_COST
        second = await client.post("/chat", headers=auth(key))
        third = await client.post("/chat", headers=auth(key))
        unknown = await client.post("/chat", headers=auth("sk-" + "y" * 32))
    assert first.json() == second.json() == {"cost": USAGE_COST}
    assert calls == ["alice", "alice"]
    error = assert_refused(third, "rate_limit_exceeded")
    assert error["message"].startswith("Rate limit reached for user alice on route dep")
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert_refused(unknown, "invalid_api_key", 401)
    assert "/chat" in app.openapi()["paths"]
    assert "parameters" not in app.openapi()["paths"]["/chat"]["post"]


async def test_dependency_budget_refusal(fence: Fence) -> None:
    app = FastAPI()
    fence.install(app)

    # A route-level dependency: the route charges through `fence.charge`.
    @app.post("/chat", dependencies=[Depends(fence.budget(max_usd=0.0001, name="b"))])
    async def chat(request: Request) -> dict[str, int]:
        return {"cost": await fence.charge(request, model="m", usage=USAGE)}

    key, _ = await fence.generate_key()
    async with client_for(app) as client:
        ok = await client.post("/chat", headers=auth(key))
        refused = await client.post("/chat", headers=auth(key))
    assert ok.status_code == 200
    assert_refused(refused, "insufficient_quota")
    assert refused.headers["x-should-retry"] == "false"


# -- plain Python ----------------------------------------------------------------------------


async def test_hold_raises_typed_errors(fence: Fence) -> None:
    guard = fence.guard(rpm=2, max_usd=0.0003, name="batch")
    async with guard.hold("alice") as permit:
        assert permit.charge(model="m", usage=USAGE) == USAGE_COST
        assert permit.charged == USAGE_COST
    async with guard.hold("alice") as permit:
        permit.charge(model="m", usage=USAGE)
    async with guard.hold("bob") as permit:
        permit.charge(model="m", usage={**USAGE, "prompt_tokens": 300})  # over the budget
    with pytest.raises(BudgetExceededError) as budget:
        async with guard.hold("bob"):
            raise AssertionError("never reached")
    assert budget.value.scope == "user"
    assert budget.value.resets_at is None
    with pytest.raises(RateLimitExceededError) as limit:
        async with guard.hold("alice"):
            raise AssertionError("never reached")
    assert (limit.value.kind, limit.value.limit) == ("requests", 2)
    assert await spent(fence, "route:batch:budget:ever:user:alice") == 2 * USAGE_COST


async def test_hold_by_key_stores_only_the_hash(fence: Fence) -> None:
    guard = fence.limit(rpm=1, name="keyed")
    key = "sk-" + "k" * 32
    async with guard.hold(key):
        pass
    with pytest.raises(RateLimitExceededError) as refused:
        async with guard.hold(key):
            pass
    assert "sk-...kkkk" in str(refused.value)
    assert key not in str(refused.value)


async def test_budget_period_resets_with_the_clock(fence: Fence, clock: FakeClock) -> None:
    guard = fence.budget(max_usd=0.0002, duration="1h", name="hourly")
    async with guard.hold("alice") as permit:
        permit.charge(model="m", usage=USAGE)
    with pytest.raises(BudgetExceededError) as refused:
        async with guard.hold("alice"):
            pass
    assert refused.value.resets_at == T0 + 3600
    clock.advance(3600)
    async with guard.hold("alice") as permit:
        permit.charge(model="m", usage=USAGE)


# -- outages and misuse ----------------------------------------------------------------------


async def test_store_outage_fails_closed_for_budgets_open_for_limits(clock: FakeClock) -> None:
    class DownStore(MemoryStore):
        async def admit(self, admission: Admission) -> AdmissionResult:
            raise ConnectionError("down")

    fence = Fence(store=DownStore(), clock=clock.now, master_key="sk-master-key")

    @fence.limit(rpm=1)
    async def limited(request: Request) -> Response:
        return Response("ok")

    @fence.budget(max_usd=1)
    async def budgeted(request: Request) -> Response:
        raise AssertionError("never reached")

    app = Starlette(routes=[Route("/limited", limited), Route("/budgeted", budgeted)])
    async with client_for(app) as client:
        opened = await client.get("/limited", headers=auth("sk-master-key"))
        closed = await client.get("/budgeted", headers=auth("sk-master-key"))
    assert opened.status_code == 200
    assert opened.headers["x-llmfence-degraded"] == "store-unavailable"
    assert_refused(closed, "store_unavailable", 503)
    with pytest.raises(StoreError):
        async with fence.budget(max_usd=1, name="x").hold("alice"):
            pass


async def test_invalid_options_and_calls(fence: Fence) -> None:
    for options in ({}, {"rpm": -1}, {"rpm": 1, "window": 0}, {"rpm": 1, "per": "org"}):
        with pytest.raises(ConfigurationError):
            fence.guard(**options)
    with pytest.raises(ConfigurationError):
        fence.budget(max_usd=-1)
    with pytest.raises(ConfigurationError):
        fence.budget(max_usd=1, duration="fortnightly")

    @fence.limit(rpm=1)
    async def endpoint() -> None:
        pass

    with pytest.raises(ConfigurationError):
        await endpoint()  # called directly, without a request


# -- faults found in review -------------------------------------------------------------------


async def test_stacked_budgets_with_different_periods_are_two_counters(fence: Fence) -> None:
    key, _ = await fence.generate_key(user_id="alice")
    app = FastAPI()

    @app.post("/ep")
    @fence.budget(max_usd=0.001, duration="daily", per="user")
    @fence.budget(max_usd=10, duration="monthly", per="user")
    async def ep(request: Request) -> dict[str, int]:
        return {"cost": await fence.charge(request, model="m", usage=USAGE)}

    async with client_for(app) as client:
        statuses = [(await client.post("/ep", headers=auth(key))).status_code for _ in range(7)]
    name = (
        "tests.test_guards.test_stacked_budgets_with_different_periods_are_two_counters.<locals>.ep"
    )
    daily = await spent(fence, f"route:{name}:budget:1d:user:alice")
    monthly = await spent(fence, f"route:{name}:budget:1mo:user:alice")
    assert statuses == [200] * 5 + [429, 429]  # $0.0002 a call: five fit the daily $0.001
    assert daily == monthly == 5 * USAGE_COST  # each counted once, each on its own counter


async def test_a_guard_used_as_dependency_and_decorator_counts_once(fence: Fence) -> None:
    key, _ = await fence.generate_key(user_id="alice")
    guard = fence.guard(rpm=2, max_usd=1, per="user", name="both")
    app = FastAPI()

    @app.post("/ep", dependencies=[Depends(guard)])
    @guard
    async def ep(request: Request) -> dict[str, int]:
        return {"cost": await fence.charge(request, model="m", usage=USAGE)}

    async with client_for(app) as client:
        first = await client.post("/ep", headers=auth(key))
        second = await client.post("/ep", headers=auth(key))
    assert (first.status_code, second.status_code) == (200, 200)  # rpm=2: one slot a call
    assert await spent(fence, "route:both:budget:ever:user:alice") == 2 * USAGE_COST


async def test_a_call_fastapi_rejects_is_not_charged(fence: Fence) -> None:
    key, _ = await fence.generate_key(user_id="alice")
    guard = fence.guard(rpm=3, max_usd=1, estimate_usd=0.25, per="user", name="strict")
    app = FastAPI()
    fence.add_exception_handlers(app)
    calls = 0

    @app.post("/ep")
    async def ep(doc: Doc, permit: Permit = Depends(guard)) -> dict[str, str]:  # noqa: B008
        nonlocal calls
        calls += 1
        return {"text": doc.text}

    async with client_for(app) as client:
        rejected = [
            await client.post("/ep", json={"wrong": 1}, headers=auth(key)) for _ in range(4)
        ]
        ok = await client.post("/ep", json={"text": "hi"}, headers=auth(key))
    assert [r.status_code for r in rejected] == [422] * 4
    assert ok.status_code == 200  # the rejected calls used no rate slot
    assert calls == 1
    assert await spent(fence, "route:strict:budget:ever:user:alice") == 250_000_000
    assert [r.status for r in await fence.store.spend_records()] == [200]


async def test_a_stream_that_never_starts_still_settles(fence: Fence) -> None:
    key, _ = await fence.generate_key(user_id="alice")

    @fence.budget(max_usd=1, estimate_usd=0.5, per="user", name="s")
    async def ep(request: Request) -> StreamingResponse:
        await fence.charge(request, model="m", usage=USAGE)

        async def body() -> AsyncIterator[bytes]:
            yield b"data: x\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/s", ep)])
    scope: Scope = {
        "type": "http", "method": "GET", "path": "/s", "query_string": b"",
        "headers": [(b"authorization", f"Bearer {key}".encode())],
        "asgi": {"version": "3.0", "spec_version": "2.4"},
    }  # fmt: skip

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        raise OSError("the client is gone")  # ASGI 2.4: sending to a closed connection

    with pytest.raises(Exception):  # noqa: B017, PT011 - Starlette's ClientDisconnect
        await app(scope, receive, send)
    assert await spent(fence, "route:s:budget:ever:user:alice") == USAGE_COST
    [log] = await fence.store.spend_records()
    assert (log.cost, log.status) == (USAGE_COST, 499)


async def test_guarded_spend_also_lands_at_the_callers_levels(fence: Fence) -> None:
    await fence.new_user("alice")
    key, record = await fence.generate_key(user_id="alice")
    app = FastAPI()

    @app.post("/ep")
    @fence.limit(rpm=100, per="user", name="counted")
    async def ep(request: Request) -> dict[str, int]:
        return {"cost": await fence.charge(request, model="m", usage=USAGE)}

    async with client_for(app) as client:
        for _ in range(3):
            assert (await client.post("/ep", headers=auth(key))).status_code == 200
    for level in ("global", "user:alice", f"key:{record.key_hash}"):
        [state] = await fence.store.budgets([BudgetScope(level, "x", "x")], fence.clock())
        assert state.total == 3 * USAGE_COST, level


async def test_end_user_identities_are_bounded(fence: Fence) -> None:
    app = FastAPI()
    fence.add_exception_handlers(app)

    @app.post("/ep")
    @fence.limit(rpm=10, per="end_user", name="eu")
    async def ep(request: Request) -> dict[str, bool]:
        return {"ok": True}

    async with client_for(app) as client:
        nested = await client.post("/ep", content=b"[" * 100_000 + b"]" * 100_000)
        long_name = await client.post("/ep", json={"user": "u" * 300})
        huge = await client.post("/ep", content=b'{"user": "' + b"x" * (2 << 20) + b'"}')
        fine = await client.post("/ep", json={"user": "eve"})
    for response in (nested, long_name, huge):
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "user"
    assert fine.status_code == 200
