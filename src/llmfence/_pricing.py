"""Exact prices for LLM calls: genai-prices plus overrides, resolved once per model name.

Prices are integers in nano-USD (1e-9 USD) per million tokens; a cost is an integer number of
nano-USD, rounded up so that no call is ever free. Floats and Decimals appear only at the edges
(`PriceOverride` in, `llmfence._money` out).

A model name is resolved the first time it is seen, then cached (bounded, LRU):

1. An override for the name, or for the name without its `provider/` prefix (case-insensitive).
2. genai-prices, with its own matching: a prefix genai-prices knows as a provider (`openai/`,
   `azure/`, `anthropic/`, `bedrock/`, `vertex_ai/`, `openrouter/`, …) picks that provider;
   otherwise genai-prices guesses the provider from the name, and failing that the model makers
   (OpenAI, Anthropic, Google, …) are asked in turn, since genai-prices does not recognise every
   OpenAI name (e.g. `text-embedding-3-small`). An unknown prefix (`hosted_vllm/gpt-4o`) is
   dropped after the whole name failed. Dated snapshots (`gpt-3.5-turbo-0613`) and fine-tuned
   names (`ft:gpt-4o-mini-2024-07-18:org::id`) resolve as genai-prices matches them.
3. The fallback price if one is configured, else `UnknownModelError`. A model that genai-prices
   prices only per second, character or page, or lists without any price, counts as unknown:
   llmfence meters tokens and never treats a model as silently free.

What is approximated, on purpose:

- Time-dependent prices are resolved when the name is first seen, with genai-prices' rules for
  that instant. A scheduled price change (a start date) ends the cache entry, so it takes effect
  on its date. Time-of-day prices (DeepSeek's off-peak discount) would be wrong half the day if
  cached, so the highest price of the day is used for every field: off-peak calls are
  over-charged, a budget is never overspent.
- A fine-tuned name genai-prices has no price for gets its base model's price (`source` ends
  in `:ft-base`). OpenAI charges fine-tuned models more, so this under-prices them; configure an
  override for fine-tunes you serve.
- `Usage` does not split tokens by modality, cache lifetime or service tier: audio and image
  tokens are priced as text input/output, cache writes at the default (5-minute) write price,
  and every call at the standard tier. Web-search and other per-use fees are not counted; a
  per-request fee (Perplexity) is.
- genai-prices stores a few prices with float noise (`0.18000000000000002`); those are rounded
  up to the next nano-USD per million tokens (less than 1e-15 USD per token). Overrides must be
  exact: an override finer than a nano-USD per million tokens is a `ConfigurationError`.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from datetime import time as day_time
from decimal import Decimal
from itertools import pairwise
from typing import TYPE_CHECKING

from cachetools import LRUCache
from genai_prices import data_snapshot
from genai_prices import types as gp

from llmfence._money import as_decimal, shift_decimal
from llmfence.exceptions import ConfigurationError, UnknownModelError

if TYPE_CHECKING:
    from llmfence._usage import Usage

__all__ = ["ModelPrice", "PriceBook", "PriceOverride", "PriceTier"]

PriceValue = Decimal | str | float | int
"""A USD amount as a user may write it; floats go through their repr, so `0.1` stays 0.1."""

_PER_MILLION = 1_000_000
_NEVER = math.inf

# Longer names are not a model anyone serves; they are not looked up or cached, so a client
# cannot make llmfence lowercase and match megabytes of text.
_MAX_MODEL_NAME = 256

# Asked in this order when genai-prices cannot tell the provider from the name alone. Only model
# makers: a name no maker lists should not get the price of whichever reseller lists it.
_FIRST_PARTY = (
    "openai",
    "anthropic",
    "google",
    "mistral",
    "cohere",
    "deepseek",
    "x-ai",
    "voyageai",
    "moonshotai",
    "zhipuai",
    "minimax",
    "perplexity",
)

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


class PriceBook:
    """Prices per model name: overrides, then genai-prices, then the fallback — cached.

    Each name is resolved once (genai-prices' matching costs tens to hundreds of µs) and kept in
    a bounded LRU cache, so a hit costs about a microsecond. Unknown names are cached apart from
    known ones: a flood of made-up names (model names come from request bodies) cannot evict
    the models actually in use. Thread-safe.

    Args:
        overrides: Prices per model name, in USD per million tokens, as `PriceOverride`s,
            mappings with the same fields (`{"input": 0.1, "output": 0.4}`) or `ModelPrice`s.
            Names match case-insensitively, with or without a `provider/` prefix. They win
            over genai-prices: use them for self-hosted models and negotiated rates.
        fallback: The price of any model neither an override nor genai-prices knows. Without
            one, such a model raises `UnknownModelError` — never priced as free.
        maxsize: How many names each cache (known, unknown) keeps.
        clock: Unix time, to resolve time-dependent prices (a fake clock in tests).

    Raises:
        ConfigurationError: An override or the fallback is not a valid price, two override
            names differ only in case, or `maxsize` < 1.
    """

    def __init__(
        self,
        *,
        overrides: Mapping[str, PriceOverride | ModelPrice | Mapping[str, PriceValue | None]]
        | None = None,
        fallback: PriceOverride | ModelPrice | Mapping[str, PriceValue | None] | None = None,
        maxsize: int = 4096,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ConfigurationError(f"maxsize must be a positive int, not {maxsize!r}")
        self._overrides: dict[str, ModelPrice] = {}
        for name, price in (overrides or {}).items():
            key = name.lower()
            if key in self._overrides:
                raise ConfigurationError(f"two price overrides for model {name!r}")
            self._overrides[key] = _to_model_price(price, "override")
        self._fallback = None if fallback is None else _to_model_price(fallback, "fallback")
        self._clock = clock
        self._known: LRUCache[str, tuple[ModelPrice, float]] = LRUCache(maxsize)
        self._unknown: LRUCache[str, bool] = LRUCache(maxsize)
        # cachetools caches are not thread-safe, and even a read moves the LRU order.
        self._lock = threading.Lock()

    def price_for(self, model: str) -> ModelPrice:
        """The price of a model, resolved on first use and cached.

        Args:
            model: The model name as a request names it (`gpt-4o`, `azure/gpt-4o`, …).

        Returns:
            The model's price.

        Raises:
            UnknownModelError: No price is known for the model and there is no fallback.
        """
        with self._lock:
            entry = self._known.get(model)
        if entry is not None and self._clock() < entry[1]:
            return entry[0]
        with self._lock:
            unknown = self._unknown.get(model, False)
        if unknown:
            return self._unknown_price(model)
        price, expires_at = self._resolve(model)
        if len(model) <= _MAX_MODEL_NAME:
            with self._lock:
                if price is None:
                    self._unknown[model] = True
                else:
                    self._known[model] = (price, expires_at)
        return self._unknown_price(model) if price is None else price

    def cost(self, model: str, usage: Usage) -> int:
        """The cost of a call in nano-USD, rounded up (see `ModelPrice.cost`).

        Raises:
            UnknownModelError: No price is known for the model and there is no fallback.
        """
        return self.price_for(model).cost(usage)

    def projected(self, model: str, input_tokens: int, output_tokens: int) -> int:
        """The cost in nano-USD, rounded up, of a call with these tokens and no cache hits.

        Raises:
            UnknownModelError: No price is known for the model and there is no fallback.
        """
        return self.price_for(model).projected(input_tokens, output_tokens)

    def clear(self) -> None:
        """Forget every resolved name, e.g. after genai-prices loaded newer prices."""
        with self._lock:
            self._known.clear()
            self._unknown.clear()

    def _unknown_price(self, model: str) -> ModelPrice:
        if self._fallback is None:
            raise UnknownModelError(model)
        return self._fallback

    def _resolve(self, model: str) -> tuple[ModelPrice | None, float]:
        """The price of a name (`None` when unknown) and the Unix time it stops being valid."""
        key = model.lower()
        override = self._overrides.get(key)
        if override is None and "/" in key:
            override = self._overrides.get(key.partition("/")[2])
        if override is not None:
            return override, _NEVER
        if not key or len(key) > _MAX_MODEL_NAME:
            return None, _NEVER
        found = _find_genai_model(key)
        if found is None:
            return None, _NEVER
        provider, info, ft_base = found
        source = f"genai-prices:{provider.id}{':ft-base' if ft_base else ''}"
        return _price_in_force(info, datetime.fromtimestamp(self._clock(), UTC), source)


def _to_model_price(
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


# --- genai-prices ---------------------------------------------------------------------------


def _find_genai_model(key: str) -> tuple[gp.Provider, gp.ModelInfo, bool] | None:
    """genai-prices' provider and model for a lowercase name; the flag marks an ft-base guess.

    This mirrors what `calc_price` does, but through `Provider.find_model` rather than
    `DataSnapshot.find_provider_model`: the latter memoises every name it is given in
    unbounded dicts, and model names come from clients.
    """
    providers = data_snapshot.get_snapshot().providers
    hint: gp.Provider | None = None
    prefix, slash, rest = key.partition("/")
    if slash and rest:
        hint = data_snapshot.find_provider_by_id(providers, prefix)
        if hint is not None:
            key = rest
    found = _find_in(providers, hint, key)
    if found is None and slash and rest and hint is None:
        # A prefix genai-prices does not know (`hosted_vllm/`, `litellm_proxy/`): the whole
        # name was tried first (OpenRouter-style ids contain a slash), now the name without it.
        key = rest
        found = _find_in(providers, None, key)
    if found is not None:
        return (*found, False)
    if key.startswith("ft:"):
        # `ft:<base>:<org>:<suffix>:<id>`; genai-prices prices some fine-tunes (tried above),
        # the others get their base model's price.
        base = key.split(":")[1]
        openai = hint or data_snapshot.find_provider_by_id(providers, "openai")
        found = _find_in(providers, openai, base) if base else None
        if found is not None:
            return (*found, True)
    return None


def _find_in(
    providers: list[gp.Provider], hint: gp.Provider | None, key: str
) -> tuple[gp.Provider, gp.ModelInfo] | None:
    if hint is not None:
        model = hint.find_model(key, all_providers=providers)
        return None if model is None else (hint, model)
    # genai-prices' own guess: the first provider whose name pattern matches.
    for provider in providers:
        if provider.model_match is not None and provider.model_match.is_match(key):
            model = provider.find_model(key, all_providers=providers)
            if model is not None:
                return provider, model
            break
    for provider_id in _FIRST_PARTY:
        maker = data_snapshot.find_provider_by_id(providers, provider_id)
        if maker is not None and (model := maker.find_model(key)) is not None:
            return maker, model
    return None


def _price_in_force(
    info: gp.ModelInfo, now: datetime, source: str
) -> tuple[ModelPrice | None, float]:
    """The model's price at `now` (see the module docstring) and when that stops holding."""
    if isinstance(info.prices, gp.ModelPrice):
        return _from_genai(info.prices, source), _NEVER
    instants = [now]
    next_start = _NEVER
    for conditional in info.prices:
        constraint = conditional.constraint
        if isinstance(constraint, gp.TimeOfDateConstraint):
            # Prices change only at window edges, so the edges of today show every price of
            # today; start dates are whole days, so today's edges see today's start dates.
            instants += [_today_at(now, constraint.start_time), _today_at(now, constraint.end_time)]
        elif isinstance(constraint, gp.StartDateConstraint) and constraint.start_date > now.date():
            starts = datetime.combine(constraint.start_date, day_time(), tzinfo=UTC)
            next_start = min(next_start, starts.timestamp())
    candidates: list[ModelPrice] = []
    for instant in instants:
        price = _from_genai(info.get_prices(instant), source)
        if price is not None and price not in candidates:
            candidates.append(price)
    if not candidates:
        return None, next_start
    if len(candidates) == 1:
        return candidates[0], next_start
    return _highest(candidates, f"{source}:peak"), next_start


def _today_at(now: datetime, at: day_time) -> datetime:
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    edge = datetime.combine(now.date(), at).astimezone(UTC)
    # A non-UTC window edge may fall on the neighbouring UTC day: keep the time, use today.
    return datetime.combine(now.date(), edge.timetz())


_Rates = tuple[int, int, int | None, int | None]
"""input, output, cached_input, cache_write."""


def _from_genai(price: gp.ModelPrice, source: str) -> ModelPrice | None:
    """genai-prices' price as ours, or `None` when it has no token price at all."""
    values = [
        getattr(price, key, None)
        for key in ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")
    ]
    if values[0] is None and values[1] is None:
        return None
    thresholds = sorted(
        {
            tier.start
            for value in values
            if isinstance(value, gp.TieredPrices)
            for tier in value.tiers
        }
    )

    def rates_above(input_tokens: int) -> _Rates:
        nano = [_ceil_nano(_genai_tier_price(value, input_tokens), 9) for value in values]
        return nano[0] or 0, nano[1] or 0, nano[2], nano[3]

    request_fee = getattr(price, "requests_kcount", None)
    # USD per thousand requests → nano-USD per request: ×1e9 / 1e3.
    per_request = _ceil_nano(_genai_tier_price(request_fee, 0), 6) or 0
    # A tier holds the rates genai-prices applies to any input above its threshold.
    tiers = [_tier(t, rates_above(t + 1)) for t in thresholds]
    return _price(rates_above(0), per_request, tiers, source)


def _genai_tier_price(value: object, input_tokens: int) -> Decimal | None:
    """The price genai-prices applies to a call with this many input tokens."""
    if not isinstance(value, gp.TieredPrices):
        return value if isinstance(value, Decimal) else None
    applicable, start = value.base, -1
    for tier in value.tiers:
        if start < tier.start < input_tokens:
            applicable, start = tier.price, tier.start
    return applicable


def _ceil_nano(usd: Decimal | None, places: int) -> int | None:
    # Exact for every clean price; float noise in the data rounds up, never down.
    return None if usd is None else math.ceil(shift_decimal(usd, places))


def _highest(prices: Sequence[ModelPrice], source: str) -> ModelPrice:
    """Field by field, the highest of several prices, tiers included."""
    thresholds = sorted({tier.above for price in prices for tier in price.tiers})

    def highest_above(input_tokens: int) -> _Rates:
        rates = [price._rates_at(input_tokens) for price in prices]
        return (
            max(r.input for r in rates),
            max(r.output for r in rates),
            max(r.input if r.cached_input is None else r.cached_input for r in rates),
            max(r.input if r.cache_write is None else r.cache_write for r in rates),
        )

    per_request = max(price.per_request for price in prices)
    tiers = [_tier(t, highest_above(t + 1)) for t in thresholds]
    return _price(highest_above(0), per_request, tiers, source)


def _tier(above: int, rates: _Rates) -> PriceTier:
    return PriceTier(
        above=above, input=rates[0], output=rates[1], cached_input=rates[2], cache_write=rates[3]
    )


def _price(rates: _Rates, per_request: int, tiers: list[PriceTier], source: str) -> ModelPrice:
    return ModelPrice(
        input=rates[0],
        output=rates[1],
        cached_input=rates[2],
        cache_write=rates[3],
        per_request=per_request,
        tiers=tuple(tiers),
        source=source,
    )
