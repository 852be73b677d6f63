"""Per-route limits and budgets on an ordinary Starlette app with one LLM-backed route.

The app is not a gateway: `/summarize` calls an LLM itself (here the OpenAI SDK against an
offline mock of the API) and reports what the call cost with `fence.charge`. The route allows 5
calls a minute and $0.001 a day per user, where the user is whatever the app says it is (here
an `x-user` header; in a real app, its session).

    python examples/starlette_routes.py
"""

from __future__ import annotations

import asyncio

import httpx
import httpx2
import openai
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llmfence import Fence, MemoryStore
from llmfence.testing import mock_llm_app

fence = Fence(store=MemoryStore())
llm = openai.AsyncOpenAI(
    api_key="sk-offline",
    base_url="http://mock-llm/v1",
    http_client=httpx2.AsyncClient(transport=httpx2.ASGITransport(app=mock_llm_app())),
)


def user_of(request: Request) -> str:
    return request.headers.get("x-user", "anonymous")


@fence.limit(rpm=5, per=user_of)
@fence.budget(max_usd=0.001, duration="daily", per=user_of, estimate_usd=0.0003)
async def summarize(request: Request) -> JSONResponse:
    text = (await request.json())["text"]
    reply = await llm.chat.completions.create(
        model="gpt-3.5-turbo-0613",
        messages=[{"role": "user", "content": f"Summarize: {text}"}],
        max_tokens=60,
    )
    cost = await fence.charge(request, reply)  # settles this call's reservation exactly
    return JSONResponse({"summary": reply.choices[0].message.content, "cost_nano_usd": cost})


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/summarize", summarize, methods=["POST"]), Route("/", health)])
fence.add_exception_handlers(app)


async def main() -> None:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        for user, calls in (("alice", 6), ("bob", 5)):
            print(f"{user}:")
            for call in range(1, calls + 1):
                text = "llmfence guards routes. " * (1 if user == "alice" else 25)
                response = await client.post(
                    "/summarize", headers={"x-user": user}, json={"text": text}
                )
                if response.status_code == 200:
                    cost = response.json()["cost_nano_usd"] / 1e9
                    left = response.headers["x-ratelimit-remaining-requests"]
                    print(f"  call {call}: 200, cost ${cost:.6f}, {left} left this minute")
                else:
                    error = response.json()["error"]
                    print(
                        f"  call {call}: {response.status_code} {error['code']}: {error['message']}"
                    )
        health = await client.get("/")
        print(f"unguarded route: {health.status_code}")


if __name__ == "__main__":
    asyncio.run(main())
