"""Tests for `llmfence._money`: exact conversions between USD and integer nano-USD."""

from __future__ import annotations

from decimal import Decimal
from functools import reduce
from operator import add

import pytest

from llmfence._money import as_decimal, nano_to_decimal, nano_to_usd, shift_decimal, usd_to_nano
from llmfence.exceptions import ConfigurationError


@pytest.mark.parametrize(
    ("amount", "nano"),
    [
        (0.1, 100_000_000),
        ("0.1", 100_000_000),
        (Decimal("0.1"), 100_000_000),
        (5, 5_000_000_000),
        ("0.000079", 79_000),
        (1e-9, 1),
        (0.3, 300_000_000),
        (-2.5, -2_500_000_000),
        (10**30, 10**39),  # beyond Decimal's default 28 digits, still exact
    ],
)
def test_usd_to_nano_is_exact(amount: Decimal | str | float | int, nano: int) -> None:
    assert usd_to_nano(amount) == nano


@pytest.mark.parametrize(
    ("amount", "nano"),
    [
        ("0.0000000005", 1),  # ties away from zero
        ("0.00000000049", 0),
        ("0.0000000015", 2),
        ("-0.0000000005", -1),
    ],
)
def test_usd_to_nano_rounds_half_up(amount: str, nano: int) -> None:
    assert usd_to_nano(amount) == nano


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "NaN", "-Infinity", "abc", True, None])
def test_usd_to_nano_refuses_non_numbers(bad: object) -> None:
    with pytest.raises(ConfigurationError):
        usd_to_nano(bad)  # type: ignore[arg-type]


def test_nano_to_usd_and_decimal() -> None:
    assert nano_to_usd(79_000) == 0.000079
    assert nano_to_usd(79_000_000) == 0.079
    assert nano_to_decimal(79_000) == Decimal("0.000079")
    assert nano_to_decimal(-1) == Decimal("-1E-9")
    big = 10**40 + 1
    # No rounding to the context precision (28 digits) either way.
    assert nano_to_decimal(big) == Decimal("10000000000000000000000000000000.000000001")
    assert usd_to_nano(nano_to_decimal(big)) == big


def test_float_sums_drift_but_nano_sums_do_not() -> None:
    # Added one by one (`+=`): sum() compensates since Python 3.12, a running total does not.
    assert reduce(add, [0.1] * 10) != 1.0
    assert sum([usd_to_nano(0.1)] * 10) == usd_to_nano(1)


def test_as_decimal_and_shift() -> None:
    assert as_decimal(0.1) == Decimal("0.1")
    assert as_decimal(" 2.50 ") == Decimal("2.50")
    assert shift_decimal(Decimal("1.5"), 9) == Decimal(1_500_000_000)
    assert shift_decimal(Decimal("123"), -2) == Decimal("1.23")
