"""A self-documenting app: the admin routes in a FastAPI app's OpenAPI schema, the docs and CORS
preflights reachable without a key, llmfence's refusals described on metered and guarded routes."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from llmfence import Fence, MemoryStore
from llmfence.guards import Permit
from llmfence.testing import mock_llm_app

from .middleware.conftest import CHAT, auth, chat_body, client_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

from fastapi_gateway import create_app  # noqa: E402

pytestmark = pytest.mark.anyio
MASTER = "sk-gateway-master"
ADMIN_OPERATIONS = {
    ("post", "/key/generate"),
    ("get", "/key/info"),
    ("post", "/key/info"),
    ("post", "/key/update"),
    ("post", "/key/delete"),
    ("post", "/user/new"),
    ("get", "/user/info"),
    ("post", "/team/new"),
    ("get", "/team/info"),
    ("get", "/spend/logs"),
    ("post", "/spend/logs"),
    ("get", "/global/spend"),
    ("post", "/get_budget"),
    ("post", "/set_budget"),
}


def gateway() -> tuple[Any, Fence]:
    app, fence = create_app(
        upstream_base_url="http://upstream/v1",
        upstream_api_key="sk-upstream",
        store=MemoryStore(),
        master_key=MASTER,
        transport=httpx.ASGITransport(app=mock_llm_app()),
    )
    return app, fence


async def test_the_gateway_example_documents_the_admin_api_without_a_key() -> None:
    app, _ = gateway()
    async with client_for(app) as client:
        response = await client.get("/openapi.json")  # no key
        docs = await client.get("/docs")
        redoc = await client.get("/redoc")
        redirect = await client.get("/docs/oauth2-redirect")
    assert response.status_code == 200, response.text
    assert docs.status_code == redoc.status_code == redirect.status_code == 200
    assert "swagger" in docs.text.lower()
    schema = response.json()
    operations = {(m, p) for p, item in schema["paths"].items() for m in item}
    assert operations >= ADMIN_OPERATIONS
    generate = schema["paths"]["/key/generate"]["post"]
    body = generate["requestBody"]["content"]["application/json"]["schema"]
    assert {"max_budget", "rpm_limit", "models", "budget_duration"} <= set(body["properties"])
    answer = generate["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"key", "key_name", "spend", "max_budget"} <= set(answer["properties"])
    assert {"401", "403"} <= set(generate["responses"])
    assert generate["tags"] == ["llmfence admin"]
    info = schema["paths"]["/key/info"]["get"]
    assert [p["name"] for p in info["parameters"]] == ["key"]
    assert "requestBody" in schema["paths"]["/key/info"]["post"]
    logs = schema["paths"]["/spend/logs"]["get"]["responses"]["200"]
    assert logs["content"]["application/json"]["schema"]["type"] == "array"
    assert schema["components"]["securitySchemes"]["llmfenceKey"]["scheme"] == "bearer"


async def test_the_gateway_schema_describes_the_refusals_of_its_llm_route() -> None:
    app, _ = gateway()
    async with client_for(app) as client:
        schema = (await client.get("/openapi.json")).json()
    forward = schema["paths"]["/v1/{path}"]["post"]
    assert {"400", "401", "403", "413", "429", "503"} <= set(forward["responses"])
    limited = forward["responses"]["429"]
    assert {"retry-after", "x-should-retry"} <= set(limited["headers"])
    shapes = limited["content"]["application/json"]["schema"]["anyOf"]  # OpenAI or Anthropic
    assert shapes[0]["properties"]["error"]["required"] == ["message", "type", "param", "code"]
    assert shapes[1]["properties"]["type"] == {"const": "error"}
    models = schema["paths"]["/v1/models"]["get"]
    assert "401" in models["responses"]
    assert "429" not in models["responses"]  # not metered: key auth only


async def test_the_admin_routes_still_work_through_the_router() -> None:
    app, _ = gateway()
    async with client_for(app) as client:
        created = await client.post("/key/generate", json={"rpm_limit": 2}, headers=auth(MASTER))
        key = created.json()["key"]
        own = await client.post("/key/info", json={}, headers=auth(key))
        refused = await client.post("/key/generate", json={}, headers=auth(key))
        bad = await client.post("/key/generate", content=b"[", headers=auth(MASTER))
    assert created.status_code == 200
    assert own.json()["info"]["rpm_limit"] == 2
    assert refused.status_code == 403
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"  # not FastAPI's 422


async def test_cors_preflights_pass_without_a_key() -> None:
    app = FastAPI()
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["https://ui.example"],
        allow_methods=["*"],
        allow_headers=["*"],
    )
    fence = Fence(store=MemoryStore(), master_key=MASTER)
    fence.install(app)  # added after CORS: llmfence is outermost

    @app.post("/v1/chat/completions")
    async def chat() -> dict[str, str]:
        return {"ok": "yes"}

    preflight = {
        "origin": "https://ui.example",
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type",
    }
    async with client_for(app) as client:
        allowed = await client.options(CHAT, headers=preflight)
        plain = await client.options(CHAT, headers={"origin": "https://ui.example"})
        anonymous = await client.post(CHAT, json=chat_body())
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == "https://ui.example"
    assert plain.status_code == 401  # not a preflight: auth as ever
    assert anonymous.status_code == 401


async def test_docs_pass_through_on_starlette_too_and_can_be_guarded() -> None:
    async def page(request: Request) -> PlainTextResponse:
        return PlainTextResponse("docs")

    routes = [Route(p, page) for p in ("/docs", "/redoc", "/openapi.json", "/private")]
    app = Starlette(routes=routes)
    Fence(store=MemoryStore(), master_key=MASTER).install(app, admin=True)
    locked = Starlette(routes=routes)
    Fence(store=MemoryStore(), master_key=MASTER, exempt_paths=["/health"]).install(locked)
    async with client_for(app) as client:
        assert (await client.get("/docs")).status_code == 200
        assert (await client.get("/openapi.json")).status_code == 200
        assert (await client.get("/private")).status_code == 401
        assert (await client.get("/key/info", headers=auth(MASTER))).status_code == 400
    async with client_for(locked) as client:
        assert (await client.get("/docs")).status_code == 401  # exempt_paths replaces the list


async def test_guarded_routes_document_their_refusals() -> None:
    app = FastAPI()
    fence = Fence(store=MemoryStore(), master_key=MASTER)

    guard = fence.guard(rpm=5)

    @app.post("/summarize")
    async def summarize(permit: Permit = Depends(guard)) -> dict[str, int]:  # noqa: B008
        return {"ok": 1}

    @app.post("/decorated")
    @fence.limit(rpm=5)
    async def decorated(request: Request) -> dict[str, int]:
        return {"ok": 1}

    @app.post("/declared", responses=fence.openapi_responses(statuses=(429,)))
    async def declared() -> dict[str, int]:
        return {"ok": 1}

    @app.get("/plain")
    async def plain() -> dict[str, int]:
        return {"ok": 1}

    fence.install(app)
    async with client_for(app) as client:
        schema = (await client.get("/openapi.json")).json()
        assert (await client.get("/plain")).status_code == 401
    paths = schema["paths"]
    for path in ("/summarize", "/decorated"):
        assert {"401", "429", "503"} <= set(paths[path]["post"]["responses"]), path
        assert paths[path]["post"]["security"] == [{"llmfenceKey": []}]
    assert {"401", "429"} <= set(paths["/declared"]["post"]["responses"])
    assert "429" not in paths["/plain"]["get"]["responses"]
    assert "/key/generate" not in paths  # admin=False
    assert "openapi.json" not in str(paths)


def test_openapi_responses_shapes() -> None:
    fence = Fence(store=MemoryStore(), master_key=MASTER)
    responses = fence.openapi_responses()
    assert set(responses) == {401, 403, 429, 503}
    assert "anyOf" not in responses[429]["content"]["application/json"]["schema"]
    both = fence.openapi_responses(anthropic=True, statuses=(400,))
    assert len(both[400]["content"]["application/json"]["schema"]["anyOf"]) == 2


def test_starlette_apps_keep_plain_routes_and_fastapi_stays_optional() -> None:
    app = Starlette()
    Fence(store=MemoryStore(), master_key=MASTER).install(app, admin=True)
    assert {type(r).__name__ for r in app.routes} == {"Route"}
    import llmfence._core
    import llmfence.middleware

    for module in (llmfence._core, llmfence.middleware):
        assert "fastapi" not in str(vars(module))
