"""Model prices as exact integers: nano-USD per million tokens, costs rounded up.

`ModelPrice` is what a model costs (with input-size tiers, cached-input and cache-write rates
and a per-request fee); `PriceOverride` is how a user writes a price, in USD per million
tokens. Floats and Decimals appear only at that edge.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from decimal import Decimal
from itertools import pairwise
from typing import TYPE_CHECKING

from llmfence._money import as_decimal, shift_decimal
from llmfence.exceptions import ConfigurationError

if TYPE_CHECKING:
    from llmfence._usage import Usage

__all__ = ["ModelPrice", "PriceOverride", "PriceTier", "PriceValue", "to_model_price"]

PriceValue = Decimal | str | float | int
"""A USD amount as a user may write it; floats go through their repr, so `0.1` stays 0.1."""

_PER_MILLION = 1_000_000
_OVERRIDE_FIELDS = frozenset({"input", "output", "cached_input", "cache_write", "per_request"})


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceTier:
    """The prices in force when a call's input tokens exceed `above` (e.g. Gemini's >200k).

    Like genai-prices, a tier is a cliff: once the input crosses the threshold, every token
    of the call is charged at the tier's prices, not only the tokens above it.

    Attributes:
        above: The input-token threshold; the tier applies when input tokens > `above`.
        input: Nano-USD per million uncached input tokens.
        output: Nano-USD per million output tokens.
        cached_input: Nano-USD per million input tokens read from the cache; `None` means the
            input price.
        cache_write: Nano-USD per million input tokens written to the cache; `None` means the
            input price.
    """

    above: int
    input: int
    output: int
    cached_input: int | None = None
    cache_write: int | None = None

    def __post_init__(self) -> None:
        _check_count("above", self.above)
        _check_rates(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelPrice:
    """The price of one model, in integer nano-USD per million tokens.

    Attributes:
        input: Nano-USD per million uncached input tokens.
        output: Nano-USD per million output tokens.
        cached_input: Nano-USD per million input tokens read from the cache; `None` means the
            input price.
        cache_write: Nano-USD per million input tokens written to the cache; `None` means the
            input price.
        per_request: Nano-USD charged once per call (Perplexity's request fee), else 0.
        tiers: Prices that replace these above an input-token threshold, by ascending `above`.
        source: Where the price comes from: `"genai-prices:<provider>"` (`:ft-base` for a
            fine-tune priced as its base model, `:peak` for the highest time-of-day price),
            `"override"` or `"fallback"`.
    """

    input: int
    output: int
    cached_input: int | None = None
    cache_write: int | None = None
    per_request: int = 0
    tiers: tuple[PriceTier, ...] = ()
    source: str = "override"

    def __post_init__(self) -> None:
        _check_rates(self)
        _check_count("per_request", self.per_request)
        object.__setattr__(self, "tiers", tuple(self.tiers))
        thresholds = [tier.above for tier in self.tiers]
        if any(a >= b for a, b in pairwise(thresholds)):
            raise ConfigurationError(f"price tiers must have ascending thresholds: {thresholds}")

    def cost(self, usage: Usage) -> int:
        """The cost of a call, in nano-USD, rounded up.

        Uncached input tokens (input − cached − cache writes) are charged at `input`, cached
        ones at `cached_input`, cache writes at `cache_write`, output tokens at `output`; the
        tier is picked by the call's whole input (cached tokens included), as genai-prices does.

        Args:
            usage: The call's usage.

        Returns:
            The cost in nano-USD, never less than the exact cost.
        """
        femto = self._femto(
            usage.input_tokens,
            usage.cached_input_tokens,
            usage.cache_write_tokens,
            usage.output_tokens,
        )
        # Ceiling division: budgets must never round a call down to free.
        return -(-femto // _PER_MILLION) + self.per_request

    def projected(self, input_tokens: int, output_tokens: int) -> int:
        """The cost, in nano-USD rounded up, of a call with these tokens and no cache hits."""
        return -(-self._femto(input_tokens, 0, 0, output_tokens) // _PER_MILLION) + self.per_request

    def max_output_tokens_for(self, budget_nano: int, input_tokens: int) -> int:
        """The most output tokens whose projected cost, with this input, fits the budget.

        Used to clamp `max_tokens` to what a budget can still pay for.

        Args:
            budget_nano: The money left, in nano-USD.
            input_tokens: The call's input tokens.

        Returns:
            The largest `n` with `projected(input_tokens, n) <= budget_nano`; 0 when not even
            the input fits (then no output token fits either, and the call should be refused);
            `sys.maxsize` when output is free and the input fits.
        """
        # projected = ceil((A + n·out) / 1e6) + fee <= budget  <=>  A + n·out <= (budget − fee)·1e6
        room = (budget_nano - self.per_request) * _PER_MILLION - self._femto(input_tokens, 0, 0, 0)
        if room < 0:
            return 0
        output_rate = self._rates_at(input_tokens).output
        if output_rate == 0:
            return sys.maxsize
        return room // output_rate

    def _rates_at(self, input_tokens: int) -> ModelPrice | PriceTier:
        for tier in reversed(self.tiers):
            if input_tokens > tier.above:
                return tier
        return self

    def _femto(self, input_tokens: int, cached: int, write: int, output: int) -> int:
        """The exact cost in femto-USD (nano-USD per million tokens × tokens)."""
        rates = self._rates_at(input_tokens) if self.tiers else self
        rate = rates.input
        cached_rate = rate if rates.cached_input is None else rates.cached_input
        write_rate = rate if rates.cache_write is None else rates.cache_write
        # Inconsistent usage (more cached than input) charges what was reported, never < 0.
        uncached = max(input_tokens - cached - write, 0)
        return uncached * rate + cached * cached_rate + write * write_rate + output * rates.output


@dataclass(frozen=True, slots=True, kw_only=True)
class PriceOverride:
    """A price given by the operator, in USD per million tokens (or per request).

    Values may be `Decimal`, decimal strings, floats or ints; a float goes through its repr, so
    `0.1` is exactly 0.1. Each must be a whole number of nano-USD per million tokens.

    Attributes:
        input: USD per million uncached input tokens.
        output: USD per million output tokens (write 0 for embedding models).
        cached_input: USD per million cached input tokens; `None` means the input price.
        cache_write: USD per million input tokens written to the cache; `None` means the
            input price.
        per_request: USD charged once per call.
    """

    input: PriceValue
    output: PriceValue
    cached_input: PriceValue | None = None
    cache_write: PriceValue | None = None
    per_request: PriceValue = 0

    def __post_init__(self) -> None:
        self.to_model_price()  # fail at configuration time, not on the first request

    @classmethod
    def from_mapping(cls, values: Mapping[str, PriceValue | None]) -> PriceOverride:
        """Build an override from a mapping such as `{"input": 2.5, "output": "10"}`.

        Raises:
            ConfigurationError: A key is unknown, or `input` or `output` is missing.
        """
        unknown = set(values) - _OVERRIDE_FIELDS
        if unknown:
            raise ConfigurationError(
                f"unknown price field(s) {sorted(unknown)}; expected {sorted(_OVERRIDE_FIELDS)}"
            )
        input_price, output_price = values.get("input"), values.get("output")
        if input_price is None or output_price is None:
            # Explicit even for embeddings (output 0): a forgotten price must not mean free.
            raise ConfigurationError("a price needs both `input` and `output`")
        per_request = values.get("per_request")
        return cls(
            input=input_price,
            output=output_price,
            cached_input=values.get("cached_input"),
            cache_write=values.get("cache_write"),
            per_request=0 if per_request is None else per_request,
        )

    def to_model_price(self, source: str = "override") -> ModelPrice:
        """This price in nano-USD, exactly.

        Raises:
            ConfigurationError: A value is negative, not a number, or finer than one nano-USD
                per million tokens.
        """
        return ModelPrice(
            input=_exact_nano("input", self.input, 9),
            output=_exact_nano("output", self.output, 9),
            cached_input=None
            if self.cached_input is None
            else _exact_nano("cached_input", self.cached_input, 9),
            cache_write=None
            if self.cache_write is None
            else _exact_nano("cache_write", self.cache_write, 9),
            per_request=_exact_nano("per_request", self.per_request, 9),
            source=source,
        )


def to_model_price(
    price: PriceOverride | ModelPrice | Mapping[str, PriceValue | None], source: str
) -> ModelPrice:
    if isinstance(price, ModelPrice):
        # The role decides the source: a fallback is reported as "fallback" however it was built.
        return price if price.source == source else replace(price, source=source)
    if isinstance(price, PriceOverride):
        return price.to_model_price(source)
    if isinstance(price, Mapping):
        return PriceOverride.from_mapping(price).to_model_price(source)
    raise ConfigurationError(f"a price must be a PriceOverride or a mapping, not {price!r}")


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be a non-negative int, not {value!r}")


def _check_rates(rates: ModelPrice | PriceTier) -> None:
    _check_count("input", rates.input)
    _check_count("output", rates.output)
    if rates.cached_input is not None:
        _check_count("cached_input", rates.cached_input)
    if rates.cache_write is not None:
        _check_count("cache_write", rates.cache_write)


def _exact_nano(name: str, value: PriceValue, places: int) -> int:
    """USD → nano-USD (`places` = 9), refusing anything that would need rounding."""
    scaled = shift_decimal(as_decimal(value, what=f"price {name}"), places)
    if scaled < 0:
        raise ConfigurationError(f"price {name} must not be negative, not {value!r}")
    if scaled != scaled.to_integral_value():
        raise ConfigurationError(
            f"price {name}={value!r} is finer than one nano-USD per million tokens"
        )
    return int(scaled)
