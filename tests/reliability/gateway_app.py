"""The gateway under test, built from the environment, for uvicorn in its own process:

    python -m uvicorn --factory tests.reliability.gateway_app:build_app

It is `examples/fastapi_gateway.py`'s gateway (`create_app`), on the store `LLMFENCE_STORE_URL`
names, forwarding to `UPSTREAM_BASE_URL`, with `LLMFENCE_MASTER_KEY` as its master key.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from fastapi_gateway import create_app

from .stores import open_store

__all__ = ["build_app"]


def build_app() -> FastAPI:
    """The gateway, configured by `LLMFENCE_STORE_URL`, `UPSTREAM_BASE_URL`,
    `LLMFENCE_MASTER_KEY` and, if set, `LLMFENCE_STORE_TIMEOUT`."""
    timeout = os.environ.get("LLMFENCE_STORE_TIMEOUT")
    app, _ = create_app(
        upstream_base_url=os.environ["UPSTREAM_BASE_URL"],
        upstream_api_key="sk-upstream-reliability",
        store=open_store(os.environ["LLMFENCE_STORE_URL"]),
        master_key=os.environ["LLMFENCE_MASTER_KEY"],
        fence_options={"store_timeout": float(timeout)} if timeout else None,
    )
    return app
