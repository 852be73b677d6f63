"""`SQLiteStore`: one truth for every worker process on one machine, kept in one file.

The store is assembled from private parts: `_sqlite_base` (the worker thread, its connection,
the schema, the time bound), `_sqlite_state` (ledger rows as `MemoryStore`'s state objects, and
the sweep), `_sqlite_ledger` (admissions, settlements, leases, budgets) and `_sqlite_records`
(registry, spend log, projects) with `_sqlite_registry` (customers, budget tiers, listing and
deleting users and teams); this module joins them into the one class users see.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Final

from ._protocol import DEFAULT_TIMEOUT
from ._sqlite_ledger import SQLiteLedger
from ._sqlite_records import SQLiteRecords
from ._sqlite_registry import SQLiteRegistry

__all__ = ["SQLiteStore"]

# Claims live in a table of their own, made by the first claim: files of earlier versions
# stay readable by them (no schema version change for a table they never read).
_CLAIMS: Final = (
    "CREATE TABLE IF NOT EXISTS claims (name TEXT PRIMARY KEY, expires REAL NOT NULL) "
    "STRICT, WITHOUT ROWID"
)


class SQLiteStore(SQLiteLedger, SQLiteRecords, SQLiteRegistry):
    """The embedded shared store: state in one SQLite file, seen alike by every worker.

    Pick it for one machine with any number of worker processes (`uvicorn --workers 4`,
    `gunicorn -w 4`): every worker opens the same file, so a limit or a budget holds for all
    of them together, and keys, users, teams, budgets, spend records and totals survive a
    restart. One process with nothing to keep (tests, scripts) needs only `MemoryStore`; many
    machines need `RedisStore`. It implements every role of `Store`, with the same rules as the
    other stores (see `llmfence.stores`).

    Each admission and each settlement is one write transaction (`BEGIN IMMEDIATE`): every
    level is reserved, or none, however many processes admit at once. Calls run on a thread of
    the store's own, with its one connection, so the event loop never waits for the disk or for
    another process's lock; the file is in WAL mode with `synchronous=NORMAL` (a commit
    survives a crashed process; a power loss may take the last few back). End users' state
    (budget counters, rate buckets, totals) is dropped once idle, as `MemoryStore` drops it,
    by a sweep that admissions run every few thousand calls; the operator's never is.

    Every call is bounded by `timeout`, all included: its wait for the store's thread, for
    another process's write lock (SQLite's `busy_timeout`) and the statements. A SQLite error
    or a timeout raises `StoreError` from the original exception. Nothing is opened in
    `__init__`: the file is opened (and its schema created) by the first call, on any event
    loop; a store may be used from one loop after another. A store used before a fork opens
    its own connection in the child.

    Args:
        path: The database file (created if missing). Give every worker the same path; a
            local disk, not a network file system (SQLite's locks need one).
        timeout: Seconds any one store call may take before it fails with `StoreError`
            (default 5; `Fence(store_timeout=...)` sets another).
        max_spend_records: How many spend records the log keeps (oldest dropped first). The
            running totals count every record ever appended.

    Raises:
        ConfigurationError: When an option is not valid.
    """

    bounds_call_time = True  # every call runs under `timeout`

    def __init__(
        self,
        path: str | os.PathLike[str] = "llmfence.db",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_spend_records: int = 100_000,
    ) -> None:
        self._setup(path, timeout, max_spend_records)

    async def claim(self, name: str, expires: float, now: float) -> bool:
        """Take `name` until `expires`: True for the first caller, False while it is held.

        One write transaction: the expired claims are dropped, then the name inserted unless
        it is held, so of all the processes that claim one name at once, one gets True.
        """
        if expires <= now:
            return False
        return await self._write("claim", _claim, name, expires, now)


def _claim(db: sqlite3.Connection, name: str, expires: float, now: float) -> bool:
    db.execute(_CLAIMS)
    db.execute("DELETE FROM claims WHERE expires <= ?", (now,))
    inserted = db.execute("INSERT OR IGNORE INTO claims VALUES (?, ?)", (name, expires))
    return inserted.rowcount == 1
