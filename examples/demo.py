"""llmfence in one run: a gateway, its admin API, limits, budgets and spend — offline.

    pip install -e ".[dev]" && python examples/demo.py

It starts the FastAPI gateway of `examples/fastapi_gateway.py` on 127.0.0.1 with the whole
llmfence stack on the embedded memory store (one process; `SQLiteStore("llmfence.db")` for
several workers on one machine, `RedisStore` for several machines), in front of an in-process
mock of the OpenAI API (`llmfence.testing.mock_llm_app`, which reports usage exactly as OpenAI
does). A scripted client then walks through what llmfence does and prints what it sees.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastapi_gateway import create_app

from llmfence import MemoryStore, TokenCounter
from llmfence.testing import mock_llm_app

MASTER = "sk-demo-master-key"
REPLY = (
    "Budgets and rate limits belong in front of every LLM endpoint: they keep a runaway "
    "script, a leaked key or a generous free tier from turning into a surprise invoice."
)
WIDTH = 78


def title(text: str) -> None:
    print(f"\n{'─' * WIDTH}\n {text}\n{'─' * WIDTH}")


def line(label: str, value: object) -> None:
    print(f"  {label:<34} {value}")


def error_of(response: httpx.Response) -> str:
    error = response.json()["error"]
    return f"{response.status_code} {error['code']} ({error['type']}): {error['message']}"


async def until_refused(
    client: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any]
) -> tuple[int, httpx.Response]:
    """Call until a refusal; the number of admitted calls and the refusal."""
    for admitted in range(100):
        response = await client.post("/v1/chat/completions", headers=headers, json=body)
        if response.status_code != 200:
            return admitted, response
    raise AssertionError("never refused")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def chat(content: str, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


async def walkthrough(client: httpx.AsyncClient) -> None:
    admin = {"authorization": f"Bearer {MASTER}"}

    title("1. The admin API: a team, a user with a key, and more keys")
    team = await client.post(
        "/team/new", headers=admin, json={"team_id": "research", "max_budget": 1.0}
    )
    line("POST /team/new", f"{team.status_code} team_id={team.json()['team_id']} budget=$1.00")
    user = (
        await client.post(
            "/user/new",
            headers=admin,
            json={
                "user_id": "ada@example.com",
                "team_id": "research",
                "max_budget": 0.05,
                "budget_duration": "30d",
            },
        )
    ).json()
    line("POST /user/new", f"user_id={user['user_id']} budget=$0.05/30d")
    line("  its key (shown once)", user["key"][:10] + "…")

    async def new_key(**fields: Any) -> str:
        response = await client.post("/key/generate", headers=admin, json=fields)
        key: str = response.json()["key"]
        shown = ", ".join(f"{name}={value}" for name, value in fields.items())
        line("POST /key/generate", f"{response.json()['key_name']}  {shown}")
        return key

    rpm_key = await new_key(user_id="ada@example.com", rpm_limit=3, key_alias="notebook")
    tpm_key = await new_key(tpm_limit=600, key_alias="batch-job")
    small_key = await new_key(max_budget=0.0004, key_alias="trial")
    ada = {"authorization": f"Bearer {user['key']}"}

    title("2. Normal calls, priced exactly from the response's usage")
    for model in ("gpt-4o-mini", "gpt-3.5-turbo-0613"):
        response = await client.post(
            "/v1/chat/completions", headers=ada, json=chat("What do budgets protect?", model)
        )
        usage = response.json()["usage"]
        line(
            f"{model}",
            f"{response.status_code}  {usage['prompt_tokens']} prompt + "
            f"{usage['completion_tokens']} completion tokens",
        )
    logs = (await client.get("/spend/logs", headers=admin)).json()
    for entry in reversed(logs):
        line(f"  spend of {entry['model']}", f"${entry['spend']:.9f} ({entry['provenance']})")

    title("3. Requests per minute: the 4th call in a minute on a 3 RPM key")
    rpm = {"authorization": f"Bearer {rpm_key}"}
    for i in range(1, 5):
        response = await client.post("/v1/chat/completions", headers=rpm, json=chat("hi"))
        remaining = response.headers.get("x-ratelimit-remaining-requests")
        line(f"call {i}", f"{response.status_code}  x-ratelimit-remaining-requests={remaining}")
    line("refusal", error_of(response))
    for header in (
        "retry-after",
        "retry-after-ms",
        "x-ratelimit-reset-requests",
        "ratelimit-policy",
        "ratelimit",
    ):
        line(f"  {header}", response.headers.get(header))

    title("4. Tokens per minute: a 600 TPM key")
    tpm = {"authorization": f"Bearer {tpm_key}"}
    huge = await client.post(
        "/v1/chat/completions", headers=tpm, json=chat("Write an essay.", max_tokens=2000)
    )
    line("max_tokens=2000 (more than the limit)", error_of(huge))
    line("  x-should-retry", huge.headers.get("x-should-retry"))
    # No max_tokens: the 4096-token default does not fit 600 TPM, so the call goes upstream
    # with the max_tokens that does (never refused for a max_tokens it did not send).
    fitted = await client.post("/v1/chat/completions", headers=tpm, json=chat("Hello."))
    clamp = fitted.headers.get("x-llmfence-max-tokens-clamped")
    line("no max_tokens (default 4096)", f"{fitted.status_code}  sent with max_tokens={clamp}")
    # Each call reserves its prompt plus max_tokens, then keeps only what it used.
    for i in range(1, 30):
        response = await client.post(
            "/v1/chat/completions", headers=tpm, json=chat("Summarise this.", max_tokens=250)
        )
        if response.status_code != 200:
            break
        remaining = response.headers.get("x-ratelimit-remaining-tokens")
        if i <= 2:
            line(f"max_tokens=250, call {i}", f"200  x-ratelimit-remaining-tokens={remaining}")
    line(f"max_tokens=250, call {i}", error_of(response))
    line("  retry-after", response.headers.get("retry-after"))

    title("5. A streamed call, counted to the token")
    chunks = 0
    text = ""
    async with client.stream(
        "POST", "/v1/chat/completions", headers=ada, json=chat("Stream me an answer.", stream=True)
    ) as stream:
        async for raw in stream.aiter_lines():
            if raw.startswith("data: ") and raw != "data: [DONE]":
                payload = json.loads(raw[6:])
                assert payload.get("usage") is None, "the client did not ask for usage"
                chunks += 1
                text += payload["choices"][0]["delta"].get("content", "")
    record = (await client.get("/spend/logs", headers=admin, params={"limit": 1})).json()[0]
    counted = TokenCounter().count_text(text, "gpt-4o-mini")
    line("chunks received (no usage chunk)", chunks)
    line("completion tokens in the text", counted)
    line("completion tokens recorded", f"{record['completion_tokens']} ({record['provenance']})")
    assert counted == record["completion_tokens"]

    title("6. A key budget running out ($0.0004)")
    small = {"authorization": f"Bearer {small_key}"}
    admitted, response = await until_refused(client, small, chat("Tell me more.", max_tokens=200))
    line(f"calls 1–{admitted}", "200 (each reserves up to $0.00012, keeps its actual cost)")
    line(f"call {admitted + 1}", error_of(response))
    line("  x-should-retry", response.headers.get("x-should-retry"))
    info = (await client.get("/key/info", headers=admin, params={"key": small_key})).json()
    line("  key spend / budget", f"${info['info']['spend']:.9f} / ${info['info']['max_budget']}")

    title("7. An end user's budget ($0.0003 each, the body's `user` field)")
    body = chat("Again!", max_tokens=100, user="customer-42")
    admitted, response = await until_refused(client, ada, body)
    line(f"customer-42, call {admitted + 1}", error_of(response))
    other = await client.post(
        "/v1/chat/completions", headers=ada, json=chat("Hello", max_tokens=100, user="customer-7")
    )
    line("customer-7, same key", other.status_code)

    title("8. Spend per key and model (GET /spend/logs)")
    totals: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0, 0])
    for entry in (await client.get("/spend/logs", headers=admin)).json():
        row = totals[(entry["api_key"], entry["model"])]
        row[0] += 1
        row[1] += entry["spend"]
        row[2] += entry["total_tokens"]
    print(f"  {'key':<14} {'model':<20} {'calls':>6} {'tokens':>8} {'spend (USD)':>14}")
    for (key, model), (calls, spend, tokens) in sorted(totals.items()):
        print(f"  {key:<14} {model:<20} {calls:>6} {tokens:>8} {spend:>14.9f}")
    overall = (await client.get("/global/spend", headers=admin)).json()
    print(f"  {'all':<14} {'':<20} {'':>6} {'':>8} {overall['spend']:>14.9f}")


async def main() -> None:
    started = time.perf_counter()
    upstream = mock_llm_app(reply=REPLY)
    app, _ = create_app(
        upstream_base_url="http://upstream.invalid/v1",
        upstream_api_key="sk-upstream-demo",
        store=MemoryStore(),
        master_key=MASTER,
        transport=httpx.ASGITransport(app=upstream),
        fence_options={
            "max_budget": 10.0,
            "budget_duration": "30d",
            "max_end_user_budget": 0.0003,
            "default_max_tokens": 1024,
        },
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 (uvicorn offers no event to wait on)
        await asyncio.sleep(0.01)
    print(f"llmfence demo: gateway on http://127.0.0.1:{port}, mock OpenAI upstream in-process")
    print(
        "store: MemoryStore, this process only (SQLiteStore: several workers on one machine; "
        "RedisStore: several machines)"
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            await walkthrough(client)
    finally:
        server.should_exit = True
        await serving
    print(f"\nDone in {time.perf_counter() - started:.1f} s.")


if __name__ == "__main__":
    asyncio.run(main())
