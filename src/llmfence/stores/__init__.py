"""Stores: the store protocols and their implementations, `MemoryStore`, `SQLiteStore` and
`RedisStore` (one node or a Redis Cluster); `store_from_url` picks one from a URL.

`Store` is the whole protocol; `LedgerStore`, `RegistryStore`, `CustomerStore`,
`BudgetTierStore`, `SpendLogStore`, `ProjectStore` and `ClaimStore` are its roles (see
`_protocol` for what each covers and the rules every store follows). Importing this package
never imports `redis`: `RedisStore` does, when a store is built."""

from __future__ import annotations

from ._protocol import (
    BudgetTierStore,
    ClaimStore,
    CustomerStore,
    LedgerStore,
    Lifecycle,
    ProjectStore,
    RegistryStore,
    SpendGroup,
    SpendLogStore,
    Store,
)
from ._types import (
    Admission,
    AdmissionResult,
    BudgetScope,
    BudgetState,
    BudgetTier,
    CustomerRecord,
    KeyRecord,
    RateHit,
    RateState,
    Refusal,
    Settlement,
    SlotRequest,
    SpendRecord,
    SpendTotals,
    TeamRecord,
    UserRecord,
    hash_key,
    mask_key,
)
from ._url import store_from_url
from .memory import MemoryStore
from .redis import RedisStore
from .sqlite import SQLiteStore

__all__ = [
    "Admission",
    "AdmissionResult",
    "BudgetScope",
    "BudgetState",
    "BudgetTier",
    "BudgetTierStore",
    "ClaimStore",
    "CustomerRecord",
    "CustomerStore",
    "KeyRecord",
    "LedgerStore",
    "Lifecycle",
    "MemoryStore",
    "ProjectStore",
    "RateHit",
    "RateState",
    "RedisStore",
    "Refusal",
    "RegistryStore",
    "SQLiteStore",
    "Settlement",
    "SlotRequest",
    "SpendGroup",
    "SpendLogStore",
    "SpendRecord",
    "SpendTotals",
    "Store",
    "TeamRecord",
    "UserRecord",
    "hash_key",
    "mask_key",
    "store_from_url",
]
