"""Budget alerts (`Fence(alert_thresholds=..., on_alert=...)`, `soft_budget`): each crossing is
reported once per level, period and threshold, by two app instances over one store as by one;
a webhook receives it as JSON over real HTTP, retried; nothing is claimed below the thresholds
or for keys without budgets; no alert carries a key or its hash."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmfence import BudgetAlert, Fence, MemoryStore, Store
from llmfence._core.alerts import Alerts
from llmfence.exceptions import ConfigurationError
from llmfence.stores import hash_key, mask_key
from llmfence.testing import FakeClock, mock_llm_app
from tests.conftest import open_store

from ._live import serve
from .middleware.conftest import CHAT, MODEL, T0, auth, chat_body, client_for

pytestmark = pytest.mark.anyio
MASTER = "sk-master-key"
# $1 per output token, nothing for the prompt: a request with max_tokens=1 costs exactly $1,
# reserved and settled alike.
PRICES = {MODEL: {"input": 0, "output": 1_000_000}}
DAY = 86_400.0


class Received:
    """An `on_alert` hook that keeps what it is given."""

    def __init__(self) -> None:
        self.alerts: list[BudgetAlert] = []

    async def __call__(self, alert: BudgetAlert) -> None:
        self.alerts.append(alert)

    def seen(self) -> list[tuple[str, float | str]]:
        return [(alert.level, alert.threshold) for alert in self.alerts]


class CountingStore(MemoryStore):
    """A MemoryStore that counts admissions and claims."""

    def __init__(self) -> None:
        super().__init__()
        self.admits = 0
        self.claims = 0

    async def admit(self, admission: Any) -> Any:
        self.admits += 1
        return await super().admit(admission)

    async def claim(self, name: str, expires: float, now: float) -> bool:
        self.claims += 1
        return await super().claim(name, expires, now)


def fenced(store: Store, clock: FakeClock, hook: Any, **options: Any) -> tuple[Fence, Starlette]:
    app = mock_llm_app()
    fence = Fence(
        store=store, master_key=MASTER, prices=PRICES, clock=clock.now, on_alert=hook, **options
    )
    fence.install(app)
    return fence, app


async def spend(client: httpx.AsyncClient, key: str, dollars: int) -> list[int]:
    """`dollars` requests of $1 each; their statuses."""
    statuses = []
    for _ in range(dollars):
        response = await client.post(CHAT, json=chat_body(max_tokens=1), headers=auth(key))
        statuses.append(response.status_code)
    return statuses


# -- one instance --------------------------------------------------------------------------


async def test_each_threshold_alerts_once_when_the_next_request_sees_it_crossed() -> None:
    clock, hook = FakeClock(T0), Received()
    fence, app = fenced(MemoryStore(), clock, hook)
    plain, _ = await fence.generate_key(max_budget=10, budget_duration="30d")
    async with client_for(app) as client:
        assert await spend(client, plain, 5) == [200] * 5
        await fence.flush()
        assert hook.alerts == []  # $5 spent: the next request sees half the budget gone
        assert await spend(client, plain, 1) == [200]
        await fence.flush()
        assert hook.seen() == [("key", 0.5)]
        assert await spend(client, plain, 6) == [200] * 4 + [429] * 2
        await fence.flush()
    assert hook.seen() == [("key", 0.5), ("key", 0.8), ("key", 1.0)]
    half, _, full = hook.alerts
    assert (half.spent, half.limit, full.spent) == (Decimal(5), Decimal(10), Decimal(10))
    assert half.scope == mask_key(plain)
    assert half.period_end == T0 + 30 * DAY
    assert half.at == T0


async def test_no_alert_and_no_claim_below_every_threshold() -> None:
    store, hook = CountingStore(), Received()
    fence, app = fenced(store, FakeClock(T0), hook, alert_thresholds=(0.5,))
    plain, _ = await fence.generate_key(max_budget=10)
    async with client_for(app) as client:
        assert await spend(client, plain, 5) == [200] * 5  # the 5th sees $4 spent
        await fence.flush()
    assert hook.alerts == []
    assert store.claims == 0


async def test_keys_without_budgets_cost_no_store_call_more() -> None:
    counts = []
    for hook in (None, Received()):
        store = CountingStore()
        fence, app = fenced(store, FakeClock(T0), hook)
        plain, _ = await fence.generate_key(rpm_limit=1000)
        async with client_for(app) as client:
            assert await spend(client, plain, 20) == [200] * 20
            await fence.flush()
        counts.append((store.admits, store.claims))
    assert counts[0] == counts[1] == (20, 0)


async def test_a_level_past_a_threshold_is_claimed_once_per_process_not_per_request() -> None:
    store, hook = CountingStore(), Received()
    fence, app = fenced(store, FakeClock(T0), hook, alert_thresholds=(0.1,))
    plain, _ = await fence.generate_key(max_budget=100)
    async with client_for(app) as client:
        assert await spend(client, plain, 30) == [200] * 30
        await fence.flush()
    assert store.claims == 1
    assert hook.seen() == [("key", 0.1)]


async def test_soft_budgets_of_keys_users_and_teams_alert_without_refusing() -> None:
    hook = Received()
    fence, app = fenced(MemoryStore(), FakeClock(T0), hook, alert_thresholds=())
    await fence.new_team("core", soft_budget=Decimal("2.5"))
    await fence.new_user("alice", team_id="core", soft_budget=4)
    plain, record = await fence.generate_key(user_id="alice", team_id="core", soft_budget=3)
    assert record.soft_budget == 3_000_000_000
    async with client_for(app) as client:
        assert await spend(client, plain, 6) == [200] * 6  # no max_budget: nothing refuses
        await fence.flush()
    assert hook.seen() == [
        ("team", "soft_budget"),
        ("key", "soft_budget"),
        ("user", "soft_budget"),
    ]
    assert [(a.scope, a.limit, a.spent) for a in hook.alerts] == [
        ("core", Decimal("2.5"), Decimal(3)),
        (mask_key(plain), Decimal(3), Decimal(3)),
        ("alice", Decimal(4), Decimal(4)),
    ]


async def test_a_new_period_alerts_again() -> None:
    clock, hook = FakeClock(T0), Received()
    fence, app = fenced(MemoryStore(), clock, hook, alert_thresholds=(0.5,))
    plain, _ = await fence.generate_key(max_budget=4, budget_duration="1d")
    async with client_for(app) as client:
        assert await spend(client, plain, 4) == [200] * 4  # the 3rd sees half of it spent
        clock.advance(DAY)  # the period rolls: spend back to zero
        assert await spend(client, plain, 2) == [200] * 2
        await fence.flush()
        assert hook.seen() == [("key", 0.5)]
        assert await spend(client, plain, 1) == [200]
        await fence.flush()
    assert hook.seen() == [("key", 0.5), ("key", 0.5)]
    assert [a.period_end for a in hook.alerts] == [T0 + DAY, T0 + 2 * DAY]


async def test_the_whole_app_budget_alerts_and_no_alert_holds_a_key_or_its_hash() -> None:
    hook = Received()
    fence, app = fenced(MemoryStore(), FakeClock(T0), hook, max_budget=2, budget_duration="monthly")
    plain, _ = await fence.generate_key(max_budget=4)
    async with client_for(app) as client:
        assert await spend(client, plain, 3) == [200, 200, 429]
        await fence.flush()
    assert ("global", 1.0) in hook.seen()
    assert ("key", 0.5) in hook.seen()
    for alert in hook.alerts:
        text = json.dumps(alert.to_dict()) + repr(alert) + alert.message
        assert plain not in text
        assert hash_key(plain) not in text
        assert plain[-20:] not in text


async def test_alerts_wait_for_the_lifespan_task_or_flush_and_a_failing_hook_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(alert: BudgetAlert) -> None:
        raise RuntimeError("the hook is down")

    fence, app = fenced(MemoryStore(), FakeClock(T0), broken, alert_thresholds=(0.5,))
    plain, _ = await fence.generate_key(max_budget=2)
    async with client_for(app) as client:
        assert await spend(client, plain, 2) == [200, 200]
    # The lifespan's shutdown sent what waited.
    assert "budget alert hook failed" in caplog.text
    assert fence.meter.alerts is not None
    assert fence.meter.alerts.depth == 0


async def test_options_are_checked() -> None:
    for bad in ((0,), (-0.5,), ("half",), "0.5", (True,), (11,)):
        with pytest.raises(ConfigurationError, match="alert_thresholds"):
            Fence(alert_thresholds=bad, on_alert=Received())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="alert_thresholds"):
        Fence(alert_thresholds=(2, -1))  # checked even without a hook
    with pytest.raises(ConfigurationError, match="http"):
        Fence(on_alert="ftp://example.com/hook")
    with pytest.raises(ConfigurationError, match="on_alert"):
        Fence(on_alert=42)  # type: ignore[arg-type]
    fence = Fence()
    assert fence.meter.alerts is None  # no hook: nothing is checked on any request
    with pytest.raises(ConfigurationError, match="soft_budget"):
        await fence.generate_key(soft_budget=-1)
    with pytest.raises(ConfigurationError):
        await fence.new_user("bob", soft_budget=float("nan"))


async def test_the_admin_api_takes_soft_budget_as_it_takes_max_budget() -> None:
    app = Starlette()
    fence = Fence(master_key=MASTER)
    fence.install(app, admin=True)
    master = auth(MASTER)
    async with client_for(app) as client:
        team = await client.post(
            "/team/new", json={"team_id": "t", "soft_budget": 5}, headers=master
        )
        assert team.status_code == 200
        assert team.json()["soft_budget"] == 5.0
        user = await client.post(
            "/user/new", json={"user_id": "u", "soft_budget": 1.5}, headers=master
        )
        assert user.status_code == 200, user.text
        key = await client.post("/key/generate", json={"soft_budget": 0.5}, headers=master)
        assert key.status_code == 200
        assert key.json()["soft_budget"] == 0.5
        updated = await client.post(
            "/key/update", json={"key": key.json()["key"], "soft_budget": 2}, headers=master
        )
        assert updated.json()["info"]["soft_budget"] == 2.0
        info = await client.get("/user/info", params={"user_id": "u"}, headers=master)
        assert info.json()["user_info"]["soft_budget"] == 1.5
        bad = await client.post("/team/update", json={"team_id": "t", "soft_budget": -1},
                                headers=master)  # fmt: skip
        assert bad.status_code == 400
        assert bad.json()["error"]["param"] == "soft_budget"
    assert (await fence.store.get_team("t")).soft_budget == 5_000_000_000  # type: ignore[union-attr]


# -- two instances over one store ------------------------------------------------------------


@pytest.fixture(params=["redis", "redis_cluster", "sqlite"])
async def shared(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Store, Store]]:
    """Two stores over one Redis (or Cluster) or one SQLite file: what two app instances
    open."""
    first = await open_store(request, request.param)
    second = await open_store(request, request.param)
    yield first, second
    await first.aclose()
    await second.aclose()


async def test_two_instances_alert_once_per_crossing(shared: tuple[Store, Store]) -> None:
    clock, hook = FakeClock(T0), Received()
    fence_a, app_a = fenced(shared[0], clock, hook, max_budget=100, budget_duration="1d")
    fence_b, app_b = fenced(shared[1], clock, hook, max_budget=100, budget_duration="1d")
    await fence_a.new_user("alice", soft_budget=6)
    plain, _ = await fence_a.generate_key(user_id="alice", max_budget=10, budget_duration="1d")
    async with client_for(app_a) as a, client_for(app_b) as b:
        for _ in range(6):  # $12 asked of a $10 key, by both instances in turn
            assert (await spend(a, plain, 1)) + (await spend(b, plain, 1)) in (
                [200, 200],
                [429, 429],
            )
        await fence_a.flush()
        await fence_b.flush()
        for alerts in (fence_a.meter.alerts, fence_b.meter.alerts):
            assert alerts is not None
            assert len(alerts._seen) == 4
        expected = [("key", 0.5), ("key", 0.8), ("user", "soft_budget"), ("key", 1.0)]
        assert sorted(hook.seen(), key=str) == sorted(expected, key=str)
        clock.advance(DAY)  # a new period: each crossing alerts once more
        for _ in range(3):
            assert (await spend(a, plain, 1)) + (await spend(b, plain, 1)) == [200, 200]
        await fence_a.flush()
        await fence_b.flush()
    assert len(hook.alerts) == 4 + 1  # the new period's 6th request sees $5 of $10 spent
    assert hook.seen()[-1] == ("key", 0.5)
    assert hook.alerts[-1].period_end == T0 + 2 * DAY


# -- a webhook, over real HTTP ---------------------------------------------------------------


class Receiver:
    """A webhook receiver: answers 503 to the first `failures` posts, then 200."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.posts: list[dict[str, Any]] = []

    async def hook(self, request: Request) -> Response:
        self.posts.append(await request.json())
        if len(self.posts) <= self.failures:
            return Response(status_code=503)
        return JSONResponse({"ok": True})


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    """A real HTTP server on 127.0.0.1 that fails the first post, then takes every one."""
    found = Receiver(failures=1)
    with serve(Starlette(routes=[Route("/hook", found.hook, methods=["POST"])])) as url:
        yield found, url + "/hook"


async def test_a_webhook_gets_each_alert_once_as_json_after_retries(
    receiver: tuple[Receiver, str], tmp_path: Any
) -> None:
    found, url = receiver
    path = tmp_path / "shared.db"
    clock = FakeClock(T0)
    fences = []
    for _ in range(2):  # two instances over one SQLite file, one webhook
        store = open_sqlite(path)
        fences.append(fenced(store, clock, url, alert_thresholds=(0.5, 1.0)))
    (fence_a, app_a), (fence_b, app_b) = fences
    plain, _ = await fence_a.generate_key(max_budget=2, budget_duration="1d")
    async with client_for(app_a) as a, client_for(app_b) as b:
        assert await spend(a, plain, 1) + await spend(b, plain, 1) == [200, 200]
        assert await spend(a, plain, 1) + await spend(b, plain, 1) == [429, 429]
        await fence_a.flush()
        await fence_b.flush()
    # The first post got a 503 and was sent again: two alerts, three posts.
    bodies = list({json.dumps(post, sort_keys=True): post for post in found.posts}.values())
    assert len(found.posts) == 3
    assert len(bodies) == 2
    assert sorted(body["threshold"] for body in bodies) == [0.5, 1.0]
    first = next(body for body in bodies if body["threshold"] == 0.5)
    assert first == {
        "type": "budget_alert",
        "level": "key",
        "scope": mask_key(plain),
        "threshold": 0.5,
        "spent": 1.0,
        "limit": 2.0,
        "period_end": iso(T0 + DAY),
        "at": iso(T0),
        "text": first["text"],
    }
    assert "50% of its budget" in first["text"]
    assert plain not in json.dumps(found.posts)
    assert hash_key(plain) not in json.dumps(found.posts)
    for fence, _ in fences:
        await fence.store.aclose()


def iso(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


def open_sqlite(path: Any) -> Store:
    from llmfence import SQLiteStore

    return SQLiteStore(path)


async def test_a_webhook_gives_up_after_its_attempts_and_on_a_4xx() -> None:
    from llmfence._fence_alerts import Webhook, WebhookError

    posts: list[int] = []

    async def refuse(request: Request) -> Response:
        posts.append(1)
        return Response(status_code=int(request.query_params["status"]))

    alert = BudgetAlert(
        level="team", scope="core", threshold=0.8, spent=Decimal(8), limit=Decimal(10),
        period_end=None, at=T0,
    )  # fmt: skip
    with serve(Starlette(routes=[Route("/", refuse, methods=["POST"])])) as url:
        with pytest.raises(WebhookError, match="3 times"):
            await Webhook(url + "/?status=500", attempts=3, backoff=0.01)(alert)
        assert len(posts) == 3
        with pytest.raises(WebhookError, match="404"):
            await Webhook(url + "/?status=404", attempts=3, backoff=0.01)(alert)
        assert len(posts) == 4
    assert "period" not in alert.message
    assert repr(Webhook(url)) == "Webhook(<url>)"


async def test_a_full_queue_drops_the_oldest_crossing(caplog: pytest.LogCaptureFixture) -> None:
    hook = Received()
    alerts = Alerts(MemoryStore(), hook, (0.5,), capacity=2)
    fence, app = fenced(MemoryStore(), FakeClock(T0), hook, alert_thresholds=(0.5,))
    keys = [(await fence.generate_key(max_budget=2))[0] for _ in range(3)]
    async with client_for(app) as client:
        fence.meter.alerts = alerts  # one no lifespan task sends: its queue holds
        for key in keys:
            assert await spend(client, key, 2) == [200, 200]
        assert alerts.depth == 2
        assert alerts.dropped == 1
        assert "dropped a budget alert" in caplog.text
        await alerts.flush()
    assert [a.scope for a in hook.alerts] == [mask_key(k) for k in keys[1:]]


async def test_a_route_guards_budget_alerts_too() -> None:
    hook = Received()
    fence = Fence(clock=FakeClock(T0).now, on_alert=hook, alert_thresholds=(0.5,))
    guard = fence.guard(max_usd=1.0, estimate_usd=0.25, name="batch")
    for _ in range(3):  # settled with the estimate: the 3rd sees $0.50 of $1 spent
        async with guard.hold("alice"):
            pass
    await fence.flush()
    assert [(a.level, a.scope, a.threshold, a.spent) for a in hook.alerts] == [
        ("user", "alice on route batch", 0.5, Decimal("0.5"))
    ]
