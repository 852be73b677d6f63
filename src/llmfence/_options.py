"""The options of `Fence` and the middlewares: checked when they are built, each message
naming the argument the user wrote (`rpm_limit`, not an internal name)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

from ._pricing import PriceBook
from .exceptions import ConfigurationError

__all__ = [
    "MIN_MASTER_KEY_LENGTH",
    "POLICIES",
    "checked_access_groups",
    "checked_bool",
    "checked_deployments",
    "checked_int",
    "checked_master_key",
    "checked_patterns",
    "checked_policy",
    "checked_prices",
    "checked_seconds",
    "checked_store",
]

logger = logging.getLogger("llmfence")

# Shorter master keys are accepted (LiteLLM's docs use `sk-1234`), with a warning.
MIN_MASTER_KEY_LENGTH = 8


def checked_patterns(name: str, value: Iterable[str]) -> tuple[str, ...]:
    """Path patterns (`metered_paths`, `exempt_paths`) as a tuple: a collection of strings,
    not one string.

    Raises:
        ConfigurationError: They are not.
    """
    patterns = () if isinstance(value, str) else tuple(value)
    if isinstance(value, str) or not all(isinstance(p, str) for p in patterns):
        raise ConfigurationError(f"{name} must be a collection of path patterns, not {value!r}")
    return patterns


def checked_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    """An int option from `low` to `high` (not a bool, a float or a string).

    Raises:
        ConfigurationError: It is not; the message names the argument.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an int, not {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"from {low} to {high:_}"
        raise ConfigurationError(f"{name} must be {bound}, not {value!r}")
    return value


def checked_seconds(name: str, value: object, *, zero: bool = False) -> float:
    """A duration option in seconds: a finite number > 0 (≥ 0 with `zero`).

    Raises:
        ConfigurationError: It is not; the message names the argument.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not zero)
    ):
        what = "≥ 0" if zero else "> 0"
        raise ConfigurationError(f"{name} must be a finite number of seconds {what}, not {value!r}")
    return float(value)


def checked_bool(name: str, value: object) -> bool:
    """A flag option: `True` or `False` (not 0, 1 or a string)."""
    if not isinstance(value, bool):
        raise ConfigurationError(f"{name} must be True or False, not {value!r}")
    return value


def checked_store(store: object) -> None:
    """A store, or None: anything with an `admit` (the ledger's verb), not a URL or a client."""
    if store is not None and not callable(getattr(store, "admit", None)):
        raise ConfigurationError(f"store must be a Store (MemoryStore, RedisStore), not {store!r}")


def checked_access_groups(groups: object) -> None:
    """Access groups defined in code: a mapping of group names to lists of models, or None."""
    if groups is not None and (
        not isinstance(groups, Mapping)
        or any(
            not isinstance(models, Iterable) or isinstance(models, str)
            for models in groups.values()
        )
    ):
        raise ConfigurationError("access_groups must map group names to lists of models")


POLICIES = ("fail_open", "fail_closed")


def checked_policy(name: str, value: object) -> str:
    """What a guard does while the store is down: `"fail_open"` or `"fail_closed"`."""
    if value not in POLICIES:
        raise ConfigurationError(f"{name} must be 'fail_open' or 'fail_closed', not {value!r}")
    assert isinstance(value, str)
    return value


def checked_master_key(value: object) -> str | None:
    """The master key, or None: a non-empty string. One shorter than `MIN_MASTER_KEY_LENGTH`
    (LiteLLM's docs use `sk-1234`) is accepted with a logged warning, never shown in it.

    Raises:
        ConfigurationError: It is not a non-empty string.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError("master_key must be a non-empty string")
    if len(value) < MIN_MASTER_KEY_LENGTH:
        logger.warning(
            "master_key is %d characters long, under %d: anyone who guesses it owns the "
            "gateway. Use a long random key (e.g. 'sk-' + secrets.token_urlsafe(32)) outside "
            "of tests.",
            len(value),
            MIN_MASTER_KEY_LENGTH,
        )
    return value


def checked_deployments(deployments: object) -> None:
    """Deployment names and the model each runs: a mapping of strings to strings, or None."""
    if deployments is not None and (
        not isinstance(deployments, Mapping)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in deployments.items())
    ):
        raise ConfigurationError("deployments must map deployment names to model names")


def checked_prices(prices: Any, fallback: Any) -> None:
    """Price overrides and the fallback price, each named in the message if it is wrong."""
    try:
        PriceBook(overrides=prices)
    except ConfigurationError as error:
        raise ConfigurationError(f"prices: {error}") from None
    try:
        PriceBook(fallback=fallback)
    except ConfigurationError as error:
        raise ConfigurationError(f"fallback_price: {error}") from None
