"""The real OpenAI Python SDK against a fenced gateway."""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import pytest
from asgi_lifespan import LifespanManager

pytestmark = pytest.mark.anyio


async def test_openai_sdk_gets_a_completion_then_rate_limit_error(gateway: Any) -> None:
    fence, app, _ = gateway()
    key, _ = await fence.generate_key(rpm_limit=1)
    async with LifespanManager(app) as manager:
        transport = httpx2.ASGITransport(app=manager.app)
        async with httpx2.AsyncClient(transport=transport) as http:
            client = openai.AsyncOpenAI(
                api_key=key, base_url="http://gateway/v1", http_client=http, max_retries=0
            )
            completion = await client.chat.completions.create(
                model="gpt-3.5-turbo-0613",
                messages=[{"role": "user", "content": "Hey, how's it going?"}],
            )
            assert completion.choices[0].message.content
            assert completion.usage is not None
            assert completion.usage.prompt_tokens == 14
            with pytest.raises(openai.RateLimitError) as info:
                await client.chat.completions.create(
                    model="gpt-3.5-turbo-0613",
                    messages=[{"role": "user", "content": "again"}],
                )
    assert info.value.status_code == 429
    assert info.value.code == "rate_limit_exceeded"


async def test_openai_sdk_does_not_retry_budget_refusals(gateway: Any) -> None:
    fence, app, _ = gateway()
    key, _ = await fence.generate_key(max_budget=0.000001)
    calls = 0
    async with LifespanManager(app) as manager:

        async def count(request: httpx2.Request) -> None:
            nonlocal calls
            calls += 1

        transport = httpx2.ASGITransport(app=manager.app)
        async with httpx2.AsyncClient(
            transport=transport, event_hooks={"request": [count]}
        ) as http:
            client = openai.AsyncOpenAI(
                api_key=key, base_url="http://gateway/v1", http_client=http, max_retries=3
            )
            with pytest.raises(openai.RateLimitError) as info:
                await client.chat.completions.create(
                    model="gpt-3.5-turbo-0613", messages=[{"role": "user", "content": "x"}]
                )
    assert info.value.code == "insufficient_quota"
    assert calls == 1  # x-should-retry: false, so the SDK gave up at once
