"""The admin HTTP API: every route, the auth matrix, validation and 404s."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.routing import Mount

from llmfence import Fence, MemoryStore, Store
from llmfence.admin import admin_app
from llmfence.testing import FakeClock, mock_llm_app

from .middleware.conftest import CHAT, auth, chat_body, client_for

pytestmark = pytest.mark.anyio
MASTER = "sk-master-key-123"
T0 = 1_795_000_000.0

ROUTES = [
    ("POST", "/key/generate"),
    ("GET", "/key/info"),
    ("POST", "/key/update"),
    ("POST", "/key/delete"),
    ("POST", "/user/new"),
    ("GET", "/user/info"),
    ("POST", "/team/new"),
    ("GET", "/team/info"),
    ("GET", "/spend/logs"),
    ("GET", "/global/spend"),
    ("POST", "/get_budget"),
    ("POST", "/set_budget"),
]


@pytest.fixture
async def admin(store: Store) -> AsyncIterator[tuple[Fence, httpx.AsyncClient, FakeClock]]:
    clock = FakeClock(T0)
    app = mock_llm_app()
    fence = Fence(
        store=store, master_key=MASTER, max_budget=50.0, budget_duration="30d", clock=clock.now
    )
    fence.install(app, admin=True)
    async with client_for(app) as client:
        client.headers.update(auth(MASTER))
        yield fence, client, clock


async def test_auth_matrix(admin: tuple[Fence, httpx.AsyncClient, FakeClock]) -> None:
    fence, client, _ = admin
    user_key, _ = await fence.generate_key()
    for method, path in ROUTES:
        none = await client.request(method, path, headers={"authorization": ""})
        user = await client.request(method, path, headers=auth(user_key))
        assert none.status_code == 401, path
        assert none.json()["error"]["code"] == "invalid_api_key"
        if path in ("/key/info", "/spend/logs"):  # a key reads its own: test_admin_self_service
            assert user.status_code == 200, path
        else:
            assert user.status_code == 403, path
            assert user.json()["error"]["type"] == "permission_error"
        assert user_key not in user.text
        master = await client.request(method, path, json={} if method == "POST" else None)
        assert master.status_code in (200, 400, 404), (path, master.text)


async def test_key_lifecycle(admin: tuple[Fence, httpx.AsyncClient, FakeClock]) -> None:
    _fence, client, _clock = admin
    created = await client.post(
        "/key/generate",
        json={
            "max_budget": 10,
            "budget_duration": "30d",
            "rpm_limit": 4,
            "tpm_limit": 20_000,
            "max_parallel_requests": 2,
            "models": ["gpt-3.5-turbo-0613"],
            "user_id": "u1",
            "team_id": "core-infra",
            "duration": "1h",
            "metadata": {"env": "test"},
            "key_alias": "ci",
            "create_missing": True,
        },
    )
    assert created.status_code == 200, created.text
    data = created.json()
    key = data["key"]
    assert key.startswith("sk-")
    assert len(key) >= 35
    assert data["expires"] == "2026-11-18T12:06:40Z"  # T0 + 1h
    assert (data["user_id"], data["team_id"], data["max_budget"]) == ("u1", "core-infra", 10.0)
    assert data["rpm_limit"] == 4
    assert data["models"] == ["gpt-3.5-turbo-0613"]

    # The key works, and its info shows spend but never the key again.
    call = await client.post(CHAT, json=chat_body(), headers=auth(key))
    assert call.status_code == 200
    info = await client.get("/key/info", params={"key": key})
    assert info.status_code == 200
    assert key not in info.text
    body = info.json()
    assert body["key"] == data["key_name"]
    assert body["info"]["spend"] > 0
    assert body["info"]["budget_reset_at"] is not None
    assert body["info"]["key_alias"] == "ci"

    updated = await client.post("/key/update", json={"key": key, "rpm_limit": 1, "max_budget": 0.5})
    assert updated.status_code == 200
    assert updated.json()["info"]["rpm_limit"] == 1
    assert updated.json()["info"]["max_budget"] == 0.5
    # The change applies at once on this instance (the key cache was invalidated).
    assert (await client.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 429

    deleted = await client.post("/key/delete", json={"keys": [key]})
    assert deleted.json() == {"deleted_keys": [data["key_name"]]}
    assert (await client.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 401
    assert (await client.get("/key/info", params={"key": key})).status_code == 404
    assert (await client.post("/key/delete", json={"keys": [key]})).status_code == 404


async def test_caller_chosen_key_for_migrations(
    admin: tuple[Fence, httpx.AsyncClient, FakeClock],
) -> None:
    _, client, _ = admin
    chosen = "sk-migrated-from-litellm-0001"
    ok = await client.post("/key/generate", json={"key": chosen})
    assert ok.json()["key"] == chosen
    again = await client.post("/key/generate", json={"key": chosen})
    assert again.status_code == 400
    for bad in ("sk-short", "pk-" + "x" * 30, 123):
        response = await client.post("/key/generate", json={"key": bad})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "key"


async def test_user_and_team_routes(admin: tuple[Fence, httpx.AsyncClient, FakeClock]) -> None:
    _fence, client, _ = admin
    team = await client.post(
        "/team/new", json={"team_id": "core-infra", "max_budget": 10, "rpm_limit": 100}
    )
    assert team.status_code == 200
    assert team.json()["team_id"] == "core-infra"
    user = await client.post(
        "/user/new",
        json={
            "user_id": "krrish@berri.ai",
            "max_parallel_requests": 10,
            "tpm_limit": 20,
            "rpm_limit": 4,
            "team_id": "core-infra",
            "models": ["azure-models"],
            "max_budget": 0,
        },
    )
    assert user.status_code == 200, user.text
    data = user.json()
    assert data["user_id"] == "krrish@berri.ai"
    assert data["key"].startswith("sk-")
    assert data["max_budget"] == 0.0
    assert (await client.post("/user/new", json={"user_id": "krrish@berri.ai"})).status_code == 400
    auto = await client.post("/user/new", json={})
    assert len(auto.json()["user_id"]) == 36  # a generated id, as LiteLLM's
    key_for_user = await client.post("/key/generate", json={"user_id": "krrish@berri.ai"})
    assert key_for_user.status_code == 200

    info = await client.get("/user/info", params={"user_id": "krrish@berri.ai"})
    assert info.status_code == 200
    body = info.json()
    assert body["user_info"]["tpm_limit"] == 20
    assert body["user_info"]["team_id"] == "core-infra"
    assert len(body["keys"]) == 2
    assert data["key"] not in info.text
    team_info = await client.get("/team/info", params={"team_id": "core-infra"})
    assert team_info.json()["team_info"]["rpm_limit"] == 100
    assert (await client.get("/user/info", params={"user_id": "nobody"})).status_code == 404
    assert (await client.get("/team/info", params={"team_id": "nobody"})).status_code == 404
    assert (await client.get("/user/info")).status_code == 404


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/key/generate", {"max_budget": -1}, "max_budget"),
        ("/key/generate", {"max_budget": "10"}, "max_budget"),
        ("/key/generate", {"rpm_limit": 1.5}, "rpm_limit"),
        ("/key/generate", {"tpm_limit": True}, "tpm_limit"),
        ("/key/generate", {"budget_duration": "10 days"}, "budget_duration"),
        ("/key/generate", {"duration": 30}, "duration"),
        ("/key/generate", {"models": "gpt-4o"}, "models"),
        ("/key/generate", {"metadata": []}, "metadata"),
        ("/key/generate", {"user_id": 5}, "user_id"),
        ("/key/generate", {"surprise": 1}, "surprise"),
        ("/user/new", {"max_budget": -5}, "max_budget"),
        ("/team/new", {"rpm_limit": -1}, "rpm_limit"),
        ("/key/delete", {"keys": "sk-x"}, "keys"),
        ("/key/update", {}, "key"),
        ("/set_budget", {"project_name": "p"}, "user_dict"),
    ],
)
async def test_validation_errors(
    admin: tuple[Fence, httpx.AsyncClient, FakeClock],
    path: str,
    body: dict[str, Any],
    param: str,
) -> None:
    _, client, _ = admin
    response = await client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}


async def test_bad_json_body(admin: tuple[Fence, httpx.AsyncClient, FakeClock]) -> None:
    _, client, _ = admin
    for raw in (b"{nope", b"[1]"):
        response = await client.post("/key/generate", content=raw)
        assert response.status_code == 400


async def test_spend_logs_and_global_spend(
    admin: tuple[Fence, httpx.AsyncClient, FakeClock],
) -> None:
    _fence, client, clock = admin
    body = {"user_id": "alice", "team_id": "t1", "create_missing": True}
    key = (await client.post("/key/generate", json=body)).json()["key"]
    body = {"user_id": "bob", "create_missing": True}
    other = (await client.post("/key/generate", json=body)).json()["key"]
    for k in (key, key, other):
        await client.post(CHAT, json=chat_body(user="eve"), headers=auth(k))
        clock.advance(10)
    await client.post(CHAT, json={**chat_body(), "model": "gpt-4o-mini"}, headers=auth(key))
    logs = (await client.get("/spend/logs")).json()
    assert len(logs) == 4
    assert all(key not in str(entry) and other not in str(entry) for entry in logs)
    assert logs[0]["model"] == "gpt-4o-mini"
    assert logs[0]["api_key"].startswith("sk-...")
    by_key = (await client.get("/spend/logs", params={"api_key": key})).json()
    assert len(by_key) == 3
    assert len((await client.get("/spend/logs", params={"user_id": "bob"})).json()) == 1
    assert len((await client.get("/spend/logs", params={"team_id": "t1"})).json()) == 3
    assert len((await client.get("/spend/logs", params={"model": "gpt-4o-mini"})).json()) == 1
    window = await client.get("/spend/logs", params={"start_date": T0 + 5, "end_date": T0 + 25})
    assert len(window.json()) == 2
    day = await client.get(
        "/spend/logs", params={"start_date": "2026-11-18", "end_date": "2026-11-18"}
    )
    assert len(day.json()) == 4
    assert (await client.get("/spend/logs", params={"start_date": "soon"})).status_code == 400

    spend = (await client.get("/global/spend")).json()
    assert spend["max_budget"] == 50.0
    assert spend["spend"] == pytest.approx(sum(entry["spend"] for entry in logs))
    assert spend["spend"] > 0


async def test_budget_manager_hosted_protocol(
    admin: tuple[Fence, httpx.AsyncClient, FakeClock],
) -> None:
    _, client, _ = admin
    missing = await client.post("/get_budget", json={"project_name": "p1"})
    assert missing.json() == {"status": "error"}
    user_dict = {"1234": {"total_budget": 10, "current_cost": 0.5, "model_cost": {"gpt-4": 0.5}}}
    saved = await client.post("/set_budget", json={"project_name": "p1", "user_dict": user_dict})
    assert saved.json() == {"status": "success"}
    loaded = await client.post("/get_budget", json={"project_name": "p1"})
    assert loaded.json() == {"status": "success", "data": user_dict}


async def test_mountable_app_and_fastapi() -> None:
    fence = Fence(store=MemoryStore(), master_key=MASTER)
    app = FastAPI()
    app.mount("/admin", admin_app(fence))
    async with client_for(app) as client:
        response = await client.post("/admin/team/new", json={"team_id": "t"}, headers=auth(MASTER))
    assert response.status_code == 200
    starlette_app = Starlette(routes=[Mount("/ops", app=admin_app(fence))])
    async with client_for(starlette_app) as client:
        info = await client.get("/ops/team/info", params={"team_id": "t"}, headers=auth(MASTER))
    assert info.json()["team_id"] == "t"


async def test_nan_and_infinity_are_refused(
    admin: tuple[Fence, httpx.AsyncClient, FakeClock],
) -> None:
    _, client, _ = admin
    for raw in (b'{"max_budget": Infinity}', b'{"project_name": "p", "user_dict": {"u": NaN}}'):
        path = "/key/generate" if b"max_budget" in raw else "/set_budget"
        response = await client.post(path, content=raw)
        assert response.status_code == 400, raw


async def test_info_reads_the_counters_the_guard_charges(
    admin: tuple[Fence, httpx.AsyncClient, FakeClock],
) -> None:
    _, client, clock = admin
    limits = {"max_budget": 5, "budget_duration": "1d"}
    assert (await client.post("/team/new", json={"team_id": "t1", **limits})).status_code == 200
    assert (await client.post("/user/new", json={"user_id": "u1", **limits})).status_code == 200
    created = await client.post("/key/generate", json={"user_id": "u1", "team_id": "t1", **limits})
    key = created.json()["key"]
    clock.advance(60)
    assert (await client.post(CHAT, json=chat_body(), headers=auth(key))).status_code == 200

    key_info = (await client.get("/key/info", params={"key": key})).json()["info"]
    user_info = (await client.get("/user/info", params={"user_id": "u1"})).json()["user_info"]
    team_info = (await client.get("/team/info", params={"team_id": "t1"})).json()["team_info"]
    spend = (await client.get("/global/spend")).json()
    assert key_info["spend"] > 0
    assert user_info["spend"] == team_info["spend"] == spend["spend"] == key_info["spend"]
    # Periods roll from each record's creation (T0), as the guard rolls them.
    for info in (key_info, user_info, team_info):
        assert info["budget_reset_at"] == "2026-11-19T11:06:40Z"
        assert info["total_spend"] == key_info["spend"]


async def test_key_update_renews_the_expiry_and_checks_fields(
    admin: tuple[Fence, httpx.AsyncClient, FakeClock],
) -> None:
    _, client, clock = admin
    key = (await client.post("/key/generate", json={"duration": "1h"})).json()["key"]
    clock.advance(1800)
    updated = await client.post("/key/update", json={"key": key, "duration": "2h"})
    assert updated.json()["info"]["expires"] == "2026-11-18T13:36:40Z"  # T0 + 30 min + 2 h
    budgets = await client.post(
        "/key/update", json={"key": key, "model_max_budget": {"gpt-4o": 0.25}}
    )
    assert budgets.json()["info"]["model_max_budget"] == {"gpt-4o": 0.25}
    for bad in ({"model_max_budget": {"gpt-4o": -1}}, {"duration": "soon"}, {"rpm_limit": "4"}):
        response = await client.post("/key/update", json={"key": key, **bad})
        assert response.status_code == 400, bad
    huge = await client.post("/key/generate", content=b'{"max_budget": 1e999}')
    assert huge.status_code == 400
    assert huge.json()["error"]["param"] == "max_budget"
