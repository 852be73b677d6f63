"""`MemoryStore`: the embedded default, for one process.

Every operation runs to completion without awaiting, so on one event loop each is atomic by
construction. The ledger (budgets, windows, leases, reservations) lives in `_memory_ledger`,
the registry, spend log and projects in `_memory_records`; this module joins them into the one
class users see. Nothing touches the event loop in `__init__`, so a store can be built at import
time.
"""

from __future__ import annotations

from typing import Final

from ._memory_ledger import MemoryLedger
from ._memory_records import MemoryRecords
from ._types import Settlement

__all__ = ["MemoryStore"]

# Claims held before the expired ones are swept (each sweep's cost is spread over as many
# claims as it found, so it is amortized O(1) per claim).
_CLAIMS_SWEEP: Final = 1024


class MemoryStore(MemoryLedger, MemoryRecords):
    """The embedded store: state in this process's memory, lost when it exits.

    It is per process: under `uvicorn --workers 4` or `gunicorn -w 4` every worker holds its
    own counters, so every limit and budget becomes four times larger, and keys, users and
    teams made through the admin API are gone after a restart. Use it for one process (tests,
    scripts, a single worker); several workers on one machine need `SQLiteStore`, several
    machines `RedisStore`. It implements every role of `Store`.

    Args:
        max_spend_records: How many spend records the log keeps (oldest dropped first). The
            running totals count every record ever appended.
    """

    bounds_call_time = True  # nothing here ever waits
    never_suspends = True  # no call yields to the event loop: nothing can cancel one halfway

    def __init__(self, *, max_spend_records: int = 100_000) -> None:
        MemoryLedger.__init__(self)
        MemoryRecords.__init__(self, max_spend_records)
        self._claims: dict[str, float] = {}  # name -> when it is free again
        self._claims_sweep = _CLAIMS_SWEEP

    async def settle(self, settlement: Settlement) -> bool:
        """Settle a reservation with the actual cost, release its leases, append its record.

        Exactly once per request id: see the settlement rules in `llmfence.stores`.
        """
        settled = self._settle(settlement)
        if settled is not None and settlement.record is not None:
            self._append(settlement.record)
        return settled is True

    async def claim(self, name: str, expires: float, now: float) -> bool:
        """Take `name` until `expires`: True for the first caller, False while it is held."""
        claims = self._claims
        if len(claims) >= self._claims_sweep:
            for held, until in list(claims.items()):
                if until <= now:
                    del claims[held]
            self._claims_sweep = max(_CLAIMS_SWEEP, 2 * len(claims))
        if expires <= now or claims.get(name, now) > now:
            return False
        claims[name] = expires
        return True

    async def ping(self) -> None:
        """Memory always answers."""

    async def aclose(self) -> None:
        """Nothing to release."""
