"""Self-service: a key reads its own info and spend (never anyone else's), and every route that
takes a key also takes it in a POST body, so no key need travel in a URL."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from llmfence import Fence, Store
from llmfence.testing import FakeClock, mock_llm_app

from .middleware.conftest import CHAT, auth, chat_body, client_for

pytestmark = pytest.mark.anyio
MASTER = "sk-master-key-123"
T0 = 1_795_000_000.0

Admin = tuple[Fence, httpx.AsyncClient]


@pytest.fixture
async def admin(store: Store) -> AsyncIterator[Admin]:
    clock = FakeClock(T0)
    app = mock_llm_app()
    fence = Fence(store=store, master_key=MASTER, clock=clock.now)
    fence.install(app, admin=True)
    async with client_for(app) as client:
        yield fence, client


def assert_forbidden(response: httpx.Response, *keys: str) -> None:
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "permission_error"
    for key in keys:
        assert key not in response.text


async def test_a_key_reads_its_own_info_without_naming_itself(admin: Admin) -> None:
    fence, client = admin
    key, record = await fence.generate_key(max_budget=2.0, key_alias="mine")
    for response in (
        await client.get("/key/info", headers=auth(key)),
        await client.get("/key/info", params={"key": key}, headers=auth(key)),
        await client.post("/key/info", json={}, headers=auth(key)),
        await client.post("/key/info", json={"key": key}, headers=auth(key)),
        await client.post("/key/info", headers={"x-api-key": key}),
    ):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["key"] == record.key_masked
        assert body["info"]["key_alias"] == "mine"
        assert body["info"]["max_budget"] == 2.0
        assert key not in response.text  # the masked form only


async def test_a_key_never_reads_another_keys_info(admin: Admin) -> None:
    fence, client = admin
    mine, _ = await fence.generate_key()
    theirs, _ = await fence.generate_key()
    assert_forbidden(
        await client.get("/key/info", params={"key": theirs}, headers=auth(mine)), mine, theirs
    )
    assert_forbidden(
        await client.post("/key/info", json={"key": theirs}, headers=auth(mine)), mine, theirs
    )
    unknown = "sk-" + "x" * 40
    assert_forbidden(await client.post("/key/info", json={"key": unknown}, headers=auth(mine)))


async def test_an_unknown_expired_or_deleted_key_reads_nothing(admin: Admin) -> None:
    fence, client = admin
    response = await client.get("/key/info", headers=auth("sk-" + "y" * 40))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    gone, _ = await fence.generate_key()
    assert (
        await client.post("/key/delete", json={"keys": [gone]}, headers=auth(MASTER))
    ).is_success
    assert (await client.get("/key/info", headers=auth(gone))).status_code == 401
    assert (await client.get("/key/info")).status_code == 401


async def test_the_master_key_still_reads_any_key_by_get_or_post(admin: Admin) -> None:
    fence, client = admin
    key, record = await fence.generate_key()
    by_get = await client.get("/key/info", params={"key": key}, headers=auth(MASTER))
    by_post = await client.post("/key/info", json={"key": key}, headers=auth(MASTER))
    assert by_get.json() == by_post.json()
    assert by_post.json()["key"] == record.key_masked
    missing = await client.post("/key/info", json={}, headers=auth(MASTER))
    assert missing.status_code == 400  # the master key has no info of its own


async def test_a_key_reads_its_own_spend_only(admin: Admin) -> None:
    fence, client = admin
    for user in ("alice", "bob"):
        await fence.new_user(user)
    mine, record = await fence.generate_key(user_id="alice")
    theirs, _ = await fence.generate_key(user_id="bob")
    for key in (mine, theirs):
        assert (await client.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 200
    for response in (
        await client.get("/spend/logs", headers=auth(mine)),
        await client.post("/spend/logs", json={}, headers=auth(mine)),
        await client.post("/spend/logs", json={"api_key": mine}, headers=auth(mine)),
        await client.post("/spend/logs", json={"user_id": "alice"}, headers=auth(mine)),
    ):
        assert response.status_code == 200, response.text
        logs = response.json()
        assert len(logs) == 1
        assert logs[0]["api_key"] == record.key_masked
        assert logs[0]["user"] == "alice"
    everyone = await client.post("/spend/logs", json={}, headers=auth(MASTER))
    assert len(everyone.json()) == 2
    by_key = await client.post("/spend/logs", json={"api_key": theirs}, headers=auth(MASTER))
    assert [log["user"] for log in by_key.json()] == ["bob"]


@pytest.mark.parametrize(
    "body",
    [
        {"api_key": "theirs"},
        {"key": "theirs"},
        {"user_id": "bob"},
        {"team_id": "team-b"},
    ],
)
async def test_a_key_never_reads_anyone_elses_spend(admin: Admin, body: dict[str, Any]) -> None:
    fence, client = admin
    for user in ("alice", "bob"):
        await fence.new_user(user)
    mine, _ = await fence.generate_key(user_id="alice")
    theirs, _ = await fence.generate_key(user_id="bob")
    body = {name: theirs if value == "theirs" else value for name, value in body.items()}
    assert_forbidden(await client.post("/spend/logs", json=body, headers=auth(mine)), mine, theirs)
    assert_forbidden(await client.get("/spend/logs", params=body, headers=auth(mine)), mine, theirs)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/key/generate"),
        ("POST", "/key/update"),
        ("POST", "/key/delete"),
        ("POST", "/user/new"),
        ("GET", "/user/info"),
        ("POST", "/team/new"),
        ("GET", "/global/spend"),
        ("POST", "/set_budget"),
    ],
)
async def test_master_only_routes_stay_master_only(admin: Admin, method: str, path: str) -> None:
    fence, client = admin
    key, _ = await fence.generate_key()
    response = await client.request(method, path, headers=auth(key))
    assert_forbidden(response, key)


async def test_keys_stay_out_of_logs(admin: Admin, caplog: pytest.LogCaptureFixture) -> None:
    fence, client = admin
    mine, _ = await fence.generate_key()
    theirs, _ = await fence.generate_key()
    with caplog.at_level(logging.DEBUG):
        await client.post("/key/info", json={"key": theirs}, headers=auth(mine))
        await client.post("/spend/logs", json={"api_key": theirs}, headers=auth(mine))
        await client.post("/key/info", json={"key": 5}, headers=auth(mine))
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert mine not in text
    assert theirs not in text
