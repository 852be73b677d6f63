"""Metrics for llmfence: Prometheus (`llmfence[prometheus]`) or OpenTelemetry (`llmfence[otel]`).

```python
from llmfence.metrics import PrometheusMetrics

fence = Fence(store=store, master_key=..., metrics=PrometheusMetrics())
app.mount("/metrics", fence.metrics_app())
```

Each adapter is imported only when named, so this package imports without either extra; naming
one whose library is missing raises an `ImportError` that says which extra to install. Without
`metrics=`, llmfence reports nothing and its hot path pays one `is None` check per event.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._tally import BUDGET_LEVELS, LABELS, OUTCOMES, Tally

if TYPE_CHECKING:
    from ._otel import OpenTelemetryMetrics
    from ._prometheus import PrometheusMetrics

__all__ = [
    "BUDGET_LEVELS",
    "LABELS",
    "OUTCOMES",
    "OpenTelemetryMetrics",
    "PrometheusMetrics",
    "Tally",
]

_ADAPTERS = {
    "PrometheusMetrics": ("._prometheus", "prometheus"),
    "OpenTelemetryMetrics": ("._otel", "otel"),
}


def __getattr__(name: str) -> Any:
    if name not in _ADAPTERS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module, extra = _ADAPTERS[name]
    try:
        found = importlib.import_module(module, __name__)
    except ImportError as error:
        raise ImportError(
            f"llmfence.metrics.{name} needs the {extra!r} extra: pip install 'llmfence[{extra}]'"
        ) from error
    return getattr(found, name)
