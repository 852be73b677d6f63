"""`store_from_url`: one string that names a store, for configuration files, environment
variables and the command line (`LLMFENCE_STORE=sqlite:///var/lib/llmfence.db`)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from llmfence.exceptions import ConfigurationError

from ._protocol import Store

__all__ = ["store_from_url"]

_SCHEMES = "memory://, sqlite:///path, redis://, rediss://, redis+cluster://"


def store_from_url(url: str, **options: Any) -> Store:
    """The store a URL names, built with `options` (each store's keyword arguments).

    | URL | store |
    |---|---|
    | `memory://` | `MemoryStore()`: this process only |
    | `sqlite:///relative/file.db`, `sqlite:////absolute/file.db` | `SQLiteStore(path)` |
    | `redis://host:6379/0`, `rediss://…` | `RedisStore.from_url(url)` |
    | `redis+cluster://host:7000`, `rediss+cluster://…` | `RedisStore.from_url(…, cluster=True)` |

    Raises:
        ConfigurationError: A URL of no known scheme, or an SQLite URL with no path.
    """
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore(**options)
    if scheme == "sqlite":
        # As SQLAlchemy reads them: three slashes begin a relative path, four an absolute one.
        path = url.split("://", 1)[1][1:]
        if not path:
            raise ConfigurationError(
                f"an SQLite store URL names a file: sqlite:///path, not {url!r}"
            )
        from .sqlite import SQLiteStore

        return SQLiteStore(path, **options)
    if scheme in ("redis", "rediss", "redis+cluster", "rediss+cluster"):
        from .redis import RedisStore

        if scheme.endswith("+cluster"):
            plain = scheme.removesuffix("+cluster") + url[len(scheme) :]
            return RedisStore.from_url(plain, cluster=True, **options)
        return RedisStore.from_url(url, **options)
    # The URL may carry a password: name the scheme only.
    raise ConfigurationError(f"no llmfence store for a {scheme or 'bare'!r} URL; use {_SCHEMES}")
