"""Hostile and absurd input: bodies, admin fields, budgets and durations give 4xx, never a 500.

Each test goes through a real `Fence.install` stack (and the admin API) on both stores where the
store matters, and checks that a refusal charged nothing and created nothing. The hypothesis
tests throw arbitrary JSON at the request parser and the admin body validator.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmfence import BudgetManager, Fence, MemoryStore, Store
from llmfence._fields import KEY_FIELDS, MAX_METADATA_BYTES
from llmfence._fields_json import json_fields, json_project
from llmfence._request import MAX_DEPTH, LLMRequest, amend, parse_request
from llmfence._tokens import TokenCounter
from llmfence.exceptions import ConfigurationError, InvalidRequestError
from llmfence.testing import FakeClock, mock_llm_app

from .middleware.conftest import CHAT, MODEL, auth, client_for

pytestmark = pytest.mark.anyio
MASTER = "sk-master-key-123"
T0 = 1_795_000_000.0
MESSAGES = "/v1/messages"
Stack = tuple[Fence, httpx.AsyncClient, str]


@pytest.fixture
async def stack(store: Store) -> AsyncIterator[Stack]:
    """A fence with every budget level, a fallback price and one slot per key, and a key."""
    fence = Fence(
        store=store,
        master_key=MASTER,
        max_budget=50.0,
        budget_duration="30d",
        max_end_user_budget=1.0,
        fallback_price={"input": 1.0, "output": 2.0},
        max_parallel_requests=1,
        clock=FakeClock(T0).now,
    )
    app = mock_llm_app()
    fence.install(app, admin=True)
    async with client_for(app) as client:
        key, _ = await fence.generate_key()
        yield fence, client, key


def raw(text: str) -> bytes:
    """A JSON body written by hand: `\\ud800` stays an escape, as a client would send it."""
    return text.encode()


async def post(client: httpx.AsyncClient, key: str, body: bytes, path: str = CHAT) -> Any:
    return await client.post(
        path, content=body, headers={**auth(key), "content-type": "application/json"}
    )


def assert_openai_400(response: httpx.Response, param: str | None = None) -> None:
    """A 400 in the API's own shape: OpenAI's (naming the field), or Anthropic's on its paths
    (`{"type": "error", "error": {"type", "message"}}`, which has no `param`: the message
    names the field)."""
    assert response.status_code == 400, response.text
    body = response.json()
    error = body["error"]
    assert error["type"] == "invalid_request_error"
    if body.get("type") == "error":  # Anthropic's shape
        assert set(error) == {"type", "message"}
        if param is not None:
            assert param.rsplit(".", 1)[-1] in error["message"]
    elif param is not None:
        assert error["param"] == param


async def assert_nothing_charged(fence: Fence) -> None:
    totals = await fence.store.spend_totals("global")
    assert (totals.cost, totals.requests) == (0, 0)
    assert fence.meter.degraded_count == 0  # a client cannot raise store-outage alerts


# -- item 4: lone surrogates and deep nesting --------------------------------------------------


async def test_a_lone_surrogate_in_streamed_content_is_forwarded_escaped(stack: Stack) -> None:
    fence, client, key = stack
    body = raw(
        f'{{"model": "{MODEL}", "stream": true, "messages": [{{"role": "user", '
        '"content": "hi \\ud800 there"}]}'
    )
    response = await post(client, key, body)
    assert response.status_code == 200, response.text
    # The stream was amended to ask for usage, so the request was counted, and charged.
    assert (await fence.store.spend_totals("global")).requests == 1


def test_amend_escapes_lone_surrogates_again() -> None:
    request = parse_request(
        raw(f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "\\udc00"}}]}}'),
        CHAT,
    )
    _, body = amend(request, stream_options={"include_usage": True})
    assert b"\\udc00" in body
    assert json.loads(body)["messages"][0]["content"] == "\udc00"


@pytest.mark.parametrize(
    ("field", "path", "param"),
    [
        ('"user": "\\ud800"', CHAT, "user"),
        ('"model": "gpt-4o-\\ud800"', CHAT, "model"),
        ('"metadata": {"user_id": "a\\udfff"}', MESSAGES, "metadata.user_id"),
    ],
)
async def test_a_lone_surrogate_in_an_identifier_is_a_400(
    stack: Stack, field: str, path: str, param: str
) -> None:
    fence, client, key = stack
    model = "" if "model" in field else f'"model": "{MODEL}", '
    body = raw(
        f'{{{model}{field}, "max_tokens": 10, "messages": [{{"role": "user", "content": "x"}}]}}'
    )
    response = await post(client, key, body, path)
    assert_openai_400(response, param)
    await assert_nothing_charged(fence)
    # Nothing was reserved or leased: the key's one slot is free for the next request.
    follow = await client.post(
        CHAT,
        json={"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]},
        headers=auth(key),
    )
    assert follow.status_code == 200, follow.text


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 500, 940, 960, 990, 5000])
async def test_a_deeply_nested_body_is_a_400(stack: Stack, depth: int) -> None:
    fence, client, key = stack
    nested = "[" * depth + "]" * depth
    body = raw(
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": '
        f'[{{"type": "text", "text": "x", "extra": {nested}}}]}}]}}'
    )
    response = await post(client, key, body)
    assert_openai_400(response)
    assert "levels deep" in response.json()["error"]["message"]
    await assert_nothing_charged(fence)


def test_nesting_up_to_the_limit_is_counted() -> None:
    depth = MAX_DEPTH - 6  # the body, messages, a message, content, a part: the rest is ours
    nested = "[" * depth + "]" * depth
    body = raw(
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": '
        f'[{{"type": "text", "text": "x", "extra": {nested}}}]}}]}}'
    )
    assert TokenCounter().count(parse_request(body, CHAT)) > 0


# -- item 6: absurd budgets and durations from the admin API ------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/key/generate", '{"max_budget": 1e309}', "max_budget"),
        ("/key/generate", '{"max_budget": 1e300}', "max_budget"),
        ("/key/generate", '{"duration": "999999y"}', "duration"),
        ("/key/generate", '{"duration": "999999w"}', "duration"),
        ("/key/generate", '{"budget_duration": "999999y"}', "budget_duration"),
        ("/key/generate", '{"budget_duration": "999999w"}', "budget_duration"),
        ("/key/generate", '{"model_max_budget": {"m": 1e309}}', "model_max_budget"),
        ("/key/generate", '{"key_alias": "' + "a" * 257 + '"}', "key_alias"),
        ("/key/generate", '{"key_alias": "\\ud800"}', "key_alias"),
        ("/key/generate", '{"user_id": "u\\ud800"}', "user_id"),
        ("/key/generate", '{"models": ["' + "m" * 257 + '"]}', "models"),
        ("/key/generate", '{"model_rpm_limit": {"' + "m" * 257 + '": 5}}', "model_rpm_limit"),
        ("/key/generate", '{"metadata": {"note": "\\ud800"}}', "metadata"),
        (
            "/key/generate",
            '{"metadata": {"note": "' + "x" * MAX_METADATA_BYTES + '"}}',
            "metadata",
        ),
        ("/key/generate", '{"metadata": ' + "[" * 500 + "]" * 500 + "}", None),
        ("/user/new", '{"user_id": "u1", "max_budget": 1e309}', "max_budget"),
        ("/user/new", '{"user_id": "u1", "duration": "999999y"}', "duration"),
        ("/team/new", '{"team_id": "t1", "budget_duration": "999999w"}', "budget_duration"),
    ],
)
async def test_absurd_admin_input_is_a_400_and_creates_nothing(
    stack: Stack, route: str, body: str, param: str | None
) -> None:
    fence, client, _ = stack
    before = await fence.store.list_keys()
    response = await client.post(
        route, content=body.encode(), headers={**auth(MASTER), "content-type": "application/json"}
    )
    assert_openai_400(response, param)
    assert await fence.store.list_keys() == before
    assert await fence.store.get_user("u1") is None
    assert await fence.store.get_team("t1") is None


async def test_set_budget_refuses_infinite_amounts_and_get_budget_still_answers(
    stack: Stack,
) -> None:
    _, client, _ = stack
    headers = {**auth(MASTER), "content-type": "application/json"}
    for user_dict in (
        '{"u": {"total_budget": 1e309}}',
        '{"u": {"total_budget": 10, "current_cost": 1e309}}',
        '{"u": {"total_budget": 1e300}}',
        '{"u": {"model_cost": {"m": 1e309}}}',
        '{"u\\ud800": {"total_budget": 1}}',
        '{"u": 5}',
    ):
        body = f'{{"project_name": "p", "user_dict": {user_dict}}}'.encode()
        response = await client.post("/set_budget", content=body, headers=headers)
        assert_openai_400(response, "user_dict")
    got = await client.post("/get_budget", json={"project_name": "p"}, headers=headers)
    assert got.status_code == 200
    assert got.json() == {"status": "error"}  # nothing was stored
    ok = {"project_name": "p", "user_dict": {"u": {"total_budget": 10, "current_cost": 1.5}}}
    assert (await client.post("/set_budget", json=ok, headers=headers)).status_code == 200
    got = await client.post("/get_budget", json={"project_name": "p"}, headers=headers)
    assert got.json()["data"] == ok["user_dict"]


async def test_python_doors_refuse_absurd_budgets_and_durations(stack: Stack) -> None:
    fence, _, _ = stack
    before = await fence.store.list_keys()
    for kwargs in (
        {"max_budget": float("inf")},
        {"max_budget": 1e300},
        {"duration": "999999y"},
        {"budget_duration": "999999w"},
        {"metadata": {"blob": "x" * MAX_METADATA_BYTES}},
        {"models": ["m" * 300]},
    ):
        with pytest.raises(ConfigurationError):
            await fence.generate_key(**kwargs)
    assert await fence.store.list_keys() == before


# -- hypothesis: the parser and the admin validator ---------------------------------------------

_TEXT = st.text(max_size=12) | st.sampled_from(
    ["\ud800", "a\udfff", "gpt-4o", MODEL, "x" * 300, ""]
)
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False)
    | st.sampled_from([1e308, -1e308, 10**400])
    | _TEXT
)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=12,
)
_FIELDS = st.sampled_from(
    [
        "model", "messages", "prompt", "input", "user", "metadata", "max_tokens", "n",
        "stream", "stream_options", "tools", "system", "instructions", "max_output_tokens",
    ]
)  # fmt: skip


def _encode(value: Any) -> bytes:
    # `allow_nan`: what hypothesis made an infinite float becomes a JSON `Infinity` (refused).
    return json.dumps(value, ensure_ascii=True).encode()


def _outcome(function: Any, *args: Any) -> Any:
    """What `function` returns, or the `InvalidRequestError` it raises (any other escapes)."""
    try:
        return function(*args)
    except InvalidRequestError as error:
        return error


def _deep(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


_PATHS = {
    CHAT: "messages",
    MESSAGES: "messages",
    "/v1/responses": "input",
    "/v1/completions": "prompt",
    "/v1/embeddings": "input",
}


def _well_formed(path: str, text: str) -> dict[str, Any]:
    """A valid body for `path` whose prompt is `text`."""
    field = _PATHS[path]
    if field == "messages":
        return {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    return {"model": MODEL, field: text}


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(sorted(_PATHS)),
    text=_TEXT,
    overrides=st.dictionaries(_FIELDS, _JSON, max_size=3),
    depth=st.sampled_from([0, 0, 0, 50, MAX_DEPTH, 900]),
)
def test_parse_request_either_refuses_or_gives_a_usable_request(
    path: str, text: str, overrides: dict[str, Any], depth: int
) -> None:
    body = {**_well_formed(path, text), **overrides}
    if depth:
        body["tools"] = [{"type": "function", "deep": _deep(depth)}]
    data = _encode(body)
    request = _outcome(parse_request, data, path)
    if isinstance(request, InvalidRequestError):
        assert request.message
        return
    assert isinstance(request, LLMRequest)
    # Every later stage works on what the parser accepted: counting, amending, identifiers.
    assert TokenCounter().count(request) >= 0
    _, amended = amend(request, max_tokens=5, stream_options={"include_usage": True})
    assert parse_request(amended, path).model == request.model
    request.model.encode()
    if request.end_user is not None:
        request.end_user.encode()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.dictionaries(st.sampled_from(KEY_FIELDS), _JSON, max_size=4))
def test_admin_fields_either_refuse_or_give_storable_values(body: dict[str, Any]) -> None:
    fields = _outcome(json_fields, body, KEY_FIELDS)
    if isinstance(fields, InvalidRequestError):
        assert fields.param is not None
        return
    # What passed is storable and can be sent back as JSON: valid Unicode, finite numbers.
    json.dumps(fields, ensure_ascii=False, allow_nan=False, default=list).encode()


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(user_dict=_JSON)
def test_set_budget_bodies_either_refuse_or_give_a_document_json_can_send(user_dict: Any) -> None:
    document = _outcome(json_project, user_dict)
    if isinstance(document, InvalidRequestError):
        assert document.param == "user_dict"
        return
    json.dumps(document, ensure_ascii=False, allow_nan=False).encode()


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/key/delete", '{"keys": ["sk-\\ud800"]}', "key"),
        ("/key/update", '{"key": "sk-\\ud800", "rpm_limit": 3}', "key"),
        ("/get_budget", '{"project_name": "p\\ud800"}', "project_name"),
        ("/set_budget", '{"project_name": "p\\ud800", "user_dict": {}}', "project_name"),
        ("/set_budget", '{"project_name": "' + "p" * 300 + '", "user_dict": {}}', "project_name"),
    ],
)
async def test_admin_lookups_refuse_ids_the_store_cannot_name(
    stack: Stack, route: str, body: str, param: str
) -> None:
    _, client, _ = stack
    headers = {**auth(MASTER), "content-type": "application/json"}
    response = await client.post(route, content=body.encode(), headers=headers)
    assert_openai_400(response, param)


@pytest.mark.parametrize(
    "query",
    [
        "/key/info?key=%ED%A0%80",
        "/user/info?user_id=%ED%A0%80",
        "/spend/logs?api_key=%ED%A0%80",
        "/spend/logs?start_date=1e309",
        "/spend/logs?limit=99999999999999999999",
        "/spend/logs?start_date=nan",
        "/spend/logs?end_date=-inf",
    ],
)
async def test_admin_queries_with_absurd_values_are_no_500(stack: Stack, query: str) -> None:
    _, client, _ = stack
    response = await client.get(query, headers=auth(MASTER))
    assert response.status_code in (200, 400, 404), response.text


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from(sorted(_PATHS)),
    text=_TEXT,
    stream=st.booleans(),
    overrides=st.dictionaries(_FIELDS, _JSON, max_size=3),
)
def test_any_body_through_the_stack_is_served_or_refused_uncharged(
    path: str, text: str, stream: bool, overrides: dict[str, Any]
) -> None:
    body = _encode({**_well_formed(path, text), "stream": stream, **overrides})

    async def run() -> None:
        fence = Fence(
            store=MemoryStore(),
            master_key=MASTER,
            max_budget=50.0,
            max_end_user_budget=1.0,
            fallback_price={"input": 1.0, "output": 2.0},
        )
        app = mock_llm_app()
        fence.install(app)
        key, _ = await fence.generate_key()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            response = await post(client, key, body, path)
        totals = await fence.store.spend_totals("global")
        if response.status_code == 200:
            return
        assert 400 <= response.status_code < 500, response.text
        reply = response.json()
        shape = (
            {"message", "type"}
            if path.endswith("/messages")
            else {"message", "type", "param", "code"}
        )
        assert set(reply["error"]) >= shape
        assert (totals.cost, totals.requests) == (0, 0)

    anyio.run(run)


@pytest.mark.parametrize("backend", ["local", "memory-store"])
@pytest.mark.parametrize(
    ("budget", "user"), [(float("inf"), "u"), (1e300, "u"), (-1, "u"), (1.0, "u\ud800"), (1.0, "")]
)
def test_budget_manager_refuses_absurd_budgets_and_user_ids(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, budget: float, user: str
) -> None:
    monkeypatch.chdir(tmp_path)  # the local backend's user_cost.json lands here
    store = {"store": MemoryStore()} if backend == "memory-store" else {}
    manager = BudgetManager("hostile", **store)  # type: ignore[arg-type]
    try:
        with pytest.raises(ConfigurationError):
            manager.create_budget(budget, user)
        assert manager.get_users() == []
    finally:
        manager.close()
