"""Refusals on Anthropic's API (`/v1/messages`) in Anthropic's error shape, same status and
headers as the OpenAI-shaped ones; the real `anthropic` SDK parses them."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx2
import pytest
from asgi_lifespan import LifespanManager

from llmfence import Fence, MemoryStore
from llmfence.exceptions import (
    BudgetExceededError,
    InvalidRequestError,
    LLMFenceError,
    RateLimitExceededError,
    RequestTooLargeError,
    StoreError,
)
from llmfence.middleware._http import is_anthropic
from llmfence.testing import mock_llm_app

from .conftest import auth, chat_body, client_for

pytestmark = pytest.mark.anyio

MESSAGES = "/v1/messages"
CLAUDE = "claude-3-5-haiku-latest"


def messages_body(content: str = "Hey, how's it going?", **extra: Any) -> dict[str, Any]:
    return {
        "model": CLAUDE,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": content}],
        **extra,
    }


def assert_anthropic(body: dict[str, Any], kind: str) -> None:
    assert set(body) == {"type", "error"}
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == kind
    assert body["error"]["message"]


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (InvalidRequestError("bad"), "invalid_request_error"),
        (RequestTooLargeError("big"), "request_too_large"),
        (RateLimitExceededError("x", kind="requests", scope="key", limit=1, current=1,
                                retry_after=1.0), "rate_limit_error"),
        (BudgetExceededError(1.0, 1.0), "rate_limit_error"),
        (StoreError("down"), "overloaded_error"),
        (LLMFenceError("boom"), "api_error"),
    ],
)  # fmt: skip
def test_to_anthropic_types_by_status(error: LLMFenceError, kind: str) -> None:
    body = error.to_anthropic()
    assert_anthropic(body, kind)
    assert body["error"]["message"] == error.message
    assert error.anthropic_type == kind


@pytest.mark.parametrize(
    ("path", "anthropic_shape"),
    [
        ("/v1/messages", True),
        ("/messages", True),
        ("/anthropic/v1/messages/", True),
        ("/v1/chat/completions", False),
        ("/v1/responses", False),
        ("/v1/messages/count_tokens", False),
    ],
)
def test_the_path_decides_before_the_body_is_parsed(path: str, anthropic_shape: bool) -> None:
    assert is_anthropic(None, path) is anthropic_shape


async def test_no_key_is_an_authentication_error(gateway: Any) -> None:
    _, _, client = gateway()
    async with client as http:
        response = await http.post(MESSAGES, json=messages_body())
        chat = await http.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 401
    assert_anthropic(response.json(), "authentication_error")
    assert chat.status_code == 401
    assert chat.json()["error"]["code"] == "invalid_api_key"  # OpenAI's paths keep theirs


async def test_a_forbidden_model_is_a_permission_error(gateway: Any) -> None:
    fence, _, client = gateway()
    key, _ = await fence.generate_key(models=["gpt-4o"])
    async with client as http:
        response = await http.post(MESSAGES, json=messages_body(), headers={"x-api-key": key})
    assert response.status_code == 403
    assert_anthropic(response.json(), "permission_error")


async def test_a_bad_body_is_an_invalid_request_error(gateway: Any) -> None:
    fence, _, client = gateway()
    key, _ = await fence.generate_key()
    async with client as http:
        response = await http.post(MESSAGES, content=b"{not json", headers=auth(key))
    assert response.status_code == 400
    assert_anthropic(response.json(), "invalid_request_error")
    assert response.headers["x-llmfence-request-id"]


async def test_rate_limit_keeps_status_and_headers(gateway: Any) -> None:
    fence, _, client = gateway()
    key, _ = await fence.generate_key(rpm_limit=1)
    async with client as http:
        first = await http.post(MESSAGES, json=messages_body(), headers=auth(key))
        second = await http.post(MESSAGES, json=messages_body(), headers=auth(key))
        chat = await http.post("/v1/chat/completions", json=chat_body(), headers=auth(key))
    assert first.status_code == 200
    assert second.status_code == chat.status_code == 429
    assert_anthropic(second.json(), "rate_limit_error")
    assert "key" in second.json()["error"]["message"]
    for name in ("retry-after", "retry-after-ms", "x-ratelimit-limit-requests", "ratelimit"):
        assert second.headers[name], name
    same = ("retry-after", "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests")
    assert {h: second.headers[h] for h in same} == {h: chat.headers[h] for h in same}
    assert key not in second.text


async def test_budget_says_do_not_retry(gateway: Any) -> None:
    fence, _, client = gateway()
    key, _ = await fence.generate_key(max_budget=0.000001, budget_duration="1d")
    async with client as http:
        response = await http.post(MESSAGES, json=messages_body(), headers=auth(key))
    assert response.status_code == 429
    assert_anthropic(response.json(), "rate_limit_error")
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["retry-after"]


async def test_an_ambiguous_path_is_refused_in_the_shape_of_its_api(gateway: Any) -> None:
    fence, _, client = gateway()
    key, _ = await fence.generate_key()
    async with client as http:
        # (An escaped slash: httpx sends it as written, and it reads `/v1/messages` decoded.)
        response = await http.post("/v1%2Fmessages", json=messages_body(), headers=auth(key))
    assert response.status_code == 400
    assert_anthropic(response.json(), "invalid_request_error")


async def test_the_anthropic_sdk_parses_the_refusals(gateway: Any) -> None:
    fence, app, _ = gateway()
    key, _ = await fence.generate_key(rpm_limit=1)
    async with LifespanManager(app) as manager:
        transport = httpx2.ASGITransport(app=manager.app)
        async with httpx2.AsyncClient(transport=transport) as http:
            client = anthropic.AsyncAnthropic(
                api_key=key, base_url="http://gateway", http_client=http, max_retries=0
            )
            message = await client.messages.create(
                model=CLAUDE, max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
            )
            assert message.usage.input_tokens > 0
            with pytest.raises(anthropic.RateLimitError) as limited:
                await client.messages.create(
                    model=CLAUDE, max_tokens=64, messages=[{"role": "user", "content": "again"}]
                )
            stranger = anthropic.AsyncAnthropic(
                api_key="sk-nobody-knows-this-key-at-all-000000", base_url="http://gateway",
                http_client=http, max_retries=0,
            )  # fmt: skip
            with pytest.raises(anthropic.AuthenticationError) as unknown:
                await stranger.messages.create(
                    model=CLAUDE, max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
                )
    assert limited.value.status_code == 429
    assert isinstance(limited.value.body, dict)
    assert_anthropic(limited.value.body, "rate_limit_error")
    assert limited.value.response.headers["retry-after"]
    assert unknown.value.status_code == 401
    assert json.loads(unknown.value.response.text)["error"]["type"] == "authentication_error"


async def test_the_anthropic_sdk_does_not_retry_a_budget(gateway: Any) -> None:
    fence, app, _ = gateway()
    key, _ = await fence.generate_key(max_budget=0.000001)
    calls = 0

    async def count(request: httpx2.Request) -> None:
        nonlocal calls
        calls += 1

    async with LifespanManager(app) as manager:
        transport = httpx2.ASGITransport(app=manager.app)
        async with httpx2.AsyncClient(transport=transport, event_hooks={"request": [count]}) as h:
            client = anthropic.AsyncAnthropic(
                api_key=key, base_url="http://gateway", http_client=h, max_retries=3
            )
            with pytest.raises(anthropic.RateLimitError):
                await client.messages.create(
                    model=CLAUDE, max_tokens=64, messages=[{"role": "user", "content": "x"}]
                )
    assert calls == 1  # x-should-retry: false


async def test_a_store_outage_is_overloaded() -> None:
    class Down(MemoryStore):
        async def admit(self, *args: Any, **kwargs: Any) -> Any:
            raise StoreError("down")

    fence = Fence(store=Down(), master_key="sk-master-key", max_budget=1.0)
    app = mock_llm_app()
    fence.install(app)
    key, _ = await fence.generate_key()
    async with client_for(app) as http:
        response = await http.post(MESSAGES, json=messages_body(), headers=auth(key))
    assert response.status_code == 503  # budgets fail closed
    assert_anthropic(response.json(), "overloaded_error")
    assert response.headers["retry-after"] == "1"
