"""`SQLiteStore`'s ledger rows as `MemoryStore`'s state objects, and the sweep.

A job loads the rows it touches into the very objects `MemoryStore` keeps (`Budget`, `Bucket`
from `_memory_state`), runs the same arithmetic on them (`Budget.roll`, `_window`), and writes
back the ones that changed, all inside its one transaction: the two stores answer alike
because they share the rules, not copies of them.

The sweep keeps the file's ledger bounded as `MemoryStore._sweep` keeps its dicts, by the same
rules (`Budget.droppable`, `Bucket.idle`, expired leases, reservations and tombstones), and at
the same amortized pace: every `SWEEP_EVERY` admissions of a process, or as many as there are
rows left, whichever is more.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any, Final

from ._memory_state import TOMBSTONE_TTL, Bucket, Budget
from ._sqlite_base import db_int, loads

__all__ = [
    "Buckets",
    "Budgets",
    "delete_leases",
    "entry_counts",
    "live_tombstone",
    "sweep",
    "tombstone",
    "unhold",
]

_TABLES: Final = ("budgets", "buckets", "leases", "reservations", "tombstones")
_Row = tuple[Any, ...]


class Budgets:
    """Budget counters loaded in one transaction, written back by `save` if they changed."""

    __slots__ = ("_absent", "_db", "_loaded")

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._loaded: dict[str, tuple[Budget, _Row | None]] = {}
        self._absent: set[str] = set()

    def load(self, keys: Iterable[str]) -> None:
        """Read the counters under `keys` in one statement (`find` then asks nothing more)."""
        wanted = {key for key in keys if key not in self._loaded}
        if not wanted:
            return
        marks = ", ".join("?" * len(wanted))
        rows = self._db.execute(
            "SELECT key, spent, total, ends, epoch, held, client FROM budgets "
            f"WHERE key IN ({marks})",
            tuple(wanted),
        )
        for key, *row in rows:
            budget = Budget(int(row[0]), int(row[1]), row[2], row[3], row[4], bool(row[5]))
            self._loaded[key] = (budget, _budget_row(budget))
            wanted.discard(key)
        self._absent |= wanted

    def find(self, key: str) -> Budget | None:
        """The counter under `key`, or None if there is none."""
        entry = self._loaded.get(key)
        if entry is not None:
            return entry[0]
        if key not in self._absent:
            self.load((key,))
            entry = self._loaded.get(key)
        return None if entry is None else entry[0]

    def get(self, key: str, client: bool = False) -> Budget:
        """The counter under `key`; a missing one is new (`client` says whose it is)."""
        budget = self.find(key)
        if budget is None:
            budget = Budget(client=client)
            self._loaded[key] = (budget, None)
        return budget

    def save(self) -> None:
        """Write every loaded counter that changed (a new one always: its period runs)."""
        rows = []
        for key, (budget, before) in self._loaded.items():
            row = _budget_row(budget)
            if row != before:
                rows.append((key, *row))
        if rows:
            self._db.executemany(
                "INSERT OR REPLACE INTO budgets VALUES (?, ?, ?, ?, ?, ?, ?)", rows
            )


def _budget_row(budget: Budget) -> _Row:
    return (
        db_int(budget.spent),
        db_int(budget.total),
        budget.end,
        budget.epoch,
        budget.held,
        int(budget.client),
    )


class Buckets:
    """Rate buckets loaded in one transaction; `save` writes those marked as written."""

    __slots__ = ("_db", "_loaded", "_written")

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._loaded: dict[str, Bucket | None] = {}
        self._written: dict[str, Bucket] = {}

    def load(self, keys: Iterable[str]) -> None:
        """Read the buckets under `keys` in one statement (`find` then asks nothing more)."""
        wanted = {key for key in keys if key not in self._loaded}
        if not wanted:
            return
        marks = ", ".join("?" * len(wanted))
        rows = self._db.execute(
            f"SELECT key, level, t, size_ms FROM buckets WHERE key IN ({marks})", tuple(wanted)
        )
        for key, level, t, size_ms in rows:
            self._loaded[key] = Bucket(size_ms, int(level), t)
        for key in wanted:
            self._loaded.setdefault(key, None)

    def find(self, key: str) -> Bucket | None:
        """The bucket under `key`, or None if there is none."""
        if key not in self._loaded:
            self.load((key,))
        return self._loaded[key]

    def get(self, key: str, size_ms: int) -> Bucket:
        """The bucket under `key`; a missing one reads as empty (and is stored only if written)."""
        bucket = self.find(key)
        if bucket is None:
            bucket = self._loaded[key] = Bucket(size_ms)
        return bucket

    def written(self, key: str, bucket: Bucket) -> None:
        self._written[key] = bucket

    def save(self) -> None:
        if self._written:
            self._db.executemany(
                "INSERT OR REPLACE INTO buckets VALUES (?, ?, ?, ?)",
                [(k, db_int(b.level), b.t, b.size_ms) for k, b in self._written.items()],
            )


def unhold(budgets: Budgets, data: dict[str, Any]) -> None:
    """A reservation is gone: the counters it held are free to be swept."""
    budgets.load(key for key, _ in data["budgets"])
    for key, _ in data["budgets"]:
        budget = budgets.find(key)
        if budget is not None:
            budget.held -= 1


def live_tombstone(db: sqlite3.Connection, request_id: str, now: float) -> bool:
    """Whether a live tombstone stands for `request_id` (a release's, unstamped, always is)."""
    row = db.execute(
        "SELECT expires FROM tombstones WHERE request_id = ?", (request_id,)
    ).fetchone()
    return row is not None and (row[0] is None or row[0] > now)


def tombstone(db: sqlite3.Connection, request_id: str, now: float) -> None:
    """Leave a tombstone for `request_id` that lives `TOMBSTONE_TTL` from `now`."""
    db.execute("INSERT OR REPLACE INTO tombstones VALUES (?, ?)", (request_id, now + TOMBSTONE_TTL))


def sweep(db: sqlite3.Connection, now: float, now_ms: int) -> int:
    """Drop what reads exactly as missing (see `MemoryLedger._sweep`); the rows left."""
    budgets = Budgets(db)
    expired = db.execute("SELECT data FROM reservations WHERE expires <= ?", (now,)).fetchall()
    for (data,) in expired:
        unhold(budgets, loads(data))
    budgets.save()
    db.execute("DELETE FROM reservations WHERE expires <= ?", (now,))
    db.execute("DELETE FROM buckets WHERE ? - t >= size_ms", (now_ms,))
    db.execute("DELETE FROM leases WHERE expires <= ?", (now,))
    # Only counters no reservation holds can go; `Budget.droppable` decides which.
    candidates = db.execute(
        "SELECT key, spent, total, ends, epoch, held, client FROM budgets WHERE held <= 0"
    )
    gone = [
        (row[0],)
        for row in candidates
        if Budget(int(row[1]), int(row[2]), row[3], row[4], row[5], bool(row[6])).droppable(now)
    ]
    db.executemany("DELETE FROM budgets WHERE key = ?", gone)
    db.execute("DELETE FROM tombstones WHERE expires <= ?", (now,))
    db.execute("UPDATE tombstones SET expires = ? WHERE expires IS NULL", (now + TOMBSTONE_TTL,))
    return sum(entry_counts(db).values())


def entry_counts(db: sqlite3.Connection) -> dict[str, int]:
    """How many rows each ledger table holds."""
    return {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in _TABLES}


def delete_leases(db: sqlite3.Connection, request_id: str, keys: Iterable[str]) -> None:
    """Free `request_id`'s lease on each key."""
    db.executemany(
        "DELETE FROM leases WHERE key = ? AND request_id = ?", [(key, request_id) for key in keys]
    )
