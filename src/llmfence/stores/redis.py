"""`RedisStore`: one truth for many app instances, kept in Redis.

Each atomic store operation is one Lua script, shipped as package data in `lua/` and called by
SHA, so `admit` and `settle` cost one round trip each. The store is assembled from four private
parts: `_redis_base` (the client, the scripts, the time bound, value codecs), `_redis_ledger`
(admissions, settlements, leases, budgets), `_redis_records` (registry, spend log, projects) and
`_redis_registry` (customers, budget tiers, listing users and teams); this module joins them
into the one class users see and opens clients.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from typing import TYPE_CHECKING, Any

from llmfence.exceptions import ConfigurationError

from ._protocol import DEFAULT_TIMEOUT
from ._redis_base import _Connection, import_redis
from ._redis_keys import tag
from ._redis_ledger import RedisLedger
from ._redis_registry import RedisRegistry
from ._redis_spendlog import SHARDS

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

__all__ = ["RedisStore"]


class RedisStore(RedisLedger, RedisRegistry):
    """The shared store: state in Redis, seen alike by every worker and host.

    It implements every role of `Store`, on a single Redis or on a Redis Cluster. Keys are
    grouped by what must change together, one hash tag per group, so a cluster spreads them
    over its slots: each scope's counters (its budget, rate buckets and lease set), the spend
    log with its totals, and the registry. On a single node `admit` and `settle` are one
    script each over every key of the request, whatever their tags (a single Redis lets a
    script reach any key). On a cluster each call is split by slot and the slots run in
    parallel, exactly (see `_redis_shards`): a refusal on any slot gives back what the others
    reserved, and a settlement goes once to every slot its request touched. Two keys would
    still take every request of a cluster on one slot each, so on a cluster the global budget
    is leased to each store in slices and admitted locally from them (`_redis_slices`), and
    the spend log is spread over 12 shards (`_redis_spendlog`). Each script names
    the keys it touches in `KEYS`; `settle` also reaches the keys its reservation names, which
    `admit` named on the same slot, and listing keys the records an index names, under the
    registry's tag.

    Layout (`<counter>` is a counter's name, `<scope>` what it counts for: `global`,
    `team:<id>`, `user:<id>`, `key:<hash>`, `end_user:<id>`…; a key's per-model counters go
    with the key's):

    - `{prefix:<scope>}:budget:<counter>` hashes (spent, total, period end, epoch; an end
      user's expires a minute after its period ends and never before a reservation that may
      hold it, or, without a period, a minute after its spend is back at zero; the operator's
      never expire), `{prefix:<scope>}:bucket:<counter>` rate-bucket hashes (level, t;
      expiring after two windows, or a minute if that is longer) and
      `{prefix:<scope>}:lease:<counter>` sorted sets (request id scored by expiry); the
      global budget's hash also counts in `leased` the slices leased out of its `spent`,
      listed in `{prefix:global}:slices` (lease id -> size, epoch, expiry);
    - `{prefix:spend}:log`, the bounded list of spend records (each a JSON array of the
      record's values in `SpendRecord` field order), `{prefix:spend}:totals`, the hash of
      running totals (field `<group>:<name>`, e.g. `user:alice` or `global:`; value
      `"<cost> <input tokens> <output tokens> <requests>"`, summed exactly by `settle.lua`),
      whose `end_user:` fields are kept for the most recent `max(max_spend_records, 1000)`
      end users only, ranked in the `{prefix:spend}:end_users` sorted set (by last use, ms);
      on a cluster the same three keys under each shard's tag, `{prefix:spend:<i>}` (or
      `{prefix:spend:<i>.<n>}`, see `_redis_spendlog`), each record with a sequence number
      after its fields, and the unsharded keys above still read;
    - the registry, under `{prefix}:`: `key:<hash>`, `user:<id>`, `team:<id>` record hashes
      (one JSON value per field; only a key's hash and masked form are ever stored), the
      `keys`, `keys:by_user`, `keys:by_team` indexes, `access_groups`, `project:<name>`,
      `customer:<id>` and `budget_tier:<id>` record hashes, and the `users`, `teams`,
      `customers`, `budget_tiers` indexes (each a sorted set of ids by creation order);
    - a request's reservation (expiring with the admission's TTL) and tombstone (left by
      every settlement, so the same settlement sent again changes nothing, and by a release
      that came before its admission; either turns a late admission into a no-op; expiring
      after ten minutes): on a single node `{prefix}:reservation:<request id>` and
      `{prefix}:tombstone:<request id>`; on a cluster one of each per slot the request
      touches (`{prefix:<scope>}:reservation:<request id>`…), and its home,
      `{prefix:req:<request id>}:home`, which records the slots its admission reserved on;
    - claims (`claim`): `{prefix:claims}:<name>` strings, each expiring when its claim does.

    State therefore grows with what the operator created, not with the names clients send.

    The layout may change before 1.0, and a new layout does not read the old one's keys.
    This one moved the counters, the spend log and its totals from under the single tag
    `{prefix}` to the tags above: earlier counters, spend records and totals are not read
    (budgets, buckets and totals start again from zero; the old keys stay until deleted, the
    end users' and buckets' expire on their own); key, user and team records, access groups
    and projects stay where they were and are still read.

    Every call is bounded by `timeout`, as a whole: waiting for a pooled connection,
    connecting, the command and its reply. A call that fails with a connection error (after
    a Redis restart or failover, every pooled connection is broken) closes the pool's idle
    connections and, if it is safe to repeat, runs once more on a fresh connection within
    the same deadline: reads, `admit`, `settle`, `release` (idempotent per request id) and
    updates are; `charge` and creating or deleting a record are not (a lost reply may hide
    a call that ran). A Redis error or a timeout raises `StoreError` from the original
    exception.

    Use one store from one event loop at a time. A store made by `from_url` opens its own
    client on first use, and a new one if it finds itself on another event loop (a client's
    connections belong to the loop that opened them); call `aclose()` before leaving a loop,
    or the connections left behind stay open until they are garbage-collected.

    Args:
        client: A `redis.asyncio.Redis` client, or a `redis.asyncio.RedisCluster` (the state
            is then spread over the cluster). The caller owns it: `aclose()` does not
            close it. Either `decode_responses` setting works. Give it no command retries
            (`retry=Retry(NoBackoff(), 0)`): redis-py's default retries may send a script
            again after a lost reply (a second `admit` of the same request takes nothing, but
            a second `charge` charges twice).
        prefix: Namespace of every key (it begins every hash tag); several apps may share
            one Redis with different prefixes. Must not contain `{` or `}`.
        timeout: Seconds any one store call may take before it fails with `StoreError`
            (default 5: long enough for a cold start's burst on a busy host, where waiting for
            the event loop counts too; `Fence(store_timeout=...)` sets another).
        max_spend_records: How many spend records the log keeps (oldest dropped first). The
            running totals count every record ever appended.
        global_slices: Lease slices of the global budget to this store and admit the global
            level from them locally (see `_redis_slices`): the global counter's slot is then
            touched once per slice instead of once per request. `None` (the default): on a
            cluster, where that slot binds first; a single node runs every request's script
            on one thread anyway and takes `False` only.
        slice_divisor: A slice is `1/slice_divisor` of what the global budget has neither
            spent nor leased (so slices shrink near its end), and at most 1024 requests like
            the one asking; one that would not hold four of them is not leased, and requests
            are admitted exactly, one by one, on the global slot.
        spend_log_shards: How many logs the spend log is spread over, each with its own
            totals (see `_redis_spendlog`). `None` (the default): 12 on a cluster, where one
            log's slot binds right after the global counter's; 1 on a single node.

    Raises:
        ImportError: When the `redis` package is not installed.
        ConfigurationError: When an option is not valid.
    """

    bounds_call_time = True  # every call runs under `timeout`

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        prefix: str = "llmfence",
        timeout: float = DEFAULT_TIMEOUT,
        max_spend_records: int = 100_000,
        global_slices: bool | None = None,
        slice_divisor: int = 16,
        spend_log_shards: int | None = None,
    ) -> None:
        self._setup(prefix, timeout, max_spend_records)
        self._cluster = isinstance(client, import_redis().asyncio.RedisCluster)
        self._setup_slices(_slicing(self._cluster, global_slices, slice_divisor), slice_divisor)
        self._setup_spend_log(_shards(self._cluster, spend_log_shards))
        self._connection = _Connection(client)
        self._factory = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "llmfence",
        timeout: float = DEFAULT_TIMEOUT,
        max_spend_records: int = 100_000,
        cluster: bool = False,
        global_slices: bool | None = None,
        slice_divisor: int = 16,
        spend_log_shards: int | None = None,
        **redis_kwargs: Any,
    ) -> RedisStore:
        """A store with its own client, opened on first use and closed by `aclose()`.

        Connections come from a bounded, blocking pool: a burst larger than the pool (a cold
        start under load) waits for a free connection within each call's `timeout`, instead
        of opening a connection per call.

        Args:
            url: A Redis URL, e.g. `redis://localhost:6379/0` or `rediss://…`.
            prefix: Namespace of every key (it begins every hash tag).
            timeout: Seconds any one store call may take, all included; also the client's
                connect timeout. The client gets no socket timeout of its own (the call's
                deadline already bounds every read and write).
            max_spend_records: How many spend records the log keeps.
            cluster: Open a `redis.asyncio.RedisCluster` (the URL names any node; the
                client finds the others) and spread the state over the cluster's slots.
            global_slices: Lease slices of the global budget (default: on a cluster only).
            slice_divisor: A slice is `1/slice_divisor` of the global budget's free room.
            spend_log_shards: How many logs the spend log is spread over (default: 12 on a
                cluster, 1 on a single node).
            **redis_kwargs: More connection options, as `redis.asyncio.Redis.from_url` (or
                `RedisCluster.from_url`) takes them; `max_connections` sizes the pool
                (default 50; on a cluster, per node, where a call finding every connection
                busy fails instead of waiting). Commands are not retried by redis-py unless a
                `retry` is given.

        Returns:
            The store; nothing is connected yet.
        """
        redis = import_redis()
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        options = {
            "socket_connect_timeout": timeout,
            # redis-py sends no command twice: a script whose reply was lost may have run,
            # and only the store knows which calls are safe to repeat (see `_redis_base`).
            "retry": Retry(NoBackoff(), 0),
            **redis_kwargs,
        }
        max_connections = options.pop("max_connections", 50)

        def open_cluster() -> Redis:
            client: Redis = redis.asyncio.RedisCluster.from_url(
                url, max_connections=max_connections, **{"socket_timeout": None, **options}
            )
            return client

        def open_client() -> Redis:
            # The pool's own wait is unbounded: the call's deadline bounds it.
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=None, **options
            )
            client: Redis = redis.asyncio.Redis.from_pool(pool)  # the client owns the pool
            return client

        store = cls.__new__(cls)
        store._setup(prefix, timeout, max_spend_records)
        store._cluster = cluster
        store._setup_slices(_slicing(cluster, global_slices, slice_divisor), slice_divisor)
        store._setup_spend_log(_shards(cluster, spend_log_shards))
        store._connection = None
        store._factory = open_cluster if cluster else open_client
        return store

    async def claim(self, name: str, expires: float, now: float) -> bool:
        """Take `name` until `expires`: True for the first caller, False while it is held.

        `SET NX PX` in a script (`claim.lua`) under `{prefix:claims}`, one slot of a cluster;
        its token makes a call sent again after a lost reply answer as the first did.
        """
        if expires <= now:
            return False
        key = tag(self._prefix, "claims") + name
        ttl_ms = max(1, math.ceil((expires - now) * 1000))
        found = await self._script("claim", [key], [secrets.token_hex(8), ttl_ms])
        return bool(found)

    # -- lifecycle ---------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise `StoreError` unless Redis answers within the timeout."""

        async def call(client: Redis) -> None:
            await client.ping()

        await self._run("ping", call)

    async def aclose(self) -> None:
        """Close the client this store opened (`from_url`); a client passed in stays open.

        A `from_url` store opens a new client if it is used again afterwards, so a sync
        caller may run each call in its own event loop and close the store at the end of it.
        """
        await self._stop_slices()  # the unused part of its slices back to the budget
        if self._factory is None:
            return  # the caller owns the client; the scripts stay loaded for later calls
        connection, self._connection = self._connection, None
        loop, self._loop = self._loop, None
        # Connections can only be closed on the loop that opened them; on another one the
        # old client is just dropped.
        if connection is not None and loop is asyncio.get_running_loop():
            await connection.client.aclose()


def _slicing(cluster: bool, global_slices: bool | None, divisor: int) -> bool:
    """Whether a store leases global budget slices; `ConfigurationError` for bad options."""
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 1:
        raise ConfigurationError(f"slice_divisor must be an integer >= 1, not {divisor!r}")
    if global_slices and not cluster:
        raise ConfigurationError("global_slices needs a Redis Cluster (cluster=True)")
    return cluster if global_slices is None else global_slices


def _shards(cluster: bool, shards: int | None) -> int:
    """How many logs the spend log has; `ConfigurationError` for a bad option."""
    if shards is None:
        return SHARDS if cluster else 1
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ConfigurationError(f"spend_log_shards must be an integer >= 1, not {shards!r}")
    return shards
