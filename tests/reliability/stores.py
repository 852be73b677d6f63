"""Which store a URL names, for the gateway processes and for the test process alike."""

from __future__ import annotations

from llmfence import RedisStore, Store

__all__ = ["open_store"]


def open_store(url: str, *, timeout: float | None = None) -> Store:
    """The store `url` names: `redis://…` (or `rediss://…`) for now.

    `sqlite:///path` is the next branch, once `SQLiteStore` lands; a Redis Cluster URL would be
    `redis://…` with `cluster=True`.

    Args:
        url: The store's URL.
        timeout: Seconds any one store call may take (the store's default if None).
    """
    if url.startswith(("redis://", "rediss://")):
        return (
            RedisStore.from_url(url)
            if timeout is None
            else RedisStore.from_url(url, timeout=timeout)
        )
    raise ValueError(f"no store for {url!r} in the reliability suite yet")
