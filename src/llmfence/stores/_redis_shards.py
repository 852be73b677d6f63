"""`RedisStore` on a Redis Cluster: each call split by slot, the slots run in parallel.

A script may only touch keys of one slot on a cluster, and a request's checks live on several
(see `_redis_keys`: one per scope). So on a cluster:

`admit`
    First the request id's home (`home.lua`, on the request id's own slot) records which slots
    the admission reserves on; then `admit.lua` runs on every slot at once, each with the
    checks whose keys live there. If any slot refuses, what the others reserved is given back
    (`settle.lua` with nothing charged and no tombstone) and the home forgotten, so a refusal
    leaves nothing; the refusal reported is the one a single node would report (the first
    failing check in `MemoryStore`'s order), from the states every slot read before
    reserving, so headers, `headroom` and the output allowance fit as on one node.
`settle`
    The home decides which rule applies, once (see `settle.lua`): a held admission is settled
    on the slots it reserved on; an unknown id charges `Settlement.charges` on their slots;
    the spend record goes to the spend log's slot. Each slot's part leaves its own tombstone
    where needed, so a settlement sent again (a reply was lost, or a slot failed) finishes
    what is left and changes nothing that was done.
`release`
    The home gets a tombstone if no admission holds the id; the leases are freed on their
    slots.
`charge`, `budgets`
    One script per slot, in parallel.

The global budget level is the exception when the store leases slices of it
(`_redis_slices`): an admission takes it from this instance's slice, in memory, and only the
other levels go to their slots; its settlement settles the take there too (the home records
no global slot for it). A refusal on another slot, or an admission that takes nothing, gives
the take back.

A request therefore costs two round trips in a row on a cluster for `admit` (the home, then
every slot at once; a refusal that must give something back, two more) and two for `settle`,
against one each on a single node, and one script per slot it touches. Budgets are exact all
the same: a slot reserves only what fits its own levels, and nothing stays reserved once a
request is refused.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

from . import _window
from ._redis_admit import (
    CLIENT_LEVELS,
    TOMBSTONE_TTL_MS,
    admission_result,
    admit_call,
    read_admit,
    refusal,
    ttl_ms,
)
from ._redis_base import num, opt_num, text
from ._redis_keys import request_tag, scope_of, scoped, tag
from ._redis_slices import RedisSlices
from ._redis_spendlog import RedisSpendLog
from ._spend import total_keys
from ._types import Admission, AdmissionResult, BudgetScope, Settlement

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RedisShards"]

# A refusal's order among the checks, as `MemoryStore` runs them: request buckets, token
# buckets, leases, budgets; then the check's position in the admission.
_REQUESTS, _TOKENS, _LEASES, _BUDGETS = 0, 1, 2, 3
_REFUSED: Final = frozenset({1, 2, 3})


@lru_cache(maxsize=65_536)
def _slot(hash_tag: str) -> int:
    from redis.crc import key_slot

    slot: int = key_slot(hash_tag.encode())
    return slot


class _Part:
    """The checks of one admission whose keys live on one slot."""

    __slots__ = ("budgets", "rates", "slots", "tag")

    def __init__(self, hash_tag: str) -> None:
        self.tag = hash_tag
        self.rates: list[int] = []
        self.slots: list[int] = []
        self.budgets: list[int] = []


class RedisShards(RedisSlices, RedisSpendLog):
    """What `RedisStore` does differently on a cluster, and the calls both paths share."""

    # -- shared by both paths ----------------------------------------------------------------

    def _by_slot(self, counters: Sequence[str]) -> list[list[int]]:
        """Positions of budget counters, grouped by their keys' slots (first seen first)."""
        prefix = self._prefix
        parts: dict[int, list[int]] = {}
        for i, counter in enumerate(counters):
            parts.setdefault(_slot(tag(prefix, scope_of(counter))), []).append(i)
        return list(parts.values())

    def _settle_call(
        self,
        settlement: Settlement,
        reservation: str,
        tombstone: str,
        mode: str,
        charges: Sequence[BudgetScope],
        *,
        record: bool,
    ) -> tuple[list[str], list[Any]]:
        """`settle.lua`'s keys and arguments (on a cluster, for one slot's part)."""
        now = settlement.now
        tokens = settlement.tokens
        spend = settlement.record if record else None
        prefix = self._prefix
        shard = self._spend_shard(settlement.request_id)
        if spend is None and self._cluster:
            # Not touched without a record, but named: on a cluster every key must be on the
            # slot this part runs on.
            keys = [reservation, reservation, reservation, reservation, tombstone]
        else:
            log = self._spend_tags[shard]
            keys = [reservation, log + "log", log + "totals", log + "end_users", tombstone]
        args: list[Any] = [
            num(now), _window.to_ms(now), settlement.cost, "" if tokens is None else tokens,
            settlement.request_id, 1 if settlement.refund_requests else 0, self._keeps[shard],
            TOMBSTONE_TTL_MS, mode, len(charges),
        ]  # fmt: skip
        for scope in charges:
            keys.append(scoped(prefix, "budget", scope.key))
            args += (opt_num(scope.period_end), "1" if scope.level in CLIENT_LEVELS else "")
        if spend is None:
            args.append("")
        else:
            args += (self._encode_spend(spend), spend.cost, spend.input_tokens, spend.output_tokens)
            args += total_keys(spend)
        return keys, args

    async def _charge_part(self, scopes: Sequence[BudgetScope], cost: int, now: float) -> None:
        keys = [scoped(self._prefix, "budget", scope.key) for scope in scopes]
        args: list[Any] = [num(now), cost]
        args += [opt_num(scope.period_end) for scope in scopes]
        args += ["1" if scope.level in CLIENT_LEVELS else "" for scope in scopes]
        await self._script("charge", keys, args)

    # -- the cluster path --------------------------------------------------------------------

    async def _home(self, request_id: str, *args: Any) -> tuple[str, list[str]]:
        key = request_tag(self._prefix, request_id) + "home"
        state, tags = await self._script("home", [key], args)
        found = json.loads(text(tags))
        return text(state), found if isinstance(found, list) else []

    async def _admit_shards(self, admission: Admission) -> AdmissionResult:
        prefix, request_id, now = self._prefix, admission.request_id, admission.now
        parts: dict[int, _Part] = {}

        def part(counter: str) -> _Part:
            hash_tag = tag(prefix, scope_of(counter))
            slot = _slot(hash_tag)
            found = parts.get(slot)
            if found is None:
                found = parts[slot] = _Part(hash_tag)
            return found

        rates, slots, scopes = admission.rates, admission.slots, admission.budgets
        # The global level from a slice of the global budget, if this store leases them.
        index = self._global_index(admission)
        fresh = request_id not in self._tickets
        local = index is not None and await self._slice_take(admission, index)
        local_level = self._slice_level(request_id) if local else None
        for i, hit in enumerate(rates):
            part(hit.key).rates.append(i)
        for i, lease in enumerate(slots):
            part(lease.key).slots.append(i)
        for i, scope in enumerate(scopes):
            if not (local and i == index):
                part(scope.key).budgets.append(i)
        shards = list(parts.values())

        nonce = secrets.token_hex(8)
        expiry, ttl = num(now + admission.ttl), ttl_ms(admission.ttl * 1000)
        # A take stays when this fails: the home may have recorded the admission (a lost
        # reply), and its settlement then settles the take; if not, the take stays spent.
        state, _ = await self._home(
            request_id, "admit", num(now), expiry, ttl, nonce, *(p.tag for p in shards)
        )
        idle = state == "idle"
        if local and fresh and idle:
            self._slice_untake(request_id)

        def call(p: _Part) -> Awaitable[Any]:
            keys, args = admit_call(
                prefix, admission,
                [rates[i] for i in p.rates], [slots[i] for i in p.slots],
                [scopes[i] for i in p.budgets],
                p.tag + "reservation:" + request_id, p.tag + "tombstone:" + request_id,
                idle=idle, undo=True,
            )  # fmt: skip
            return self._script("admit", keys, args)

        replies = await self._each(call(p) for p in shards)
        buckets: list[tuple[int, int]] = [(0, 0)] * len(rates)
        levels: list[tuple[int, int, float | None]] = [(0, 0, None)] * len(scopes)
        if local_level is not None and index is not None:
            levels[index] = local_level
        first: tuple[tuple[int, int], int, int, int] | None = None  # order, verdict, index, held
        took: list[_Part] = []
        for p, reply in zip(shards, replies, strict=True):
            verdict, position, held, read_buckets, read_levels = read_admit(reply, len(p.rates))
            for j, i in enumerate(p.rates):
                buckets[i] = read_buckets[j]
            for j, i in enumerate(p.budgets):
                levels[i] = read_levels[j]
            if verdict not in _REFUSED:
                took.append(p)
                continue
            if verdict == 1:
                index = p.rates[position - 1]
                group = _REQUESTS if rates[index].kind == "requests" else _TOKENS
            elif verdict == 2:
                index, group = p.slots[position - 1], _LEASES
            else:
                index, group = p.budgets[position - 1], _BUDGETS
            if first is None or (group, index) < first[0]:
                first = ((group, index), verdict, index, held)
        if idle:
            return admission_result(admission, None, buckets, levels, took=False)
        if first is None:
            return admission_result(admission, None, buckets, levels, took=True)
        # Refused: give back what the other slots reserved (a part that reserved nothing, or
        # whose reservation a lost reply hid, gives back nothing), then forget the home, so
        # the same request id may be admitted again (with a smaller allowance, say).
        if took:
            undo = Settlement(request_id, now, cost=0, tokens=0, refund_requests=True)

            def give_back(p: _Part) -> Awaitable[Any]:
                keys, args = self._settle_call(
                    undo, p.tag + "reservation:" + request_id,
                    p.tag + "tombstone:" + request_id, "never", (), record=False,
                )  # fmt: skip
                return self._script("settle", keys, args)

            await self._each(give_back(p) for p in took)
        if local and fresh:
            self._slice_untake(request_id)
        await self._home(request_id, "undo", num(now), nonce)
        _, verdict, index, held = first
        refused = refusal(admission, verdict, index, held, buckets, levels)
        return admission_result(admission, refused, buckets, levels, took=False)

    async def _settle_shards(self, settlement: Settlement) -> bool:
        prefix, request_id = self._prefix, settlement.request_id
        spend = self._spend_tags[self._spend_shard(request_id)]
        logged = [spend] if settlement.record is not None else []
        # Where a settlement that finds no admission goes: its charges' slots, and the log's.
        unknown = [tag(prefix, scope_of(scope.key)) for scope in settlement.charges] + logged
        state, tags = await self._home(
            request_id, "settle", num(settlement.now), TOMBSTONE_TTL_MS, len(logged),
            *logged, *_distinct(unknown),
        )  # fmt: skip
        rule_one = state in ("A", "D1")
        charges = () if rule_one else settlement.charges
        # Each slot once, named by the first tag that reaches it (the admission's come first,
        # and a settlement sent again gets the same tags back from the home).
        shards: dict[int, tuple[str, list[BudgetScope]]] = {}
        for hash_tag in tags:
            shards.setdefault(_slot(hash_tag), (hash_tag, []))
        for scope in charges:
            found = shards.get(_slot(tag(prefix, scope_of(scope.key))))
            if found is not None:
                found[1].append(scope)
        log_slot = _slot(spend) if spend in tags else None

        def call(slot: int, hash_tag: str, scopes: list[BudgetScope]) -> Awaitable[Any]:
            record = slot == log_slot
            # A part that records or charges is tombstoned, so it is done once; one that
            # only settles a reservation is tombstoned when it finds none (its admission is
            # still on its way), and otherwise settles it once by deleting it.
            mode = "always" if record or scopes else "missing"
            keys, args = self._settle_call(
                settlement, hash_tag + "reservation:" + request_id,
                hash_tag + "tombstone:" + request_id, mode, scopes, record=record,
            )  # fmt: skip
            return self._script("settle", keys, args)

        calls = [call(slot, t, s) for slot, (t, s) in shards.items()]
        if self._tickets:  # admitted from a slice of the global budget
            # Held: the admission (or, sent again, its settlement) is on the home.
            call_global = self._slice_settle(request_id, settlement.cost, settlement.now, rule_one)
            if call_global is not None:
                calls.append(call_global)
        await self._each(calls)
        return state == "A"

    async def _release_shards(self, request_id: str, slot_keys: Sequence[str]) -> None:
        prefix = self._prefix

        def free(key: str) -> Awaitable[Any]:
            async def zrem(client: Redis) -> Any:
                return await client.zrem(key, request_id)

            return self._run("release", zrem)

        home = self._home(request_id, "release", "0", TOMBSTONE_TTL_MS)
        await self._each([home, *(free(scoped(prefix, "lease", key)) for key in slot_keys)])


def _distinct(tags: Sequence[str]) -> list[str]:
    """Tags with one per slot, first seen first."""
    seen: dict[int, str] = {}
    for hash_tag in tags:
        seen.setdefault(_slot(hash_tag), hash_tag)
    return list(seen.values())
