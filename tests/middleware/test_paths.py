"""One path truth: llmfence meters the path an HTTP router or client would reach, and refuses
(400) a path whose readings disagree on a metered route rather than guess; the endpoint comes
from the path, and a body that names another API's prompt field is refused."""

from __future__ import annotations

import json
import posixpath
from typing import Any
from urllib.parse import unquote

import anyio
import pytest
from asgi_lifespan import LifespanManager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message

from llmfence import Fence, MemoryStore, PathRules
from llmfence._request import parse_request
from llmfence.exceptions import InvalidRequestError
from llmfence.middleware._paths import normalize_path

pytestmark = pytest.mark.anyio

CHAT_MESSAGES = [{"role": "user", "content": "hi"}]


# -- the endpoint comes from the path --------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"prompt": "x"}, "prompt"),
        ("/v1/chat/completions", {"messages": CHAT_MESSAGES, "prompt": "x"}, "prompt"),
        ("/v1/chat/completions", {"messages": CHAT_MESSAGES, "input": "x"}, "input"),
        ("/v1/completions", {"prompt": "x", "messages": CHAT_MESSAGES}, "messages"),
        ("/v1/embeddings", {"input": "x", "prompt": "y"}, "prompt"),
        ("/v1/messages", {"messages": CHAT_MESSAGES, "prompt": "x"}, "prompt"),
        ("/v1/responses", {"input": "x", "messages": CHAT_MESSAGES}, "messages"),
        # A custom metered path: the body decides, and must decide one way.
        ("/summarize", {"messages": CHAT_MESSAGES, "prompt": "x"}, "prompt"),
    ],
)
def test_a_body_that_contradicts_the_path_is_refused(
    path: str, body: dict[str, Any], param: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_request(json.dumps({"model": "gpt-4o", **body}).encode(), path)
    assert caught.value.status_code == 400
    assert caught.value.param == param


def test_fields_of_the_paths_own_api_and_nulls_still_parse() -> None:
    chat = {"model": "gpt-4o", "messages": CHAT_MESSAGES, "prompt": None}
    assert parse_request(json.dumps(chat).encode(), "/v1/chat/completions").endpoint == "chat"
    # The Responses API has a `prompt` of its own (a stored prompt's reference).
    responses = {"model": "gpt-4o", "input": "x", "prompt": {"id": "pmpt_1"}}
    assert parse_request(json.dumps(responses).encode(), "/v1/responses").endpoint == "responses"


# -- one path truth, through a real `Fence.install` stack ------------------------------------

MASTER = "sk-master-key"
USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


def forwarder() -> tuple[Starlette, list[str]]:
    """An app that answers every path, as a forwarding gateway would, and notes what reached it."""
    reached: list[str] = []

    async def forward(request: Request) -> JSONResponse:
        await request.body()
        reached.append(request.url.path)
        return JSONResponse({"object": "chat.completion", "choices": [], "usage": USAGE})

    routes = [Route("/{path:path}", forward, methods=["GET", "POST"])]
    return Starlette(routes=routes), reached


async def send_raw(
    app: ASGIApp,
    raw_path: bytes,
    body: dict[str, Any],
    key: str,
    method: str = "POST",
) -> tuple[int, dict[str, Any]]:
    """One request as a server hands it over: `path` decoded from `raw_path` as uvicorn does
    (test clients normalize the path before it is sent, which is the point)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"content-type", b"application/json"),
            (b"authorization", f"Bearer {key}".encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("gateway", 80),
    }
    incoming: list[Message] = [{"type": "http.request", "body": json.dumps(body).encode()}]
    sent: list[Message] = []

    async def receive() -> Message:
        if incoming:
            return incoming.pop(0)
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    status = sent[0]["status"]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(payload) if payload else {}


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": CHAT_MESSAGES, **extra}


AMBIGUOUS = [
    b"/v1/chat/completions/.",
    b"/v1/chat/completions/./",
    b"/v1/chat/completions/x/..",
    b"/v1/chat/x/../completions",
    b"/v1/x/../../v1/chat/completions",
    b"//v1/chat/completions",
    b"/v1//chat/completions",
    b"/v1/chat/completions//",
    b"/v1/chat%2Fcompletions",
    b"/v1/chat%2fcompletions",
    b"/v1/chat/completions/%2E",
    b"/v1/chat/%2e%2e/chat/completions",
    b"/v1/chat%252Fcompletions",
    b"/v1/chat/x%252F..%252Fcompletions",
    b"/v1/chat\\completions",
    b"/v1/embeddings/..",
    b"/v1/messages/./",
]


@pytest.mark.parametrize("raw_path", AMBIGUOUS, ids=lambda p: p.decode())
async def test_an_ambiguous_path_on_a_metered_route_is_refused(raw_path: bytes) -> None:
    app, reached = forwarder()
    store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER)
    fence.install(app)
    key, _ = await fence.generate_key(rpm_limit=1, max_budget=0.002)
    async with LifespanManager(app) as manager:
        # A decoy `prompt` on a path that normalizes to chat: refused before any body is read.
        for body in (chat(), {"model": "gpt-4o-mini", "prompt": "x"}):
            status, error = await send_raw(manager.app, raw_path, body, key)
            assert status == 400
            assert error["error"]["type"] == "invalid_request_error"
            assert error["error"]["code"] == "invalid_request_error"
        assert reached == []
        assert await store.spend_records() == []
        # The refusals took nothing: the key's one request a minute is still there.
        status, _ = await send_raw(manager.app, b"/v1/chat/completions", chat(), key)
        assert status == 200
    assert reached == ["/v1/chat/completions"]
    [record] = await store.spend_records()
    assert record.cost > 0


@pytest.mark.parametrize(
    ("raw_path", "metered"),
    [
        (b"/v1/chat/completions", True),
        (b"/v1/chat/completions/", True),
        (b"/openai/deployments/gpt-4o-mini/chat/completions", True),
        (b"/openai/deployments/gpt%2D4o%2Dmini/chat/completions", True),
        (b"/v1/models", False),
        (b"/v1/models/./gpt-4o", False),
        (b"/v1/files/a%20b", False),
        (b"/.well-known/x", False),
    ],
    ids=lambda p: p.decode() if isinstance(p, bytes) else str(p),
)
async def test_a_plain_path_is_classified_as_before(raw_path: bytes, metered: bool) -> None:
    app, reached = forwarder()
    store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER)
    fence.install(app)
    key, _ = await fence.generate_key()
    async with LifespanManager(app) as manager:
        status, _ = await send_raw(manager.app, raw_path, chat(), key)
    assert status == 200
    assert reached == [unquote(raw_path.decode())]
    assert len(await store.spend_records()) == (1 if metered else 0)


async def test_an_ambiguous_path_needs_no_key_to_be_refused_and_costs_no_lookup() -> None:
    app, reached = forwarder()
    fence = Fence(store=MemoryStore(), master_key=MASTER)
    fence.install(app)
    async with LifespanManager(app) as manager:
        status, _ = await send_raw(manager.app, b"/v1/chat/completions/.", chat(), "sk-nobody")
        assert status == 400
        status, _ = await send_raw(manager.app, b"/v1/chat/completions", chat(), "sk-nobody")
        assert status == 401
    assert reached == []


def test_custom_metered_patterns_see_the_normalized_path() -> None:
    rules = PathRules(metered=["/summarize"], exempt=["/docs*"])
    assert rules.classify("/summarize") == (False, True)
    for path in ("/summarize/.", "/x/../summarize", "//summarize", "/summarize/x/.."):
        with pytest.raises(InvalidRequestError):
            rules.classify(path)
    with pytest.raises(InvalidRequestError):
        rules.classify("/summarize", b"%2Fsummarize")
    # An exempt prefix does not exempt what it leads to.
    with pytest.raises(InvalidRequestError):
        rules.classify("/docs/../admin/key/generate")
    assert rules.classify("/docs/./index.html") == (True, False)
    assert rules.classify("/a/./b") == (False, False)
    assert not rules.is_exempt("/docs/../summarize")
    assert rules.is_metered("/docs/../summarize")


def test_normalize_path() -> None:
    assert normalize_path("/v1/chat/completions/.") == "/v1/chat/completions/"
    assert normalize_path("/v1/chat/x/../completions") == "/v1/chat/completions"
    assert normalize_path("//v1//chat///completions") == "/v1/chat/completions"
    assert normalize_path("/v1/chat%2Fcompletions") == "/v1/chat/completions"
    assert normalize_path("/v1/chat%252Fcompletions") == "/v1/chat/completions"
    assert normalize_path("/../..") == "/"
    assert normalize_path("/v1\\chat\\completions") == "/v1/chat/completions"


def test_the_path_caches_stay_bounded() -> None:
    rules = PathRules()
    for i in range(PathRules._CACHE_SIZE + 100):
        rules.classify(f"/v1/{i}/a%20b", f"/v1/{i}/a%2520b".encode())
        with pytest.raises(InvalidRequestError):
            rules.classify(f"/v1/{i}/../chat/completions")
    assert len(rules._seen) <= PathRules._CACHE_SIZE
    assert len(rules._escaped) <= PathRules._CACHE_SIZE


# -- the classifier, fuzzed ----------------------------------------------------------------

SEGMENTS = [
    "v1", "chat", "completions", "embeddings", "messages", "responses", "models", "health",
    "x", ".", "..", "", "%2E", "%2e%2E", "%2F", "%252F", "%25", "%5C", "\\", "%20", "a.b",
]  # fmt: skip


def oracle(path: str) -> str:
    """An independent normalization: decode until stable, backslashes as slashes, then
    `posixpath.normpath`, keeping a trailing slash."""
    for _ in range(8):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    path = path.replace("\\", "/")
    trailing = path.rsplit("/", 1)[-1] in ("", ".", "..")
    normal = posixpath.normpath("/" + path.lstrip("/")).lstrip("/")
    return "/" + normal + ("/" if trailing and normal not in ("", ".") else "")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=8),
    st.sampled_from([None, ["/summarize", "/v1/x/*"]]),
)
def test_a_path_is_refused_or_classified_as_its_normal_form(
    segments: list[str], metered: list[str] | None
) -> None:
    raw = "/" + "/".join(segments)
    path = unquote(raw)  # what uvicorn puts in scope["path"]
    rules, fresh = PathRules(metered), PathRules(metered)
    try:
        answer: tuple[bool, bool] | None = rules.classify(path, raw.encode())
    except InvalidRequestError as refused:
        assert refused.status_code == 400  # noqa: PT017 (the property: a 400 or an answer)
        answer = None
    if answer is None:
        # Refused only when the path is not its own normal form or a metered route is near.
        assert fresh.is_metered(path) or oracle(raw) != path or "%2F" in raw.upper()
        return
    assert answer == fresh.classify(oracle(raw))


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6))
async def test_through_the_stack_a_path_is_refused_or_metered_as_its_normal_form(
    segments: list[str],
) -> None:
    raw = "/" + "/".join(segments)
    normal_metered = PathRules().is_metered(oracle(raw))
    app, reached = forwarder()
    store = MemoryStore()
    fence = Fence(store=store, master_key=MASTER)
    fence.install(app)
    key, _ = await fence.generate_key()
    async with LifespanManager(app) as manager:
        status, answer = await send_raw(manager.app, raw.encode(), chat(), key)
    records = await store.spend_records()
    if status == 400:
        assert answer["error"]["type"] == "invalid_request_error"
        assert reached == []
        assert records == []
        return
    assert status == 200
    assert len(reached) == 1
    # Never unmetered when the route reached is metered; metered as exactly that route.
    assert len(records) == (1 if normal_metered else 0)
    if normal_metered:
        assert reached == [oracle(raw)]
