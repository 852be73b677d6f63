"""The pieces a `Plan` is built from: a caller's levels, end-user namespaces, merged counters,
per-model lookups and budget periods. Pure functions of records and configuration."""

from __future__ import annotations

from typing import Any

from llmfence import _counters
from llmfence._duration import parse_duration
from llmfence._models import same_model
from llmfence._money import usd_to_nano
from llmfence.stores import BudgetScope

from .auth import Principal
from .checks import Check

__all__ = [
    "MAX_MODELS",
    "Level",
    "Merged",
    "Timed",
    "budgeted_model",
    "caller_levels",
    "namespace",
    "per_model",
    "record_levels",
    "timed_scope",
    "to_nano",
]

Level = tuple[str, str, str, int | None]  # (level, counter id, label, limit)
# A budget level whose period end depends on the time: (key, level, label, limit, duration,
# anchor, aligned). Levels without a duration are prebuilt `BudgetScope`s.
Timed = tuple[str, str, str, int | None, str, float | None, bool]
# Distinct models a key's per-model limits are looked up for (models come from bodies).
MAX_MODELS = 256


def caller_levels(principal: Principal | None, attr: str, default: int | None) -> list[Level]:
    """The key, user and team levels of a principal, with their limits for `attr`."""
    if principal is None:
        return [] if default is None else [("anonymous", "all", "unauthenticated", default)]
    if principal.is_master:
        return []
    levels: list[Level] = []
    key = principal.key
    if key is not None and principal.key_hash is not None:
        own = getattr(key, attr)
        limit = own if own is not None else default
        levels.append(("key", principal.key_hash, principal.key_masked or "key", limit))
    if principal.user is not None:
        user_id = principal.user.user_id
        levels.append(("user", user_id, user_id, getattr(principal.user, attr)))
    if principal.team is not None:
        team_id = principal.team.team_id
        levels.append(("team", team_id, team_id, getattr(principal.team, attr)))
    return levels


def per_model(limits: Any, model: str) -> int | None:
    """A key's limit for a model, under any of its names."""
    if model in limits:
        return int(limits[model])
    return next((int(v) for name, v in limits.items() if same_model(name, model)), None)


def namespace(scope: str, principal: Principal | None) -> str:
    """The prefix of a caller's end-user ids: none when they are global, else the tenant's."""
    if scope == "global" or principal is None or principal.is_master:
        return ""
    if scope == "team" and principal.team_id:
        return f"team:{principal.team_id}:"
    return f"key:{principal.key_hash}:" if principal.key_hash else ""


class Merged:
    """Counters by name, each with the tightest limit of the checks that enforce it."""

    def __init__(self) -> None:
        self._what: dict[str, tuple[str, str, str, float]] = {}
        self._real: dict[str, int | None] = {}  # limits of the checks that refuse
        self._shadow: dict[str, int | None] = {}  # limits of shadow checks (only report)

    def add(
        self,
        key: str,
        what: tuple[str, str, str, float],
        limit: int | None,
        check: Check,
        *,
        unlimited: bool = False,
    ) -> None:
        self._what.setdefault(key, what)
        table = self._shadow if check.shadow else self._real
        if key not in table:
            table[key] = limit
        elif limit is not None:
            current = table[key]
            table[key] = limit if current is None else min(current, limit)
        elif not unlimited:
            table[key] = None

    def limit(self, key: str) -> Any:
        """The limit a counter is enforced with: the real checks', else the shadow ones'."""
        return self._real[key] if key in self._real else self._shadow[key]

    def items(self) -> list[tuple[str, tuple[str, str, str, float], Any]]:
        return [(key, what, self.limit(key)) for key, what in self._what.items()]

    @property
    def shadowed(self) -> frozenset[str]:
        return frozenset(key for key in self._shadow if key not in self._real)


def record_levels(principal: Principal) -> list[tuple[str, str, str, Any, Any]]:
    """The team, team member, user and key budget levels: (level, counter, label, limit,
    record)."""
    found: list[tuple[str, str, str, Any, Any]] = []
    if principal.team is not None:
        team_id = principal.team.team_id
        found.append(("team", _counters.budget("team", team_id), team_id, None, principal.team))
    member = principal.member
    if member is not None and member.team_id:
        # The user's own budget inside the team (`max_budget_in_team`), for team keys only.
        ident = f"{member.team_id}:{member.user_id}"
        label = f"{member.user_id} in team {member.team_id}"
        found.append(("team_member", _counters.budget("team_member", ident), label, None, member))
    if principal.user is not None:
        user_id = principal.user.user_id
        found.append(("user", _counters.budget("user", user_id), user_id, None, principal.user))
    if principal.key is not None and principal.key_hash is not None:
        label = principal.key_masked or "key"
        counter = _counters.budget("key", principal.key_hash)
        found.append(("key", counter, label, None, principal.key))
    return [(lv, c, lb, rec.max_budget, rec) for lv, c, lb, _, rec in found]


def timed_scope(timed: Timed, now: float) -> BudgetScope:
    key, level, label, limit, duration, anchor, aligned = timed
    seconds = None if aligned else _SECONDS[duration]
    if seconds is None:
        end = _counters.period_end(duration, now, anchor, aligned=aligned)
    elif anchor and anchor <= now:
        # Rolling from the budget's creation: the first `anchor + k × duration` after now
        # (what `Duration.period_end` computes, inline: every request asks).
        end = anchor + ((now - anchor) // seconds + 1) * seconds
    else:
        end = now + seconds
    return BudgetScope(key, level, label, limit, end)


class _Seconds(dict[str, int | None]):
    """Fixed lengths of durations in seconds (`None` for months and years), parsed once each."""

    def __missing__(self, duration: str) -> int | None:
        if len(self) >= MAX_MODELS:
            self.clear()
        seconds = self[duration] = parse_duration(duration).seconds
        return seconds


_SECONDS = _Seconds()


def budgeted_model(budgets: Any, model: str) -> str | None:
    """The per-model budget a request's model falls under: the entry of the same model, in
    any of its names (`_models`: snapshots, provider prefixes and case count as the base)."""
    if model in budgets:
        return model
    return next((name for name in budgets if same_model(name, model)), None)


def to_nano(usd: float | None) -> int | None:
    return None if usd is None else usd_to_nano(usd)
