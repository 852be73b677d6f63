"""`RequestContext`: what llmfence knows about one request while it runs.

One context is made per metered request by the engine that owns the request and shared through
the ASGI scope (`scope["state"]["llmfence"]`) with the app and with any llmfence layer further
in. It is a plain `__slots__` class: a request builds one, not a tree of dataclasses.
"""

from __future__ import annotations

import itertools
import os
import secrets
import time
from typing import TYPE_CHECKING

from llmfence._pricing import ModelPrice
from llmfence._request import LLMRequest
from llmfence._usage import StreamUsageScanner, UsageChunkFilter
from llmfence.stores import BudgetScope, CustomerRecord, RateState, Refusal

from .auth import Principal

if TYPE_CHECKING:
    from .meter import Meter

__all__ = ["RequestContext", "new_request_id"]

# Request ids name reservations in a store shared by many processes: a random per-process
# prefix and a counter are unique across them, and cheaper than a uuid4 per request.
_PREFIX = secrets.token_hex(6)
_COUNTER = itertools.count(1)


def _reseed() -> None:
    # A forked worker (gunicorn --preload) starts with its parent's prefix and count.
    global _PREFIX, _COUNTER
    _PREFIX = secrets.token_hex(6)
    _COUNTER = itertools.count(1)


os.register_at_fork(after_in_child=_reseed)


def new_request_id() -> str:
    """A request id unique across processes and hosts."""
    return f"{_PREFIX}{next(_COUNTER):08x}"


class RequestContext:
    """Everything llmfence knows about one request, shared by the layers that see it.

    Attributes:
        request_id: Unique per request; names its reservations, leases and spend record.
        path: The request path.
        now: Unix time when the request arrived.
        body: The body forwarded to the app (amended if llmfence changed it).
        request: The parsed LLM request, for metered paths.
        principal: Who is calling, once authenticated.
        meter: The meter whose store holds this request's reservations.
    """

    __slots__ = (
        "admissions",
        "allowance",
        "app_called",
        "app_failed",
        "body",
        "bounded",
        "budget_scopes",
        "charges",
        "completed",
        "cost",
        "customer",
        "finished",
        "fit",
        "hide_usage",
        "json_parts",
        "meter",
        "now",
        "path",
        "price",
        "principal",
        "prompt_tokens",
        "rate_states",
        "record_spend",
        "refusal",
        "refused",
        "request",
        "request_id",
        "reservations",
        "response_headers",
        "scanner",
        "started",
        "status",
        "stream_filter",
        "uncertain",
    )

    def __init__(self, meter: Meter, path: str, now: float) -> None:
        self.meter = meter
        self.request_id = new_request_id()
        self.path = path
        self.now = now
        self.started = time.perf_counter()
        self.body = b""
        self.request: LLMRequest | None = None
        self.principal: Principal | None = None
        self.customer: CustomerRecord | None = None  # the registered customer named, if any
        self.prompt_tokens: int | None = None
        # `prompt_tokens` is an upper bound, not the exact count (`Meter.lazy_counting`).
        self.bounded = False
        self.price: ModelPrice | None = None
        self.allowance = 0
        self.cost = 0
        self.admissions = 0
        self.reservations: list[str] = []
        # Admissions whose outcome is unknown (the store timed out, or the task was cancelled
        # while it ran): they may hold a reservation, so the end of the request settles them.
        self.uncertain: list[str] = []
        self.charges: dict[str, tuple[BudgetScope, ...]] = {}
        self.budget_scopes: tuple[BudgetScope, ...] = ()
        self.rate_states: list[RateState] = []
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.hide_usage = False
        self.record_spend = False
        self.status: int | None = None
        self.scanner: StreamUsageScanner | None = None
        self.stream_filter: UsageChunkFilter | None = None
        self.json_parts: list[bytes] | None = None
        self.completed = False
        self.refused = False
        self.refusal: Refusal | None = None  # what the store refused, for the log
        self.app_called = False  # the app read the body or began a response
        self.app_failed = False
        self.finished = False
        self.fit: int | None = None  # the largest max_tokens that fitted, when one was refused

    @property
    def end_user(self) -> str | None:
        """The end user named by the request body."""
        return self.request.end_user if self.request is not None else None
