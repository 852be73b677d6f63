"""`Tally`: the core's events summed in plain dicts and ints, for an exporter to read.

Both exporters (Prometheus, OpenTelemetry) read the same totals when they are scraped or
collected, so a request pays a dict update or two, never a metrics library's lock or label
lookup: the library's cost lands on the scrape. Totals are cumulative for the process.

Labels: a request's outcome, a model, a store operation, a budget level. The caller's user,
team and end user are labels only if the operator names them in `labels` (each distinct value
is a series: cardinality is the operator's choice). No label ever carries a key or its hash.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from llmfence._core.observe import REFUSAL_KINDS
from llmfence.exceptions import ConfigurationError
from llmfence.stores import BudgetState

if TYPE_CHECKING:
    from llmfence._core.context import RequestContext
    from llmfence._core.meter import Meter

__all__ = ["BUDGET_LEVELS", "LABELS", "LATENCY_BUCKETS", "OUTCOMES", "Tally"]

LABELS = ("user", "team", "end_user")
"""The caller labels an operator may opt into."""
BUDGET_LEVELS = ("global", "team", "user", "end_user")
"""The budget levels whose remaining budget may be a gauge (a key's would name the key)."""
OUTCOMES = ("allowed", *REFUSAL_KINDS)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Upper bounds (seconds) of the store latency histogram's buckets, `+Inf` last."""

Who = tuple[str, ...]
# Each caller label's value for a request, read straight off its context (no dict per call).
_READ: dict[str, Callable[[RequestContext], str | None]] = {
    "user": lambda ctx: ctx.principal.user_id if ctx.principal is not None else None,
    "team": lambda ctx: ctx.principal.team_id if ctx.principal is not None else None,
    "end_user": lambda ctx: ctx.end_user,
}


def _choice(name: str, given: Iterable[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(given, str):
        raise ConfigurationError(f"{name} must be a collection of names, not {given!r}")
    chosen = tuple(given)
    unknown = sorted(set(chosen) - set(allowed))
    if unknown:
        raise ConfigurationError(f"{name}: unknown {unknown}; choose from {list(allowed)}")
    return tuple(name for name in allowed if name in chosen)


class Tally:
    """Every `Observer` event, summed.

    Args:
        labels: Caller labels to add to request, token and spend counts: any of `"user"`,
            `"team"`, `"end_user"` (the user id, team id, and the `user` of request bodies).
        budget_levels: Budget levels to report the remaining budget of, one gauge series per
            level and name: any of `"global"`, `"team"`, `"user"`, `"end_user"`.
    """

    def __init__(self, *, labels: Iterable[str] = (), budget_levels: Iterable[str] = ()) -> None:
        self.labels = _choice("labels", labels, LABELS)
        self.budget_levels = frozenset(_choice("budget_levels", budget_levels, BUDGET_LEVELS))
        self._anonymous: Who = ("",) * len(self.labels)
        self._read = tuple(_READ[name] for name in self.labels)
        self.requests: dict[tuple[str, Who], int] = {}
        """Requests by (outcome, caller labels)."""
        self.usage: dict[tuple[str, Who], list[int]] = {}
        """[input tokens, output tokens, spend in nano-USD] by (model, caller labels)."""
        self.remaining: dict[tuple[str, str], int] = {}
        """Remaining budget in nano-USD by (level, name), as of the last admission there."""
        self.store_calls: dict[str, list[float]] = {}
        """Per operation: one count per latency bucket (`+Inf` last), then the sum of seconds."""
        self.store_errors: dict[str, int] = {}
        self.degradations: dict[str, int] = {}
        self.in_flight = 0
        self.meter: Meter | None = None

    # -- Observer ----------------------------------------------------------------------------

    def attach(self, meter: Meter) -> None:
        if self.meter is not None and self.meter is not meter:
            raise ConfigurationError("one metrics adapter reports one Fence (one meter)")
        self.meter = meter

    def request_started(self) -> None:
        self.in_flight += 1

    def request_finished(self, ctx: RequestContext) -> None:
        self.in_flight -= 1
        if not ctx.refused:
            key = ("allowed", self._who(ctx))
            self.requests[key] = self.requests.get(key, 0) + 1

    def refused(self, reason: str, ctx: RequestContext | None) -> None:
        key = (reason, self._who(ctx))
        self.requests[key] = self.requests.get(key, 0) + 1

    def spent(self, ctx: RequestContext, model: str, tokens: tuple[int, int], cost: int) -> None:
        key = (model, self._who(ctx))
        totals = self.usage.get(key)
        if totals is None:
            self.usage[key] = [tokens[0], tokens[1], cost]
        else:
            totals[0] += tokens[0]
            totals[1] += tokens[1]
            totals[2] += cost

    def budgets(self, states: tuple[BudgetState, ...]) -> None:
        levels = self.budget_levels
        if not levels:
            return
        for state in states:
            if state.level in levels and state.limit is not None:
                self.remaining[(state.level, state.label)] = state.limit - state.spent

    def store_call(self, operation: str, seconds: float, failed: bool) -> None:
        counts = self.store_calls.get(operation)
        if counts is None:
            counts = self.store_calls[operation] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        counts[-1] += seconds
        if failed:
            self.store_errors[operation] = self.store_errors.get(operation, 0) + 1

    def degraded(self, operation: str) -> None:
        self.degradations[operation] = self.degradations.get(operation, 0) + 1

    # -- reading -----------------------------------------------------------------------------

    def _who(self, ctx: RequestContext | None) -> Who:
        read = self._read
        if not read or ctx is None:
            return self._anonymous
        if len(read) == 1:
            return (read[0](ctx) or "",)
        return tuple([get(ctx) or "" for get in read])

    def totals(self, index: int) -> dict[tuple[str, Who], int]:
        """Input tokens (0), output tokens (1) or spend in nano-USD (2) by (model, labels)."""
        return {key: values[index] for key, values in list(self.usage.items())}

    def request_counts(self) -> dict[tuple[str, Who], int]:
        """Requests by (outcome, caller labels), every outcome present (0 if none yet)."""
        counts = {(outcome, self._anonymous): 0 for outcome in OUTCOMES}
        counts.update(self.requests)
        return counts

    def outbox(self) -> tuple[int, int, int, int]:
        """The meter's outbox: (depth, queued, delivered, dropped)."""
        if self.meter is None:
            return 0, 0, 0, 0
        box = self.meter.outbox
        return box.depth, box.queued, box.delivered, box.dropped

    def latency(self, operation: str) -> tuple[list[tuple[str, float]], float, int]:
        """An operation's cumulative buckets as (upper bound, count), its sum and count."""
        counts = self.store_calls[operation]
        buckets: list[tuple[str, float]] = []
        total = 0.0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=False):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), total))
        return buckets, counts[-1], int(total)
