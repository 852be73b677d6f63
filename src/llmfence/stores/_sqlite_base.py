"""`SQLiteStore`'s plumbing: the worker thread and its connection, the schema, the time bound.

Every store call runs as one job on the store's own thread, which holds the store's one
`sqlite3` connection: the event loop only waits for the job's future, so a slow disk or a lock
held by another process never blocks it. Why a thread of our own and not `aiosqlite`:
`aiosqlite` also runs each connection on one thread of its own and queues calls to it, so it
would add a dependency and a second queue for nothing; here one job is one whole transaction
(`BEGIN IMMEDIATE` … `COMMIT`), run by plain `sqlite3` from the standard library.

Time bound: a call's deadline (`timeout`) covers its wait in the thread's queue, SQLite's wait
for another process's lock (`busy_timeout`, set per job to what is left of the deadline) and
the statements. A caller that gives up gets `StoreError` at once; a job that has not started
by then never runs, one that has runs to its end (a transaction applies whole or not at all),
and the store's tombstones make whatever a lost reply leaves behind harmless (see
`_protocol`).

The database: WAL journal (readers never wait for the writer; every worker process on the
host shares the one file), `synchronous=NORMAL` (a commit survives a crashed process; a power
loss may take the last ones back), and a schema versioned by `PRAGMA user_version`. Money and
other counters that may outgrow 64 bits live in `ANY` columns of STRICT tables: an integer
SQLite can hold is stored as one, a larger one as its decimal text, and Python does every sum,
so amounts stay exact whatever their size.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

from llmfence.exceptions import ConfigurationError, StoreError

from ._types import checked_timeout

__all__ = ["SCHEMA_VERSION", "SQLiteBase", "db_int", "dumps", "loads"]

_T = TypeVar("_T")
_P = ParamSpec("_P")

SCHEMA_VERSION: Final = 2

# One statement per table; `ANY` columns keep what they are given (see the module docstring).
_SCHEMA: Final = (
    # Budget counters: spend of the current period, all-time total, the period's end (NULL:
    # it never ends), an epoch bumped at every roll, how many live reservations hold it, and
    # whether clients name it (an end user's: swept once idle).
    """CREATE TABLE budgets (
        key TEXT PRIMARY KEY, spent ANY NOT NULL, total ANY NOT NULL, ends REAL,
        epoch INTEGER NOT NULL, held INTEGER NOT NULL, client INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID""",
    # Rate buckets (`_window`): level in units x window ms, written at `t` ms.
    """CREATE TABLE buckets (
        key TEXT PRIMARY KEY, level ANY NOT NULL, t INTEGER NOT NULL, size_ms INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID""",
    """CREATE TABLE leases (
        key TEXT NOT NULL, request_id TEXT NOT NULL, expires REAL NOT NULL,
        PRIMARY KEY (key, request_id)
    ) STRICT, WITHOUT ROWID""",
    # What `settle` needs of an admission, as JSON: budgets (key, epoch), token and request
    # hits (key, window ms, limit, units), lease keys.
    """CREATE TABLE reservations (
        request_id TEXT PRIMARY KEY, expires REAL NOT NULL, cost ANY NOT NULL,
        data TEXT NOT NULL
    ) STRICT, WITHOUT ROWID""",
    # NULL `expires`: a release's (it carries no time), stamped by the next sweep.
    "CREATE TABLE tombstones (request_id TEXT PRIMARY KEY, expires REAL) STRICT, WITHOUT ROWID",
    """CREATE TABLE keys (
        key_hash TEXT PRIMARY KEY, user_id TEXT, team_id TEXT, record TEXT NOT NULL
    ) STRICT""",
    "CREATE INDEX keys_by_user ON keys (user_id)",
    "CREATE INDEX keys_by_team ON keys (team_id)",
    "CREATE TABLE users (user_id TEXT PRIMARY KEY, record TEXT NOT NULL) STRICT",
    "CREATE TABLE teams (team_id TEXT PRIMARY KEY, record TEXT NOT NULL) STRICT",
    "CREATE TABLE access_groups (name TEXT PRIMARY KEY, models TEXT NOT NULL) STRICT",
    "CREATE TABLE projects (name TEXT PRIMARY KEY, document TEXT NOT NULL) STRICT",
    # The spend log: the filtered fields as columns, the whole record as a JSON array of its
    # values in `SpendRecord` field order. AUTOINCREMENT: `seq` only grows, across processes.
    """CREATE TABLE spend_log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, timestamp REAL NOT NULL, model TEXT,
        key_hash TEXT, user_id TEXT, team_id TEXT, record TEXT NOT NULL
    ) STRICT""",
    # Running totals, named as `_spend.total_keys` names them; end users' apart, each with
    # the `seq` of the record that last counted it, so the least recent can be dropped.
    """CREATE TABLE spend_totals (
        name TEXT PRIMARY KEY, cost ANY NOT NULL, input_tokens ANY NOT NULL,
        output_tokens ANY NOT NULL, requests ANY NOT NULL
    ) STRICT, WITHOUT ROWID""",
    """CREATE TABLE end_user_totals (
        name TEXT PRIMARY KEY, cost ANY NOT NULL, input_tokens ANY NOT NULL,
        output_tokens ANY NOT NULL, requests ANY NOT NULL, used INTEGER NOT NULL
    ) STRICT, WITHOUT ROWID""",
    "CREATE INDEX end_user_totals_by_use ON end_user_totals (used)",
    # Small counters kept beside the tables (how many end users have totals).
    "CREATE TABLE counts (name TEXT PRIMARY KEY, value INTEGER NOT NULL) STRICT",
)
# Version 2 adds customers and budget tiers: records of a kind, by id, in creation order.
_SCHEMA_V2: Final = (
    """CREATE TABLE registry (
        kind TEXT NOT NULL, id TEXT NOT NULL, record TEXT NOT NULL, PRIMARY KEY (kind, id)
    ) STRICT""",
)

_INT64: Final = 1 << 63
_encode: Final = json.JSONEncoder(separators=(",", ":")).encode
loads: Final = json.loads


def dumps(value: Any) -> str:
    """Compact JSON text (integers of any size stay exact)."""
    return _encode(value)


def db_int(value: int) -> int | str:
    """An integer as an `ANY` column keeps it: itself if SQLite can hold it, else its digits."""
    return value if -_INT64 <= value < _INT64 else str(value)


class _Worker:
    """One thread, and the connection it opens on its first job and alone uses."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmfence-sqlite")
        self.db: sqlite3.Connection | None = None

    def run(
        self,
        deadline: float,
        write: bool,
        job: Callable[Concatenate[sqlite3.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run `job` in one transaction, unless its caller's deadline has passed already."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError  # its caller gave up while it queued: it must not apply
        # Another process's lock is waited for only as long as the caller still waits.
        busy = f"PRAGMA busy_timeout = {max(1, int(left * 1000))}"
        db = self.db if self.db is not None else self._open(busy)
        db.execute(busy)
        # IMMEDIATE takes the write lock first: a read-then-write transaction never finds, at
        # its first write, that another process wrote meanwhile. DEFERRED reads see one
        # snapshot and never wait for a writer (WAL).
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            result = job(db, *args, **kwargs)
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return result

    def _open(self, busy: str) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        try:
            db.execute(busy)  # switching to WAL, or creating the schema, may wait for a lock
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            _migrate(db)
        except BaseException:
            db.close()
            raise
        self.db = db
        return db

    def close(self) -> None:
        if self.db is not None:
            db, self.db = self.db, None
            db.close()


def _migrate(db: sqlite3.Connection) -> None:
    """Create the schema in a new file; refuse a file a newer version wrote."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have created it meanwhile.
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version in (0, 1):
            # A new file gets every table; a version 1 file gets the tables version 2 added.
            for statement in (*(_SCHEMA if version == 0 else ()), *_SCHEMA_V2):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise StoreError(
                f"The SQLite store's file has schema version {version}; this llmfence "
                f"reads version {SCHEMA_VERSION} (a newer llmfence wrote it)."
            )
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


class SQLiteBase:
    """What every part of `SQLiteStore` shares: the file, the worker and the time bound."""

    def _setup(self, path: str | os.PathLike[str], timeout: float, max_spend_records: int) -> None:
        if isinstance(max_spend_records, bool) or max_spend_records < 0:
            raise ConfigurationError("max_spend_records must not be negative")
        self._path = os.fspath(path)
        self._max_records = max_spend_records
        self._timeout = 1.0
        self.set_call_timeout(timeout)
        self._worker: _Worker | None = None
        self._lock = threading.Lock()  # builds one worker when several loops' threads race

    @property
    def path(self) -> str:
        """The database file."""
        return self._path

    @property
    def call_timeout(self) -> float:
        """Seconds any one call may take, all included (the store's `timeout`)."""
        return self._timeout

    def set_call_timeout(self, seconds: float) -> None:
        """Bound every later call by `seconds` instead (what `Fence(store_timeout=...)` does).

        Raises:
            ConfigurationError: `seconds` is not a finite number > 0.
        """
        self._timeout = checked_timeout(seconds)

    def _current_worker(self) -> _Worker:
        worker = self._worker
        if worker is None or worker.pid != os.getpid():
            with self._lock:
                worker = self._worker
                # A worker inherited through fork has no thread in this process: it is left
                # alone (its connection belongs to the parent) and this process opens its own.
                if worker is None or worker.pid != os.getpid():
                    worker = self._worker = _Worker(self._path)
        return worker

    async def _write(
        self,
        what: str,
        job: Callable[Concatenate[sqlite3.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run `job` in one write transaction (`BEGIN IMMEDIATE`) on the store's thread."""
        return await self._submit(what, True, job, *args, **kwargs)

    async def _read(
        self,
        what: str,
        job: Callable[Concatenate[sqlite3.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """Run `job` in one read transaction (one snapshot) on the store's thread."""
        return await self._submit(what, False, job, *args, **kwargs)

    async def _submit(
        self,
        what: str,
        write: bool,
        job: Callable[Concatenate[sqlite3.Connection, _P], _T],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        timeout = self._timeout
        worker = self._current_worker()
        deadline = time.monotonic() + timeout

        def call() -> _T:
            return worker.run(deadline, write, job, *args, **kwargs)

        try:
            future: Future[_T] = worker.executor.submit(call)
        except RuntimeError as exc:  # `aclose` stopped this worker meanwhile
            raise StoreError(f"The SQLite store was closed during the call ({what}).") from exc
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.wrap_future(future)
        except TimeoutError as exc:
            future.cancel()  # not started yet: it never will
            raise StoreError(
                f"The SQLite store did not answer within {timeout} s ({what})."
            ) from exc
        except (sqlite3.Error, OSError) as exc:
            # The cause keeps SQLite's own message for logs; this one is safe to show anyone.
            name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
            raise StoreError(f"The SQLite store failed ({what}): {name}.") from exc

    # -- lifecycle ---------------------------------------------------------------------------

    async def ping(self) -> None:
        """Raise `StoreError` unless the database answers within the timeout."""
        await self._read("ping", _ping)

    async def aclose(self) -> None:
        """Close the connection and stop the thread; a later call opens them again."""
        with self._lock:
            worker, self._worker = self._worker, None
        if worker is None or worker.pid != os.getpid():
            return
        try:
            await asyncio.wrap_future(worker.executor.submit(worker.close))
        except sqlite3.Error as exc:
            raise StoreError("The SQLite store failed (aclose).") from exc
        finally:
            worker.executor.shutdown(wait=False)


def _ping(db: sqlite3.Connection) -> None:
    db.execute("SELECT 1").fetchone()
