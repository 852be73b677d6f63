"""The values that cross the store boundary.

Money is an `int` of nano-USD (1e-9 USD) and time a `float` of Unix seconds everywhere here; the
caller passes `now` in, so a test can drive every period and window with a fake clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

from llmfence.exceptions import ConfigurationError

from ._quick import quick_init
from ._record_types import BudgetTier, CustomerRecord, KeyRecord, TeamRecord, UserRecord

__all__ = [
    "Admission",
    "AdmissionResult",
    "BudgetScope",
    "BudgetState",
    "BudgetTier",
    "CustomerRecord",
    "KeyRecord",
    "RateHit",
    "RateState",
    "Refusal",
    "Settlement",
    "SlotRequest",
    "SpendRecord",
    "SpendTotals",
    "TeamRecord",
    "UserRecord",
    "checked_timeout",
    "hash_key",
    "mask_key",
]

RateKind = Literal["requests", "tokens"]
Provenance = Literal["provider-reported", "estimated", "reservation-only"]
RefusalReason = Literal["requests", "tokens", "parallel_requests", "budget"]


def hash_key(key: str) -> str:
    """The sha256 hex digest under which a key is stored; the plain key never is."""
    return hashlib.sha256(key.encode()).hexdigest()


def mask_key(key: str) -> str:
    """A short display form of a key, e.g. `sk-...Qw8z`: enough to recognise, useless to use."""
    prefix = "sk-" if key.startswith("sk-") else ""
    return f"{prefix}...{key[-4:]}" if len(key) >= 12 else f"{prefix}..."


# -- one request's checks --------------------------------------------------------------------


@quick_init
@dataclass(frozen=True, slots=True)
class BudgetScope:
    """One budget level a request is charged to.

    Attributes:
        key: Storage id of the counter, e.g. `"user:alice"`; scoped, never limit-specific.
        level: `"global"`, `"team"`, `"user"`, `"key"`, `"end_user"` or `"model"`.
        label: What messages may show: an id, a masked key, a model; never a key or its hash.
        limit: Budget in nano-USD, or `None` to track spend without a limit.
        period_end: When a period starting now would end (`Duration.period_end(now)`), or
            `None` if the spend never resets. Used only when a new period starts.
    """

    key: str
    level: str
    label: str
    limit: int | None = None
    period_end: float | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class RateHit:
    """A rate bucket (RPM or TPM) a request hits with a cost (1 request, or N tokens).

    Attributes:
        key: Storage id of the counter, e.g. `"rpm:key:<hash>"`; not limit-specific, so a new
            limit keeps the usage.
        kind: `"requests"` or `"tokens"`.
        level: The level, for messages.
        label: What messages may show.
        limit: Units allowed per window: the bucket's burst, and its rate per window.
        cost: Units this request takes.
        window: Window length in seconds.
    """

    key: str
    kind: RateKind
    level: str
    label: str
    limit: int
    cost: int
    window: float = 60.0


@quick_init
@dataclass(frozen=True, slots=True)
class SlotRequest:
    """A concurrency lease the request needs.

    Attributes:
        key: Storage id of the slot set, e.g. `"parallel:user:alice"`.
        level: The level, for messages.
        label: What messages may show.
        limit: How many leases may be held at once.
        ttl: Seconds after which an unreleased lease frees itself (a crashed worker's).
    """

    key: str
    level: str
    label: str
    limit: int
    ttl: float = 600.0


@quick_init
@dataclass(frozen=True, slots=True)
class Admission:
    """Every check of one request, applied by the store as one atomic step: all or nothing.

    Attributes:
        request_id: Names the reservation for `settle` and the leases for release.
        now: The current Unix time.
        rates: Window hits (RPM, TPM) at every level.
        slots: Concurrency leases at every level.
        budgets: Budget levels to reserve `cost` at.
        cost: Projected cost in nano-USD, reserved at every budget level.
        ttl: Seconds the reservation is kept for `settle`; an unsettled one just expires (its
            reserved spend stays spent: nothing is refunded that was not settled).
    """

    request_id: str
    now: float
    rates: tuple[RateHit, ...] = ()
    slots: tuple[SlotRequest, ...] = ()
    budgets: tuple[BudgetScope, ...] = ()
    cost: int = 0
    ttl: float = 86_400.0


@quick_init
@dataclass(frozen=True, slots=True)
class RateState:
    """A rate bucket's state after the admission, for the `x-ratelimit-*` headers."""

    key: str
    kind: RateKind
    level: str
    limit: int
    remaining: int
    reset_after: float
    """Seconds until the bucket is empty again (`remaining` is back to `limit`)."""
    window: float


@quick_init
@dataclass(frozen=True, slots=True)
class BudgetState:
    """A budget level's state: spent in the current period, its limit and when it resets."""

    key: str
    level: str
    label: str
    limit: int | None
    spent: int
    resets_at: float | None
    total: int = 0
    """All-time spend of this level, nano-USD."""


@quick_init
@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an admission was refused: the first check that failed.

    Attributes:
        reason: `"requests"`, `"tokens"`, `"parallel_requests"` or `"budget"`.
        level: The level that refused.
        label: What messages may show for that level.
        limit: Its limit (units, leases, or nano-USD).
        current: What it holds now (units in the bucket, leases held, nano-USD spent).
        requested: What this request asked of it.
        retry_after: Seconds until the request could pass, or `None` when it never can (it
            asks for more than the whole limit). For budgets: until the period resets.
        resets_at: For budgets, Unix time the period ends, or `None` if it never does.
    """

    reason: RefusalReason
    level: str
    label: str
    limit: int
    current: int
    requested: int
    retry_after: float | None
    resets_at: float | None = None


@quick_init
@dataclass(frozen=True, slots=True)
class AdmissionResult:
    """The outcome of `Store.admit`.

    Attributes:
        refusal: `None` when the request was admitted (and everything reserved).
        rates: Every window's state after the step, in the admission's order.
        budgets: Every budget level's state after the step, in the admission's order.
        headroom: Smallest `limit - spent` over the limited budget levels before this
            request's reservation, or `None` when no level has a limit. Lets a caller clamp
            `max_tokens` to what the tightest budget can still pay for.
    """

    refusal: Refusal | None
    rates: tuple[RateState, ...] = ()
    budgets: tuple[BudgetState, ...] = ()
    headroom: int | None = None

    @property
    def admitted(self) -> bool:
        """Whether every check passed."""
        return self.refusal is None


class SpendRecord(NamedTuple):
    """One metered request, as the spend log keeps it. Never holds a key, only its hash.

    A named tuple of plain values (text, numbers, `None`), so a store can keep it as the exact
    tuple `tuple(record)`, which CPython's garbage collector stops tracking: however many
    records a log holds, collections do not walk them. Build it with keywords; `to_dict` and
    `from_dict` convert it for JSON.

    Attributes:
        provenance: `"provider-reported"` (usage from the response), `"estimated"` (counted by
            llmfence) or `"reservation-only"` (nothing known beyond the reservation).
        status: The HTTP status of the response, or 499 when the client disconnected.
    """

    request_id: str
    timestamp: float
    model: str
    cost: int
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    key_hash: str | None = None
    key_masked: str | None = None
    user_id: str | None = None
    team_id: str | None = None
    end_user: str | None = None
    provenance: Provenance = "provider-reported"
    price_source: str = ""
    status: int = 200
    latency_ms: float = 0.0
    path: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return self._asdict()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpendRecord:
        """The record from `to_dict`'s output; unknown fields are ignored."""
        return cls(**{k: v for k, v in data.items() if k in _SPEND_RECORD_FIELDS})


_SPEND_RECORD_FIELDS: Final = frozenset(SpendRecord._fields)


@quick_init
@dataclass(frozen=True, slots=True)
class SpendTotals:
    """Running all-time totals of one group of spend records."""

    cost: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0


@quick_init
@dataclass(frozen=True, slots=True)
class Settlement:
    """The end of a request: the actual cost replaces the reservation.

    Attributes:
        request_id: The admission's request id.
        now: The current Unix time.
        cost: Actual cost in nano-USD (the reservation is refunded or topped up to it).
        tokens: Actual tokens for the TPM windows, or `None` to keep the reserved count.
        record: The spend record to append in the same step, if any.
        refund_requests: Also give back the request-window hits (RPM), for a request that a
            later check refused: all of a request's reservations stand, or none does.
        charges: The levels that take `cost` when no reservation holds this request id (its
            admission never reached the store, or there was none): the settlement then
            charges them as `charge` does. Ignored when the reservation is live.
    """

    request_id: str
    now: float
    cost: int
    tokens: int | None = None
    record: SpendRecord | None = None
    refund_requests: bool = False
    charges: tuple[BudgetScope, ...] = ()


def checked_timeout(seconds: object) -> float:
    """A store call's bound as a float; `ConfigurationError` unless a finite number > 0."""
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not (0 < seconds < float("inf"))
    ):
        raise ConfigurationError(f"timeout must be a finite number > 0, not {seconds!r}")
    return float(seconds)
