"""Shadow checks: admitting again with the limits only shadow checks enforce lifted.

A shadow check counts like any other but never refuses. When an admission is refused, the meter
admits it once more with the counters that only shadow checks enforce relaxed (`relax`); admitted
then, the refusal was a shadow check's, and the windows it reports are put back against their
real limits (`unrelax`) so the headers say what the real limits leave.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from llmfence.stores import Admission, RateState

__all__ = ["RELAXED", "relax", "unrelax"]

RELAXED = 1 << 62
"""The limit a shadowed counter is admitted under: never reached."""


def relax(admission: Admission, shadowed: Callable[[str], bool]) -> Admission:
    """The admission with the limits of the counters only shadow checks enforce lifted."""
    return replace(
        admission,
        rates=tuple(
            replace(hit, limit=RELAXED) if shadowed(hit.key) else hit for hit in admission.rates
        ),
        slots=tuple(
            replace(slot, limit=RELAXED) if shadowed(slot.key) else slot for slot in admission.slots
        ),
        budgets=tuple(
            replace(scope, limit=None) if shadowed(scope.key) else scope
            for scope in admission.budgets
        ),
    )


def unrelax(states: tuple[RateState, ...], admission: Admission) -> tuple[RateState, ...]:
    """Report shadowed windows against their real limits, not the lifted ones."""
    limits = {hit.key: hit.limit for hit in admission.rates}
    return tuple(
        replace(s, limit=limits[s.key], remaining=max(0, limits[s.key] - (s.limit - s.remaining)))
        if s.limit == RELAXED
        else s
        for s in states
    )
