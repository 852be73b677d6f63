from __future__ import annotations

from typing import Any

import anyio
import pytest

from llmfence import Fence, MemoryStore
from llmfence._core.auth import Authenticator, AuthError
from llmfence.exceptions import LLMFenceError, StoreError
from llmfence.testing import FakeClock

from .conftest import CHAT, MODEL, auth, chat_body

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "header",
    [
        lambda k: {"authorization": f"Bearer {k}"},
        lambda k: {"Authorization": f"bearer  {k} "},
        lambda k: {"x-api-key": k},
        lambda k: {"api-key": k},
        lambda k: {"x-goog-api-key": k},
    ],
)
async def test_key_headers(gateway: Any, header: Any) -> None:
    fence, _, client = gateway()
    key, _ = await fence.generate_key()
    async with client as c:
        response = await c.post(CHAT, json=chat_body(), headers=header(key))
    assert response.status_code == 200, response.text


async def test_master_key_passes(gateway: Any) -> None:
    _, _, client = gateway()
    async with client as c:
        response = await c.post(CHAT, json=chat_body(), headers=auth("sk-master-key"))
    assert response.status_code == 200


async def test_missing_unknown_deleted_and_expired_keys(gateway: Any, clock: FakeClock) -> None:
    fence, _app, client = gateway()
    key, record = await fence.generate_key(duration="1h")
    deleted, deleted_record = await fence.generate_key()
    async with client as c:
        cases = {
            "missing": await c.post(CHAT, json=chat_body()),
            "unknown": await c.post(CHAT, json=chat_body(), headers=auth("sk-" + "x" * 40)),
            "not bearer": await c.post(CHAT, json=chat_body(), headers={"authorization": key}),
        }
        assert (await c.post(CHAT, json=chat_body(), headers=auth(deleted))).status_code == 200
        await fence.store.delete_key(deleted_record.key_hash)
        fence.authenticator.invalidate_key(deleted_record.key_hash)
        cases["deleted"] = await c.post(CHAT, json=chat_body(), headers=auth(deleted))
        clock.advance(3601)
        cases["expired"] = await c.post(CHAT, json=chat_body(), headers=auth(key))
    for name, response in cases.items():
        assert response.status_code == 401, name
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key", name
        assert error["type"] == "invalid_request_error"
        for secret in (key, deleted, record.key_hash, deleted_record.key_hash):
            assert secret not in response.text


async def test_key_cache_staleness_is_bounded() -> None:
    # A key deleted through another instance is refused here within the cache TTL.
    from llmfence import Fence
    from llmfence.testing import mock_llm_app

    from .conftest import client_for

    store = MemoryStore()
    clock = FakeClock(1_000.0)
    here = Fence(store=store, master_key="sk-master-key", cache_ttl=5.0, clock=clock.now)
    there = Fence(store=store, master_key="sk-master-key")
    app = mock_llm_app()
    here.install(app)
    key, record = await there.generate_key()
    async with client_for(app) as c:
        assert (await c.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 200
        await store.delete_key(record.key_hash)
        clock.advance(4)  # still cached here
        assert (await c.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 200
        clock.advance(2)
        assert (await c.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 401


async def test_model_allow_lists_and_access_groups(gateway: Any) -> None:
    fence, _app, client = gateway(access_groups={"cheap": ["gpt-3.5-*", "gpt-4o-mini"]})
    await fence.store.set_access_group("beta-models", ["gpt-4o"])
    only_cheap, _ = await fence.generate_key(models=["cheap"])
    only_beta, _ = await fence.generate_key(models=["beta-models"])
    await fence.new_user("u1", models=["gpt-4o-mini"])
    user_limited, _ = await fence.generate_key(user_id="u1", models=["cheap"])
    async with client as c:
        ok = await c.post(CHAT, json=chat_body(), headers=auth(only_cheap))
        forbidden = await c.post(
            CHAT, json={**chat_body(), "model": "gpt-4o"}, headers=auth(only_cheap)
        )
        beta = await c.post(CHAT, json={**chat_body(), "model": "gpt-4o"}, headers=auth(only_beta))
        # The key allows gpt-3.5, but its user only gpt-4o-mini: every level must allow it.
        user_says_no = await c.post(CHAT, json=chat_body(), headers=auth(user_limited))
        user_says_yes = await c.post(
            CHAT, json={**chat_body(), "model": "gpt-4o-mini"}, headers=auth(user_limited)
        )
    assert ok.status_code == 200
    assert beta.status_code == 200, beta.text
    assert user_says_yes.status_code == 200
    for response in (forbidden, user_says_no):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "model_not_allowed"
        assert response.json()["error"]["type"] == "permission_error"
    assert MODEL in user_says_no.text


async def test_other_paths_get_auth_only_and_exempt_paths_nothing(gateway: Any) -> None:
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    fence, app, client = gateway(rpm_limit=1)
    seen: list[str] = []

    async def models(request: Any) -> PlainTextResponse:
        seen.append(request.url.path)
        return PlainTextResponse("models")

    app.router.routes.append(Route("/v1/models", models))
    app.router.routes.append(Route("/health", models))
    key, _ = await fence.generate_key()
    async with client as c:
        assert (await c.get("/v1/models")).status_code == 401
        for _ in range(3):  # not metered: the RPM limit of 1 does not apply
            assert (await c.get("/v1/models", headers=auth(key))).status_code == 200
        assert (await c.get("/health")).status_code == 200
    assert seen == ["/v1/models"] * 3 + ["/health"]


async def test_a_flood_of_unknown_keys_does_not_evict_known_ones() -> None:
    from llmfence._core.auth import Authenticator

    reads = 0
    store = MemoryStore()

    class Counting(MemoryStore):
        async def get_key(self, key_hash: str) -> Any:
            nonlocal reads
            reads += 1
            return await store.get_key(key_hash)

    from llmfence import Fence

    fence = Fence(store=store)
    key, _ = await fence.generate_key()
    authenticator = Authenticator(Counting(), cache_size=10)
    await authenticator.authenticate(key)
    for i in range(100):
        with pytest.raises(Exception, match="Incorrect API key"):
            await authenticator.authenticate(f"sk-unknown-{i:040d}")
    reads_before = reads
    await authenticator.authenticate(key)
    assert reads == reads_before  # still cached
    with pytest.raises(Exception, match="Incorrect API key"):
        await authenticator.authenticate(f"sk-unknown-{99:040d}")
    assert reads == reads_before  # a known-unknown key is not read again either


class SlowLookups:
    """A real store whose key lookups take a moment (a cold pool), counted."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.lookups = 0
        self.fail = 0

    async def get_key(self, key_hash: str) -> Any:
        self.lookups += 1
        await anyio.sleep(0.05)
        if self.fail:
            self.fail -= 1
            raise StoreError("did not answer in time")
        return await self.store.get_key(key_hash)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def test_a_cold_cache_looks_a_key_up_once_for_all_who_ask_at_once() -> None:
    # Issue 11, item 10: 600 requests of one key on a cold start must not send 600 lookups.
    store = MemoryStore()
    fence = Fence(store=store, master_key="sk-master-key")
    key, _ = await fence.generate_key()
    slow = SlowLookups(store)
    authenticator = Authenticator(slow)
    found: list[Any] = []

    async def ask(api_key: str) -> None:
        try:
            found.append(await authenticator.authenticate(api_key))
        except LLMFenceError as error:
            found.append(error)

    async with anyio.create_task_group() as tasks:
        for _ in range(50):
            tasks.start_soon(ask, key)
        for _ in range(20):
            tasks.start_soon(ask, "sk-unknown-key-0123456789abcdef")
    assert slow.lookups == 2
    principals = [p for p in found if not isinstance(p, LLMFenceError)]
    assert len(principals) == 50
    assert all(p is principals[0] for p in principals)
    assert sum(isinstance(p, AuthError) for p in found) == 20


async def test_a_failed_lookup_fails_its_waiters_and_the_next_request_looks_again() -> None:
    store = MemoryStore()
    fence = Fence(store=store, master_key="sk-master-key")
    key, _ = await fence.generate_key()
    slow = SlowLookups(store)
    slow.fail = 1
    authenticator = Authenticator(slow)
    errors: list[BaseException] = []

    async def ask() -> None:
        try:
            await authenticator.authenticate(key)
        except StoreError as error:
            errors.append(error)

    async with anyio.create_task_group() as tasks:
        for _ in range(10):
            tasks.start_soon(ask)
    assert (slow.lookups, len(errors)) == (1, 10)
    assert (await authenticator.authenticate(key)).key is not None
    assert slow.lookups == 2


async def test_a_cancelled_lookup_leaves_its_waiters_to_look_again() -> None:
    store = MemoryStore()
    fence = Fence(store=store, master_key="sk-master-key")
    key, _ = await fence.generate_key()
    slow = SlowLookups(store)
    authenticator = Authenticator(slow)
    found: list[Any] = []

    async def wait() -> None:
        found.append(await authenticator.authenticate(key))

    async with anyio.create_task_group() as outer, anyio.create_task_group() as leader:
        leader.start_soon(authenticator.authenticate, key)
        await anyio.sleep(0.01)  # its lookup is under way
        outer.start_soon(wait)
        await anyio.sleep(0.01)  # the second request waits for it
        leader.cancel_scope.cancel()  # the first client left
    assert len(found) == 1
    assert found[0].key is not None
    assert slow.lookups == 2
