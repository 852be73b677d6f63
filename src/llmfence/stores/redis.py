"""`RedisStore`: one truth for many app instances, kept in Redis.

Each atomic store operation is one Lua script, shipped as package data in `lua/` and called by
SHA (EVALSHA, loaded again on NOSCRIPT), so `admit` and `settle` cost one round trip each. The
scripts mirror `MemoryStore` rule for rule; the arithmetic that needs no state (remaining units,
retry times, headroom) stays in Python, in `_window`, shared with `MemoryStore`.

Money is integer nano-USD from end to end: it enters a script as text and is added by
`HINCRBY`, never by `INCRBYFLOAT`, and never goes through `cjson.encode` or a Lua number that
Redis would format with 14 significant digits. Times stay the caller's float text (compared as
doubles, exactly as `MemoryStore` compares them), except the sliding windows, which count in
integer milliseconds as `_window` does.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio

from llmfence.exceptions import ConfigurationError, StoreError

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
from .memory import _groups, _matches

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["RedisStore"]

_T = TypeVar("_T")
_R = TypeVar("_R", KeyRecord, UserRecord, TeamRecord)

_SCRIPTS: Final = (
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
)
# Scripts that roll budget periods get the one shared definition of the roll prepended.
_ROLLS_BUDGETS: Final = frozenset({"admit", "charge"})
# A lease ends when its request does, which no store can predict: suggest a short retry.
_PARALLEL_RETRY: Final = 1.0
# Redis expires keys on its own clock while the scripts judge expiry by the caller's `now`
# (a fake clock in tests, a slightly skewed one on another host). Key TTLs only reclaim
# memory; a floor under them keeps Redis from forgetting state a short window, lease or
# reservation still holds by the caller's clock, and the scripts' own checks make expiry exact.
_MIN_KEY_TTL_MS: Final = 60_000
_TOTAL_FIELDS: Final = ("cost", "input_tokens", "output_tokens", "requests")
_INSTALL_HINT: Final = 'RedisStore needs the redis package: pip install "llmfence[redis]"'


def _import_redis() -> Any:
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


class _Connection:
    """A client and the scripts registered on it."""

    __slots__ = ("client", "scripts")

    def __init__(self, client: Redis) -> None:
        self.client = client
        # register_script only hashes the source: no I/O until the first call.
        self.scripts: dict[str, AsyncScript] = {
            name: client.register_script(_script_source(name)) for name in _SCRIPTS
        }


class RedisStore:
    """The shared store: state in Redis, seen alike by every worker and host.

    Every key lives under one hash tag, `{prefix}` (e.g. `{llmfence}:budget:user:alice`), so
    all of them fall in one Redis Cluster slot and a single script can touch every window,
    lease set and budget level of a request, as `admit` and `settle` do. (On a cluster, one
    node therefore holds a store's whole state; give tenants separate prefixes to spread
    them.) Each script names the keys it touches in `KEYS`; the two that cannot know them in
    advance (`settle` reads the keys its reservation names; listing keys reads the records an
    index names) only reach keys under the same tag.

    Layout, under `{prefix}:`: `budget:<scope>` hashes (spent, total, period end, epoch),
    `window:<scope>` hashes (index, cur, prev; expiring after two windows, or a minute if
    that is longer), `lease:<scope>` sorted sets (request id scored by expiry),
    `reservation:<request id>` (expiring with the admission's TTL), `key:<hash>`,
    `user:<id>`, `team:<id>` record hashes (one JSON value per field; only a key's hash and
    masked form are ever stored), `keys`, `keys:by_user`, `keys:by_team` indexes,
    `access_groups`, `project:<name>`, the bounded `spend:log` list and
    `spend:totals:<group>:<name>` hashes of running totals.

    Every call is bounded by `timeout`; a Redis error or a timeout raises `StoreError` from
    the original exception.

    Use one store from one event loop at a time. A store made by `from_url` opens its own
    client on first use, and a new one if it finds itself on another event loop (a client's
    connections belong to the loop that opened them); call `aclose()` before leaving a loop,
    or the connections left behind stay open until they are garbage-collected.

    Args:
        client: A `redis.asyncio.Redis` client. The caller owns it: `aclose()` does not
            close it. Either `decode_responses` setting works. Give it no command retries
            (`retry=Retry(NoBackoff(), 0)`): redis-py's default retries may send a script
            again after a lost reply, and a second `admit` reserves twice.
        prefix: Namespace of every key (the hash tag); several apps may share one Redis
            with different prefixes. Must not contain `{` or `}`.
        timeout: Seconds any one store call may take before it fails with `StoreError`.
        max_spend_records: How many spend records the log keeps (oldest dropped first). The
            running totals count every record ever appended.

    Raises:
        ImportError: When the `redis` package is not installed.
        ConfigurationError: When an option is not valid.
    """

    bounds_call_time = True  # every call runs under `timeout`

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = "llmfence",
        timeout: float = 1.0,
        max_spend_records: int = 100_000,
    ) -> None:
        self._setup(prefix, timeout, max_spend_records)
        self._connection: _Connection | None = _Connection(client)
        self._factory: Callable[[], Redis] | None = None

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "llmfence",
        timeout: float = 1.0,
        max_spend_records: int = 100_000,
        **redis_kwargs: Any,
    ) -> RedisStore:
        """A store with its own client, opened on first use and closed by `aclose()`.

        Connections come from a blocking pool: a burst larger than the pool waits for a free
        connection (within `timeout`) instead of failing.

        Args:
            url: A Redis URL, e.g. `redis://localhost:6379/0` or `rediss://…`.
            prefix: Namespace of every key (the hash tag).
            timeout: Seconds any one store call may take; also the default socket and
                connect timeouts of the client.
            max_spend_records: How many spend records the log keeps.
            **redis_kwargs: More connection options, as `redis.asyncio.Redis.from_url` takes
                them; `max_connections` sizes the pool (default 50). Commands are not
                retried unless a `retry` is given.

        Returns:
            The store; nothing is connected yet.
        """
        redis = _import_redis()
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        options = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            # No command is sent twice: a script whose reply was lost may have run, and
            # running `admit` or `settle` again would reserve or record twice. A pooled
            # connection the server closed is still replaced when it is checked out.
            "retry": Retry(NoBackoff(), 0),
            **redis_kwargs,
        }
        max_connections = options.pop("max_connections", 50)

        def open_client() -> Redis:
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                url, max_connections=max_connections, timeout=timeout, **options
            )
            client: Redis = redis.asyncio.Redis.from_pool(pool)  # the client owns the pool
            return client

        store = cls.__new__(cls)
        store._setup(prefix, timeout, max_spend_records)
        store._connection = None
        store._factory = open_client
        return store

    def _setup(self, prefix: str, timeout: float, max_spend_records: int) -> None:
        redis = _import_redis()
        if not prefix or "{" in prefix or "}" in prefix:
            raise ConfigurationError(f"prefix must be non-empty without braces, not {prefix!r}")
        if not timeout > 0:
            raise ConfigurationError(f"timeout must be positive, not {timeout!r}")
        if max_spend_records < 0:
            raise ConfigurationError("max_spend_records must not be negative")
        self._tag = "{" + prefix + "}:"
        self._timeout = timeout
        self._max_records = max_spend_records
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- plumbing ----------------------------------------------------------------------------

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

    async def _run(self, what: str, call: Callable[[_Connection], Awaitable[_T]]) -> _T:
        try:
            with anyio.fail_after(self._timeout):
                return await call(self._connect())
        except TimeoutError as exc:
            raise StoreError(
                f"The Redis store did not answer within {self._timeout} s ({what})."
            ) from exc
        except self._errors as exc:
            # The cause keeps Redis's own message for logs; this one is safe to show anyone.
            raise StoreError(f"The Redis store failed ({what}): {type(exc).__name__}.") from exc

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        async def call(connection: _Connection) -> Any:
            return await connection.scripts[name](keys=keys, args=args)

        return await self._run(name, call)

    # -- the hot path ------------------------------------------------------------------------

    async def admit(self, admission: Admission) -> AdmissionResult:
        """Apply every check of one request atomically: all reserved, or nothing changed.

        One round trip: a single EVALSHA of `admit.lua`.
        """
        now = admission.now
        now_ms = int(now * 1000)
        keys = [self._key("reservation", admission.request_id)]
        args: list[str | int] = [
            _num(now),
            now_ms,
            admission.request_id,
            admission.cost,
            _num(now + admission.ttl),
            _ttl_ms(admission.ttl * 1000),
            len(admission.rates),
            len(admission.slots),
            len(admission.budgets),
        ]
        for hit in admission.rates:
            size = _size(hit)
            keys.append(self._key("window", hit.key))
            args += [hit.kind, size, now_ms // size, hit.limit, hit.cost, _ttl_ms(2 * size)]
        for slot in admission.slots:
            keys.append(self._key("lease", slot.key))
            args += [slot.limit, _num(now + slot.ttl), _ttl_ms(slot.ttl * 1000)]
        for scope in admission.budgets:
            keys.append(self._key("budget", scope.key))
            args += [_opt(scope.limit), _opt_num(scope.period_end)]

        raw = await self._script("admit", keys, args)
        verdict, position, held = (_int(value) for value in raw[:3])
        reply = [_text(value) for value in raw[3:]]
        # The script answers with the states before anything was reserved.
        windows = [
            (int(reply[3 * i]), int(reply[3 * i + 1]), int(reply[3 * i + 2]))
            for i in range(len(admission.rates))
        ]
        reply = reply[3 * len(admission.rates) :]
        levels = [
            (int(reply[3 * i]), int(reply[3 * i + 1]), _opt_float(reply[3 * i + 2]))
            for i in range(len(admission.budgets))
        ]
        refusal = _refusal(admission, verdict, position - 1, held, windows, levels)
        return _admission_result(admission, refusal, windows, levels)

    async def settle(self, settlement: Settlement) -> bool:
        """Settle a reservation with the actual cost, release its leases, append its record.

        One round trip: a single EVALSHA of `settle.lua`, which also appends the record.
        """
        keys = [self._key("reservation", settlement.request_id), self._key("spend", "log")]
        args: list[str | int] = [
            _num(settlement.now),
            int(settlement.now * 1000),
            settlement.cost,
            _opt(settlement.tokens),
            settlement.request_id,
            "",
            self._max_records,
            0,
            0,
            0,
            1 if settlement.refund_requests else 0,
        ]
        record = settlement.record
        if record is not None:
            keys += [self._totals_key(group, name) for group, name in _groups(record)]
            args[5] = json.dumps(record.to_dict(), separators=(",", ":"))
            args[7:10] = [record.cost, record.input_tokens, record.output_tokens]
        return bool(_int(await self._script("settle", keys, args)))

    async def release(self, request_id: str, slot_keys: Sequence[str]) -> None:
        """Free a request's leases without settling anything."""
        if slot_keys:
            keys = [self._key("lease", key) for key in slot_keys]
            await self._script("release", keys, [request_id])

    # -- budgets outside a request -----------------------------------------------------------

    async def charge(self, scopes: Sequence[BudgetScope], cost: int, now: float) -> None:
        """Add spend at every level unconditionally."""
        if scopes:
            keys = [self._key("budget", scope.key) for scope in scopes]
            args: list[str | int] = [_num(now), cost]
            args += [_opt_num(scope.period_end) for scope in scopes]
            await self._script("charge", keys, args)

    async def budgets(self, scopes: Sequence[BudgetScope], now: float) -> list[BudgetState]:
        """Read budget levels; a period that has ended reads as zero spent."""
        if not scopes:
            return []
        keys = [self._key("budget", scope.key) for scope in scopes]
        reply = [_text(v) for v in await self._script("budgets", keys, [])]
        states = []
        for i, scope in enumerate(scopes):
            spent, total = int(reply[3 * i]), int(reply[3 * i + 1])
            end = _opt_float(reply[3 * i + 2])
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
        await self._script("reset_budget", [self._key("budget", key)], [_opt_num(period_end)])

    # -- key, user and team records ----------------------------------------------------------

    async def create_key(self, record: KeyRecord) -> bool:
        """Store a new key record; False if one with that hash exists."""
        keys = [
            self._key("key", record.key_hash),
            self._key("keys"),
            self._key("keys", "seq"),
            self._key("keys", "by_user"),
            self._key("keys", "by_team"),
        ]
        args = [
            record.key_hash,
            *_index_args(record.user_id),
            *_index_args(record.team_id),
            *_fields(record.to_dict()),
        ]
        return bool(_int(await self._script("record_create", keys, args)))

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        """The key record stored under a key's hash."""
        return await self._get_record(KeyRecord, self._key("key", key_hash))

    async def update_key(self, key_hash: str, changes: Mapping[str, Any]) -> KeyRecord | None:
        """Change some fields of a key record."""
        keys = [
            self._key("key", key_hash),
            self._key("keys", "by_user"),
            self._key("keys", "by_team"),
        ]
        index = [
            *(_index_args(changes["user_id"]) if "user_id" in changes else ("keep", "")),
            *(_index_args(changes["team_id"]) if "team_id" in changes else ("keep", "")),
        ]
        return await self._update_record(KeyRecord, keys, key_hash, index, changes)

    async def delete_key(self, key_hash: str) -> bool:
        """Delete a key record; False if there was none."""
        keys = [
            self._key("key", key_hash),
            self._key("keys"),
            self._key("keys", "by_user"),
            self._key("keys", "by_team"),
        ]
        return bool(_int(await self._script("record_delete", keys, [key_hash])))

    async def list_keys(
        self, *, user_id: str | None = None, team_id: str | None = None
    ) -> list[KeyRecord]:
        """Key records, all of them or those of one user and/or team, oldest first."""
        keys = [self._key("keys")]
        if user_id is not None:
            keys.append(self._key("keys", "by_user"))
            args = ["index", user_id]
        elif team_id is not None:
            keys.append(self._key("keys", "by_team"))
            args = ["index", team_id]
        else:
            args = ["all", ""]
        reply = await self._script("list_keys", keys, [*args, self._key("key", "")])
        records = [KeyRecord.from_dict(_decode_fields(fields)) for fields in reply[1::2]]
        # The index only narrows the search; the records' own fields decide, as in MemoryStore.
        return [
            record
            for record in records
            if (user_id is None or record.user_id == user_id)
            and (team_id is None or record.team_id == team_id)
        ]

    async def create_user(self, record: UserRecord) -> bool:
        """Store a new user; False if the id is taken."""
        return await self._create_record(self._key("user", record.user_id), record)

    async def get_user(self, user_id: str) -> UserRecord | None:
        """A user record by id."""
        return await self._get_record(UserRecord, self._key("user", user_id))

    async def update_user(self, user_id: str, changes: Mapping[str, Any]) -> UserRecord | None:
        """Change some fields of a user."""
        keys = [self._key("user", user_id)]
        return await self._update_record(UserRecord, keys, user_id, _KEEP_INDEX, changes)

    async def create_team(self, record: TeamRecord) -> bool:
        """Store a new team; False if the id is taken."""
        return await self._create_record(self._key("team", record.team_id), record)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        """A team record by id."""
        return await self._get_record(TeamRecord, self._key("team", team_id))

    async def update_team(self, team_id: str, changes: Mapping[str, Any]) -> TeamRecord | None:
        """Change some fields of a team."""
        keys = [self._key("team", team_id)]
        return await self._update_record(TeamRecord, keys, team_id, _KEEP_INDEX, changes)

    async def set_access_group(self, name: str, models: Sequence[str]) -> None:
        """Define (or redefine) a model access group."""
        value = json.dumps(list(models))

        async def call(connection: _Connection) -> None:
            await connection.client.hset(self._key("access_groups"), name, value)

        await self._run("set_access_group", call)

    async def access_groups(self) -> dict[str, tuple[str, ...]]:
        """Every model access group and its models."""

        async def call(connection: _Connection) -> dict[Any, Any]:
            return await connection.client.hgetall(self._key("access_groups"))

        groups = await self._run("access_groups", call)
        return {_text(name): tuple(json.loads(models)) for name, models in groups.items()}

    async def _create_record(self, key: str, record: UserRecord | TeamRecord) -> bool:
        args = ["", "none", "", "none", "", *_fields(record.to_dict())]
        return bool(_int(await self._script("record_create", [key], args)))

    async def _get_record(self, cls: type[_R], key: str) -> _R | None:
        async def call(connection: _Connection) -> dict[Any, Any]:
            return await connection.client.hgetall(key)

        fields = await self._run("get_record", call)
        if not fields:
            return None
        return cls.from_dict({_text(name): json.loads(value) for name, value in fields.items()})

    async def _update_record(
        self,
        cls: type[_R],
        keys: list[str],
        record_id: str,
        index: Sequence[str],
        changes: Mapping[str, Any],
    ) -> _R | None:
        # Fields a record does not have would be dropped by `from_dict` anyway; not storing
        # them keeps the hash exactly the record.
        names = {field.name for field in dataclasses.fields(cls)}
        known: dict[str, Any] = {name: value for name, value in changes.items() if name in names}
        args = [record_id, *index, *_fields(known)]
        reply = await self._script("record_update", keys, args)
        return None if reply is None else cls.from_dict(_decode_fields(reply))

    # -- spend records -----------------------------------------------------------------------

    def _totals_key(self, group: str, name: str) -> str:
        return self._key("spend", "totals", group, name)

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
        """Kept spend records matching every filter given, newest first.

        Filters run in Python over the bounded log, read in one command.
        """
        if limit <= 0:
            return []
        filtered = any(v is not None for v in (key_hash, user_id, team_id, model, start, end))
        stop = -1 if filtered else limit - 1

        async def call(connection: _Connection) -> list[Any]:
            return await connection.client.lrange(self._key("spend", "log"), 0, stop)

        found: list[SpendRecord] = []
        for raw in await self._run("spend_records", call):
            if len(found) >= limit:
                break
            record = SpendRecord.from_dict(json.loads(raw))
            if _matches(record, key_hash, user_id, team_id, model, start, end):
                found.append(record)
        return found

    async def spend_totals(self, group: SpendGroup, name: str = "") -> SpendTotals:
        """All-time totals of one group (`"global"` ignores `name`)."""
        key = self._totals_key(group, "" if group == "global" else name)

        async def call(connection: _Connection) -> list[Any]:
            return await connection.client.hmget(key, list(_TOTAL_FIELDS))

        values = await self._run("spend_totals", call)
        return SpendTotals(*(0 if value is None else int(value) for value in values))

    # -- BudgetManager project documents -----------------------------------------------------

    async def get_project(self, project_name: str) -> dict[str, Any] | None:
        """A BudgetManager project's user dict, or None."""

        async def call(connection: _Connection) -> Any:
            return await connection.client.get(self._key("project", project_name))

        document = await self._run("get_project", call)
        if document is None:
            return None
        loaded: dict[str, Any] = json.loads(document)
        return loaded

    async def set_project(self, project_name: str, user_dict: Mapping[str, Any]) -> None:
        """Replace a BudgetManager project's user dict (stored as one JSON document)."""
        document = json.dumps(user_dict, default=_jsonable)

        async def call(connection: _Connection) -> None:
            await connection.client.set(self._key("project", project_name), document)

        await self._run("set_project", call)

    # -- lifecycle ---------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise `StoreError` unless Redis answers within the timeout."""

        async def call(connection: _Connection) -> None:
            await connection.client.ping()

        await self._run("ping", call)

    async def aclose(self) -> None:
        """Close the client this store opened (`from_url`); a client passed in stays open.

        A `from_url` store opens a new client if it is used again afterwards, so a sync
        caller may run each call in its own event loop and close the store at the end of it.
        """
        if self._factory is None:
            return  # the caller owns the client; the registered scripts stay for later calls
        connection, self._connection = self._connection, None
        loop, self._loop = self._loop, None
        # Connections can only be closed on the loop that opened them; on another one the
        # old client is just dropped.
        if connection is not None and loop is asyncio.get_running_loop():
            await connection.client.aclose()


def _window_state(
    now_ms: int, size: int, cur: int, prev: int, index: int
) -> tuple[int, int, int, int]:
    # `_window`'s arguments: counts, milliseconds into the stored window (never negative: a
    # caller a little behind counts in it), window length.
    return cur, prev, max(0, now_ms - index * size), size


def _refusal(
    admission: Admission,
    verdict: int,
    index: int,
    held: int,
    windows: Sequence[tuple[int, int, int]],
    levels: Sequence[tuple[int, int, float | None]],
) -> Refusal | None:
    """The refusal `admit.lua` reported, worded exactly as `MemoryStore` words it."""
    if verdict == 1:
        hit = admission.rates[index]
        state = _window_state(int(admission.now * 1000), _size(hit), *windows[index])
        retry = _window.retry_after_ms(*state, hit.limit, hit.cost)
        used = hit.limit - _window.remaining(*state, hit.limit)
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
    if verdict == 3:
        scope = admission.budgets[index]
        spent, _, resets_at = levels[index]
        assert scope.limit is not None  # only a limited level refuses
        return Refusal(
            "budget", scope.level, scope.label, scope.limit, spent, admission.cost,
            None if resets_at is None else max(0.0, resets_at - admission.now), resets_at,
        )  # fmt: skip
    return None


def _admission_result(
    admission: Admission,
    refusal: Refusal | None,
    windows: Sequence[tuple[int, int, int]],
    levels: Sequence[tuple[int, int, float | None]],
) -> AdmissionResult:
    """The states after the step: what the script read, plus what an admission took."""
    now_ms = int(admission.now * 1000)
    # A key named twice took twice, as in MemoryStore.
    taken: dict[str, int] = {}
    reserved: dict[str, int] = {}
    if refusal is None:
        for hit in admission.rates:
            taken[hit.key] = taken.get(hit.key, 0) + hit.cost
        for scope in admission.budgets:
            reserved[scope.key] = reserved.get(scope.key, 0) + admission.cost
    rates = []
    for hit, (cur, prev, index) in zip(admission.rates, windows, strict=True):
        state = _window_state(now_ms, _size(hit), cur + taken.get(hit.key, 0), prev, index)
        rates.append(
            RateState(
                hit.key,
                hit.kind,
                hit.level,
                hit.limit,
                _window.remaining(*state, hit.limit),
                _window.reset_after_ms(*state) / 1000,
                hit.window,
            )
        )
    budgets = [
        BudgetState(
            scope.key,
            scope.level,
            scope.label,
            scope.limit,
            spent + reserved.get(scope.key, 0),
            end,
            total,
        )
        for scope, (spent, total, end) in zip(admission.budgets, levels, strict=True)
    ]
    # Headroom is measured before this request's reservation.
    rooms = [
        scope.limit - spent
        for scope, (spent, _, _) in zip(admission.budgets, levels, strict=True)
        if scope.limit is not None
    ]
    return AdmissionResult(refusal, tuple(rates), tuple(budgets), min(rooms) if rooms else None)


def _size(hit: RateHit) -> int:
    return int(hit.window * 1000)


_KEEP_INDEX: Final = ("keep", "", "keep", "")


def _index_args(value: Any) -> tuple[str, str]:
    # Only string ids are indexed: no string lookup could match any other value.
    return ("set", value) if isinstance(value, str) else ("none", "")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _fields(data: Mapping[str, Any]) -> list[str]:
    # One JSON value per hash field: an update rewrites only the fields it changes, and no
    # number ever passes through cjson (which keeps 14 significant digits).
    pairs: list[str] = []
    for name, value in data.items():
        pairs += [name, json.dumps(value, default=_jsonable)]
    return pairs


def _decode_fields(flat: Iterable[Any]) -> dict[str, Any]:
    items = [_text(item) for item in flat]
    return {items[i]: json.loads(items[i + 1]) for i in range(0, len(items), 2)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int:
    return int(_text(value)) if isinstance(value, bytes) else int(value)


def _num(value: float) -> str:
    # repr round-trips a double exactly; Lua's tonumber reads it back to the same double.
    return repr(float(value))


def _opt_num(value: float | None) -> str:
    return "" if value is None else _num(value)


def _opt_float(text: str) -> float | None:
    return float(text) if text else None


def _opt(value: int | None) -> str | int:
    return "" if value is None else value


def _ttl_ms(milliseconds: float) -> int:
    return max(_MIN_KEY_TTL_MS, math.ceil(milliseconds))
