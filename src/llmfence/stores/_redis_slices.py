"""Slices of the global budget, leased to each app instance on a Redis Cluster.

Every metered request touches the whole-app ("global") budget counter, and on a cluster that
counter lives on one slot: its node serves every request of every instance, and was measured
to bind first (`benchmarks/bench_hot_key.py`). So an instance leases a *slice* of the global
budget in one atomic script on that slot (`lua/lease.lua`) and admits the global level of its
requests locally from it; the request's other levels go to their slots as before.

Exactness. The counter's `spent` holds every outstanding slice in full (as it holds a
reservation), so `admit.lua`'s check there, and every other instance's lease, count it: what
all slices and all per-request reservations hold together never passes the limit. Locally a
request takes its cost from the slice only if it fits (`used + cost <= size`), in plain
integer arithmetic with no `await` between the check and the take (one event loop, so no
lock is needed). A settlement refunds or tops up within the slice, as `settle.lua` does a
reservation. A slice is returned to the counter (its unused part back, its settled spend added
to the all-time total) when it has been idle for `_IDLE` seconds, once it is older than
`_AGE`, when a larger request needs a new one, when its period ends, and at `flush`/`aclose`;
it is only given back once its requests are settled, unless it is forced (shutdown, or its
lease is near expiry): then requests still in flight settle on the counter directly
(`adjust`), exactly as their reservation would have.

Sizes. A slice is `1/divisor` of what the budget has neither spent nor leased, so slices
shrink as the budget runs out, and at most `_MAX_REQUESTS` requests like the one asking (what a
busy instance spends in about a second: the most a dead instance can strand); one that would
not hold `_MIN_REQUESTS` of them is not leased, and the request is admitted exactly, per
request, on the global slot (then no new lease is tried for `_REFUSED_FOR` seconds). A budget
without a limit (it only counts spend) gets slices of `_MAX_REQUESTS` requests.

Periods. A slice belongs to the period (the counter's epoch) it was leased in; it is not used
once that period ends, its return adds nothing to the next period, and a request admitted from
it but settled after the end is charged in full to the new period, as `settle.lua` charges a
reservation that outlived its period.

A dead instance. Leases expire after `_LEASE_TTL` seconds (an instance takes nothing from a
slice in the last quarter of that, and returns it); the next lease by any other instance
sweeps an expired one, which then counts as spent in full (it stays in `spent` and moves to
the all-time total): spend stays within the budget, and the dead instance's unused slice is
lost to its period. An instance's own leases are never swept by its own leases (its clock
may have jumped, as a test's fake clock does); a return that comes after the sweep changes
nothing.

Reads (`budgets`, `/global/spend`) leave outstanding slices out and add what the reading
store's own slices hold: one instance reads what it spent at once, and every instance's spend
shows once its slices are returned (within `_IDLE` seconds of its last request).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
from collections.abc import Awaitable
from typing import Any, Final

from llmfence.exceptions import StoreError

from ._redis_base import RedisBase, num, opt_num, text
from ._redis_keys import scoped, tag
from ._types import Admission, BudgetScope

__all__ = ["RedisSlices"]

GLOBAL: Final = "global"
_MIN_REQUESTS: Final = 4  # a slice must hold at least this many requests like the one asking
_MAX_REQUESTS: Final = 1024  # and holds at most this many (every slice of an unlimited budget)
_LEASE_TTL: Final = 120.0  # seconds (the caller's clock) a lease lives unless returned
_IDLE: Final = 1.0  # seconds without a take before a slice is returned
_AGE: Final = 10.0  # seconds after which a slice is retired (returned once its requests end)
_TICK: Final = 0.25  # how often the keeper looks
_REFUSED_FOR: Final = 0.5  # seconds no lease is tried after the counter had none to give


class _Slice:
    """One leased slice: its size, what its requests took, and where it stands."""

    __slots__ = (
        "base", "born", "ends", "epoch", "expires", "giving", "inflight", "last", "lease_id",
        "limit", "retired", "returning", "settled", "size", "total", "used",
    )  # fmt: skip

    def __init__(self, lease_id: str, reply: list[Any], limit: int | None, expires: float) -> None:
        size, epoch, ends, base, total = (text(value) for value in reply)
        self.lease_id, self.limit, self.expires = lease_id, limit, expires
        self.size, self.epoch = int(size), epoch
        self.ends: float | None = float(ends) if ends else None
        self.base, self.total = int(base), int(total)  # the counter's spend and total, leased
        self.used = 0  # reserved by requests in flight + the actual cost of settled ones
        self.settled = 0  # the actual cost of settled ones
        self.inflight = 0
        self.born = self.last = time.monotonic()
        self.retired = False  # takes nothing more; returned once `inflight` is 0
        self.returning: tuple[int, int] | None = None  # (used, settled) frozen for the return
        self.giving: asyncio.Task[None] | None = None  # the return under way, or done


class RedisSlices(RedisBase):
    """The slice part of `RedisStore`: lease, take, settle and return global budget slices."""

    def _setup_slices(self, enabled: bool, divisor: int) -> None:
        self._slicing = enabled
        self._divisor = divisor
        self._counter = scoped(self._prefix, "budget", GLOBAL)
        self._slices_key = tag(self._prefix, GLOBAL) + "slices"
        self._current: _Slice | None = None
        self._retired: list[_Slice] = []
        self._tickets: dict[str, tuple[_Slice, int]] = {}  # request id -> slice, reserved
        self._refused_until = 0.0  # monotonic
        self._refused_min = 0  # the smallest slice asked for when none was given
        self._leasing: asyncio.Lock | None = None
        self._leasing_loop: asyncio.AbstractEventLoop | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._clock = (0.0, 0.0)  # the caller's last `now`, and the monotonic time then

    # -- admission ---------------------------------------------------------------------------

    def _global_index(self, admission: Admission) -> int | None:
        """The position of the one global budget level a slice may admit, if any."""
        if not self._slicing:
            return None
        found = None
        for i, scope in enumerate(admission.budgets):
            if scope.key == GLOBAL:
                if found is not None:
                    return None  # named twice: taken twice, per request
                found = i
        return found

    async def _slice_take(self, admission: Admission, index: int) -> bool:
        """Take the request's cost at the global level from a slice, leasing one if needed.

        False when no slice can hold it: the level is then admitted per request.
        """
        request_id, cost = admission.request_id, admission.cost
        if request_id in self._tickets:
            return True  # admitted from a slice already (an admission sent again)
        self._clock = (admission.now, time.monotonic())
        scope = admission.budgets[index]
        if self._take(request_id, scope, cost, admission.now):
            return True
        wanted = max(1, _MIN_REQUESTS * cost)
        if time.monotonic() < self._refused_until and wanted >= self._refused_min:
            return False
        loop = asyncio.get_running_loop()
        if self._leasing is None or self._leasing_loop is not loop:
            self._leasing, self._leasing_loop = asyncio.Lock(), loop
        async with self._leasing:  # one lease at a time; the others wait for it
            if self._take(request_id, scope, cost, admission.now):
                return True
            if time.monotonic() < self._refused_until and wanted >= self._refused_min:
                return False  # the lease it waited for had nothing to give
            lease_id = secrets.token_hex(8)
            expires = admission.now + _LEASE_TTL
            # The slice this one follows gives back, in the same call, what none of its
            # requests holds: unused bits of retired slices do not add up near the end.
            # It takes nothing more from here on (no take may slip in while this call waits).
            before = self._current
            if before is not None:
                self._retire(before)
            if before is not None and before.returning is None and before.used < before.size:
                follows, give = before.lease_id, before.size - before.used
            else:
                before, follows, give = None, "", 0
            lease = asyncio.ensure_future(self._script(
                "lease", [self._counter, self._slices_key], [
                    "lease", num(admission.now), opt_num(scope.period_end),
                    "" if scope.limit is None else scope.limit, lease_id, self._divisor, wanted,
                    _MAX_REQUESTS * max(1, cost), num(expires), follows, give,
                    *(held.lease_id for held in self._retired),  # alive: not to be swept
                ],
            ))  # fmt: skip
            try:
                await asyncio.shield(lease)
            except asyncio.CancelledError:
                # The caller left (a disconnect): the lease still lands, and is kept (and
                # returned), rather than lost until it expires.
                lease.add_done_callback(
                    functools.partial(self._orphan, before, give, lease_id, scope.limit, expires)
                )
                raise
            leased = self._adopt(before, give, lease_id, scope.limit, expires, lease)
            if leased is None:
                self._refused_until, self._refused_min = time.monotonic() + _REFUSED_FOR, wanted
                return False
            if self._current is not None:
                self._retire(self._current)
            self._current = leased
            self._start_keeper()
            return self._take(request_id, scope, cost, admission.now)

    def _adopt(
        self,
        before: _Slice | None,
        give: int,
        lease_id: str,
        limit: int | None,
        expires: float,
        lease: asyncio.Future[Any],
    ) -> _Slice | None:
        """The slice a finished lease call gave (None: none), its predecessor shrunk."""
        if lease.cancelled() or lease.exception() is not None:
            return None
        reply = lease.result()
        if before is not None and text(reply[5]) == "1":
            before.size -= give
        leased = _Slice(lease_id, reply[:5], limit, expires)
        return leased if leased.size else None

    def _orphan(
        self,
        before: _Slice | None,
        give: int,
        lease_id: str,
        limit: int | None,
        expires: float,
        lease: asyncio.Future[Any],
    ) -> None:
        """A lease whose caller left: its slice is kept only to be returned."""
        leased = self._adopt(before, give, lease_id, limit, expires, lease)
        if leased is not None:
            self._retire(leased)
            self._start_keeper()

    def _take(self, request_id: str, scope: BudgetScope, cost: int, now: float) -> bool:
        # No await in here: check and take are one step for the event loop.
        s = self._current
        if s is None:
            return False
        if (
            s.retired
            or s.limit != scope.limit
            or (s.ends is not None and now >= s.ends)
            or now >= s.expires - _LEASE_TTL / 4
        ):
            self._retire(s)
            return False
        if s.used + cost > s.size:
            return False
        s.used += cost
        s.inflight += 1
        s.last = time.monotonic()
        self._tickets[request_id] = (s, cost)
        return True

    def _slice_untake(self, request_id: str) -> None:
        """Give back a take whose admission took nothing or was refused elsewhere."""
        found = self._tickets.pop(request_id, None)
        if found is not None:
            s, reserved = found
            s.used -= reserved
            s.inflight -= 1

    def _slice_level(self, request_id: str) -> tuple[int, int, float | None]:
        """The global level as this instance sees it before the request's take."""
        s, reserved = self._tickets[request_id]
        return s.base + s.used - reserved, s.total + s.settled, s.ends

    def _slice_spend(self, now: float) -> tuple[int, int]:
        """What this store's slices hold that the counter does not show yet: the spend of
        the current period (reserved and settled), and the settled spend for the total."""
        spent = settled = 0
        slices = [*self._retired] if self._current is None else [self._current, *self._retired]
        for s in slices:
            if s.returning is not None:
                continue
            settled += s.settled
            if s.ends is None or now < s.ends:
                spent += s.used
        return spent, settled

    # -- settlement --------------------------------------------------------------------------

    def _slice_settle(
        self, request_id: str, cost: int, now: float, held: bool
    ) -> Awaitable[Any] | None:
        """Settle a request admitted from a slice; a call for the counter when it must go there.

        `held`: the home held the admission, or a first try of this settlement found it
        there (else it expired: its take stays spent, and the settlement charges the levels
        it names, the global one included). Once per request id: the take is forgotten here.
        """
        found = self._tickets.pop(request_id, None)
        if found is None:
            return None
        s, reserved = found
        s.inflight -= 1
        if not held:
            return None
        if s.returning is None and (s.ends is None or now < s.ends):
            s.used += cost - reserved
            s.settled += cost
            return None
        if s.returning is None:
            s.used -= reserved  # the period ended: the slice's return leaves it out
        if s.returning == (-1, -1):
            return None  # the lease expired and counted in full
        # The slice is gone (returned, or its period ended): settle on the counter itself.
        return self._script(
            "lease", [self._counter, self._slices_key],
            ["adjust", num(now), s.epoch, reserved, cost],
        )  # fmt: skip

    # -- returns -----------------------------------------------------------------------------

    def _retire(self, s: _Slice) -> None:
        s.retired = True
        if s is self._current:
            self._current = None
        if s not in self._retired:
            self._retired.append(s)

    def _now(self) -> float:
        """The caller's clock, carried forward since its last call."""
        then, at = self._clock
        return then + (time.monotonic() - at)

    async def _give_back(self, s: _Slice) -> None:
        """Return one slice; a return of it under way (the keeper's, a flush's) is joined."""
        task = s.giving
        loop = asyncio.get_running_loop()
        if (
            task is None
            or task.get_loop() is not loop
            or (task.done() and (task.cancelled() or task.exception() is not None))
        ):
            task = s.giving = loop.create_task(self._return_now(s))
        await asyncio.shield(task)

    async def _return_now(self, s: _Slice) -> None:
        if s.returning is None:
            s.returning = (s.used, s.settled)
        used, settled = s.returning
        reply = await self._script(
            "lease", [self._counter, self._slices_key],
            ["return", num(self._now()), s.lease_id, used, settled],
        )  # fmt: skip
        if text(reply[0]) == "gone":
            s.returning = (-1, -1)
        if s in self._retired:
            self._retired.remove(s)

    async def return_slices(self) -> None:
        """Return every slice of the global budget this store holds, now.

        `aclose` and `Fence.flush` (and so the app's shutdown) call it. Requests still in
        flight then settle on the counter directly.

        Raises:
            StoreError: When a return fails (it is tried again later, or expires).
        """
        if self._current is not None:
            self._retire(self._current)
        for s in list(self._retired):
            await self._give_back(s)

    def _start_keeper(self) -> None:
        keeper = self._keeper
        loop = asyncio.get_running_loop()
        if keeper is None or keeper.done() or keeper.get_loop() is not loop:
            self._keeper = loop.create_task(self._keep())

    async def _keep(self) -> None:
        """Retire idle and old slices and return them once their requests are settled."""
        while self._current is not None or self._retired:
            await asyncio.sleep(_TICK)
            now, mono = self._now(), time.monotonic()
            s = self._current
            if s is not None and (mono - s.last >= _IDLE or mono - s.born >= _AGE):
                self._retire(s)
            for s in list(self._retired):
                if s.inflight <= 0 or now >= s.expires - _LEASE_TTL / 4:
                    with contextlib.suppress(StoreError):  # tried again at the next tick
                        await self._give_back(s)

    async def _stop_slices(self) -> None:
        """Return the slices (what can be) and stop the keeper: the store is closing."""
        with contextlib.suppress(StoreError):
            await self.return_slices()
        keeper, self._keeper = self._keeper, None
        if keeper is not None and keeper.get_loop() is asyncio.get_running_loop():
            keeper.cancel()
            with contextlib.suppress(BaseException):
                await keeper
