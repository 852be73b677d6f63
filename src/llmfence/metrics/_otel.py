"""`OpenTelemetryMetrics`: llmfence's metrics as OpenTelemetry instruments (the API only).

Counts and gauges are observable instruments whose callbacks read a `Tally` when the SDK's
reader collects; store latency is a histogram recorded per call. Without an SDK configured,
the API's meter provider is a no-op and so is every instrument.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

from llmfence._money import nano_to_usd
from llmfence._version import __version__

from ._tally import LATENCY_BUCKETS, Tally, Who

__all__ = ["OpenTelemetryMetrics"]

Reader = Callable[[CallbackOptions], Iterable[Observation]]


class OpenTelemetryMetrics(Tally):
    """llmfence's metrics as OpenTelemetry instruments; give it to `Fence(metrics=...)`.

    Instruments (meter `llmfence`): `llmfence.requests{outcome}`, `llmfence.tokens.input{model}`,
    `llmfence.tokens.output{model}`, `llmfence.spend{model}` (USD), `llmfence.budget.remaining
    {level,name}` (USD, opted-in levels), `llmfence.store.duration{operation}` (histogram,
    seconds), `llmfence.store.errors{operation}`, `llmfence.degraded{operation}`,
    `llmfence.outbox.depth`, `llmfence.outbox.dropped`, `llmfence.requests.in_flight`.

    Args:
        meter_provider: Where the instruments are made: the global provider unless given.
        labels: Caller attributes on request, token and spend counts: `"user"`, `"team"`,
            `"end_user"`.
        budget_levels: Levels whose remaining budget is a gauge: `"global"`, `"team"`,
            `"user"`, `"end_user"`.
    """

    def __init__(
        self,
        *,
        meter_provider: MeterProvider | None = None,
        labels: Iterable[str] = (),
        budget_levels: Iterable[str] = (),
    ) -> None:
        super().__init__(labels=labels, budget_levels=budget_levels)
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter("llmfence", __version__)
        counters: list[tuple[str, str, str, Reader]] = [
            ("llmfence.requests", "{request}", "Requests llmfence checked.", self._requests),
            ("llmfence.tokens.input", "{token}", "Input tokens.", self._by(0)),
            ("llmfence.tokens.output", "{token}", "Output tokens.", self._by(1)),
            ("llmfence.spend", "USD", "Spend of settled requests.", self._spend),
            (
                "llmfence.store.errors",
                "{call}",
                "Failed store calls.",
                self._ops(self.store_errors),
            ),
            ("llmfence.degraded", "{event}", "Store degradations.", self._ops(self.degradations)),
            ("llmfence.outbox.dropped", "{settlement}", "Settlements given up.", self._dropped),
        ]
        for name, unit, text, reader in counters:
            meter.create_observable_counter(name, [reader], unit, text)
        gauges: list[tuple[str, str, str, Reader]] = [
            ("llmfence.budget.remaining", "USD", "Budget left in the period.", self._remaining),
            ("llmfence.outbox.depth", "{settlement}", "Settlements waiting.", self._depth),
            ("llmfence.requests.in_flight", "{request}", "Requests in flight.", self._in_flight),
        ]
        for name, unit, text, reader in gauges:
            meter.create_observable_gauge(name, [reader], unit, text)
        self._duration = meter.create_histogram(
            "llmfence.store.duration",
            "s",
            "Store call latency.",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS,
        )

    def store_call(self, operation: str, seconds: float, failed: bool) -> None:
        super().store_call(operation, seconds, failed)
        self._duration.record(seconds, {"operation": operation})

    def _attributes(self, first: tuple[str, str], values: Who) -> Mapping[str, Any]:
        attributes = dict(zip(self.labels, values, strict=True))
        attributes[first[0]] = first[1]
        return attributes

    def _requests(self, _: CallbackOptions) -> Iterable[Observation]:
        counts = self.request_counts()
        return [Observation(n, self._attributes(("outcome", o), w)) for (o, w), n in counts.items()]

    def _by(self, index: int) -> Reader:
        def read(_: CallbackOptions) -> Iterable[Observation]:
            items = self.totals(index).items()
            return [Observation(n, self._attributes(("model", m), w)) for (m, w), n in items]

        return read

    def _spend(self, _: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(float(nano_to_usd(nano)), self._attributes(("model", model), who))
            for (model, who), nano in self.totals(2).items()
        ]

    @staticmethod
    def _ops(counts: dict[str, int]) -> Reader:
        def read(_: CallbackOptions) -> Iterable[Observation]:
            return [Observation(n, {"operation": op}) for op, n in list(counts.items())]

        return read

    def _remaining(self, _: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(float(nano_to_usd(nano)), {"level": level, "name": name})
            for (level, name), nano in list(self.remaining.items())
        ]

    def _depth(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.outbox()[0])]

    def _dropped(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.outbox()[3])]

    def _in_flight(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(self.in_flight)]
