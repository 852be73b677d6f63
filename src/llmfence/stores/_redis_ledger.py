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
`_TOMBSTONE_TTL_MS`. The end users' spend totals are
kept for the most recent `max(max_spend_records, 1000)` of them. Everything the operator
created stays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

from . import _window
from ._redis_base import RedisBase, encode_record, num, opt_float, opt_num, text
from ._spend import total_keys
from ._types import (
    Admission,
    AdmissionResult,
    BudgetScope,
    BudgetState,
    Refusal,
    Settlement,
)

__all__ = ["RedisLedger"]

# A lease ends when its request does, which no store can predict: suggest a short retry.
_PARALLEL_RETRY: Final = 1.0
# Redis expires keys on its own clock while the scripts judge expiry by the caller's `now`
# (a fake clock in tests, a slightly skewed one on another host). Key TTLs only reclaim
# memory; a floor under them keeps Redis from forgetting state a short bucket, lease or
# reservation still holds by the caller's clock, and the scripts' own checks make expiry exact.
# A bucket is empty one window after its last write (see `_window`); its key lives two.
_MIN_KEY_TTL_MS: Final = 60_000
# Levels whose counters the clients name (a body's `user`, a caller's address): their budget
# counters expire when idle (budget.lua). MemoryStore drops the same ones in its sweep.
_CLIENT_LEVELS: Final = frozenset({"end_user", "ip"})
# How long a tombstone turns a late admission of its request id into a no-op (MemoryStore's
# `TOMBSTONE_TTL`): as long as the default lease TTL, far past any store timeout, so an
# admission queued behind a stall still finds it.
_TOMBSTONE_TTL_MS: Final = 600_000
# admit.lua's verdict for an admission that takes nothing (a live reservation or tombstone).
_IDLE: Final = 4

_Buckets = Sequence[tuple[int, int]]  # per rate hit: level, t (as stored, before the step)
_Levels = Sequence[tuple[int, int, float | None]]  # per budget: spent, total, end (before)


class RedisLedger(RedisBase):
    """The ledger part of `RedisStore`: every `LedgerStore` method."""

    async def admit(self, admission: Admission) -> AdmissionResult:
        """Apply every check of one request atomically: all reserved, or nothing changed.

        One round trip: a single EVALSHA of `admit.lua`.
        """
        now = admission.now
        now_ms = _window.to_ms(now)
        rates, slots, scopes = admission.rates, admission.slots, admission.budgets
        tag = self._tag
        request_id = admission.request_id
        keys = [tag + "reservation:" + request_id]
        args: list[Any] = [
            num(now), now_ms, admission.request_id, admission.cost,
            num(now + admission.ttl), _ttl_ms(admission.ttl * 1000),
            len(rates), len(slots), len(scopes),
        ]  # fmt: skip
        for hit in rates:
            size = int(hit.window * 1000)
            keys.append(tag + "bucket:" + hit.key)
            args += (hit.kind, size, hit.limit, hit.cost, _ttl_ms(2 * size))
        for slot in slots:
            keys.append(tag + "lease:" + slot.key)
            args += (slot.limit, num(now + slot.ttl), _ttl_ms(slot.ttl * 1000))
        for scope in scopes:
            keys.append(tag + "budget:" + scope.key)
            args += (
                "" if scope.limit is None else scope.limit,
                opt_num(scope.period_end),
                "1" if scope.level in _CLIENT_LEVELS else "",
            )
        keys.append(tag + "tombstone:" + request_id)

        # The script answers with the states before anything was reserved, in one string.
        reply = text(await self._script("admit", keys, args)).split()
        split = 3 + 2 * len(rates)
        buckets = [(int(reply[i]), int(reply[i + 1])) for i in range(3, split, 2)]
        levels = [
            (int(reply[i]), int(reply[i + 1]), None if reply[i + 2] == "-" else float(reply[i + 2]))
            for i in range(split, len(reply), 3)
        ]
        verdict, position, held = int(reply[0]), int(reply[1]) - 1, int(reply[2])
        if verdict == _IDLE:
            return _admission_result(admission, None, buckets, levels, took=False)
        refusal = _refusal(admission, verdict, position, held, buckets, levels)
        return _admission_result(admission, refusal, buckets, levels, took=refusal is None)

    async def settle(self, settlement: Settlement) -> bool:
        """Settle a request id once: its reservation, or the levels it names; and its record.

        One round trip: a single EVALSHA of `settle.lua`, which also appends the record and
        adds it to its running totals. A tombstone is left for the id either way (a reply
        can be lost after the script ran): the same settlement sent again changes nothing.
        """
        now = settlement.now
        tokens = settlement.tokens
        record = settlement.record
        charges = settlement.charges
        tag = self._tag
        keys = [
            tag + "reservation:" + settlement.request_id,
            self._log_key,
            self._totals_key,
            tag + "spend:end_users",
            tag + "tombstone:" + settlement.request_id,
        ]
        args: list[Any] = [
            num(now), _window.to_ms(now), settlement.cost, "" if tokens is None else tokens,
            settlement.request_id, 1 if settlement.refund_requests else 0, self._max_records,
            _TOMBSTONE_TTL_MS, "always", len(charges),
        ]  # fmt: skip
        for scope in charges:
            keys.append(tag + "budget:" + scope.key)
            args += (opt_num(scope.period_end), "1" if scope.level in _CLIENT_LEVELS else "")
        if record is None:
            args.append("")
        else:
            args += (encode_record(record), record.cost, record.input_tokens, record.output_tokens)
            args += total_keys(record)
        return bool(await self._script("settle", keys, args))

    async def release(self, request_id: str, slot_keys: Sequence[str]) -> None:
        """Free a request's leases without settling anything.

        A release ahead of its admission leaves a tombstone: the late admission takes nothing.
        """
        tag = self._tag
        keys = [tag + "reservation:" + request_id, tag + "tombstone:" + request_id]
        keys += [tag + "lease:" + key for key in slot_keys]
        await self._script("release", keys, [request_id, _TOMBSTONE_TTL_MS])

    # -- budgets outside a request -----------------------------------------------------------

    async def charge(self, scopes: Sequence[BudgetScope], cost: int, now: float) -> None:
        """Add spend at every level unconditionally."""
        if scopes:
            keys = [self._tag + "budget:" + scope.key for scope in scopes]
            args: list[Any] = [num(now), cost]
            args += [opt_num(scope.period_end) for scope in scopes]
            args += ["1" if scope.level in _CLIENT_LEVELS else "" for scope in scopes]
            await self._script("charge", keys, args)

    async def budgets(self, scopes: Sequence[BudgetScope], now: float) -> list[BudgetState]:
        """Read budget levels; a period that has ended reads as zero spent."""
        if not scopes:
            return []
        keys = [self._tag + "budget:" + scope.key for scope in scopes]
        reply = await self._script("budgets", keys, [])
        states = []
        for i, scope in enumerate(scopes):
            spent, total = int(reply[3 * i]), int(reply[3 * i + 1])
            end = opt_float(reply[3 * i + 2])
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
        """Start a new period for one budget counter now."""
        await self._script("reset_budget", [self._tag + "budget:" + key], [opt_num(period_end)])


def _refusal(
    admission: Admission,
    verdict: int,
    index: int,
    held: int,
    buckets: _Buckets,
    levels: _Levels,
) -> Refusal | None:
    """The refusal `admit.lua` reported, worded exactly as `MemoryStore` words it."""
    if verdict == 0:
        return None
    if verdict == 1:
        hit = admission.rates[index]
        level, t = buckets[index]
        size = int(hit.window * 1000)
        level = _window.drained(level, t, _window.to_ms(admission.now), size, hit.limit)
        retry = _window.retry_after_ms(level, size, hit.limit, hit.cost)
        used = hit.limit - _window.remaining(level, size, hit.limit)
        return Refusal(
            hit.kind, hit.level, hit.label, hit.limit, used, hit.cost,
            None if retry is None else retry / 1000,
        )  # fmt: skip
    if verdict == 2:
        slot = admission.slots[index]
        return Refusal(
            "parallel_requests", slot.level, slot.label, slot.limit, held, 1,
            _PARALLEL_RETRY if slot.limit > 0 else None,
        )  # fmt: skip
    scope = admission.budgets[index]
    spent, _, resets_at = levels[index]
    assert scope.limit is not None  # only a limited level refuses
    return Refusal(
        "budget", scope.level, scope.label, scope.limit, spent, admission.cost,
        None if resets_at is None else max(0.0, resets_at - admission.now), resets_at,
    )  # fmt: skip


def _admission_result(
    admission: Admission,
    refusal: Refusal | None,
    buckets: _Buckets,
    levels: _Levels,
    *,
    took: bool,
) -> AdmissionResult:
    """The states after the step: what the script read, plus what an admission took."""
    now_ms = _window.to_ms(admission.now)
    drained = _window.drained
    after: dict[str, tuple[int, int]] = {}  # per key: level, t after the step
    reserved: dict[str, int] = {}
    if took:
        # What admit.lua wrote, hit by hit: a key named twice took twice, as in MemoryStore.
        for hit, stored in zip(admission.rates, buckets, strict=True):
            level, t = after.get(hit.key, stored)
            size = int(hit.window * 1000)
            level = drained(level, t, now_ms, size, hit.limit) + hit.cost * size
            after[hit.key] = (level, now_ms if now_ms > t else t)
        for scope in admission.budgets:
            reserved[scope.key] = reserved.get(scope.key, 0) + admission.cost
    rates = []
    for hit, stored in zip(admission.rates, buckets, strict=True):
        size = int(hit.window * 1000)
        level, t = after.get(hit.key, stored)
        rates.append(_window.rate_state(hit, drained(level, t, now_ms, size, hit.limit), size))
    budgets = []
    headroom: int | None = None
    for scope, (spent, total, end) in zip(admission.budgets, levels, strict=True):
        budgets.append(
            BudgetState(
                scope.key,
                scope.level,
                scope.label,
                scope.limit,
                spent + reserved.get(scope.key, 0),
                end,
                total,
            )
        )
        # Headroom is measured before this request's reservation.
        if scope.limit is not None and (headroom is None or scope.limit - spent < headroom):
            headroom = scope.limit - spent
    return AdmissionResult(refusal, tuple(rates), tuple(budgets), headroom)


def _ttl_ms(milliseconds: float) -> int:
    return max(_MIN_KEY_TTL_MS, math.ceil(milliseconds))
