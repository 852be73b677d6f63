"""Every example runs, offline, and does what it says."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llmfence import MemoryStore
from llmfence.testing import mock_llm_app

from .middleware.conftest import client_for

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

from fastapi_gateway import create_app  # noqa: E402


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=120
    )


def test_demo_runs_offline_in_under_30_seconds() -> None:
    started = time.monotonic()
    result = run_example("demo.py")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 30
    out = result.stdout
    for section in (
        "1. The admin API",
        "3. Requests per minute",
        "4. Tokens per minute",
        "5. A streamed call",
        "6. A key budget",
        "7. An end user",
        "8. Spend",
    ):
        assert section in out
    assert "429 rate_limit_exceeded (requests)" in out
    assert "429 rate_limit_exceeded (tokens)" in out
    assert "429 insufficient_quota (budget_exceeded)" in out
    assert "Budget exceeded for end_user customer-42" in out
    assert "x-should-retry                   false" in out


@pytest.mark.parametrize("name", ["budget_manager.py", "starlette_routes.py"])
def test_other_examples_run(name: str) -> None:
    if not (EXAMPLES / name).exists():
        pytest.fail(f"examples/{name} is missing")
    result = run_example(name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


@pytest.mark.anyio
async def test_gateway_forwards_and_streams_through_the_fence() -> None:
    upstream = mock_llm_app()
    app, _ = create_app(
        upstream_base_url="http://upstream/v1",
        upstream_api_key="sk-upstream",
        store=MemoryStore(),
        master_key="sk-gateway-master",
        transport=httpx.ASGITransport(app=upstream),
    )
    async with client_for(app) as client:
        admin = {"authorization": "Bearer sk-gateway-master"}
        key = (await client.post("/key/generate", headers=admin, json={"rpm_limit": 2})).json()[
            "key"
        ]
        headers = {"authorization": f"Bearer {key}"}
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        ok = await client.post("/v1/chat/completions", headers=headers, json=body)
        assert ok.status_code == 200
        assert ok.json()["usage"]["prompt_tokens"] == 8
        assert ok.headers["x-ratelimit-remaining-requests"] == "1"
        streamed = await client.post(
            "/v1/chat/completions", headers=headers, json={**body, "stream": True}
        )
        assert streamed.status_code == 200
        events = [e for e in streamed.text.split("\n\n") if e.startswith("data: {")]
        assert events
        assert all(json.loads(e[6:])["usage"] is None for e in events)
        refused = await client.post("/v1/chat/completions", headers=headers, json=body)
        assert refused.status_code == 429
        logs = (await client.get("/spend/logs", headers=admin)).json()
    assert [entry["provenance"] for entry in logs] == ["provider-reported"] * 2
    assert logs[0]["completion_tokens"] > 0
