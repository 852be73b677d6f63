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

import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from cachetools import LRUCache

from llmfence.exceptions import ConfigurationError, UnknownModelError

if TYPE_CHECKING:
    from llmfence._usage import Usage

from llmfence import _genai_prices
from llmfence._prices import ModelPrice, PriceOverride, PriceTier, PriceValue, to_model_price

__all__ = ["ModelPrice", "PriceBook", "PriceOverride", "PriceTier"]

# Longer names are not a model anyone serves; they are not looked up or cached, so a client
# cannot make llmfence lowercase and match megabytes of text.
_MAX_MODEL_NAME = 256


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
            self._overrides[key] = to_model_price(price, "override")
        self._fallback = None if fallback is None else to_model_price(fallback, "fallback")
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
            return override, _genai_prices.NEVER
        if not key or len(key) > _MAX_MODEL_NAME:
            return None, _genai_prices.NEVER
        found = _genai_prices.find_model(key)
        if found is None:
            return None, _genai_prices.NEVER
        provider, info, ft_base = found
        source = f"genai-prices:{provider.id}{':ft-base' if ft_base else ''}"
        return _genai_prices.price_in_force(
            info, datetime.fromtimestamp(self._clock(), UTC), source
        )
