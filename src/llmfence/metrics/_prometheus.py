"""`PrometheusMetrics`: llmfence's metrics as a prometheus-client collector.

A custom collector (prometheus-client's "custom collectors"): requests only add to a `Tally`,
and the metric families are built from it when the registry is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from llmfence._money import nano_to_usd

from ._tally import Tally

__all__ = ["PrometheusMetrics"]


def _usd(nano: int) -> float:
    return float(nano_to_usd(nano))


class PrometheusMetrics(Tally, Collector):
    """llmfence's metrics for Prometheus; give it to `Fence(metrics=...)`.

    ```python
    metrics = PrometheusMetrics(labels=("team",), budget_levels=("global", "team"))
    fence = Fence(store=store, master_key=..., metrics=metrics)
    app.mount("/metrics", fence.metrics_app())   # or prometheus_client.make_asgi_app()
    ```

    Series (all prefixed `llmfence_`): `requests_total{outcome}` (`allowed` or the refusal:
    `invalid_api_key`, `model_not_allowed`, `requests`, `tokens`, `parallel_requests`,
    `budget_exceeded`, `request_too_large`, `invalid_request`, `store_unavailable`),
    `input_tokens_total{model}`, `output_tokens_total{model}`, `spend_usd_total{model}`,
    `budget_remaining_usd{level,name}` (opted-in levels), `store_call_seconds{operation}`
    (histogram), `store_errors_total{operation}`, `degraded_total{operation}`,
    `outbox_depth`, `outbox_dropped_total`, `outbox_delivered_total`, `requests_in_flight`.

    Args:
        registry: Where the collector registers: prometheus-client's default `REGISTRY`
            (what `prometheus_client.make_asgi_app()` serves) unless given; pass a
            `CollectorRegistry()` of its own to run several fences in one process.
        labels: Caller labels on request, token and spend counts: `"user"`, `"team"`,
            `"end_user"` (each distinct value is a series).
        budget_levels: Levels whose remaining budget is a gauge: `"global"`, `"team"`,
            `"user"`, `"end_user"` (one series per level and name).
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        labels: Iterable[str] = (),
        budget_levels: Iterable[str] = (),
    ) -> None:
        super().__init__(labels=labels, budget_levels=budget_levels)
        self.registry = registry if registry is not None else REGISTRY
        self.registry.register(self)

    def asgi_app(self) -> Callable[..., Any]:
        """An ASGI app serving this collector's registry in the Prometheus text format."""
        return make_asgi_app(self.registry)

    def collect(self) -> Iterator[Metric]:
        who = list(self.labels)
        requests = CounterMetricFamily(
            "llmfence_requests", "Requests llmfence checked, by outcome.", labels=["outcome", *who]
        )
        for (outcome, values), count in self.request_counts().items():
            requests.add_metric([outcome, *values], count)
        yield requests
        model = ["model", *who]
        for name, what, index in (
            ("llmfence_input_tokens", "Input (prompt) tokens", 0),
            ("llmfence_output_tokens", "Output (completion) tokens", 1),
        ):
            family = CounterMetricFamily(name, f"{what} of settled requests.", labels=model)
            for (model_name, values), count in self.totals(index).items():
                family.add_metric([model_name, *values], count)
            yield family
        spend = CounterMetricFamily(
            "llmfence_spend_usd", "Spend of settled requests, USD.", labels=model
        )
        for (model_name, values), nano in self.totals(2).items():
            spend.add_metric([model_name, *values], _usd(nano))
        yield spend
        remaining = GaugeMetricFamily(
            "llmfence_budget_remaining_usd",
            "Budget left in the period (USD), as of the last admission at that level.",
            labels=["level", "name"],
        )
        for (level, name), nano in list(self.remaining.items()):
            remaining.add_metric([level, name], _usd(nano))
        yield remaining
        yield from self._store_metrics()

    def _store_metrics(self) -> Iterator[Metric]:
        latency = HistogramMetricFamily(
            "llmfence_store_call_seconds", "Store call latency.", labels=["operation"]
        )
        for operation in list(self.store_calls):
            buckets, total, _ = self.latency(operation)
            latency.add_metric([operation], buckets, total)
        yield latency
        for name, text, counts in (
            ("llmfence_store_errors", "Store calls that failed or timed out.", self.store_errors),
            ("llmfence_degraded", "Store failures requests went on without.", self.degradations),
        ):
            family = CounterMetricFamily(name, text, labels=["operation"])
            for operation, count in list(counts.items()):
                family.add_metric([operation], count)
            yield family
        depth, _, delivered, dropped = self.outbox()
        yield GaugeMetricFamily(
            "llmfence_outbox_depth", "Settlements waiting to be sent again.", value=depth
        )
        yield CounterMetricFamily(
            "llmfence_outbox_delivered",
            "Settlements the store took on a later try.",
            value=delivered,
        )
        yield CounterMetricFamily(
            "llmfence_outbox_dropped",
            "Settlements given up (too old, or over capacity).",
            value=dropped,
        )
        yield GaugeMetricFamily(
            "llmfence_requests_in_flight", "Requests inside llmfence now.", value=self.in_flight
        )
