"""Stores: the `Store` protocol and its implementations, `MemoryStore` and `RedisStore`."""

from __future__ import annotations

from ._protocol import SpendGroup, Store
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
    SlotRequest,
    SpendRecord,
    SpendTotals,
    TeamRecord,
    UserRecord,
    hash_key,
    mask_key,
)
from .memory import MemoryStore

__all__ = [
    "Admission",
    "AdmissionResult",
    "BudgetScope",
    "BudgetState",
    "KeyRecord",
    "MemoryStore",
    "RateHit",
    "RateState",
    "Refusal",
    "Settlement",
    "SlotRequest",
    "SpendGroup",
    "SpendRecord",
    "SpendTotals",
    "Store",
    "TeamRecord",
    "UserRecord",
    "hash_key",
    "mask_key",
]
