"""genai-prices as llmfence's price source: model lookup and conversion to `ModelPrice`.

Lookups mirror what genai-prices' `calc_price` does, without its unbounded per-name caches
(model names come from clients). `PriceBook` calls these once per name and caches the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from datetime import time as day_time
from decimal import Decimal
from typing import TYPE_CHECKING

from genai_prices import data_snapshot
from genai_prices import types as gp

from llmfence._money import shift_decimal

if TYPE_CHECKING:
    pass

from llmfence._prices import ModelPrice, PriceTier

__all__ = ["NEVER", "find_model", "price_in_force"]

NEVER = math.inf
"""The expiry of a price that never changes."""

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


def find_model(key: str) -> tuple[gp.Provider, gp.ModelInfo, bool] | None:
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


def price_in_force(
    info: gp.ModelInfo, now: datetime, source: str
) -> tuple[ModelPrice | None, float]:
    """The model's price at `now` (see the module docstring) and when that stops holding."""
    if isinstance(info.prices, gp.ModelPrice):
        return _from_genai(info.prices, source), NEVER
    instants = [now]
    next_start = NEVER
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
