"""What every counter is called, and when a budget period ends: one place for both.

A counter's name is its scope, never its limit: raising a key's limit keeps what the key used.
The window length is part of a rate counter's name (a limit per minute and one per hour are two
counters), and a route budget's period is part of its name (a daily and a monthly budget on one
route are two). The middlewares, the route guards, the admin API and `BudgetManager` all name
counters through this module, so that what one writes the others read.
"""

from __future__ import annotations

from functools import lru_cache
from urllib.parse import quote

from ._duration import Duration, parse_duration

__all__ = [
    "GLOBAL",
    "budget",
    "key_model",
    "parallel",
    "period_end",
    "project",
    "project_user",
    "rate",
    "route_budget",
    "route_rate",
]

GLOBAL = "global"
"""The whole app's budget counter."""

_RATE_PREFIX = {"requests": "rpm", "tokens": "tpm"}


def rate(kind: str, window: float, level: str, ident: str) -> str:
    """A request (`rpm:`) or token (`tpm:`) window of one level, e.g. `rpm:60000:key:<hash>`."""
    return f"{_RATE_PREFIX[kind]}:{round(window * 1000)}:{level}:{ident}"


def parallel(level: str, ident: str) -> str:
    """The lease set of one level, e.g. `parallel:user:alice`."""
    return f"parallel:{level}:{ident}"


def budget(level: str, ident: str) -> str:
    """The budget counter of one level: `global`, `key:<hash>`, `user:<id>`, `end_user:<id>`…"""
    return GLOBAL if level == GLOBAL else f"{level}:{ident}"


def key_model(key_hash: str, model: str) -> str:
    """A key's budget for one model (named as the key's `model_max_budget` names it)."""
    return f"key_model:{key_hash}:{model}"


def route_rate(name: str, kind: str, window: float, ident: str) -> str:
    """A route guard's window: `route:{name}:{rpm|tpm}:{window ms}:{identity}`."""
    return f"route:{name}:{_RATE_PREFIX[kind]}:{round(window * 1000)}:{ident}"


def route_budget(name: str, duration: Duration | None, ident: str) -> str:
    """A route guard's budget: `route:{name}:budget:{period}:{identity}`."""
    period = "ever" if duration is None else f"{duration}{'-aligned' if duration.aligned else ''}"
    return f"route:{name}:budget:{period}:{ident}"


def project(name: str) -> str:
    """A `BudgetManager` project's prefix (names are quoted: they come from callers)."""
    return f"bm:{quote(name, safe='')}"


def project_user(project_prefix: str, user: str, model: str | None = None) -> str:
    """A `BudgetManager` user's counter, or the user's counter for one model."""
    base = f"{project_prefix}:{quote(user, safe='')}"
    return base if model is None else f"{base}:model:{quote(model, safe='')}"


@lru_cache(maxsize=1024)
def _duration(duration: str, aligned: bool) -> Duration:
    # Records name their durations as strings: each distinct one is parsed once, which keeps
    # the regular expression off the hot path.
    return parse_duration(duration, aligned=aligned)


def period_end(
    duration: str | None, now: float, anchor: float | None = None, *, aligned: bool = False
) -> float | None:
    """When a period of `duration` that contains `now` ends, or `None` if it never does.

    `anchor` is the budget's creation time: its periods roll from then (`anchor + k ×
    duration`). Without one, a period starting now ends one duration from now.
    """
    if duration is None:
        return None
    return _duration(duration, aligned).period_end(now, anchor or None)
