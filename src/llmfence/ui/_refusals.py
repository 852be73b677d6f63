"""Recent refusals, for the spend page: a bounded ring of what `llmfence.refusals` logs.

The engines log one record per refused request on the `llmfence.refusals` logger (INFO, with
`llmfence_*` fields; see `llmfence._logs`). The ring is a filter on that logger: it keeps
each record's fields and lets the record through exactly as it would have gone without it.
Logging gates INFO records before any filter runs, so when the logger has no level of its
own (and its parents' let no INFO through) the ring gives it a level of its own, `INFO - 1`,
and while that level stands lets through only what the parent logger's level would have (by
default nothing below WARNING): the application's log output does not change, and a level
someone sets later (`caplog.set_level`, `logger.setLevel(logging.INFO)`) is theirs to keep.

The ring lives in this process, for every `Fence` in it, and forgets on restart: it shows
what one instance refused lately, not a history (the spend log holds no refused request,
since a refused request is never charged).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any, Final

__all__ = ["RefusalRing", "refusal_ring"]

LOGGER: Final = "llmfence.refusals"
_OWN_LEVEL: Final = logging.INFO - 1
_FIELDS: Final = (
    "reason",
    "status",
    "level",
    "scope",
    "unit",
    "limit",
    "value",
    "requested",
    "reset",
    "retry_after",
    "request_id",
    "key",
    "user",
    "team",
    "end_user",
    "model",
    "path",
)


class RefusalRing(logging.Filter):
    """The last `size` refusals logged on `llmfence.refusals`, newest last."""

    def __init__(self, size: int = 200) -> None:
        super().__init__()
        self._entries: deque[dict[str, Any]] = deque(maxlen=size)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "llmfence_event", "refusal") == "refusal":
            message = record.getMessage()
            if message.startswith("llmfence refused request"):  # what the client was told
                message = message.split("): ", 1)[-1]
            entry: dict[str, Any] = {"time": record.created, "message": message}
            for name in _FIELDS:
                value = getattr(record, f"llmfence_{name}", None)
                entry[name] = value if isinstance(value, str | int | float | None) else str(value)
            self._entries.append(entry)
        logger = logging.getLogger(LOGGER)
        if logger.level != _OWN_LEVEL or logger.parent is None:
            return True
        return record.levelno >= logger.parent.getEffectiveLevel()

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        """The newest `limit` refusals, newest first."""
        entries = list(self._entries)
        return entries[::-1][:limit]

    def attach(self) -> None:
        """Start keeping refusals (idempotent)."""
        logger = logging.getLogger(LOGGER)
        if self in logger.filters:
            return
        if logger.level == logging.NOTSET and not logger.isEnabledFor(logging.INFO):
            logger.setLevel(_OWN_LEVEL)
        logger.addFilter(self)

    def detach(self) -> None:
        """Stop keeping refusals, and give the logger back the level it had."""
        logger = logging.getLogger(LOGGER)
        logger.removeFilter(self)
        if logger.level == _OWN_LEVEL:
            logger.setLevel(logging.NOTSET)


_RING: RefusalRing | None = None
_LOCK = threading.Lock()


def refusal_ring() -> RefusalRing:
    """The process's ring, attached to `llmfence.refusals` on first use."""
    global _RING
    with _LOCK:
        if _RING is None:
            _RING = RefusalRing()
            _RING.attach()
        return _RING
