"""Which store a URL names, for the gateway processes and for the test process alike."""

from __future__ import annotations

from llmfence import Store, store_from_url

__all__ = ["open_store"]


def open_store(url: str, *, timeout: float | None = None) -> Store:
    """The store `url` names (`llmfence.store_from_url`: `redis://…`, `redis+cluster://…`,
    `sqlite:///path`).

    Args:
        url: The store's URL.
        timeout: Seconds any one store call may take (the store's default if None).
    """
    return store_from_url(url) if timeout is None else store_from_url(url, timeout=timeout)
