"""`admit.lua`'s arguments and reply, built and read for the single-node and cluster paths.

The Python around `admit.lua` names the keys, packs the arguments in the order the script's
header lists them and reads its one-string reply; the arithmetic that needs no state
(remaining units, retry times, headroom) stays here and in `_window`, shared with `MemoryStore`,
so a refusal is worded exactly as `MemoryStore` words it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Final

from . import _window
from ._redis_base import num, opt_num, text
from ._redis_keys import scoped
from ._types import (
    Admission,
    AdmissionResult,
    BudgetScope,
    BudgetState,
    RateHit,
    Refusal,
    SlotRequest,
)

__all__ = [
    "CLIENT_LEVELS",
    "IDLE",
    "TOMBSTONE_TTL_MS",
    "Buckets",
    "Levels",
    "admission_result",
    "admit_call",
    "read_admit",
    "refusal",
    "ttl_ms",
]

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
CLIENT_LEVELS: Final = frozenset({"end_user", "ip"})
# How long a tombstone turns a late admission of its request id into a no-op (MemoryStore's
# `TOMBSTONE_TTL`): as long as the default lease TTL, far past any store timeout, so an
# admission queued behind a stall still finds it.
TOMBSTONE_TTL_MS: Final = 600_000
# admit.lua's verdict for an admission that takes nothing (a live reservation or tombstone).
IDLE: Final = 4

Buckets = Sequence[tuple[int, int]]  # per rate hit: level, t (as stored, before the step)
Levels = Sequence[tuple[int, int, float | None]]  # per budget: spent, total, end (before)


def admit_call(
    prefix: str,
    admission: Admission,
    rates: Sequence[RateHit],
    slots: Sequence[SlotRequest],
    scopes: Sequence[BudgetScope],
    reservation: str,
    tombstone: str,
    *,
    idle: bool,
    undo: bool = False,
) -> tuple[list[str], list[Any]]:
    """`admit.lua`'s keys and arguments for some of an admission's checks (all on one node)."""
    now = admission.now
    keys = [reservation]
    args: list[Any] = [
        num(now), _window.to_ms(now), admission.request_id, admission.cost,
        num(now + admission.ttl), ttl_ms(admission.ttl * 1000),
        len(rates), len(slots), len(scopes), "1" if idle else "", "1" if undo else "",
    ]  # fmt: skip
    for hit in rates:
        size = int(hit.window * 1000)
        keys.append(scoped(prefix, "bucket", hit.key))
        args += (hit.kind, size, hit.limit, hit.cost, ttl_ms(2 * size))
    for slot in slots:
        keys.append(scoped(prefix, "lease", slot.key))
        args += (slot.limit, num(now + slot.ttl), ttl_ms(slot.ttl * 1000))
    for scope in scopes:
        keys.append(scoped(prefix, "budget", scope.key))
        args += (
            "" if scope.limit is None else scope.limit,
            opt_num(scope.period_end),
            "1" if scope.level in CLIENT_LEVELS else "",
        )
    keys.append(tombstone)
    return keys, args


def read_admit(reply: Any, rates: int) -> tuple[int, int, int, Buckets, Levels]:
    """`admit.lua`'s one-string reply: verdict, position, held, bucket and budget states."""
    # The script answers with the states before anything was reserved, in one string.
    values = text(reply).split()
    split = 3 + 2 * rates
    buckets = [(int(values[i]), int(values[i + 1])) for i in range(3, split, 2)]
    levels = [
        (int(values[i]), int(values[i + 1]), None if values[i + 2] == "-" else float(values[i + 2]))
        for i in range(split, len(values), 3)
    ]
    return int(values[0]), int(values[1]), int(values[2]), buckets, levels


def refusal(
    admission: Admission,
    verdict: int,
    index: int,
    held: int,
    buckets: Buckets,
    levels: Levels,
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


def admission_result(
    admission: Admission,
    refusal: Refusal | None,
    buckets: Buckets,
    levels: Levels,
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


def ttl_ms(milliseconds: float) -> int:
    return max(_MIN_KEY_TTL_MS, math.ceil(milliseconds))
