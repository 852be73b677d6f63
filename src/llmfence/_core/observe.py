"""`Observer`: what the core tells a metrics adapter, and nothing it must import for it.

The core calls an observer at a few points of a request's life: it started, it was refused
(and why), it ended, what it spent; every store call (its operation and duration); every
degradation; each admission's budget states. Adapters (`llmfence.metrics`: Prometheus,
OpenTelemetry) implement it above the core, so the core never imports a metrics library.

Without an observer (`Meter.observer is None`, the default) each of those points costs one
`is None` check. The outbox's counters and depth are not pushed: an adapter reads them from
the meter it is attached to when it is scraped.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

from llmfence.stores import BudgetState

if TYPE_CHECKING:
    from .context import RequestContext
    from .meter import Meter

__all__ = ["REFUSAL_KINDS", "Observer", "timed"]

_T = TypeVar("_T")

REFUSAL_KINDS = (
    "invalid_api_key",
    "model_not_allowed",
    "requests",
    "tokens",
    "parallel_requests",
    "budget_exceeded",
    "request_too_large",
    "invalid_request",
    "store_unavailable",
)
"""Every outcome of a refused request, as metrics label it (`allowed` is the other outcome)."""


@runtime_checkable
class Observer(Protocol):
    """Receives the core's events. Every method is called on the event loop and must not
    block or raise; keep them cheap (they run on the request's path)."""

    def attach(self, meter: Meter) -> None:
        """Called once when the observer is given to a meter (read its outbox from here)."""

    def request_started(self) -> None:
        """A request entered an engine (it is now in flight)."""

    def request_finished(self, ctx: RequestContext) -> None:
        """A request left its engine: allowed unless `ctx.refused` (counted by `refused`)."""

    def refused(self, reason: str, ctx: RequestContext | None) -> None:
        """A request was refused; `reason` is one of `REFUSAL_KINDS`."""

    def spent(self, ctx: RequestContext, model: str, tokens: tuple[int, int], cost: int) -> None:
        """A request settled: its model, (input, output) tokens and cost in nano-USD."""

    def budgets(self, states: tuple[BudgetState, ...]) -> None:
        """An admission's budget levels, as the store left them."""

    def store_call(self, operation: str, seconds: float, failed: bool) -> None:
        """One store call (`admit`, `settle`, `get_key`…): how long it took, whether it failed."""

    def degraded(self, operation: str) -> None:
        """A store failure the request went on without (its guard's outage policy)."""


async def timed(observer: Observer, awaitable: Awaitable[_T]) -> _T:
    """A store call, timed and reported by its operation (the store method's name); one cut
    short (a timeout cancels it) counts as failed."""
    operation = getattr(awaitable, "__name__", "call")
    started = time.perf_counter()
    failed = True
    try:
        result = await awaitable
        failed = False
        return result
    finally:
        observer.store_call(operation, time.perf_counter() - started, failed)
