"""`RedisStore`'s ledger: admissions, settlements, leases and budget counters, one script each.

`admit` and `settle` are one EVALSHA each (`admit.lua`, `settle.lua`); the Python around them
only names the keys, packs the arguments in the order the script's header lists them, and reads
the reply. The scripts mirror `MemoryStore` rule for rule; the arithmetic that needs no state
(remaining units, retry times, headroom) stays in Python, in `_window`, shared with
`MemoryStore`.

Money is integer nano-USD from end to end: it enters a script as text and is added by
`HINCRBY` (or, for the spend totals, by the script's exact decimal addition), never by
`INCRBYFLOAT`, and never goes through `cjson.encode` or a Lua number that Redis would format
with 14 significant digits. Times stay the caller's float text (compared as doubles, exactly as
`MemoryStore` compares them), except the rate buckets, which count in integer milliseconds
as `_window` does.

Keys that clients name expire when idle (see `budget.lua`): an end user's budget counter a
minute after its period ends (and never before a reservation that may hold it is gone), or, for
spend that never resets, a minute after it is back at zero; rate buckets two windows (at least
a minute) after their last write; lease sets with their longest lease; reservations with the
admission's TTL; tombstones (left by every settlement, and by a release that came before its
admission: they make a settlement sent again, and a late admission, a no-op) after
`TOMBSTONE_TTL_MS`. The end users' spend totals are
kept for the most recent `max(max_spend_records, 1000)` of them. Everything the operator
created stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._redis_admit import (
    IDLE,
    TOMBSTONE_TTL_MS,
    admission_result,
    admit_call,
    read_admit,
    refusal,
)
from ._redis_base import opt_float, opt_num
from ._redis_keys import scoped
from ._redis_shards import RedisShards
from ._redis_slices import GLOBAL
from ._types import Admission, AdmissionResult, BudgetScope, BudgetState, Settlement

__all__ = ["RedisLedger"]


class RedisLedger(RedisShards):
    """The ledger part of `RedisStore`: every `LedgerStore` method.

    On a single node each method is one script over every key it names; on a cluster the
    `_redis_shards` part runs it slot by slot.
    """

    async def admit(self, admission: Admission) -> AdmissionResult:
        """Apply every check of one request atomically: all reserved, or nothing changed.

        One round trip on a single node: a single EVALSHA of `admit.lua`.
        """
        if self._cluster:
            return await self._admit_shards(admission)
        request = self._tag  # a single node: the registry's tag, as in earlier versions
        keys, args = admit_call(
            self._prefix, admission, admission.rates, admission.slots, admission.budgets,
            request + "reservation:" + admission.request_id,
            request + "tombstone:" + admission.request_id,
            idle=False,
        )  # fmt: skip
        verdict, position, held, buckets, levels = read_admit(
            await self._script("admit", keys, args), len(admission.rates)
        )
        if verdict == IDLE:
            return admission_result(admission, None, buckets, levels, took=False)
        refused = refusal(admission, verdict, position - 1, held, buckets, levels)
        return admission_result(admission, refused, buckets, levels, took=refused is None)

    async def settle(self, settlement: Settlement) -> bool:
        """Settle a request id once: its reservation, or the levels it names; and its record.

        One round trip on a single node: a single EVALSHA of `settle.lua`, which also appends
        the record and adds it to its running totals. A tombstone is left for the id either
        way (a reply can be lost after the script ran): the same settlement sent again
        changes nothing.
        """
        if self._cluster:
            return await self._settle_shards(settlement)
        request_id = settlement.request_id
        keys, args = self._settle_call(
            settlement,
            self._tag + "reservation:" + request_id,
            self._tag + "tombstone:" + request_id,
            "always",
            settlement.charges,
            record=True,
        )
        return bool(await self._script("settle", keys, args))

    async def release(self, request_id: str, slot_keys: Sequence[str]) -> None:
        """Free a request's leases without settling anything.

        A release ahead of its admission leaves a tombstone: the late admission takes nothing.
        """
        if self._cluster:
            await self._release_shards(request_id, slot_keys)
            return
        keys = [self._tag + "reservation:" + request_id, self._tag + "tombstone:" + request_id]
        keys += [scoped(self._prefix, "lease", key) for key in slot_keys]
        await self._script("release", keys, [request_id, TOMBSTONE_TTL_MS])

    # -- budgets outside a request -----------------------------------------------------------

    async def charge(self, scopes: Sequence[BudgetScope], cost: int, now: float) -> None:
        """Add spend at every level unconditionally (on a cluster, slot by slot)."""
        if not scopes:
            return
        if self._cluster:
            parts = self._by_slot([scope.key for scope in scopes])
        else:
            parts = [list(range(len(scopes)))]
        await self._each(self._charge_part([scopes[i] for i in part], cost, now) for part in parts)

    async def budgets(self, scopes: Sequence[BudgetScope], now: float) -> list[BudgetState]:
        """Read budget levels; a period that has ended reads as zero spent."""
        if not scopes:
            return []
        prefix = self._prefix
        if self._cluster:
            parts = self._by_slot([scope.key for scope in scopes])
        else:
            parts = [list(range(len(scopes)))]

        async def read(part: list[int]) -> list[Any]:
            keys = [scoped(prefix, "budget", scopes[i].key) for i in part]
            return list(await self._script("budgets", keys, []))

        replies = await self._each(read(part) for part in parts)
        values: list[Any] = [None] * (3 * len(scopes))
        for part, reply in zip(parts, replies, strict=True):
            for j, i in enumerate(part):
                values[3 * i : 3 * i + 3] = reply[3 * j : 3 * j + 3]
        states = []
        for i, scope in enumerate(scopes):
            spent, total = int(values[3 * i]), int(values[3 * i + 1])
            if scope.key == GLOBAL and self._slicing:
                # What this store's slices hold and the counter does not show yet.
                held, settled = self._slice_spend(now)
                spent, total = spent + held, total + settled
            end = opt_float(values[3 * i + 2])
            ended = end is not None and now >= end
            states.append(
                BudgetState(
                    scope.key,
                    scope.level,
                    scope.label,
                    scope.limit,
                    0 if ended else spent,
                    scope.period_end if ended or end is None else end,
                    total,
                )
            )
        return states

    async def reset_budget(self, key: str, period_end: float | None, now: float) -> None:
        """Start a new period for one budget counter now.

        The global counter's slices this store holds are returned first (to the old period);
        another store's are used until it returns them (idle, old, or at its next lease: at
        most `_redis_slices._AGE` seconds), and what they admit meanwhile counts in the old
        period.
        """
        if key == GLOBAL and self._slicing:
            await self.return_slices()
        keys = [scoped(self._prefix, "budget", key)]
        await self._script("reset_budget", keys, [opt_num(period_end)])
