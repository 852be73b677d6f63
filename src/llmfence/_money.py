"""Exact money: integer nano-USD inside, floats and Decimals only at the public edges.

One nano-USD is 1e-9 USD. Sums of integers never drift, Redis `INCRBY` adds them atomically,
and a nano is far below any price a provider charges for one token, so nothing is lost.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

from llmfence.exceptions import ConfigurationError

__all__ = [
    "NANO_PER_USD",
    "as_decimal",
    "nano_to_decimal",
    "nano_to_usd",
    "shift_decimal",
    "usd_to_nano",
]

NANO_PER_USD = 1_000_000_000
"""Nano-USD in one USD."""


def as_decimal(value: Decimal | str | float | int, *, what: str = "amount") -> Decimal:
    """Convert a number given by a user to a finite `Decimal`, exactly as it was written.

    A float goes through its shortest repr, so `0.1` becomes `Decimal("0.1")`, not the
    binary value `0.1000000000000000055511151231257827…` that `Decimal(0.1)` would give.

    Args:
        value: A `Decimal`, a decimal string, a float or an int (not a bool).
        what: What the value is, for the error message.

    Returns:
        The value as a finite `Decimal`.

    Raises:
        ConfigurationError: The value is a bool, another type, not a number, NaN or infinite.
    """
    # bool is an int subclass: `True` as a price is a bug, not 1 USD.
    if isinstance(value, bool):
        raise ConfigurationError(f"{what} must be a number, not {value!r}")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigurationError(f"{what} must be finite, not {value!r}")
        result = Decimal(repr(value))
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip())
        except InvalidOperation:
            raise ConfigurationError(f"{what} must be a decimal number, not {value!r}") from None
    else:
        raise ConfigurationError(f"{what} must be a number, not {type(value).__name__}")
    if not result.is_finite():
        raise ConfigurationError(f"{what} must be finite, not {value!r}")
    return result


def shift_decimal(value: Decimal, places: int) -> Decimal:
    """`value × 10**places`, exactly: moves the exponent, never rounds to the context precision."""
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite values only (as_decimal guarantees it)
    return Decimal((sign, digits, exponent + places))


def usd_to_nano(amount: Decimal | str | float | int) -> int:
    """Convert USD to integer nano-USD.

    The conversion is exact for any amount with at most 9 decimals. Finer amounts are rounded
    to the nearest nano, ties away from zero (`ROUND_HALF_UP`), as people round money by hand.

    Args:
        amount: USD as a `Decimal`, a decimal string, a float or an int. Floats go through
            their shortest repr, so `0.1` is exactly 100_000_000 nano-USD.

    Returns:
        The amount in nano-USD.

    Raises:
        ConfigurationError: The amount is not a finite number.
    """
    nano = shift_decimal(as_decimal(amount, what="USD amount"), 9)
    return int(nano.to_integral_value(rounding=ROUND_HALF_UP))


def nano_to_usd(nano: int) -> float:
    """Convert nano-USD to a float of USD, for display and JSON (the nearest float)."""
    # int / int is correctly rounded in Python: 79_000 gives exactly the float 7.9e-05.
    return nano / NANO_PER_USD


def nano_to_decimal(nano: int) -> Decimal:
    """Convert nano-USD to an exact `Decimal` of USD (79_000 → `Decimal("0.000079000")`)."""
    return shift_decimal(Decimal(nano), -9)
