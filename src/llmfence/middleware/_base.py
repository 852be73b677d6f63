"""`FenceMiddleware`: what every llmfence middleware is, a layer that fuses into one engine.

A middleware contributes checks (plain data). Built over another llmfence middleware with the
same path rules and body cap, it absorbs it (Starlette builds a stack from the inside out, so the
outermost layer ends up holding every adjacent layer's checks and the real app); over anything
else, it runs as its own engine, and joins an outer llmfence engine at request time if there is
one. Either way the request is read, admitted and settled once.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import ASGIApp

from llmfence._core.checks import AuthCheck, Check, RecordCheck
from llmfence._core.meter import Meter
from llmfence.stores import Store

from ._engine import STATE_KEY, Engine, Layer
from ._paths import DEFAULT_EXEMPT_PATHS, PathRules

__all__ = ["DEFAULT_EXEMPT_PATHS", "DEFAULT_MAX_BODY_SIZE", "STATE_KEY", "FenceMiddleware"]

DEFAULT_MAX_BODY_SIZE = 32 * 1024 * 1024


class FenceMiddleware(Engine):
    """Base of the llmfence middlewares: a layer of checks over an app.

    Args:
        app: The ASGI app to protect.
        checks: What this layer checks.
        store: The store; ignored when `meter` is given. Layers of one stack given no store
            share one `MemoryStore`.
        meter: A shared meter (what `Fence` passes), else one is built over `store`.
        paths: Which paths are metered and which are exempt.
        max_body_size: Largest request body accepted on a metered path, in bytes (413 above).
    """

    def __init__(
        self,
        app: ASGIApp,
        checks: Sequence[Check | AuthCheck | RecordCheck] = (),
        *,
        store: Store | None = None,
        meter: Meter | None = None,
        paths: PathRules | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
    ) -> None:
        if meter is None and store is not None:
            meter = Meter(store)
        paths = paths or PathRules()
        layer = Layer(type(self).__name__, tuple(checks), meter)
        if (
            isinstance(app, FenceMiddleware)
            and app.paths == paths
            and app.max_body_size == max_body_size
        ):
            # The inner layer is llmfence too: take its checks and run them in this engine.
            self._configure(app.app, (layer, *app.layers), paths, max_body_size)
        else:
            self._configure(app, (layer,), paths, max_body_size)
