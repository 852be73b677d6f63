"""`RedisStore`'s plumbing: the client, the Lua scripts, the time bound, and value codecs.

Every store call goes through `RedisBase._script` or `RedisBase._run`, which put one deadline
(`asyncio.timeout`) over the whole call, from waiting for a pooled connection to the reply, and
turn every Redis error into `StoreError`. Scripts ship as package data in `lua/` and are called
by SHA (EVALSHA), loaded again when Redis answers NOSCRIPT (after a restart or a failover).

Nothing here imports `redis` at module import: `RedisStore` is importable without the extra,
and says how to install it when it is built.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

from llmfence.exceptions import ConfigurationError, StoreError

from ._types import SpendRecord, checked_timeout

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

__all__ = [
    "RedisBase",
    "decode_record",
    "encode_record",
    "import_redis",
    "num",
    "opt_float",
    "opt_num",
    "text",
]

_T = TypeVar("_T")

_SCRIPTS: Final = (
    "home",
    "admit",
    "settle",
    "charge",
    "budgets",
    "reset_budget",
    "release",
    "record_create",
    "record_update",
    "record_delete",
    "list_keys",
    "registry_delete",
    "claim",
    "lease",
)
# Scripts that roll budget periods get the one shared definition of the roll prepended.
_ROLLS_BUDGETS: Final = frozenset({"admit", "charge", "settle", "lease"})
# Scripts that must not run twice: a second `charge` charges twice, and a second create or
# delete of a record answers "taken" or "none" for the one the first call made or deleted.
# A lease (or a slice's late adjustment) sent twice takes twice. Every other call is safe to
# repeat (reads; `admit`, `settle` and `release` are idempotent per request id; a slice's
# return finds it gone the second time), so it gets one more try on a fresh connection after
# a connection error.
_NOT_REPEATABLE: Final = frozenset(
    {"charge", "record_create", "record_delete", "registry_delete", "lease"}
)
# Scripts that write key, user or team records: a read of a record that a write may have
# overtaken is not shared with a caller who comes after the write (see `_read_record`).
_RECORD_WRITES: Final = frozenset(
    {"record_create", "record_update", "record_delete", "registry_delete"}
)
_INSTALL_HINT: Final = 'RedisStore needs the redis package: pip install "llmfence[redis]"'


def import_redis() -> Any:
    """The `redis` package, imported on first use; an `ImportError` that says what to install."""
    try:
        import redis.asyncio
    except ImportError as exc:  # pragma: no cover - the test environment has redis
        raise ImportError(_INSTALL_HINT) from exc
    return redis


@functools.cache
def _script_source(name: str) -> str:
    lua = resources.files("llmfence.stores").joinpath("lua")
    source = lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")
    if name in _ROLLS_BUDGETS:
        source = lua.joinpath("budget.lua").read_text(encoding="utf-8") + "\n" + source
    return source


@functools.cache
def _script_sha(name: str) -> str:
    return hashlib.sha1(_script_source(name).encode()).hexdigest()


class _Connection:
    """A client, and the scripts' SHAs (hashing the sources is all that happens before I/O)."""

    __slots__ = ("client", "execute", "permits", "shas", "starting")

    def __init__(self, client: Redis | RedisCluster) -> None:
        # A cluster client answers every command the store sends as a single node's does
        # (routing each by its keys), so the parts treat both as `Redis`.
        self.client = cast("Redis", client)
        # A cluster client learns the cluster's slots on first use. Calls that all start at
        # once on a new client trip over each other in redis-py (MOVED storms, connections
        # closed under other calls), so the first call learns them alone (see `start`).
        self.starting: asyncio.Lock | None = None
        # A cluster client's connections are bounded per node, but a call that finds every
        # one busy fails at once (redis-py has no blocking pool for clusters): the store lets
        # no more calls run at once than a node may have connections, and the others wait
        # for a turn within their deadline, as they wait for a pooled connection on one node.
        self.permits: asyncio.Semaphore | None = None
        if hasattr(client, "nodes_manager"):
            self.starting = asyncio.Lock()
            limit = client.nodes_manager.connection_kwargs.get("max_connections") or 50
            self.permits = asyncio.Semaphore(limit)
        # Scripts are called through the client's own command path (its pool, its errors),
        # without the two wrapper frames of `evalsha`.
        self.execute: Callable[..., Awaitable[Any]] = client.execute_command
        self.shas = {name: _script_sha(name) for name in _SCRIPTS}

    async def start(self) -> None:
        """Learn a cluster's slots before the first command (once, whoever calls first)."""
        starting = self.starting
        if starting is not None:
            async with starting:
                if self.starting is not None:
                    await self.client.initialize()
                    self.starting = None


class RedisBase:
    """What every part of `RedisStore` shares: key names, the connection and the time bound."""

    _factory: Callable[[], Redis] | None
    _connection: _Connection | None

    def _setup(self, prefix: str, timeout: float, max_spend_records: int) -> None:
        redis = import_redis()
        if not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(f"prefix must be non-empty without braces, not {prefix!r}")
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be positive, not {timeout!r}")
        if max_spend_records < 0:
            raise ConfigurationError("max_spend_records must not be negative")
        self._prefix = prefix
        self._tag = "{" + prefix + "}:"  # the registry's
        self._cluster = False
        self._timeout = timeout
        self._max_records = max_spend_records
        # What a call may fail with: its deadline, or Redis (redis-py's errors, socket errors).
        self._errors: tuple[type[BaseException], ...] = (TimeoutError, redis.RedisError, OSError)
        # What a broken connection fails with (a timeout is no broken connection: retrying it
        # would only wait again, and the call's deadline is spent).
        self._broken: tuple[type[BaseException], ...] = (redis.ConnectionError, OSError)
        self._noscript: type[BaseException] = redis.exceptions.NoScriptError
        self._loop: asyncio.AbstractEventLoop | None = None
        # Record reads in flight, shared by the callers that ask for the same record at once
        # (a cold start: every request misses the key cache together); see `_read_record`.
        self._reads: dict[str, tuple[int, asyncio.Task[Any]]] = {}
        self._reads_loop: asyncio.AbstractEventLoop | None = None
        self._writes = 0  # record writes begun plus record writes ended

    @property
    def call_timeout(self) -> float:
        """Seconds any one call may take, all included (the store's `timeout`)."""
        return self._timeout

    def set_call_timeout(self, seconds: float) -> None:
        """Bound every later call by `seconds` instead (what `Fence(store_timeout=...)` does).

        A client `from_url` opens keeps its `timeout` as the connect timeout; the call's
        deadline bounds every wait, connect, read and write all the same.

        Raises:
            ConfigurationError: `seconds` is not a finite number > 0.
        """
        self._timeout = checked_timeout(seconds)

    def _key(self, *parts: str) -> str:
        return self._tag + ":".join(parts)

    def _connect(self) -> _Connection:
        if self._factory is None:
            assert self._connection is not None
            return self._connection
        loop = asyncio.get_running_loop()
        if self._connection is None or self._loop is not loop:
            self._connection = _Connection(self._factory())
            self._loop = loop
        return self._connection

    def _failure(self, what: str, exc: BaseException) -> StoreError:
        if isinstance(exc, TimeoutError):
            return StoreError(f"The Redis store did not answer within {self._timeout} s ({what}).")
        # The cause keeps Redis's own message for logs; this one is safe to show anyone.
        return StoreError(f"The Redis store failed ({what}): {type(exc).__name__}.")

    async def _run(self, what: str, call: Callable[[Redis], Awaitable[_T]]) -> _T:
        """Run `call` on the client under the store's deadline; errors become `StoreError`.

        `call` must be safe to run twice: after a connection error it runs once more, on a
        fresh connection, within the same deadline.
        """
        try:
            # One deadline over the whole call: the pool's wait, a connect, the command, the
            # reply. The clients `from_url` opens set no per-read socket timeout of their own
            # (each costs a timer, and redis-py wraps every send in a task for it).
            async with asyncio.timeout(self._timeout):
                connection = self._connect()
                if connection.permits is not None:
                    async with connection.permits:
                        return await _on_cluster(connection, call, self._broken)
                try:
                    return await call(connection.client)
                except self._broken as exc:
                    if isinstance(exc, TimeoutError):
                        raise
                    await _drop_idle(connection.client)
                    return await call(connection.client)
        except self._errors as exc:
            raise self._failure(what, exc) from exc

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """One EVALSHA of a script under the store's deadline; NOSCRIPT loads it again.

        A connection error (a Redis restart leaves every pooled connection broken) gets one
        more try on a fresh connection, within the same deadline, unless the script is in
        `_NOT_REPEATABLE`: a lost reply may hide a script that ran.
        """
        write = name in _RECORD_WRITES
        if write:
            self._writes += 1
        try:
            async with asyncio.timeout(self._timeout):
                connection = self._connect()
                if connection.permits is not None:
                    async with connection.permits:
                        return await _on_cluster(
                            connection,
                            lambda _: _evalsha(connection, self._noscript, name, keys, args),
                            self._broken if name not in _NOT_REPEATABLE else (),
                        )
                try:
                    return await connection.execute(
                        "EVALSHA", connection.shas[name], len(keys), *keys, *args
                    )
                except self._noscript:
                    await connection.client.script_load(_script_source(name))
                    return await connection.execute(
                        "EVALSHA", connection.shas[name], len(keys), *keys, *args
                    )
                except self._broken as exc:
                    if isinstance(exc, TimeoutError):
                        raise
                    await _drop_idle(connection.client)
                    if name in _NOT_REPEATABLE:
                        raise
                    return await _evalsha(connection, self._noscript, name, keys, args)
        except self._errors as exc:
            raise self._failure(name, exc) from exc
        finally:
            if write:
                self._writes += 1

    async def _read_record(self, key: str) -> dict[Any, Any]:
        """HGETALL of a record; callers that ask for the same one at once share one call.

        On a cold start every request misses the key-record cache at the same moment: one
        read per record instead of one per request keeps the burst off the pool and within
        its deadline. A caller never joins a read that began before a record write of this
        store began or ended, so a caller that wrote a record reads what it wrote. Each
        caller waits within its own deadline; the shared read has the store's.
        """
        loop = asyncio.get_running_loop()
        if self._reads_loop is not loop:
            self._reads, self._reads_loop = {}, loop
        shared = self._reads.get(key)
        if shared is None or shared[0] != self._writes:

            async def call(client: Redis) -> dict[Any, Any]:
                return await client.hgetall(key)

            shared = (self._writes, loop.create_task(self._run("get_record", call)))
            self._reads[key] = shared
            shared[1].add_done_callback(functools.partial(self._read_done, key, shared))
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(shared[1])
        except TimeoutError as exc:
            raise self._failure("get_record", exc) from exc

    def _read_done(self, key: str, shared: tuple[int, asyncio.Task[Any]], task: Any) -> None:
        if self._reads.get(key) is shared:
            del self._reads[key]
        if not task.cancelled():
            task.exception()  # retrieved: a failure reaches every caller, or none is left


async def _on_cluster(
    connection: _Connection,
    call: Callable[[Redis], Awaitable[_T]],
    repeat_on: tuple[type[BaseException], ...],
) -> _T:
    """A call on a cluster client: its slots learnt first; once more after a broken
    connection if the call may be repeated (redis-py refreshes the node's connections)."""
    if connection.starting is not None:
        await connection.start()
    try:
        return await call(connection.client)
    except repeat_on as exc:
        if isinstance(exc, TimeoutError):
            raise
        return await call(connection.client)


async def _evalsha(
    connection: _Connection,
    noscript: type[BaseException],
    name: str,
    keys: Sequence[str],
    args: Sequence[Any],
) -> Any:
    """EVALSHA, loading the script on NOSCRIPT (a restarted Redis has none)."""
    sha = connection.shas[name]
    try:
        return await connection.execute("EVALSHA", sha, len(keys), *keys, *args)
    except noscript:
        await connection.client.script_load(_script_source(name))
        return await connection.execute("EVALSHA", sha, len(keys), *keys, *args)


async def _drop_idle(client: Any) -> None:
    """Close the idle pooled connections after a connection error, before the retry.

    A connection error mostly means the server went away (a restart, a failover): then every
    idle connection in the pool is broken too, and each would fail its next call. They are
    closed here, so the retry and the calls after it connect afresh. Connections in use are
    left to their callers. A cluster client's nodes are refreshed by redis-py itself.
    """
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        await pool.disconnect(inuse_connections=False)


# -- codecs ----------------------------------------------------------------------------------

# Spend records are stored as JSON arrays of their values in field order: the C encoder writes
# a tuple as an array with no dict built first, and the array is half the size of an object.
_encode: Final = json.JSONEncoder(separators=(",", ":")).encode
_FIELDS: Final = len(SpendRecord._fields)


def encode_record(record: SpendRecord) -> str:
    """A spend record as the JSON text the log stores."""
    return _encode(record)


def decode_record(values: Any) -> SpendRecord:
    """A spend record from the log's decoded JSON: an array, or an object (older layout)."""
    if isinstance(values, dict):
        return SpendRecord.from_dict(values)
    # Fields a newer version appended are ignored, as `from_dict` ignores unknown ones; fields
    # an older one lacked take their defaults.
    return SpendRecord(*values[:_FIELDS])


def text(value: Any) -> str:
    """A reply value as text (replies are bytes unless the client decodes them)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def num(value: float) -> str:
    """A time as text Lua reads back to the same double (repr round-trips it exactly)."""
    return repr(float(value))


def opt_num(value: float | None) -> str:
    """`num`, or `''` for `None`."""
    return "" if value is None else num(value)


def opt_float(value: Any) -> float | None:
    """A reply's float (text or bytes), or `None` for an empty reply."""
    return float(value) if value else None
