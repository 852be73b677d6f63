"""`Fence`'s metrics route: the `/metrics` app of the adapter given as `Fence(metrics=...)`."""

from __future__ import annotations

from typing import Any

from ._core.meter import Meter
from .exceptions import ConfigurationError

__all__ = ["MetricsMixin"]


class MetricsMixin:
    """`Fence.metrics_app()`."""

    meter: Meter

    def metrics_app(self) -> Any:
        """An ASGI app serving the fence's metrics in the Prometheus text format, to mount:

        ```python
        fence = Fence(..., metrics=PrometheusMetrics())
        app.mount("/metrics", fence.metrics_app())
        ```

        Mounted inside a fenced app, `/metrics` needs a key like any other path unless it is
        in `exempt_paths` (Prometheus can send the master key as a bearer token).

        Raises:
            ConfigurationError: The fence has no metrics adapter that serves its own page
                (`OpenTelemetryMetrics` exports through the OpenTelemetry SDK instead).
        """
        serve = getattr(self.meter.observer, "asgi_app", None)
        if serve is None:
            raise ConfigurationError(
                "metrics_app() needs Fence(metrics=PrometheusMetrics()) (pip install "
                "'llmfence[prometheus]'); OpenTelemetry exports through its SDK's reader"
            )
        return serve()
