"""`RedisStore`'s spend log, spread over a cluster's masters in a fixed number of shards.

Every settlement appends a record to the spend log and adds it to the running totals; on a
cluster one slot would take every one of them, and was measured to bind right after the global
budget counter (`benchmarks/bench_hot_key.py`). So on a cluster the log is `SHARDS` logs, each
with its own totals and end users' ranking under its own hash tag, and a record goes to the
shard its request id picks (CRC-32, so every instance picks the same one). Shard `i`'s tag is
the first `{<prefix>:spend:<i>}` (then `…:<i>.1`, `…:<i>.2`…) whose slot is in the `i`-th of
`SHARDS` equal ranges of the slot space: a cluster whose masters split the slots evenly (what
`redis-cli --cluster create` does) holds `SHARDS / masters` shards on each master; with 12,
three, four or six masters hold equally many.

Reads merge the shards: `spend_records` reads every shard at once and merges them newest first
(by timestamp, then by a sequence number each record carries after its fields: the writer's
`time.time_ns()`, kept increasing per store), and shows the newest `max_spend_records` of
them, as one log would; `spend_totals` adds the shards' totals exactly (integers). A shard
keeps its share of the bound, `ceil(max_spend_records / SHARDS)`, plus room for an uneven
spread of request ids, `ceil(4 * sqrt(share)) + 1` (four standard deviations): so the newest
`max_spend_records` records are all kept unless one shard got far more than its share of them,
and the shards together hold a few percent more than the bound (about 4 % at 100,000 records)
that reads never show. Each shard keeps the totals of its `max(kept, 1000)` most recent end
users.

Records written before the log was sharded (one log, `{<prefix>:spend}:log`, and its totals)
are still read, beside the shards: nothing is written there any more, so they stay as they
were until deleted. A single node keeps the one log (a single Redis runs every script on one
thread: spreading keys there buys nothing).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import math
import time
import zlib
from collections.abc import Awaitable, Iterable
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final, TypeVar

from ._protocol import SpendGroup
from ._redis_base import RedisBase, decode_record, encode_record
from ._redis_keys import SPEND, tag
from ._spend import matches, total_key
from ._types import SpendRecord, SpendTotals

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["SHARDS", "RedisSpendLog", "spend_tags"]

_T = TypeVar("_T")

SHARDS: Final = 12
"""How many shards the spend log has on a cluster."""
_SLOTS: Final = 16_384
_FIELDS: Final = len(SpendRecord._fields)
_TIMESTAMP: Final = SpendRecord._fields.index("timestamp")


@lru_cache(maxsize=64)
def spend_tags(prefix: str, shards: int) -> tuple[str, ...]:
    """Each shard's hash tag, with braces; one shard is the unsharded log's own tag."""
    if shards == 1:
        return (tag(prefix, SPEND),)
    from redis.crc import key_slot

    tags = []
    for i in range(shards):
        low, high = i * _SLOTS // shards, (i + 1) * _SLOTS // shards
        n = 0
        while True:
            name = f"{prefix}:{SPEND}:{i}" + (f".{n}" if n else "")
            if low <= key_slot(name.encode()) < high:
                tags.append("{" + name + "}:")
                break
            n += 1
    return tuple(tags)


class RedisSpendLog(RedisBase):
    """The spend log part of `RedisStore`: where a record goes, and reading the shards."""

    def _setup_spend_log(self, shards: int) -> None:
        self._spend_tags = spend_tags(self._prefix, shards)
        total = self._max_records
        if shards == 1 or total == 0:
            self._keeps = (total,) * shards
        else:
            # A shard's share, and room for the uneven spread of the newest records over the
            # shards (four standard deviations of a binomial count, and one).
            share = -(-total // shards)
            self._keeps = (share + math.ceil(4 * math.sqrt(share)) + 1,) * shards
        # The unsharded log (this layout's predecessor), read beside the shards.
        self._old_spend = () if shards == 1 else (tag(self._prefix, SPEND),)
        self._seq = 0

    def _encode_spend(self, record: SpendRecord) -> str:
        """A record as its shard stores it: with a sequence number after its fields when the
        log is sharded, so records with equal timestamps merge in the order they came."""
        encoded = encode_record(record)
        if len(self._spend_tags) == 1:
            return encoded
        self._seq = max(self._seq + 1, time.time_ns())
        return f"{encoded[:-1]},{self._seq}]"

    def _spend_shard(self, request_id: str) -> int:
        """The shard a request's record goes to."""
        if len(self._spend_tags) == 1:
            return 0
        return zlib.crc32(request_id.encode()) % len(self._spend_tags)

    async def _each(self, calls: Iterable[Awaitable[_T]]) -> list[_T]:
        """Run calls at once and wait for all of them; then raise the first error, if any."""
        pending = list(calls)
        if len(pending) == 1:
            return [await pending[0]]
        results = await asyncio.gather(*pending, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results  # type: ignore[return-value]  # no exception is left in it

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
        request_id: str | None = None,
    ) -> list[SpendRecord]:
        """Kept spend records matching every filter given, newest first.

        Filters run in Python over the bounded log, each shard read in one command, the
        shards at once.
        """
        if limit <= 0:
            return []
        filters = (key_hash, user_id, team_id, model, start, end)
        filtered = request_id is not None or any(value is not None for value in filters)
        stop = -1 if filtered else limit - 1

        def read(log: str) -> Awaitable[list[Any]]:
            async def call(client: Redis) -> list[Any]:
                return await client.lrange(log, 0, stop)

            return self._run("spend_records", call)

        logs = [t + "log" for t in (*self._spend_tags, *self._old_spend)]
        found: list[SpendRecord] = []
        replies = await self._each(read(log) for log in logs)
        if len(replies) == 1:
            for raw in replies[0]:
                if len(found) >= limit:
                    break
                record = decode_record(json.loads(raw))
                if matches(record, filters, request_id):
                    found.append(record)
            return found
        # The shards merged newest first; what they keep past the bound (their room for an
        # uneven spread) is left out, so the log shows the newest `max_spend_records`.
        shards = [[json.loads(raw) for raw in shard] for shard in replies]
        merged = heapq.merge(*shards, key=_newest_first)
        for values in itertools.islice(merged, self._max_records):
            if len(found) >= limit:
                break
            record = decode_record(values)
            if matches(record, filters, request_id):
                found.append(record)
        return found

    async def spend_totals(self, group: SpendGroup, name: str = "") -> SpendTotals:
        """All-time totals of one group (`"global"` ignores `name`), summed over the shards."""
        field = total_key(group, name)

        def read(key: str) -> Awaitable[Any]:
            async def call(client: Redis) -> Any:
                return await client.hget(key, field)

            return self._run("spend_totals", call)

        keys = [t + "totals" for t in (*self._spend_tags, *self._old_spend)]
        sums = [0, 0, 0, 0]
        for packed in await self._each(read(key) for key in keys):
            if packed is not None:
                # settle.lua packs them as "cost input_tokens output_tokens requests".
                for i, value in enumerate(packed.split()):
                    sums[i] += int(value)
        return SpendTotals(*sums)


def _newest_first(values: Any) -> tuple[float, int]:
    """A stored record's place, newest first: its timestamp, then its sequence number."""
    if isinstance(values, dict):  # an older layout's object
        return -float(values.get("timestamp", 0.0)), 0
    seq = values[_FIELDS] if len(values) > _FIELDS else 0
    return -float(values[_TIMESTAMP]), -int(seq)
