"""Budget alerts: a level's spend that crosses a threshold of its budget, or its soft budget,
is reported once per level, period and threshold, by whichever process claims it first.

Seeing a crossing costs no store call: every admission's result carries the state of each of
its budget levels, and `check` compares the spend there with the thresholds. A process
remembers the crossings it has seen, so a level past a threshold costs one claim per process
and period, not one per request. The claim (`ClaimStore.claim`, named after the level, its
period, its amount and the threshold) is decided atomically in the store: of two workers that
see one crossing at once, one sends the alert. Claims and deliveries stay off the request's
path: crossings wait in a bounded queue that a background task empties for the app's lifespan
(`middleware._lifespan`) and at shutdown; `Fence.flush` empties it where no lifespan runs.

Which spend is compared: the level's spend before this request's reservation (what earlier
requests settled, or still hold). A reservation is the most a request may cost (its whole
`max_tokens`), often far more than it will; counting it would report 80 % of a budget that is
at 60 % once the request settles. So a crossing is reported when the next request charged to
the level arrives, admitted or refused, as LiteLLM checks soft budgets when a request arrives.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Final, Literal

import anyio

from llmfence._money import nano_to_decimal
from llmfence.exceptions import ConfigurationError
from llmfence.stores import AdmissionResult, BudgetState, ClaimStore

from .levels import record_levels

if TYPE_CHECKING:
    from .auth import Principal

__all__ = [
    "DEFAULT_THRESHOLDS",
    "SOFT_BUDGET",
    "AlertHook",
    "Alerts",
    "BudgetAlert",
    "checked_thresholds",
]

logger = logging.getLogger("llmfence.alerts")

SOFT_BUDGET: Final = "soft_budget"
"""`BudgetAlert.threshold` of an alert for a soft budget."""
DEFAULT_THRESHOLDS: Final = (0.5, 0.8, 1.0)
"""`Fence(alert_thresholds=...)` unless given: half, four fifths and all of a budget."""

# A claim outlives its period by this much: an admission that read the period just before it
# ended may queue its crossing a little after.
_GRACE: Final = 3600.0
# A budget that never resets alerts once a year at most per threshold.
_NO_PERIOD: Final = 366 * 86_400.0
# Crossings this process remembers before it forgets the expired ones.
_SEEN: Final = 4096
_SOFT_KEY: Final = object()  # the soft budgets' slot in `Principal.plans`

Mark = tuple[str, float | None, int, float | str]  # (counter, period end, amount, threshold)


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetAlert:
    """A budget level's spend crossed a threshold of its budget, or its soft budget.

    Given to `Fence(on_alert=...)` once per level, period and threshold, whatever the number
    of app instances. It never holds a key or a key's hash: a key's level is named by its
    masked form (`sk-...Qw8z`).

    Attributes:
        level: `"global"`, `"team"`, `"team_member"`, `"user"`, `"key"`, `"end_user"` or
            `"model"` (a key's budget for one model).
        scope: Which one: a team, user or end-user id, a masked key, `"gpt-4o on
            sk-...Qw8z"`, `"alice in team core"`, or `"global"`.
        threshold: The fraction of `limit` crossed (one of `Fence(alert_thresholds=...)`),
            or `"soft_budget"` when `limit` is the level's soft budget.
        spent: USD spent in the current period when the crossing was seen (exact).
        limit: The level's budget in USD (`max_budget`), or its soft budget.
        period_end: Unix time when the period ends and its spend resets; `None`: never.
        at: Unix time when the crossing was seen.
    """

    level: str
    scope: str
    threshold: float | Literal["soft_budget"]
    spent: Decimal
    limit: Decimal
    period_end: float | None
    at: float

    @property
    def message(self) -> str:
        """One line for people, e.g. for a chat webhook."""
        what = (
            "soft budget"
            if self.threshold == SOFT_BUDGET
            else f"{self.threshold:.0%} of its budget"
        )
        until = f" in the period ending {_iso(self.period_end)}" if self.period_end else ""
        return (
            f"llmfence budget alert: {self.level} {self.scope} crossed {what}: "
            f"${self.spent:.4f} spent of ${self.limit:.4f}{until}."
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON a webhook receives: amounts as numbers of USD, times in ISO 8601 (UTC),
        and `text`, the `message` (what Slack's and similar webhooks show)."""
        return {
            "type": "budget_alert",
            "level": self.level,
            "scope": self.scope,
            "threshold": self.threshold,
            "spent": float(self.spent),
            "limit": float(self.limit),
            "period_end": _iso(self.period_end),
            "at": _iso(self.at),
            "text": self.message,
        }


AlertHook = Callable[[BudgetAlert], Awaitable[object]]
"""What `Fence(on_alert=...)` calls: an async callable taking one `BudgetAlert`."""


def checked_thresholds(thresholds: Iterable[float]) -> tuple[float, ...]:
    """Thresholds as fractions of a budget, ascending: each a number > 0 and at most 10.

    Raises:
        ConfigurationError: One is not.
    """
    if isinstance(thresholds, str | bytes) or not isinstance(thresholds, Iterable):
        raise ConfigurationError(f"alert_thresholds must be numbers, not {thresholds!r}")
    found = tuple(thresholds)
    for value in found:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 10:
            raise ConfigurationError(
                f"alert_thresholds must be fractions of a budget > 0 and ≤ 10, not {value!r}"
            )
    return tuple(sorted({float(value) for value in found}))


class Alerts:
    """Sees budget crossings in admissions' results, claims them and sends them, once.

    Args:
        store: Where crossings are claimed, shared by every app instance.
        hook: Called with each alert this process claimed (an exception is logged).
        thresholds: Fractions of a budget that alert when the spend reaches them.
        call: Runs one store call under the meter's bound (`Meter.call`).
        capacity: The most crossings waiting to be sent; past it the oldest are dropped.
        clock: Unix time.
    """

    def __init__(
        self,
        store: ClaimStore,
        hook: AlertHook,
        thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
        *,
        call: Callable[[Awaitable[bool]], Awaitable[bool]] | None = None,
        capacity: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not isinstance(store, ClaimStore):
            raise ConfigurationError("budget alerts need a store with claims (a ClaimStore)")
        if not callable(hook):
            raise ConfigurationError(f"on_alert must be a callable or a URL, not {hook!r}")
        self.store = store
        self.hook = hook
        self.thresholds = checked_thresholds(thresholds)
        self.capacity = capacity
        self.clock = clock
        self._call = call
        self._seen: dict[Mark, float] = {}  # crossings seen here, until their claims expire
        self._queue: deque[tuple[Mark, float, BudgetAlert]] = deque()
        self._wake: anyio.Event | None = None
        self._lock: anyio.Lock | None = None  # made on first use, inside the event loop
        self.running = False
        """Whether a background task sends the alerts (the app's lifespan)."""
        self.sent = 0
        """Alerts this process claimed and handed to the hook."""
        self.dropped = 0
        """Crossings dropped from a full queue (each logged)."""

    @property
    def depth(self) -> int:
        """Crossings waiting to be claimed and sent."""
        return len(self._queue)

    # -- on the request's path: no store call, no await ----------------------------------------

    def check(
        self, result: AdmissionResult, reserved: int, principal: Principal | None, now: float
    ) -> None:
        """Queue the crossings an admission's budget states show that this process has not
        seen yet: the spend before the `reserved` cost an admitted request took (see the
        module's docstring), with the soft budgets of the caller's records."""
        cost = reserved if result.refusal is None else 0
        soft = _soft_budgets(principal)
        for state in result.budgets:
            limit = state.limit
            own = soft.get(state.key) if soft else None
            if not limit and own is None:
                continue
            spent = state.spent - cost
            if limit:
                for threshold in self.thresholds:
                    if spent < limit * threshold:
                        break
                    self._crossed(state, threshold, limit, spent, now)
            if own is not None and spent >= own and spent > 0:
                self._crossed(state, SOFT_BUDGET, own, spent, now)

    def _crossed(
        self, state: BudgetState, threshold: float | str, amount: int, spent: int, now: float
    ) -> None:
        mark: Mark = (state.key, state.resets_at, amount, threshold)
        seen = self._seen
        if mark in seen:
            return
        if len(seen) >= _SEEN:
            self._forget(now)
        end = state.resets_at
        expires = end + _GRACE if end is not None else now + _NO_PERIOD
        seen[mark] = expires
        alert = BudgetAlert(
            level=state.level,
            scope=state.label,
            threshold=threshold,  # type: ignore[arg-type]
            spent=nano_to_decimal(max(0, spent)),
            limit=nano_to_decimal(amount),
            period_end=end,
            at=now,
        )
        queue = self._queue
        queue.append((mark, expires, alert))
        if len(queue) > self.capacity:
            old_mark, _, old = queue.popleft()
            seen.pop(old_mark, None)  # seen again by a later request, it is queued again
            self.dropped += 1
            logger.warning(
                "llmfence dropped a budget alert (%s %s, threshold %s): %d alerts wait already",
                old.level,
                old.scope,
                old.threshold,
                self.capacity,
            )
        if self._wake is not None:
            self._wake.set()

    def _forget(self, now: float) -> None:
        seen = self._seen
        for mark, expires in list(seen.items()):
            if expires <= now:
                del seen[mark]
        if len(seen) >= _SEEN:  # all live: forget them all (the store still claims once)
            queued = {mark: seen[mark] for mark, _, _ in self._queue if mark in seen}
            seen.clear()
            seen.update(queued)

    # -- off the request's path ----------------------------------------------------------------

    async def flush(self) -> int:
        """Claim every waiting crossing and send those this process won; how many still wait
        (none, unless another flush runs)."""
        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            queue = self._queue
            while queue:
                mark, expires, alert = queue.popleft()
                if await self._claim(mark, expires):
                    await self._send(alert)
            return len(queue)

    async def run(self) -> None:
        """Send alerts as crossings come, until cancelled (the app's lifespan)."""
        self.running = True
        try:
            while True:
                if not self._queue:
                    self._wake = anyio.Event()
                    await self._wake.wait()
                    self._wake = None
                await self.flush()
        finally:
            self.running = False
            self._wake = None

    async def _claim(self, mark: Mark, expires: float) -> bool:
        name = "alert:" + hashlib.sha256(repr(mark).encode()).hexdigest()[:40]
        claim = self.store.claim(name, expires, self.clock())
        try:
            return await (self._call(claim) if self._call is not None else claim)
        except Exception as error:  # the store is down: a later request sees it again
            self._seen.pop(mark, None)
            logger.warning("llmfence could not claim a budget alert: %s", error)
            return False

    async def _send(self, alert: BudgetAlert) -> None:
        try:
            outcome = self.hook(alert)
            if inspect.isawaitable(outcome):
                await outcome
            self.sent += 1
        except Exception:
            logger.exception(
                "llmfence's budget alert hook failed (%s %s, threshold %s)",
                alert.level,
                alert.scope,
                alert.threshold,
            )


def _soft_budgets(principal: Principal | None) -> dict[str, int] | None:
    """The soft budgets of a caller's team, user and key by counter; worked out once per
    cached principal (kept with its plans, so a record change drops it too)."""
    if principal is None or principal.is_master:
        return None
    plans = principal.plans
    found = plans.get(_SOFT_KEY, _SOFT_KEY)
    if found is _SOFT_KEY:
        found = {
            counter: record.soft_budget
            for _, counter, _, _, record in record_levels(principal)
            if getattr(record, "soft_budget", None) is not None
        } or None
        plans[_SOFT_KEY] = found
    return found  # type: ignore[return-value]


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")
