"""`MemoryStore`: the embedded default, for one process.

Every operation runs to completion without awaiting, so on one event loop each is atomic by
construction. State lives in plain dicts; the spend log is a bounded ring buffer beside running
totals, so memory stays bounded however long the process runs. Nothing touches the event loop
in `__init__`, so a store can be built at import time.
"""

from __future__ import annotations

import copy
import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import _window
from ._protocol import SpendGroup
from ._types import (
    Admission,
    AdmissionResult,
    BudgetScope,
    BudgetState,
    KeyRecord,
    RateHit,
    RateState,
    Refusal,
    Settlement,
    SpendRecord,
    SpendTotals,
    TeamRecord,
    UserRecord,
)

__all__ = ["MemoryStore"]

_SWEEP_EVERY = 4096
# A lease ends when its request does, which no store can predict: suggest a short retry.
_PARALLEL_RETRY = 1.0
_R = TypeVar("_R", KeyRecord, UserRecord, TeamRecord)


@dataclass(slots=True)
class _Budget:
    spent: int = 0
    total: int = 0
    end: float | None = None
    epoch: int = 0  # bumped at every roll, so settlement can tell the period changed

    def roll(self, scope: BudgetScope, now: float) -> None:
        if self.end is None:
            # First touch, or a duration configured since: the first period starts now.
            self.end = scope.period_end
        elif now >= self.end:
            self.spent = 0
            self.end = scope.period_end
            self.epoch += 1

    def state(self, scope: BudgetScope) -> BudgetState:
        return BudgetState(
            scope.key, scope.level, scope.label, scope.limit, self.spent, self.end, self.total
        )


@dataclass(slots=True)
class _Window:
    size_ms: int
    index: int = 0
    cur: int = 0
    prev: int = 0

    def idle(self, now_ms: int) -> bool:
        """Whether neither of its windows is seen any more (both ended a window ago)."""
        return (self.index + 2) * self.size_ms <= now_ms

    def advance(self, index: int) -> None:
        # Only ever forward: a caller whose clock is a little behind counts in the current
        # window instead of wiping it.
        if index <= self.index:
            return
        self.prev = self.cur if index == self.index + 1 else 0
        self.cur = 0
        self.index = index


@dataclass(slots=True)
class _Leases:
    """Leases held on one key: who holds one until when, and a heap to find the expired."""

    held: dict[str, float] = field(default_factory=dict)
    heap: list[tuple[float, str]] = field(default_factory=list)

    def add(self, lease_id: str, expires: float) -> None:
        self.held[lease_id] = expires
        heapq.heappush(self.heap, (expires, lease_id))

    def expire(self, now: float) -> None:
        # Only leases due by now are looked at, so a key with many requests in flight does not
        # pay for all of them on every admission.
        heap = self.heap
        while heap and heap[0][0] <= now:
            expires, lease_id = heapq.heappop(heap)
            if self.held.get(lease_id) == expires:
                del self.held[lease_id]
        if len(heap) > 2 * len(self.held) + 64:
            # Released leases leave stale heap entries; rebuild before they pile up.
            self.heap = [(e, lid) for lid, e in self.held.items()]
            heapq.heapify(self.heap)


@dataclass(slots=True)
class _Reservation:
    expires: float
    cost: int
    budgets: list[tuple[str, int]]  # (counter key, epoch at reservation)
    tokens: list[tuple[str, int, int, int]]  # (counter key, window ms, index, units)
    requests: list[tuple[str, int, int, int]]  # the same, for request windows
    slots: list[str]


@dataclass(slots=True)
class _Totals:
    cost: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0


@dataclass(slots=True)
class _Records:
    keys: dict[str, KeyRecord] = field(default_factory=dict)
    users: dict[str, UserRecord] = field(default_factory=dict)
    teams: dict[str, TeamRecord] = field(default_factory=dict)
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    projects: dict[str, dict[str, Any]] = field(default_factory=dict)


class MemoryStore:
    """The embedded store: state in this process's memory, lost when it exits.

    Use it for one process (one uvicorn worker); several workers or hosts need `RedisStore`.

    Args:
        max_spend_records: How many spend records the log keeps (oldest dropped first). The
            running totals count every record ever appended.
    """

    bounds_call_time = True  # nothing here ever waits

    def __init__(self, *, max_spend_records: int = 100_000) -> None:
        self._budgets: dict[str, _Budget] = {}
        self._windows: dict[str, _Window] = {}
        self._leases: dict[str, _Leases] = {}
        self._reservations: OrderedDict[str, _Reservation] = OrderedDict()
        self._records = _Records()
        self._log: deque[SpendRecord] = deque(maxlen=max_spend_records)
        self._totals: dict[tuple[str, str], _Totals] = {}
        self._ops = itertools.count()

    # -- the hot path ------------------------------------------------------------------------

    async def admit(self, admission: Admission) -> AdmissionResult:
        """Apply every check of one request atomically: all reserved, or nothing changed."""
        now = admission.now
        if next(self._ops) % _SWEEP_EVERY == 0:
            self._sweep(now)
        now_ms = int(now * 1000)

        windows = [self._window(hit, now_ms) for hit in admission.rates]
        budgets = [self._budget(scope, now) for scope in admission.budgets]
        for scope, budget in zip(admission.budgets, budgets, strict=True):
            budget.roll(scope, now)
        headroom = _headroom(admission.budgets, budgets)

        refusal = self._check(admission, windows, budgets, now_ms)
        if refusal is None:
            for hit, window in zip(admission.rates, windows, strict=True):
                window.cur += hit.cost
            for slot in admission.slots:
                self._live_leases(slot.key, now).add(admission.request_id, now + slot.ttl)
            for budget in budgets:
                budget.spent += admission.cost
            self._reservations[admission.request_id] = _Reservation(
                expires=now + admission.ttl,
                cost=admission.cost,
                budgets=[(s.key, b.epoch) for s, b in zip(admission.budgets, budgets, strict=True)],
                tokens=[
                    (hit.key, int(hit.window * 1000), w.index, hit.cost)
                    for hit, w in zip(admission.rates, windows, strict=True)
                    if hit.kind == "tokens"
                ],
                requests=[
                    (hit.key, int(hit.window * 1000), w.index, hit.cost)
                    for hit, w in zip(admission.rates, windows, strict=True)
                    if hit.kind == "requests"
                ],
                slots=[slot.key for slot in admission.slots],
            )
        return AdmissionResult(
            refusal=refusal,
            rates=tuple(
                _rate_state(hit, window, now_ms)
                for hit, window in zip(admission.rates, windows, strict=True)
            ),
            budgets=tuple(b.state(s) for s, b in zip(admission.budgets, budgets, strict=True)),
            headroom=headroom,
        )

    def _check(
        self,
        admission: Admission,
        windows: list[_Window],
        budgets: list[_Budget],
        now_ms: int,
    ) -> Refusal | None:
        for kind in ("requests", "tokens"):
            for hit, window in zip(admission.rates, windows, strict=True):
                if hit.kind != kind:
                    continue
                size = int(hit.window * 1000)
                elapsed = max(0, now_ms - window.index * size)
                args = (window.cur, window.prev, elapsed, size)
                if not _window.fits(*args, hit.limit, hit.cost):
                    retry = _window.retry_after_ms(*args, hit.limit, hit.cost)
                    used = hit.limit - _window.remaining(*args, hit.limit)
                    return Refusal(
                        hit.kind,
                        hit.level,
                        hit.label,
                        hit.limit,
                        used,
                        hit.cost,
                        None if retry is None else retry / 1000,
                    )
        for slot in admission.slots:
            leases = self._live_leases(slot.key, admission.now)
            if len(leases.held) >= slot.limit:
                return Refusal(
                    "parallel_requests",
                    slot.level,
                    slot.label,
                    slot.limit,
                    len(leases.held),
                    1,
                    _PARALLEL_RETRY if slot.limit > 0 else None,
                )
        for scope, budget in zip(admission.budgets, budgets, strict=True):
            if scope.limit is not None and budget.spent + admission.cost > scope.limit:
                resets_at = budget.end
                return Refusal(
                    "budget",
                    scope.level,
                    scope.label,
                    scope.limit,
                    budget.spent,
                    admission.cost,
                    None if resets_at is None else max(0.0, resets_at - admission.now),
                    resets_at,
                )
        return None

    async def settle(self, settlement: Settlement) -> bool:
        """Settle a reservation with the actual cost, release its leases, append its record."""
        if settlement.record is not None:
            self._append(settlement.record)
        reservation = self._reservations.pop(settlement.request_id, None)
        if reservation is None or reservation.expires <= settlement.now:
            return False
        for key, epoch in reservation.budgets:
            budget = self._budgets.setdefault(key, _Budget())
            if budget.epoch == epoch:
                budget.spent = max(0, budget.spent + settlement.cost - reservation.cost)
            else:
                budget.spent += settlement.cost
            budget.total += settlement.cost
        now_ms = int(settlement.now * 1000)
        if settlement.tokens is not None:
            for key, size, index, units in reservation.tokens:
                self._adjust(key, size, index, settlement.tokens - units, now_ms)
        if settlement.refund_requests:
            for key, size, index, units in reservation.requests:
                self._adjust(key, size, index, -units, now_ms)
        for key in reservation.slots:
            self._release(key, settlement.request_id)
        return True

    async def release(self, request_id: str, slot_keys: Sequence[str]) -> None:
        """Free a request's leases without settling anything."""
        for key in slot_keys:
            self._release(key, request_id)

    # -- budgets outside a request -----------------------------------------------------------

    async def charge(self, scopes: Sequence[BudgetScope], cost: int, now: float) -> None:
        """Add spend at every level unconditionally."""
        for scope in scopes:
            budget = self._budget(scope, now)
            budget.roll(scope, now)
            budget.spent += cost
            budget.total += cost

    async def budgets(self, scopes: Sequence[BudgetScope], now: float) -> list[BudgetState]:
        """Read budget levels; a period that has ended reads as zero spent."""
        states = []
        for scope in scopes:
            budget = self._budgets.get(scope.key, _Budget())
            ended = budget.end is not None and now >= budget.end
            states.append(
                BudgetState(
                    scope.key,
                    scope.level,
                    scope.label,
                    scope.limit,
                    0 if ended else budget.spent,
                    scope.period_end if ended or budget.end is None else budget.end,
                    budget.total,
                )
            )
        return states

    async def reset_budget(self, key: str, period_end: float | None, now: float) -> None:
        """Start a new period for one budget counter now."""
        budget = self._budgets.setdefault(key, _Budget())
        budget.spent = 0
        budget.end = period_end
        budget.epoch += 1

    # -- key, user and team records ----------------------------------------------------------

    async def create_key(self, record: KeyRecord) -> bool:
        """Store a new key record; False if one with that hash exists."""
        return _create(self._records.keys, record.key_hash, record)

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        """The key record stored under a key's hash."""
        return self._records.keys.get(key_hash)

    async def update_key(self, key_hash: str, changes: Mapping[str, Any]) -> KeyRecord | None:
        """Change some fields of a key record."""
        return _update(self._records.keys, key_hash, changes)

    async def delete_key(self, key_hash: str) -> bool:
        """Delete a key record; False if there was none."""
        return self._records.keys.pop(key_hash, None) is not None

    async def list_keys(
        self, *, user_id: str | None = None, team_id: str | None = None
    ) -> list[KeyRecord]:
        """Key records, all of them or those of one user and/or team."""
        return [
            record
            for record in self._records.keys.values()
            if (user_id is None or record.user_id == user_id)
            and (team_id is None or record.team_id == team_id)
        ]

    async def create_user(self, record: UserRecord) -> bool:
        """Store a new user; False if the id is taken."""
        return _create(self._records.users, record.user_id, record)

    async def get_user(self, user_id: str) -> UserRecord | None:
        """A user record by id."""
        return self._records.users.get(user_id)

    async def update_user(self, user_id: str, changes: Mapping[str, Any]) -> UserRecord | None:
        """Change some fields of a user."""
        return _update(self._records.users, user_id, changes)

    async def create_team(self, record: TeamRecord) -> bool:
        """Store a new team; False if the id is taken."""
        return _create(self._records.teams, record.team_id, record)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        """A team record by id."""
        return self._records.teams.get(team_id)

    async def update_team(self, team_id: str, changes: Mapping[str, Any]) -> TeamRecord | None:
        """Change some fields of a team."""
        return _update(self._records.teams, team_id, changes)

    async def set_access_group(self, name: str, models: Sequence[str]) -> None:
        """Define (or redefine) a model access group."""
        self._records.groups[name] = tuple(models)

    async def access_groups(self) -> dict[str, tuple[str, ...]]:
        """Every model access group and its models."""
        return dict(self._records.groups)

    # -- spend records -----------------------------------------------------------------------

    def _append(self, record: SpendRecord) -> None:
        self._log.append(record)
        for group, name in _groups(record):
            totals = self._totals.setdefault((group, name), _Totals())
            totals.cost += record.cost
            totals.input_tokens += record.input_tokens
            totals.output_tokens += record.output_tokens
            totals.requests += 1

    async def spend_records(
        self,
        *,
        key_hash: str | None = None,
        user_id: str | None = None,
        team_id: str | None = None,
        model: str | None = None,
        start: float | None = None,
        end: float | None = None,
        limit: int = 1000,
    ) -> list[SpendRecord]:
        """Kept spend records matching every filter given, newest first."""
        found: list[SpendRecord] = []
        for record in reversed(self._log):
            if len(found) >= limit:
                break
            if _matches(record, key_hash, user_id, team_id, model, start, end):
                found.append(record)
        return found

    async def spend_totals(self, group: SpendGroup, name: str = "") -> SpendTotals:
        """All-time totals of one group (`"global"` ignores `name`)."""
        totals = self._totals.get((group, "" if group == "global" else name), _Totals())
        return SpendTotals(totals.cost, totals.input_tokens, totals.output_tokens, totals.requests)

    # -- BudgetManager project documents -----------------------------------------------------

    async def get_project(self, project_name: str) -> dict[str, Any] | None:
        """A BudgetManager project's user dict, or None."""
        document = self._records.projects.get(project_name)
        return None if document is None else copy.deepcopy(document)

    async def set_project(self, project_name: str, user_dict: Mapping[str, Any]) -> None:
        """Replace a BudgetManager project's user dict."""
        self._records.projects[project_name] = copy.deepcopy(dict(user_dict))

    # -- lifecycle ---------------------------------------------------------------------------

    async def ping(self) -> None:
        """Memory always answers."""

    async def aclose(self) -> None:
        """Nothing to release."""

    # -- internals ---------------------------------------------------------------------------

    def _budget(self, scope: BudgetScope, now: float) -> _Budget:
        budget = self._budgets.get(scope.key)
        if budget is None:
            budget = self._budgets[scope.key] = _Budget()
        return budget

    def _window(self, hit: RateHit, now_ms: int) -> _Window:
        window = self._windows.get(hit.key)
        if window is None:
            window = self._windows[hit.key] = _Window(int(hit.window * 1000))
        window.advance(now_ms // int(hit.window * 1000))
        return window

    def _adjust(self, key: str, size: int, index: int, change: int, now_ms: int) -> None:
        """Move a hit by `change` units in the window it was counted in, if still seen."""
        window = self._windows.get(key)
        if window is None:
            return
        window.advance(now_ms // size)
        if index == window.index:
            window.cur = max(0, window.cur + change)
        elif index == window.index - 1:
            window.prev = max(0, window.prev + change)

    def _live_leases(self, key: str, now: float) -> _Leases:
        leases = self._leases.get(key)
        if leases is None:
            leases = self._leases[key] = _Leases()
        leases.expire(now)
        return leases

    def _release(self, key: str, request_id: str) -> None:
        leases = self._leases.get(key)
        if leases is not None:
            leases.held.pop(request_id, None)

    def _sweep(self, now: float) -> None:
        # Idle windows and lease sets hold nothing the next request could see; dropping them
        # keeps memory bounded by the active keys, users and end users.
        while self._reservations:
            request_id, reservation = next(iter(self._reservations.items()))
            if reservation.expires > now:
                break
            del self._reservations[request_id]
        now_ms = int(now * 1000)
        stale = [k for k, w in self._windows.items() if w.idle(now_ms)]
        for key in stale:
            del self._windows[key]
        for key in [k for k in self._leases if not self._live_leases(k, now).held]:
            del self._leases[key]


def _rate_state(hit: RateHit, window: _Window, now_ms: int) -> RateState:
    size = int(hit.window * 1000)
    elapsed = max(0, now_ms - window.index * size)
    args = (window.cur, window.prev, elapsed, size)
    return RateState(
        hit.key,
        hit.kind,
        hit.level,
        hit.limit,
        _window.remaining(*args, hit.limit),
        _window.reset_after_ms(*args) / 1000,
        hit.window,
    )


def _headroom(scopes: Sequence[BudgetScope], budgets: Sequence[_Budget]) -> int | None:
    rooms = [s.limit - b.spent for s, b in zip(scopes, budgets, strict=True) if s.limit is not None]
    return min(rooms) if rooms else None


def _create(table: dict[str, _R], key: str, record: _R) -> bool:
    if key in table:
        return False
    table[key] = record
    return True


def _update(table: dict[str, _R], key: str, changes: Mapping[str, Any]) -> _R | None:
    record = table.get(key)
    if record is None:
        return None
    data = record.to_dict()
    data.update(changes)
    updated = type(record).from_dict(data)
    table[key] = updated
    return updated


def _groups(record: SpendRecord) -> list[tuple[str, str]]:
    groups = [("global", "")]
    for group, name in (
        ("key", record.key_hash),
        ("user", record.user_id),
        ("team", record.team_id),
        ("model", record.model),
        ("end_user", record.end_user),
    ):
        if name:
            groups.append((group, name))
    return groups


def _matches(
    record: SpendRecord,
    key_hash: str | None,
    user_id: str | None,
    team_id: str | None,
    model: str | None,
    start: float | None,
    end: float | None,
) -> bool:
    return (
        (key_hash is None or record.key_hash == key_hash)
        and (user_id is None or record.user_id == user_id)
        and (team_id is None or record.team_id == team_id)
        and (model is None or record.model == model)
        and (start is None or record.timestamp >= start)
        and (end is None or record.timestamp <= end)
    )
