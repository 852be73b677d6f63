"""Metrics: a scripted run through a real app, then `/metrics` scraped: every count is what
the run did (requests by outcome, tokens and spend by model from the spend log, budgets left,
store calls), no label names a key or its hash, and OpenTelemetry sees the same."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette

from llmfence import Fence, MemoryStore, Store
from llmfence._core.meter import Meter
from llmfence._money import nano_to_usd
from llmfence.exceptions import ConfigurationError, StoreError
from llmfence.metrics import OUTCOMES, OpenTelemetryMetrics, PrometheusMetrics, Tally
from llmfence.stores import Admission, AdmissionResult, hash_key, mask_key
from llmfence.testing import FakeClock, mock_llm_app

from .middleware.conftest import CHAT, MODEL, T0, auth, chat_body, client_for

pytestmark = pytest.mark.anyio
MASTER = "sk-master-key"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a scrape by (name, sorted labels)."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def total(found: Samples, series: str, **labels: str) -> float:
    """The sum of a series over the labels not named."""
    return sum(
        value
        for (sample, pairs), value in found.items()
        if sample == series and all((k, v) in pairs for k, v in labels.items())
    )


def fenced(store: Store, metrics: Any, **options: Any) -> tuple[Fence, Starlette]:
    app = mock_llm_app()
    fence = Fence(
        store=store,
        master_key=MASTER,
        max_budget=10.0,
        budget_duration="30d",
        clock=FakeClock(T0).now,
        exempt_paths=("/metrics/",),
        metrics=metrics,
        **options,
    )
    fence.install(app)
    if isinstance(metrics, PrometheusMetrics):
        app.mount("/metrics", fence.metrics_app())
    return fence, app


async def scripted_run(fence: Fence, client: httpx.AsyncClient) -> tuple[dict[str, int], list[str]]:
    """Requests of every kind; returns the expected count per outcome and the keys used."""
    await fence.new_team("research", max_budget=5.0, budget_duration="30d")
    rpm, _ = await fence.generate_key(team_id="research", rpm_limit=3)
    narrow, _ = await fence.generate_key(models=["gpt-4o-mini"])
    poor, _ = await fence.generate_key(max_budget=0.0000001)
    tpm, _ = await fence.generate_key(tpm_limit=100)
    single, _ = await fence.generate_key(max_parallel_requests=1)
    expected = dict.fromkeys(OUTCOMES, 0)

    async def post(
        key: str, body: Any, status: int, outcome: str, headers: dict[str, str] | None = None
    ) -> None:
        sent = {**auth(key), **(headers or {})}
        if isinstance(body, bytes):
            response = await client.post(CHAT, content=body, headers=sent)
        else:
            response = await client.post(CHAT, json=body, headers=sent)
        assert response.status_code == status, response.text
        expected[outcome] += 1

    for _ in range(3):
        await post(rpm, chat_body(max_tokens=20), 200, "allowed")
    await post(rpm, chat_body(max_tokens=20), 429, "requests")
    await post("sk-" + "x" * 40, chat_body(), 401, "invalid_api_key")
    await post(narrow, chat_body(), 403, "model_not_allowed")
    await post(poor, chat_body(max_tokens=10), 429, "budget_exceeded")
    await post(tpm, chat_body(max_tokens=40), 200, "allowed")
    await post(tpm, chat_body(max_tokens=80), 429, "tokens")  # fits the limit, not what is left
    await post(tpm, chat_body(max_tokens=200), 429, "request_too_large")  # over the whole limit
    await post(rpm, b"{not json", 400, "invalid_request")
    await post(rpm, {"model": MODEL, "messages": "nope"}, 400, "invalid_request")

    # One stream holds the only slot of `single` while a second request is refused.
    metrics = fence.meter.observer
    assert isinstance(metrics, Tally)
    admitted = metrics.latency("admit")[2]
    async with anyio.create_task_group() as group:
        stream = chat_body(stream=True, max_tokens=20)
        group.start_soon(
            post, single, stream, 200, "allowed", {"x-mock-delay": "0.3", "x-mock-chunks": "2"}
        )
        with anyio.fail_after(30):
            # Polled: the store calls a test sees are counts, not events.
            while metrics.latency("admit")[2] == admitted:  # noqa: ASYNC110
                await anyio.sleep(0.005)
        await post(single, chat_body(), 429, "parallel_requests")
    return expected, [rpm, narrow, poor, tpm, single]


async def test_a_scrape_counts_exactly_what_the_run_did(store: Store) -> None:
    metrics = PrometheusMetrics(
        registry=CollectorRegistry(), labels=("team",), budget_levels=("global", "team")
    )
    fence, app = fenced(store, metrics)
    async with client_for(app) as client:
        expected, keys = await scripted_run(fence, client)
        scrape = await client.get("/metrics/")
    assert scrape.status_code == 200
    found = samples(scrape.text)
    for outcome, count in expected.items():
        assert total(found, "llmfence_requests_total", outcome=outcome) == count, outcome
    # Allowed requests carry their team (opted in); the rest have none.
    assert total(found, "llmfence_requests_total", outcome="allowed", team="research") == 3
    # Tokens and spend by model equal the spend log's sums.
    records = await fence.store.spend_records()
    assert len(records) == expected["allowed"]
    assert {r.model for r in records} == {MODEL}
    inputs = sum(r.input_tokens for r in records)
    outputs = sum(r.output_tokens for r in records)
    assert total(found, "llmfence_input_tokens_total", model=MODEL) == inputs > 0
    assert total(found, "llmfence_output_tokens_total", model=MODEL) == outputs > 0
    spend = nano_to_usd(sum(r.cost for r in records))
    assert total(found, "llmfence_spend_usd_total", model=MODEL) == pytest.approx(spend, abs=1e-15)
    # Budgets left, as of the last admission at each opted-in level (a reservation apart).
    remaining = total(found, "llmfence_budget_remaining_usd", level="global", name="global")
    assert remaining == pytest.approx(10.0 - spend, abs=1e-3)
    assert total(found, "llmfence_budget_remaining_usd", level="team") > 4.99
    assert total(found, "llmfence_budget_remaining_usd", level="key") == 0
    # Store calls: every admission timed; nothing failed; nothing in flight or queued.
    assert total(found, "llmfence_store_call_seconds_count", operation="admit") >= 9
    assert (
        total(found, "llmfence_store_call_seconds_count", operation="settle") >= expected["allowed"]
    )
    assert total(found, "llmfence_store_errors_total") == 0
    assert total(found, "llmfence_degraded_total") == 0
    assert total(found, "llmfence_requests_in_flight") == 0
    assert total(found, "llmfence_outbox_depth") == 0
    # No label carries a key, its hash or its masked form.
    for key in keys:
        for secret in (key, hash_key(key), mask_key(key)):
            assert secret not in scrape.text


class DownStore:
    """A real store whose admissions fail (the store is down)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def admit(self, admission: Admission) -> AdmissionResult:
        raise StoreError("the store is down") from ConnectionError("refused")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def test_an_outage_counts_store_errors_degradations_and_refusals() -> None:
    metrics = PrometheusMetrics(registry=CollectorRegistry())
    fence, app = fenced(DownStore(MemoryStore()), metrics)
    key, _ = await fence.generate_key()
    async with client_for(app) as client:
        for _ in range(2):
            response = await client.post(CHAT, json=chat_body(), headers=auth(key))
            assert response.status_code == 503  # budgets fail closed
        found = samples((await client.get("/metrics/")).text)
    assert total(found, "llmfence_requests_total", outcome="store_unavailable") == 2
    assert total(found, "llmfence_requests_total", outcome="allowed") == 0
    assert total(found, "llmfence_store_errors_total", operation="admit") == 2
    assert total(found, "llmfence_degraded_total", operation="admit") == 2
    assert total(found, "llmfence_store_call_seconds_count", operation="admit") == 2


async def test_open_telemetry_sees_the_same_run() -> None:
    reader = InMemoryMetricReader()
    metrics = OpenTelemetryMetrics(meter_provider=MeterProvider(metric_readers=[reader]))
    fence, app = fenced(MemoryStore(), metrics)
    async with client_for(app) as client:
        expected, _ = await scripted_run(fence, client)
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points[metric.name] = list(metric.data.data_points)
    outcomes = {p.attributes["outcome"]: p.value for p in points["llmfence.requests"]}
    assert outcomes == expected
    records = await fence.store.spend_records()
    [inputs] = points["llmfence.tokens.input"]
    assert inputs.value == sum(r.input_tokens for r in records)
    [spend] = points["llmfence.spend"]
    assert spend.value == nano_to_usd(sum(r.cost for r in records))
    assert sum(p.count for p in points["llmfence.store.duration"]) >= 9
    [in_flight] = points["llmfence.requests.in_flight"]
    assert in_flight.value == 0


async def test_open_telemetry_without_an_sdk_is_a_harmless_no_op() -> None:
    from opentelemetry.metrics import NoOpMeterProvider

    fence, app = fenced(MemoryStore(), OpenTelemetryMetrics(meter_provider=NoOpMeterProvider()))
    key, _ = await fence.generate_key()
    async with client_for(app) as client:
        response = await client.post(CHAT, json=chat_body(), headers=auth(key))
    assert response.status_code == 200
    with pytest.raises(ConfigurationError, match="PrometheusMetrics"):
        fence.metrics_app()


def test_options_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="labels"):
        Tally(labels=("key",))
    with pytest.raises(ConfigurationError, match="budget_levels"):
        Tally(budget_levels=("key",))
    with pytest.raises(ConfigurationError, match="labels"):
        Tally(labels="team")
    with pytest.raises(ConfigurationError, match="metrics"):
        Fence(metrics=object())  # type: ignore[arg-type]
    tally = Tally()
    Meter(MemoryStore(), observer=tally)
    with pytest.raises(ConfigurationError, match="one Fence"):
        Meter(MemoryStore(), observer=tally)
    with pytest.raises(ConfigurationError, match="PrometheusMetrics"):
        Fence().metrics_app()


async def test_without_metrics_nothing_is_observed() -> None:
    fence, app = fenced(MemoryStore(), None)
    assert fence.meter.observer is None
    key, _ = await fence.generate_key()
    async with client_for(app) as client:
        response = await client.post(CHAT, json=chat_body(), headers=auth(key))
    assert response.status_code == 200


def test_the_metrics_package_exports_what_it_lists() -> None:
    import llmfence.metrics

    assert llmfence.metrics.__all__ == sorted(llmfence.metrics.__all__)
    for name in llmfence.metrics.__all__:
        assert getattr(llmfence.metrics, name) is not None
    with pytest.raises(AttributeError):
        _ = llmfence.metrics.Nothing
