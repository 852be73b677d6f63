"""Structured logs: one record per refusal and per degradation, fields as `extra=`.

Every field is a `LogRecord` attribute named `llmfence_*` (`llmfence_reason`, `llmfence_level`,
`llmfence_scope`, `llmfence_limit`, `llmfence_value`, `llmfence_reset`, `llmfence_request_id`,
…), so a JSON formatter (python-json-logger, structlog's `ProcessorFormatter`, …) writes them
as keys while a plain formatter prints only the one-line message. Refusals go to
`llmfence.refusals` at INFO, store degradations to `llmfence.store` at WARNING; the outbox logs
to `llmfence.outbox`. No record ever carries an API key or its hash: callers pass the masked
key at most, and store errors are scrubbed of anything that looks like a key or a hash before
they are logged.

Nothing here runs for an admitted request: a log call costs a few microseconds, paid only by
requests that are refused or meet a store outage.
"""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "REFUSALS",
    "STORE",
    "log_degraded",
    "log_refusal",
    "scrub",
]

REFUSALS = logging.getLogger("llmfence.refusals")
STORE = logging.getLogger("llmfence.store")

# API keys (`sk-` + url-safe characters) and sha256 hex digests (key hashes, in store key names).
_SECRET = re.compile(r"sk-[A-Za-z0-9_\-]{8,}|\b[0-9a-fA-F]{64}\b")


def scrub(text: str) -> str:
    """`text` with anything shaped like an API key or a key hash replaced by `<redacted>`."""
    return _SECRET.sub("<redacted>", text)


def iso(timestamp: float | None) -> str | None:
    """A Unix time as an ISO 8601 UTC string, or None."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def log_refusal(reason: str, status: int, message: str, fields: dict[str, Any]) -> None:
    """One INFO record on `llmfence.refusals` for a refused request.

    Args:
        reason: The refusal's kind (`"tokens"`, `"budget_exceeded"`, `"invalid_api_key"`…).
        status: The HTTP status the client got.
        message: The error message the client got (never holds a key or a hash).
        fields: More `llmfence_*` fields (level, scope, limit, value, reset, request id…).
    """
    if not REFUSALS.isEnabledFor(logging.INFO):
        return
    extra = {"llmfence_event": "refusal", "llmfence_reason": reason, "llmfence_status": status}
    extra.update(fields)
    REFUSALS.info(
        "llmfence refused request %s (%s, %d): %s",
        fields.get("llmfence_request_id") or "-",
        reason,
        status,
        scrub(message),
        extra=extra,
    )


def log_degraded(operation: str, error: BaseException, request_id: str | None = None) -> None:
    """One WARNING record on `llmfence.store`: a store call failed and the request went on
    under its guard's outage policy (or the settlement went to the outbox)."""
    cause = error.__cause__
    reason = scrub(str(error))
    if cause is not None:
        reason = f"{reason} (cause: {type(cause).__name__}: {scrub(str(cause))})"
    STORE.warning(
        "llmfence store degraded during %s: %s",
        operation,
        reason,
        extra={
            "llmfence_event": "degraded",
            "llmfence_operation": operation,
            "llmfence_reason": reason,
            "llmfence_request_id": request_id,
            # The `StoreError` itself (its text is llmfence's own, never the backend's), for
            # handlers that want the object; formatters that stringify it print that text.
            "llmfence_error": error,
        },
    )
