"""The README's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from .middleware.conftest import client_for

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.anyio


def quick_start() -> str:
    section = README.read_text().split("## Quick start (FastAPI)", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    return match.group(1)


async def test_quick_start_protects_the_endpoint() -> None:
    code = quick_start()
    assert len(code.strip().splitlines()) <= 16
    namespace: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), namespace)
    app, fence = namespace["app"], namespace["fence"]
    key, _ = await fence.generate_key()
    body = {"model": "gpt-3.5-turbo-0613", "messages": [{"role": "user", "content": "hi"}]}
    async with client_for(app) as client:
        refused = await client.post("/v1/chat/completions", json=body)
        ok = await client.post(
            "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"}
        )
        created = await client.post(
            "/key/generate", json={}, headers={"authorization": "Bearer sk-master-change-me"}
        )
    assert refused.status_code == 401
    assert ok.status_code == 200
    assert ok.headers["x-ratelimit-limit-requests"] == "60"
    assert created.status_code == 200
    [record] = await fence.store.spend_records()
    assert record.cost == 14 * 1500 + 29 * 2000
