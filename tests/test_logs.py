"""Structured logs: one INFO record per refusal on `llmfence.refusals`, one WARNING record per
degradation on `llmfence.store`, the facts as `llmfence_*` fields, and never a key or a hash."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from llmfence import Fence, MemoryStore, Store
from llmfence._logs import scrub
from llmfence.exceptions import StoreError
from llmfence.metrics import Tally
from llmfence.stores import hash_key

from .middleware.conftest import CHAT, auth, chat_body, client_for
from .test_metrics import DownStore, fenced, scripted_run

pytestmark = pytest.mark.anyio
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def fields(record: logging.LogRecord) -> dict[str, Any]:
    """A record's extra fields, as a JSON formatter would pick them up."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def everything(record: logging.LogRecord) -> str:
    """All a handler could write of a record: its message and every field."""
    return record.getMessage() + json.dumps(fields(record), default=str)


async def test_one_record_per_refusal_with_its_fields_and_no_key(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    fence, app = fenced(store, Tally())  # the run waits on its store-call counts
    with caplog.at_level(logging.INFO, logger="llmfence"):
        async with client_for(app) as client:
            expected, keys = await scripted_run(fence, client)
    refusals = [r for r in caplog.records if r.name == "llmfence.refusals"]
    reasons = [r.llmfence_reason for r in refusals]  # type: ignore[attr-defined]
    assert sorted(reasons) == sorted(
        kind for kind, count in expected.items() if kind != "allowed" for _ in range(count)
    )
    assert all(r.levelno == logging.INFO for r in refusals)
    by_reason = {r.llmfence_reason: fields(r) for r in refusals}  # type: ignore[attr-defined]
    for found in by_reason.values():
        assert found["llmfence_event"] == "refusal"
        assert found["llmfence_request_id"]
        assert found["llmfence_path"] == CHAT
    rpm = by_reason["requests"]
    assert rpm["llmfence_status"] == 429
    assert (rpm["llmfence_level"], rpm["llmfence_limit"], rpm["llmfence_value"]) == ("key", 3, 3)
    assert rpm["llmfence_scope"].startswith("sk-...")  # the masked key, at most
    assert rpm["llmfence_team"] == "research"
    assert rpm["llmfence_reset"].endswith("Z")
    assert rpm["llmfence_retry_after"] > 0
    budget = by_reason["budget_exceeded"]
    assert budget["llmfence_unit"] == "usd"
    assert budget["llmfence_limit"] == pytest.approx(1e-7)
    assert budget["llmfence_reset"] is None  # a key budget without a duration never resets
    assert by_reason["tokens"]["llmfence_limit"] == 100
    assert by_reason["request_too_large"]["llmfence_reset"] is None
    assert by_reason["parallel_requests"]["llmfence_limit"] == 1
    assert by_reason["invalid_api_key"]["llmfence_status"] == 401
    # Nothing llmfence logged names a key or its hash, in the message or any field.
    secrets = [
        *keys,
        *(hash_key(key) for key in keys),
        "sk-" + "x" * 40,
        hash_key("sk-" + "x" * 40),
    ]
    for record in caplog.records:
        text = everything(record)
        assert not any(secret in text for secret in secrets), text


async def test_an_admitted_request_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    fence, app = fenced(MemoryStore(), None)
    key, _ = await fence.generate_key()
    with caplog.at_level(logging.DEBUG, logger="llmfence"):
        async with client_for(app) as client:
            response = await client.post(CHAT, json=chat_body(), headers=auth(key))
    assert response.status_code == 200
    assert caplog.records == []


async def test_a_degradation_is_one_warning_with_its_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fence, app = fenced(DownStore(MemoryStore()), None)
    key, _ = await fence.generate_key()
    with caplog.at_level(logging.INFO, logger="llmfence"):
        async with client_for(app) as client:
            response = await client.post(CHAT, json=chat_body(), headers=auth(key))
    assert response.status_code == 503
    [degraded] = [r for r in caplog.records if r.name == "llmfence.store"]
    assert degraded.levelno == logging.WARNING
    found = fields(degraded)
    assert found["llmfence_event"] == "degraded"
    assert found["llmfence_operation"] == "admit"
    assert "ConnectionError" in found["llmfence_reason"]
    [refused] = [r for r in caplog.records if r.name == "llmfence.refusals"]
    assert fields(refused)["llmfence_reason"] == "store_unavailable"
    assert found["llmfence_request_id"] == fields(refused)["llmfence_request_id"]


def test_store_errors_are_scrubbed_of_keys_and_hashes(caplog: pytest.LogCaptureFixture) -> None:
    key = "sk-" + "a1B2" * 10
    fence = Fence()
    error = StoreError("failed")
    error.__cause__ = RuntimeError(f"WRONGTYPE llmfence:key:{hash_key(key)} for {key}")
    with caplog.at_level(logging.WARNING, logger="llmfence.store"):
        fence.meter.degraded("settle", error, "r1")
    text = everything(caplog.records[0])
    assert key not in text
    assert hash_key(key) not in text
    assert "<redacted>" in text
    assert scrub("sk-...Qw8z") == "sk-...Qw8z"  # a masked key stays readable
