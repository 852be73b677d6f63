"""What a stack's checks ask of the store for one caller, worked out once per caller.

A `Plan` turns an engine's checks and a principal into the store's terms: the request and token
windows it hits, the leases it takes and the budget levels it is charged to, with their counter
names, limits and labels. Building one reads the key, user and team records; a request then only
fills in what depends on it (its token count, its end user, its model, the time). Plans hang off
the cached principal (`Principal.plans`), so they live exactly as long as the records they were
built from, and an admin change that drops the principal drops its plans with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llmfence import _counters
from llmfence._duration import parse_duration
from llmfence._money import usd_to_nano
from llmfence.stores import BudgetScope, RateHit, SlotRequest

from .auth import Principal
from .checks import BudgetCheck, Check, ParallelCheck, RateCheck

__all__ = ["Plan", "budget_scopes"]

_Level = tuple[str, str, str, int | None]  # (level, counter id, label, limit)
# A budget level whose period end depends on the time: (key, level, label, limit, duration,
# anchor, aligned). Levels without a duration are prebuilt `BudgetScope`s.
_Timed = tuple[str, str, str, int | None, str, float | None, bool]
# Distinct models a key's per-model budgets are looked up for (models come from bodies).
_MAX_MODELS = 256


def _levels(principal: Principal | None, attr: str, default: int | None) -> list[_Level]:
    """The key, user and team levels of a principal, with their limits for `attr`."""
    if principal is None:
        return [] if default is None else [("anonymous", "all", "unauthenticated", default)]
    if principal.is_master:
        return []
    levels: list[_Level] = []
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


class Plan:
    """The store's side of one stack's checks for one caller.

    Attributes:
        requests: Request windows, complete (each request costs 1).
        tokens: Token windows, as `(key, level, label, limit, window)`; a request adds its cost.
        slots: Leases the request takes.
        owners: Which check a refusal belongs to, by `(reason, level, label)` (the label is
            `""` for budgets: end users and models are named by requests).
        fail_closed: Whether a check that asks anything of the store fails closed: then a
            store outage refuses the request (503).
        clamp: Whether a `max_tokens` the client named is lowered to what fits instead of
            refused (`clamp_max_tokens`).
    """

    __slots__ = (
        "_end_user",
        "_model",
        "_models",
        "_static",
        "_timed",
        "clamp",
        "fail_closed",
        "owners",
        "requests",
        "slots",
        "tokens",
    )

    def __init__(
        self, checks: Sequence[Check], principal: Principal | None, *, budgets: bool = True
    ) -> None:
        self.owners: dict[tuple[str, str, str], Check] = {}
        requests: list[RateHit] = []
        tokens: list[tuple[str, str, str, int, float]] = []
        slots: list[SlotRequest] = []
        for check in checks:
            if isinstance(check, RateCheck):
                attr = "rpm_limit" if check.kind == "requests" else "tpm_limit"
                for level, ident, label, limit in _levels(principal, attr, check.default_limit):
                    if limit is None:
                        continue
                    key = _counters.rate(check.kind, check.window, level, ident)
                    self.owners.setdefault((check.kind, level, label), check)
                    if check.kind == "requests":
                        requests.append(
                            RateHit(key, "requests", level, label, limit, 1, check.window)
                        )
                    else:
                        tokens.append((key, level, label, limit, check.window))
            elif isinstance(check, ParallelCheck):
                levels = _levels(principal, "max_parallel_requests", check.default_limit)
                for level, ident, label, limit in levels:
                    if limit is not None:
                        key = _counters.parallel(level, ident)
                        self.owners.setdefault(("parallel_requests", level, label), check)
                        slots.append(SlotRequest(key, level, label, limit, check.lease_ttl))
        self.requests = tuple(requests)
        self.tokens = tuple(tokens)
        self.slots = tuple(slots)
        self._static: list[BudgetScope] = []
        self._timed: list[_Timed] = []
        self._end_user: list[tuple[BudgetCheck, int | None]] = []
        self._model: tuple[Any, ...] | None = None
        self._models: dict[str, tuple[BudgetScope | _Timed, ...]] = {}
        if budgets:
            self._budgets([c for c in checks if isinstance(c, BudgetCheck)], principal)
        self.fail_closed = any(c.on_store_error == "fail_closed" for c in self.owners.values())
        self.clamp = any(isinstance(c, BudgetCheck) and c.clamp_max_tokens for c in checks)

    def owner(self, reason: str, level: str, label: str) -> Check | None:
        """The check a refusal of `reason` at a level belongs to (the first that names it)."""
        return self.owners.get((reason, level, "" if reason == "budget" else label))

    @property
    def has_budgets(self) -> bool:
        """Whether a budget check runs (every request is then charged to its levels)."""
        return bool(self._static or self._timed or self._end_user)

    def _budgets(self, checks: list[BudgetCheck], principal: Principal | None) -> None:
        seen: set[str] = set()

        def add(key: str, level: str, label: str, limit: int | None, check: BudgetCheck,
                duration: str | None, anchor: float | None = None) -> None:  # fmt: skip
            # A level is charged once per request: when two budget checks name the same level
            # (both track the whole app, say), the first one's limit applies.
            if key in seen:
                return
            seen.add(key)
            self.owners.setdefault(("budget", level, ""), check)
            if duration is None:
                self._static.append(BudgetScope(key, level, label, limit, None))
            else:
                timed = (key, level, label, limit, duration, anchor, check.calendar_aligned)
                self._timed.append(timed)

        for check in checks:
            add(_counters.GLOBAL, "global", "global", _nano(check.max_budget), check,
                check.budget_duration)  # fmt: skip
            if principal is None or principal.is_master:
                continue
            records: list[tuple[str, str, str, Any]] = []
            if principal.team is not None:
                team_id = principal.team.team_id
                records.append(("team", team_id, team_id, principal.team))
            if principal.user is not None:
                user_id = principal.user.user_id
                records.append(("user", user_id, user_id, principal.user))
            key = principal.key
            if key is not None and principal.key_hash is not None:
                records.append(("key", principal.key_hash, principal.key_masked or "key", key))
                if key.model_max_budget and self._model is None:
                    self._model = (key, principal.key_hash, principal.key_masked, check)
            for level, ident, label, record in records:
                add(_counters.budget(level, ident), level, label, record.max_budget, check,
                    record.budget_duration, record.created_at)  # fmt: skip
        if checks:
            self._end_user.append((checks[0], _nano(checks[0].max_end_user_budget)))
            self.owners.setdefault(("budget", "end_user", ""), checks[0])

    def budget_scopes(
        self, end_user: str | None, model: str | None, now: float
    ) -> tuple[BudgetScope, ...]:
        """Every budget level a request is charged to, limited or not (spend is tracked)."""
        scopes = [*self._static, *(_scope(timed, now) for timed in self._timed)]
        if self._model is not None and model:
            scopes.extend(
                scope if isinstance(scope, BudgetScope) else _scope(scope, now)
                for scope in self._model_scopes(model)
            )
        if end_user and self._end_user:
            # One end-user level per request, with the first budget check's limit and period.
            check, limit = self._end_user[0]
            key = _counters.budget("end_user", end_user)
            duration = check.end_user_budget_duration
            end = _counters.period_end(duration, now, aligned=check.calendar_aligned)
            scopes.append(BudgetScope(key, "end_user", end_user, limit, end))
        return tuple(scopes)

    def _model_scopes(self, model: str) -> tuple[BudgetScope | _Timed, ...]:
        found = self._models.get(model)
        if found is None:
            key, key_hash, masked, check = self._model or (None, "", "", None)
            budgeted = _budgeted_model(key.model_max_budget, model) if key else None
            if budgeted is None:
                found = ()
            else:
                label = f"{budgeted} on {masked}"
                self.owners.setdefault(("budget", "model", ""), check)
                counter = _counters.key_model(key_hash, budgeted)
                limit = key.model_max_budget[budgeted]
                if key.budget_duration is None:
                    found = (BudgetScope(counter, "model", label, limit, None),)
                else:
                    aligned = check.calendar_aligned
                    found = ((counter, "model", label, limit, key.budget_duration,
                              key.created_at, aligned),)  # fmt: skip
            if len(self._models) >= _MAX_MODELS:
                self._models.clear()
            self._models[model] = found
        return found


def budget_scopes(
    check: BudgetCheck,
    principal: Principal | None,
    end_user: str | None,
    model: str | None,
    now: float,
) -> tuple[BudgetScope, ...]:
    """The levels one budget check charges a caller's request to (spend charged outside an
    admission: a route's reported cost, or a request no budget guard reserved for)."""
    plans = principal.plans if principal is not None else None
    plan = plans.get(check) if plans is not None else None
    if not isinstance(plan, Plan):
        plan = Plan((check,), principal)
        if plans is not None:
            plans[check] = plan
    return plan.budget_scopes(end_user, model, now)


def _scope(timed: _Timed, now: float) -> BudgetScope:
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
        if len(self) >= _MAX_MODELS:
            self.clear()
        seconds = self[duration] = parse_duration(duration).seconds
        return seconds


_SECONDS = _Seconds()


def _budgeted_model(budgets: Any, model: str) -> str | None:
    """The per-model budget a request's model falls under, names compared as prices compare
    them: case aside, with or without a `provider/` prefix (`OpenAI/gpt-4o` is `gpt-4o`)."""
    if model in budgets:
        return model
    wanted = model.rsplit("/", 1)[-1].lower()
    return next((name for name in budgets if name.rsplit("/", 1)[-1].lower() == wanted), None)


def _nano(usd: float | None) -> int | None:
    return None if usd is None else usd_to_nano(usd)
