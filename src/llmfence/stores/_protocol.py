"""The store protocols: the only door to llmfence's state.

A store plays up to seven roles, each a protocol of its own, so a backend implements only what
its users need:

`LedgerStore`
    Admissions, settlements, leases and budget counters: what every metered request touches.
`RegistryStore`
    Key, user and team records and model access groups: what authentication reads.
`CustomerStore`
    Registered customers (end users named by request bodies), with their own budgets.
`BudgetTierStore`
    Reusable budget tiers that keys, users and customers name by `budget_id`.
`SpendLogStore`
    The spend log and its running totals: what the admin API and reports read.
`ProjectStore`
    BudgetManager's project documents.
`ClaimStore`
    Claims: names the first caller takes until they expire (budget alerts, sent once).

`Store` is all seven at once, as `MemoryStore`, `SQLiteStore` and `RedisStore` are. A third-party
backend that only rate-limits (no spend log, no BudgetManager) implements `LedgerStore` and
`RegistryStore`; its `settle` may drop the spend record it is handed, since no log reads it
back. Every role includes `ping` and `aclose` (the `Lifecycle` protocol), so a component that
holds one role can check and close its store.

Every method is one atomic step in the store — there is no "read, then write" anywhere — and
takes the current time from its caller. The rules every store follows (and that the shared
contract suite in `llmfence.testing` checks):

Budgets
    A budget counter holds the spend of its current period, the period's end and an all-time
    total. A period rolls on first touch: when `now` is at or past the stored end, the spend
    starts from zero and the new period ends at the scope's `period_end` (computed by the caller
    from `now`). `admit` reserves the projected cost at every level, or at none.

Settlement
    `settle` replaces a reservation with the actual cost, exactly once per request id. At a
    level whose period has not rolled since the reservation, the difference is applied (a
    refund or a top-up). At a level whose period rolled meanwhile, the reservation vanished with
    the old period, so the whole actual cost is added to the new period: a call's cost is never
    lost, and never counted twice. Spend never goes below zero.

    A settlement of an id that holds no live reservation (its admission never reached the
    store, it expired, or there was none) charges its cost at the levels it names in `charges`
    (as `charge` does), appends its record, and leaves a tombstone for the id. A settlement of
    a tombstoned id changes nothing and appends nothing. A store whose calls can lose a reply
    after applying (any store that does not set `never_suspends`) also leaves a tombstone when
    it settles a live reservation, so a settlement sent again, after a reply lost to a timeout,
    is a no-op: the caller's retries (llmfence's outbox) are safe. `MemoryStore`, which never
    loses a reply, tombstones only refunds of ids it holds no reservation for.

    Admission is idempotent per request id: an `admit` whose id already holds a live
    reservation (a retried or duplicated admission) changes nothing and answers as admitted,
    with the states as they are now; it never reserves twice. A settlement or a release that
    reached the store before its admission (the caller gave up while the admission was still
    queued, say behind a stall) leaves a tombstone for that id; an `admit` of a tombstoned id
    likewise changes nothing, takes no reservation, bucket hit or lease, and answers as
    admitted with the states as they are now. Admitted, not refused: the caller already gave
    up on that request (or is retrying one the store holds, whose one reservation its
    settlement settles). Tombstones are bounded: they expire after a TTL of the store's (ten
    minutes in every store shipped), swept or given a key TTL.

Windows
    RPM and TPM are exact token buckets (GCRA in integers, see `_window`): a bucket holds a level
    in units × window ms that drains at `limit` per ms, and a hit of `cost` fits iff the level
    now plus `cost × window` is at most `limit × window`. A client at or under its rate is never
    refused, a burst of up to the limit is allowed, and a refusal's `retry_after` is the exact
    wait until the hit fits, never more than the window (`None` only when `cost > limit`).
    `RateState.remaining` (whole units that fit now) and `reset_after` (until the bucket is
    empty) agree with it. Counters are keyed by scope and never by limit, and the level does not
    depend on the limit, so changing a limit keeps what was used. A refused admission writes no
    bucket. Settlement moves a TPM hit to the actual token count (and `refund_requests` gives
    request hits back) by adjusting the level at settlement time, never below empty. Time never
    runs backwards for a bucket: a caller whose clock is behind its last write reads it as of
    that write.

Leases
    A concurrency lease expires on its own after its TTL, so a worker that died cannot leak
    slots; `settle` (or `release`) frees it at once. A `release` of an id that holds no
    reservation (it came before its admission) leaves a tombstone, as a refund does (see
    Settlement): the late admission takes no lease, no reservation and no bucket hit.

Registry
    A record is created only if its id is free (`create_*` returns False otherwise), and
    `update_*` changes only the fields it is given, atomically, returning the new record (or
    None if there is none). Deleting a user or a team deletes its record only: the caller
    deletes their keys. Lists come oldest first. Records are kept as JSON of their `to_dict()`:
    a field a store does not know is kept as given, one a record lacks takes its default.

Spend log
    The log keeps a bounded number of records, newest first; the running totals count every
    record ever appended, so they survive the log's bound.

Claims
    `claim(name, expires, now)` is True for a name's first caller in any process, False for all
    others until `expires` (never granted if `expires <= now`); expired claims are swept or
    expire. A call repeated after a lost reply answers as the first did: one owner at most.

Time bounds
    A store whose class sets `bounds_call_time = True` promises that every call ends (or raises
    `StoreError`) within its own timeout; llmfence then adds no timeout of its own. Any other
    store's calls are bounded by the caller. A store whose class sets `never_suspends = True`
    promises that no call yields to the event loop (it runs to completion once awaited), so a
    cancellation cannot interrupt one: settlements over it need no shield from cancellation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal, Protocol, runtime_checkable

from ._types import (
    Admission,
    AdmissionResult,
    BudgetScope,
    BudgetState,
    BudgetTier,
    CustomerRecord,
    KeyRecord,
    Settlement,
    SpendRecord,
    SpendTotals,
    TeamRecord,
    UserRecord,
)

__all__ = [
    "BudgetTierStore",
    "ClaimStore",
    "CustomerStore",
    "LedgerStore",
    "Lifecycle",
    "ProjectStore",
    "RegistryStore",
    "SpendGroup",
    "SpendLogStore",
    "Store",
]

DEFAULT_TIMEOUT: Final = 5.0
"""The bound of every store call unless the operator sets one (seconds): the shipped stores'
default `timeout`, and the meter's for a store that sets none. Long enough that a cold start's
burst on a busy host (where the wait for the event loop counts too) is not refused."""

SpendGroup = Literal["global", "key", "user", "team", "model", "end_user"]


@runtime_checkable
class Lifecycle(Protocol):
    """What every role includes: a health check and a close."""

    async def ping(self) -> None:
        """Raise `StoreError` unless the store answers."""
        ...

    async def aclose(self) -> None:
        """Release connections; the store may not be used afterwards."""
        ...


@runtime_checkable
class LedgerStore(Lifecycle, Protocol):
    """The ledger: admissions, settlements, leases and budget counters.

    The hot path of every metered request: `admit` before the call, `settle` (or `release`)
    after it, one atomic step each.
    """

    async def admit(self, admission: Admission) -> AdmissionResult:
        """Apply every check of one request atomically: all reserved, or nothing changed.

        An id that holds a live reservation or a tombstone is answered as admitted, and
        nothing is taken (see Settlement in the module's docstring).
        """
        ...

    async def settle(self, settlement: Settlement) -> bool:
        """Settle a reservation with the actual cost, release its leases, append its record.

        The record, if any, goes to the store's spend log in the same step; a store that keeps
        no log (it is no `SpendLogStore`) may drop it.

        Returns:
            True if this call settled a live reservation; False otherwise (the id holds no
            reservation: its `charges` took the cost and its record was appended, or a
            tombstone stood for it and nothing changed). See "Settlement" above.
        """
        ...

    async def release(self, request_id: str, slot_keys: Sequence[str]) -> None:
        """Free a request's leases without settling anything (e.g. after a refusal upstream).

        An id that holds no reservation gets a tombstone: its late admission takes nothing.
        """
        ...

    async def charge(self, scopes: Sequence[BudgetScope], cost: int, now: float) -> None:
        """Add spend at every level unconditionally (spend that needed no reservation)."""
        ...

    async def budgets(self, scopes: Sequence[BudgetScope], now: float) -> list[BudgetState]:
        """Read budget levels; a period that has ended reads as zero spent."""
        ...

    async def reset_budget(self, key: str, period_end: float | None, now: float) -> None:
        """Start a new period for one budget counter now (spend back to zero)."""
        ...


@runtime_checkable
class RegistryStore(Lifecycle, Protocol):
    """The registry: key, user and team records, and model access groups."""

    async def create_key(self, record: KeyRecord) -> bool:
        """Store a new key record; False if one with that hash exists."""
        ...

    async def get_key(self, key_hash: str) -> KeyRecord | None:
        """The key record stored under a key's hash."""
        ...

    async def update_key(self, key_hash: str, changes: Mapping[str, Any]) -> KeyRecord | None:
        """Change some fields of a key record; the updated record, or None if there is none."""
        ...

    async def delete_key(self, key_hash: str) -> bool:
        """Delete a key record; False if there was none."""
        ...

    async def list_keys(
        self, *, user_id: str | None = None, team_id: str | None = None
    ) -> list[KeyRecord]:
        """Key records, all of them or those of one user and/or team."""
        ...

    async def create_user(self, record: UserRecord) -> bool:
        """Store a new user; False if the id is taken."""
        ...

    async def get_user(self, user_id: str) -> UserRecord | None:
        """A user record by id."""
        ...

    async def update_user(self, user_id: str, changes: Mapping[str, Any]) -> UserRecord | None:
        """Change some fields of a user; the updated record, or None if there is none."""
        ...

    async def create_team(self, record: TeamRecord) -> bool:
        """Store a new team; False if the id is taken."""
        ...

    async def get_team(self, team_id: str) -> TeamRecord | None:
        """A team record by id."""
        ...

    async def update_team(self, team_id: str, changes: Mapping[str, Any]) -> TeamRecord | None:
        """Change some fields of a team; the updated record, or None if there is none."""
        ...

    async def delete_user(self, user_id: str) -> bool:
        """Delete a user record (not its keys); False if there was none."""
        ...

    async def list_users(self) -> list[UserRecord]:
        """Every user record, oldest first."""
        ...

    async def delete_team(self, team_id: str) -> bool:
        """Delete a team record (not its keys); False if there was none."""
        ...

    async def list_teams(self) -> list[TeamRecord]:
        """Every team record, oldest first."""
        ...

    async def set_access_group(self, name: str, models: Sequence[str]) -> None:
        """Define (or redefine) a model access group."""
        ...

    async def access_groups(self) -> dict[str, tuple[str, ...]]:
        """Every model access group and its models."""
        ...


@runtime_checkable
class CustomerStore(Lifecycle, Protocol):
    """Registered customers: the end users request bodies name, with budgets of their own."""

    async def create_customer(self, record: CustomerRecord) -> bool:
        """Store a new customer; False if the id is taken."""
        ...

    async def get_customer(self, user_id: str) -> CustomerRecord | None:
        """A customer by id."""
        ...

    async def update_customer(
        self, user_id: str, changes: Mapping[str, Any]
    ) -> CustomerRecord | None:
        """Change some fields of a customer; the updated record, or None if there is none."""
        ...

    async def delete_customer(self, user_id: str) -> bool:
        """Delete a customer; False if there was none."""
        ...

    async def list_customers(self) -> list[CustomerRecord]:
        """Every customer, oldest first."""
        ...


@runtime_checkable
class BudgetTierStore(Lifecycle, Protocol):
    """Budget tiers: reusable budgets and limits that records name by `budget_id`."""

    async def create_budget_tier(self, tier: BudgetTier) -> bool:
        """Store a new tier; False if the id is taken."""
        ...

    async def get_budget_tier(self, budget_id: str) -> BudgetTier | None:
        """A tier by id."""
        ...

    async def update_budget_tier(
        self, budget_id: str, changes: Mapping[str, Any]
    ) -> BudgetTier | None:
        """Change some fields of a tier; the updated tier, or None if there is none."""
        ...

    async def delete_budget_tier(self, budget_id: str) -> bool:
        """Delete a tier; False if there was none."""
        ...

    async def list_budget_tiers(self) -> list[BudgetTier]:
        """Every tier, oldest first."""
        ...


@runtime_checkable
class SpendLogStore(Lifecycle, Protocol):
    """The spend log: the records `settle` appends, and running totals that outlive them."""

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
        """Kept spend records matching every filter given, newest first."""
        ...

    async def spend_totals(self, group: SpendGroup, name: str = "") -> SpendTotals:
        """All-time totals of one group (`"global"` ignores `name`); survive the log's bound."""
        ...


@runtime_checkable
class ProjectStore(Lifecycle, Protocol):
    """BudgetManager's project documents: one user dict per project name."""

    async def get_project(self, project_name: str) -> dict[str, Any] | None:
        """A BudgetManager project's user dict, or None."""
        ...

    async def set_project(self, project_name: str, user_dict: Mapping[str, Any]) -> None:
        """Replace a BudgetManager project's user dict."""
        ...


@runtime_checkable
class ClaimStore(Lifecycle, Protocol):
    """Claims: what happens once however many workers see it (a budget alert's crossing)."""

    async def claim(self, name: str, expires: float, now: float) -> bool:
        """Take `name` until `expires`: True for its first caller only (see "Claims")."""
        ...


@runtime_checkable
class Store(
    LedgerStore,
    RegistryStore,
    CustomerStore,
    BudgetTierStore,
    SpendLogStore,
    ProjectStore,
    ClaimStore,
    Protocol,
):
    """Every role at once: async storage for keys, budgets, windows, leases and spend records.

    `MemoryStore`, `SQLiteStore` and `RedisStore` implement all of it.
    """
