"""Tests for `llmfence._pricing`: exact prices from genai-prices and overrides, cached per model."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from datetime import UTC, date, datetime, time
from decimal import Decimal

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import calc_price, data_snapshot
from genai_prices import types as gp
from hypothesis import given
from hypothesis import strategies as st

from llmfence import _genai_prices
from llmfence._money import nano_to_decimal, nano_to_usd
from llmfence._pricing import ModelPrice, PriceBook, PriceOverride, PriceTier
from llmfence._usage import Usage
from llmfence.exceptions import ConfigurationError, UnknownModelError


class FakeClock:
    """Unix time that moves only when a test says so."""

    def __init__(self, when: datetime) -> None:
        self.now = when.timestamp()

    def __call__(self) -> float:
        return self.now

    def set(self, when: datetime) -> None:
        self.now = when.timestamp()


def usage(inp: int = 0, out: int = 0, cached: int = 0, write: int = 0) -> Usage:
    return Usage(
        input_tokens=inp, output_tokens=out, cached_input_tokens=cached, cache_write_tokens=write
    )


def genai_nano(model: str, u: Usage, *, provider_id: str | None = None) -> int:
    """genai-prices' exact price of the call, rounded up to a nano-USD as ours is."""
    genai_usage = GenaiUsage(
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        cache_read_tokens=u.cached_input_tokens,
        cache_write_tokens=u.cache_write_tokens,
    )
    total = calc_price(genai_usage, model, provider_id=provider_id).total_price
    return math.ceil(total * 10**9)


def count_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every name that reaches genai-prices (i.e. every cache miss)."""
    seen: list[str] = []
    real = _genai_prices.find_model

    def spy(key: str) -> tuple[gp.Provider, gp.ModelInfo, bool] | None:
        seen.append(key)
        return real(key)

    monkeypatch.setattr(_genai_prices, "find_model", spy)
    return seen


# --- the seed figure --------------------------------------------------------------------------


def test_seed_figure_is_exact() -> None:
    book = PriceBook()
    cost = book.cost("gpt-3.5-turbo-0613", usage(14, 29))
    assert cost == 79_000
    assert nano_to_usd(cost) == 0.000079
    assert nano_to_decimal(cost) == Decimal("0.000079")

    total = sum(book.cost("gpt-3.5-turbo-0613", usage(14, 29)) for _ in range(1000))
    assert total == 79_000_000
    assert nano_to_decimal(total) == Decimal("0.079")
    assert nano_to_usd(total) == 0.079


# --- agreement with genai-prices ----------------------------------------------------------------

USAGES = [
    usage(14, 29),
    usage(1_000, 500, cached=400),
    usage(5_000, 100, cached=1_000, write=2_000),
    usage(150_000, 2_000, cached=20_000),
    usage(300_000, 1_000, cached=100_000),  # above every tier threshold in the data
    usage(1, 0),
]

MODELS = [
    ("gpt-4o", None),
    ("gpt-4o-mini", None),
    ("gpt-4.1", None),
    ("o3-mini", None),
    ("claude-3-5-sonnet-20241022", None),
    ("claude-sonnet-4-5", None),  # tiered above 200k input tokens
    ("gemini-1.5-flash", None),  # tiered above 128k
    ("gemini-2.5-pro", None),  # tiered above 200k
    ("text-embedding-3-small", "openai"),  # genai-prices needs the provider for this one
]


@pytest.mark.parametrize(("model", "provider_id"), MODELS)
@pytest.mark.parametrize("u", USAGES, ids=lambda u: f"{u.input_tokens}in")
def test_matches_calc_price(model: str, provider_id: str | None, u: Usage) -> None:
    assert PriceBook().cost(model, u) == genai_nano(model, u, provider_id=provider_id)


@pytest.mark.parametrize("model", ["claude-sonnet-4-5", "gemini-1.5-flash", "gemini-2.5-pro"])
def test_tiered_models_have_tiers(model: str) -> None:
    # Guards the comparison above against becoming vacuous if the data changes shape.
    assert PriceBook().price_for(model).tiers


def test_every_token_priced_genai_model_matches_calc_price() -> None:
    now = datetime.now(UTC)
    checked = 0
    for provider in data_snapshot.get_snapshot().providers:
        for info in provider.models:
            price, _ = _genai_prices.price_in_force(info, now, "test")
            if price is None:
                continue
            for u in (usage(1_000, 500, cached=400), usage(300_000, 7, write=50_000)):
                genai_usage = GenaiUsage(
                    input_tokens=u.input_tokens,
                    output_tokens=u.output_tokens,
                    cache_read_tokens=u.cached_input_tokens,
                    cache_write_tokens=u.cache_write_tokens,
                )
                exact = info.calc_price(genai_usage, provider, genai_request_timestamp=now)
                expected = math.ceil(exact.total_price * 10**9)
                if price.source.endswith(":peak"):
                    assert price.cost(u) >= expected, (provider.id, info.id)
                else:
                    assert price.cost(u) == expected, (provider.id, info.id)
                checked += 1
    assert checked > 1_000


def test_tier_boundary_is_exclusive_like_genai_prices() -> None:
    price = PriceBook().price_for("gemini-2.5-pro")
    (tier,) = price.tiers
    assert price.projected(tier.above, 1) < price.projected(tier.above + 1, 1)
    for inp in (tier.above, tier.above + 1):
        assert price.cost(usage(inp, 1)) == genai_nano("gemini-2.5-pro", usage(inp, 1))


# --- rounding -----------------------------------------------------------------------------------


def test_one_token_is_never_free() -> None:
    tiny = ModelPrice(input=1, output=1)  # one nano-USD per million tokens
    assert tiny.cost(usage(1)) == 1
    assert tiny.cost(usage(0, 1)) == 1
    assert tiny.cost(usage(1_000_000)) == 1  # exactly one nano: not rounded further up
    assert tiny.cost(usage(1_000_001)) == 2
    assert tiny.cost(usage()) == 0
    # A real price with a fraction of a nano per token: Gemini 1.5 Flash reads cache at
    # $0.01875 per million, 18.75 nano-USD per token.
    flash = PriceBook().price_for("gemini-1.5-flash")
    assert flash.cached_input == 18_750_000
    assert flash.cost(usage(1, cached=1)) == 19


def test_exact_costs_are_not_rounded() -> None:
    price = ModelPrice(input=2_500_000_000, output=10_000_000_000)  # $2.5 / $10 per million
    assert price.cost(usage(1_000_000, 1_000_000)) == 12_500_000_000
    assert price.projected(1_000_000, 1_000_000) == 12_500_000_000


def test_cached_and_cache_write_tokens() -> None:
    price = ModelPrice(
        input=1_000_000, output=2_000_000, cached_input=100_000, cache_write=1_250_000
    )
    # 600 uncached × 1 + 100 cached × 0.1 + 300 written × 1.25 + 10 out × 2 (nano per token)
    assert price.cost(usage(1_000, 10, cached=100, write=300)) == 600 + 10 + 375 + 20
    # Without cache prices, cached and written tokens cost the input price.
    plain = ModelPrice(input=1_000_000, output=2_000_000)
    assert plain.cost(usage(1_000, 10, cached=100, write=300)) == 1_000 + 20


def test_inconsistent_usage_never_goes_negative() -> None:
    price = ModelPrice(input=1_000_000, output=0, cached_input=100_000)
    assert price.cost(usage(10, 0, cached=50)) == 5  # the 50 cached tokens, nothing negative


def test_per_request_fee() -> None:
    price = PriceBook().price_for("sonar")  # Perplexity: $12 per thousand requests
    assert price.per_request == 12_000_000
    assert price.cost(usage()) == 12_000_000
    assert price.cost(usage(10, 10)) == genai_nano("sonar", usage(10, 10), provider_id="perplexity")


# --- max_output_tokens_for ----------------------------------------------------------------------


def test_max_output_tokens_boundaries() -> None:
    price = PriceBook().price_for("gpt-4o")
    budget = price.projected(1_000, 500)
    n = price.max_output_tokens_for(budget, 1_000)
    assert n >= 500
    assert price.projected(1_000, n) <= budget < price.projected(1_000, n + 1)
    # Not even the input fits: nothing does.
    assert price.max_output_tokens_for(price.projected(1_000, 0) - 1, 1_000) == 0
    assert price.max_output_tokens_for(0, 1_000) == 0
    assert price.max_output_tokens_for(-5, 0) == 0


def test_max_output_tokens_free_output_and_fees() -> None:
    embedding = PriceBook().price_for("text-embedding-3-small")
    assert embedding.max_output_tokens_for(1_000, 10) == sys.maxsize
    assert embedding.max_output_tokens_for(0, 10) == 0
    fee = ModelPrice(input=0, output=1_000_000, per_request=100)  # 1 nano per output token
    assert fee.max_output_tokens_for(100, 0) == 0
    assert fee.max_output_tokens_for(150, 0) == 50


def test_max_output_tokens_uses_the_tier_of_the_input() -> None:
    price = ModelPrice(
        input=0, output=1_000_000, tiers=(PriceTier(above=100, input=0, output=2_000_000),)
    )
    assert price.max_output_tokens_for(100, 100) == 100
    assert price.max_output_tokens_for(100, 101) == 50


@given(
    budget=st.integers(min_value=0, max_value=10**12),
    inp=st.integers(min_value=0, max_value=400_000),
    model=st.sampled_from(["gpt-4o", "claude-sonnet-4-5", "gemini-2.5-pro", "sonar"]),
)
def test_max_output_tokens_is_the_largest_that_fits(budget: int, inp: int, model: str) -> None:
    price = _BOOK.price_for(model)
    n = price.max_output_tokens_for(budget, inp)
    if n == 0:
        assert price.projected(inp, 1) > budget
    else:
        assert price.projected(inp, n) <= budget < price.projected(inp, n + 1)


_BOOK = PriceBook()


# --- overrides, fallback, unknown models -------------------------------------------------------


def test_float_override_stays_exact() -> None:
    book = PriceBook(overrides={"my-model": {"input": 0.1, "output": 0.3}})
    price = book.price_for("my-model")
    assert (price.input, price.output, price.source) == (100_000_000, 300_000_000, "override")
    # Exactly $0.40: 0.1 went in as Decimal("0.1"), not as the float 0.1000000000000000055….
    assert book.cost("my-model", usage(1_000_000, 1_000_000)) == 400_000_000


@pytest.mark.parametrize("value", [Decimal("0.1"), "0.1", 0.1, " 0.1 "])
def test_override_value_forms(value: Decimal | str | float) -> None:
    assert PriceOverride(input=value, output=0).to_model_price().input == 100_000_000


def test_integer_override_and_all_fields() -> None:
    override = PriceOverride(
        input=3, output=15, cached_input="0.3", cache_write=3.75, per_request=1
    )
    assert override.to_model_price() == ModelPrice(
        input=3_000_000_000,
        output=15_000_000_000,
        cached_input=300_000_000,
        cache_write=3_750_000_000,
        per_request=1_000_000_000,
        source="override",
    )


def test_override_wins_over_genai_prices_and_matches_loosely() -> None:
    book = PriceBook(overrides={"GPT-4o": PriceOverride(input=1, output=1)})
    for name in ("gpt-4o", "GPT-4O", "openai/gpt-4o", "azure/gpt-4o"):
        assert book.price_for(name).source == "override"
    assert book.price_for("gpt-4o-mini").source == "genai-prices:openai"
    selfhosted = PriceBook(overrides={"my-llama": {"input": 0, "output": "0.5"}})
    assert selfhosted.price_for("hosted_vllm/my-llama").output == 500_000_000


def test_override_accepts_a_model_price() -> None:
    tiered = ModelPrice(input=1, output=2, tiers=(PriceTier(above=10, input=3, output=4),))
    assert PriceBook(overrides={"m": tiered}).price_for("m") is tiered
    fallback = PriceBook(fallback=tiered).price_for("unknown-model")
    assert (fallback.tiers, fallback.source) == (tiered.tiers, "fallback")


@pytest.mark.parametrize(
    "bad",
    [
        {"input": 1},  # output missing: must not default to free
        {"input": 1, "output": 1, "completion": 2},  # unknown field
        {"input": "0.0000000001", "output": 1},  # finer than a nano per million
        {"input": -1, "output": 1},
        {"input": float("nan"), "output": 1},
        {"input": float("inf"), "output": 1},
        {"input": True, "output": 1},
        {"input": "abc", "output": 1},
    ],
)
def test_bad_overrides_are_configuration_errors(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        PriceBook(overrides={"m": bad})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match=r"."):  # ConfigurationError is a ValueError
        PriceBook(fallback=bad)  # type: ignore[arg-type]


def test_override_names_differing_only_in_case_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="two price overrides"):
        PriceBook(overrides={"m": {"input": 1, "output": 1}, "M": {"input": 2, "output": 2}})


def test_bad_model_prices_and_options() -> None:
    with pytest.raises(ConfigurationError):
        ModelPrice(input=-1, output=0)
    with pytest.raises(ConfigurationError):
        ModelPrice(input=1, output=1, cached_input=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="ascending"):
        ModelPrice(
            input=1,
            output=1,
            tiers=(PriceTier(above=20, input=2, output=2), PriceTier(above=10, input=3, output=3)),
        )
    with pytest.raises(ConfigurationError):
        PriceTier(above=-1, input=1, output=1)
    with pytest.raises(ConfigurationError):
        PriceBook(maxsize=0)
    with pytest.raises(ConfigurationError):
        PriceBook(fallback=3)  # type: ignore[arg-type]


def test_unknown_model_is_rejected_by_default() -> None:
    book = PriceBook()
    with pytest.raises(UnknownModelError) as caught:
        book.cost("no-such-model", usage(1, 1))
    assert caught.value.model == "no-such-model"
    assert caught.value.status_code == 400
    assert caught.value.to_openai()["error"]["code"] == "model_not_found"


def test_unknown_model_uses_the_fallback() -> None:
    book = PriceBook(fallback=PriceOverride(input=10, output=30))
    price = book.price_for("no-such-model")
    assert (price.input, price.output, price.source) == (10_000_000_000, 30_000_000_000, "fallback")
    assert book.cost("no-such-model", usage(1_000, 1_000)) == 40_000_000  # $0.01 + $0.03
    assert book.price_for("gpt-4o").source == "genai-prices:openai"  # known models unaffected


@pytest.mark.parametrize("model", ["whisper-1", "tts-1", "", "x" * 1_000])
def test_models_without_token_prices_are_unknown(model: str) -> None:
    # whisper and tts are priced per minute / character: never metered as free tokens.
    with pytest.raises(UnknownModelError):
        PriceBook().price_for(model)
    assert PriceBook(fallback={"input": 1, "output": 1}).price_for(model).source == "fallback"


def test_unknown_outcome_is_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = count_lookups(monkeypatch)
    book = PriceBook()
    for _ in range(3):
        with pytest.raises(UnknownModelError):
            book.price_for("no-such-model")
        book.price_for("gpt-4o")
    assert lookups == ["no-such-model", "gpt-4o"]
    book.clear()
    book.price_for("gpt-4o")
    assert lookups[-1] == "gpt-4o"
    assert len(lookups) == 3


def test_overlong_names_are_neither_looked_up_nor_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = count_lookups(monkeypatch)
    book = PriceBook(fallback={"input": 1, "output": 1})
    book.price_for("gpt-4o" + "x" * 1_000)
    assert lookups == []
    assert len(book._unknown) == 0


def test_caches_are_bounded_lru_and_unknown_names_cannot_evict_known_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lookups = count_lookups(monkeypatch)
    book = PriceBook(maxsize=2, fallback={"input": 1, "output": 1})
    book.price_for("gpt-4o")
    for i in range(1_000):  # an attacker's flood of made-up names
        book.price_for(f"made-up-{i}")
    assert len(book._unknown) == 2
    assert len(book._known) == 1
    lookups.clear()
    book.price_for("gpt-4o")
    assert lookups == []  # still cached
    book.price_for("gpt-4o-mini")
    book.price_for("gpt-4o")  # most recently used
    book.price_for("gpt-4.1")  # evicts gpt-4o-mini, the least recently used
    assert len(book._known) == 2
    lookups.clear()
    book.price_for("gpt-4o")
    book.price_for("gpt-4o-mini")
    assert lookups == ["gpt-4o-mini"]


# --- names --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("openai/gpt-4o", "genai-prices:openai"),
        ("azure/gpt-4o", "genai-prices:azure"),
        ("anthropic/claude-3-5-sonnet-20241022", "genai-prices:anthropic"),
        ("vertex_ai/gemini-1.5-flash", "genai-prices:google"),
        ("bedrock/anthropic.claude-3-5-sonnet-20240620-v1:0", "genai-prices:aws"),
        ("openrouter/meta-llama/llama-3.1-8b-instruct", "genai-prices:openrouter"),
        ("hosted_vllm/gpt-4o", "genai-prices:openai"),  # unknown prefix: dropped
        ("GPT-4o", "genai-prices:openai"),
        ("gpt-4o-2024-08-06", "genai-prices:openai"),
        ("gpt-3.5-turbo-0613", "genai-prices:openai"),
        ("gpt-5.2-20251211", "genai-prices:openai"),  # compact date, as LiteLLM writes it
        ("text-embedding-3-small", "genai-prices:openai"),
    ],
)
def test_names_resolve(name: str, source: str) -> None:
    assert PriceBook().price_for(name).source == source


def test_provider_prefix_prices_like_the_bare_name() -> None:
    book = PriceBook()
    assert book.cost("openai/gpt-4o", usage(100, 100)) == book.cost("gpt-4o", usage(100, 100))
    assert book.cost("anthropic/claude-3-5-sonnet-20241022", usage(100, 100)) == genai_nano(
        "claude-3-5-sonnet-20241022", usage(100, 100)
    )


def test_fine_tuned_names() -> None:
    book = PriceBook()
    # genai-prices knows what OpenAI charges for this fine-tune ($0.30 / $1.20)...
    known = book.price_for("ft:gpt-4o-mini-2024-07-18:my-org::abc123")
    assert (known.input, known.output, known.source) == (
        300_000_000,
        1_200_000_000,
        "genai-prices:openai",
    )
    # ... and not for this one: the base model's price, marked as the approximation it is.
    guessed = book.price_for("ft:gpt-4.1-2025-04-14:my-org:custom:abc123")
    base = book.price_for("gpt-4.1-2025-04-14")
    assert (guessed.input, guessed.output) == (base.input, base.output)
    assert guessed.source == "genai-prices:openai:ft-base"
    with pytest.raises(UnknownModelError):
        book.price_for("ft:no-such-base:my-org::abc123")


# --- time-dependent and unusual prices (a synthetic genai-prices snapshot) ----------------------


def _model(model_id: str, prices: gp.ModelPrice | list[gp.ConditionalPrice]) -> gp.ModelInfo:
    return gp.ModelInfo(id=model_id, match=gp.ClauseEquals(equals=model_id), prices=prices)


def _mp(**usd: Decimal | gp.TieredPrices) -> gp.ModelPrice:
    return gp.ModelPrice(**usd)


@pytest.fixture
def synthetic() -> Iterator[gp.Provider]:
    provider = gp.Provider(
        id="testco",
        name="TestCo",
        api_pattern=r"https://testco\.invalid",
        model_match=gp.ClauseStartsWith(starts_with="test-"),
        models=[
            _model(
                "test-dated",
                [
                    gp.ConditionalPrice(prices=_mp(input_mtok=Decimal(1), output_mtok=Decimal(2))),
                    gp.ConditionalPrice(
                        constraint=gp.StartDateConstraint(start_date=date(2030, 1, 1)),
                        prices=_mp(input_mtok=Decimal(3), output_mtok=Decimal(4)),
                    ),
                ],
            ),
            _model(
                "test-offpeak",
                [
                    gp.ConditionalPrice(
                        prices=_mp(
                            input_mtok=Decimal(1),
                            output_mtok=Decimal(2),
                            cache_read_mtok=Decimal("0.5"),
                        )
                    ),
                    gp.ConditionalPrice(
                        constraint=gp.TimeOfDateConstraint(
                            start_time=time(8, 0, tzinfo=UTC), end_time=time(20, 0, tzinfo=UTC)
                        ),
                        prices=_mp(input_mtok=Decimal(2), output_mtok=Decimal(1)),
                    ),
                ],
            ),
            _model(
                "test-tiered",
                _mp(
                    input_mtok=gp.TieredPrices(
                        base=Decimal(1), tiers=[gp.Tier(start=1_000, price=Decimal(2))]
                    ),
                    output_mtok=gp.TieredPrices(
                        base=Decimal(3),
                        tiers=[
                            gp.Tier(start=2_000, price=Decimal(5)),
                            gp.Tier(start=500, price=Decimal(4)),
                        ],
                    ),
                    cache_read_mtok=Decimal("0.5"),
                ),
            ),
            _model(
                "test-noisy", _mp(input_mtok=Decimal("0.18000000000000002"), output_mtok=Decimal(1))
            ),
            _model("test-free", _mp()),
            _model("test-audio", _mp(audio_hours=Decimal("0.36"))),
        ],
    )
    data_snapshot.set_custom_snapshot(
        data_snapshot.DataSnapshot(providers=[provider], from_auto_update=False)
    )
    try:
        yield provider
    finally:
        data_snapshot.set_custom_snapshot(None)


def test_scheduled_price_change_takes_effect_on_its_date(
    synthetic: gp.Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups = count_lookups(monkeypatch)
    clock = FakeClock(datetime(2029, 12, 31, 23, 0, tzinfo=UTC))
    book = PriceBook(clock=clock)
    assert book.price_for("test-dated").input == 1_000_000_000
    clock.set(datetime(2029, 12, 31, 23, 59, 59, tzinfo=UTC))
    assert book.price_for("test-dated").input == 1_000_000_000
    assert len(lookups) == 1  # still the cached entry
    clock.set(datetime(2030, 1, 1, tzinfo=UTC))
    assert book.price_for("test-dated").input == 3_000_000_000
    assert len(lookups) == 2
    assert book.price_for("test-dated").output == 4_000_000_000
    assert len(lookups) == 2  # no date ahead: cached for good


def test_time_of_day_prices_use_the_highest_of_the_day(synthetic: gp.Provider) -> None:
    offpeak = datetime(2030, 5, 1, 3, 0, tzinfo=UTC)
    peak = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
    price = PriceBook(clock=FakeClock(offpeak)).price_for("test-offpeak")
    assert price.source == "genai-prices:testco:peak"
    # Field by field: input and cached from the peak price, output from the off-peak one.
    assert (price.input, price.output, price.cached_input) == (2 * 10**9, 2 * 10**9, 2 * 10**9)
    u = usage(1_000, 1_000, cached=500)
    for when in (offpeak, peak):
        genai_usage = GenaiUsage(input_tokens=1_000, output_tokens=1_000, cache_read_tokens=500)
        exact = calc_price(genai_usage, "test-offpeak", genai_request_timestamp=when).total_price
        assert price.cost(u) >= math.ceil(exact * 10**9)


@pytest.mark.parametrize("inp", [0, 1, 500, 501, 999, 1_000, 1_001, 2_000, 2_001, 10**6])
def test_tiers_with_different_thresholds_per_field(synthetic: gp.Provider, inp: int) -> None:
    price = PriceBook().price_for("test-tiered")
    assert [tier.above for tier in price.tiers] == [500, 1_000, 2_000]
    u = usage(inp, 321, cached=inp // 3)
    assert price.cost(u) == genai_nano("test-tiered", u)


def test_float_noise_in_the_data_rounds_up(synthetic: gp.Provider) -> None:
    assert PriceBook().price_for("test-noisy").input == 180_000_001


@pytest.mark.parametrize("model", ["test-free", "test-audio"])
def test_no_token_price_means_unknown(synthetic: gp.Provider, model: str) -> None:
    with pytest.raises(UnknownModelError):
        PriceBook().price_for(model)


def test_made_up_names_do_not_grow_genai_prices_caches() -> None:
    # DataSnapshot.find_provider_model memoises every name in unbounded dicts; we avoid it.
    snapshot = data_snapshot.get_snapshot()
    sizes = (len(snapshot._lookup_cache), len(snapshot._provider_cache))
    misses = len(snapshot._provider_misses)
    book = PriceBook(fallback={"input": 1, "output": 1})
    for i in range(200):
        book.price_for(f"gpt-4o-made-up-{i}")
        book.price_for(f"made-up-{i}")
        book.price_for(f"openai/made-up-{i}")
    assert (len(snapshot._lookup_cache), len(snapshot._provider_cache)) == sizes
    assert len(snapshot._provider_misses) == misses
