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
from llmfence._models import base_model
from llmfence.stores import BudgetScope, RateHit, SlotRequest

from .auth import Principal
from .checks import BudgetCheck, Check, ParallelCheck, RateCheck
from .levels import (
    MAX_MODELS,
    Merged,
    Timed,
    budgeted_model,
    caller_levels,
    namespace,
    per_model,
    record_levels,
    timed_scope,
    to_nano,
)

__all__ = ["Plan", "budget_scopes"]

_DAY = 86_400.0


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
        "_end_user_kinds",
        "_key_ref",
        "_model",
        "_model_rates",
        "_models",
        "_rate_checks",
        "_static",
        "_timed",
        "clamp",
        "end_user_ns",
        "end_user_rates",
        "fail_closed",
        "owners",
        "requests",
        "shadow_keys",
        "shadow_prefixes",
        "slots",
        "tokens",
    )

    def __init__(
        self, checks: Sequence[Check], principal: Principal | None, *, budgets: bool = True
    ) -> None:
        self.owners: dict[tuple[str, str, str], Check] = {}
        # Counters by name, merged: two checks that name one counter (two RPM layers with one
        # window) hit it once, with the tightest limit of the checks that enforce it.
        merged = Merged()
        for check in checks:
            if isinstance(check, RateCheck):
                attr = "rpm_limit" if check.kind == "requests" else "tpm_limit"
                for level, ident, label, limit in caller_levels(
                    principal, attr, check.default_limit
                ):
                    if limit is not None:
                        key = _counters.rate(check.kind, check.window, level, ident)
                        self.owners.setdefault((check.kind, level, label), check)
                        merged.add(key, (check.kind, level, label, check.window), limit, check)
                # Per-day limits of the records (rpd_limit, tpd_limit): a one-day bucket more.
                daily = "rpd_limit" if check.kind == "requests" else "tpd_limit"
                for level, ident, label, limit in caller_levels(principal, daily, None):
                    if limit is not None and principal is not None:
                        key = _counters.rate(check.kind, _DAY, level, ident)
                        self.owners.setdefault((check.kind, level, label), check)
                        merged.add(key, (check.kind, level, label, _DAY), limit, check)
            elif isinstance(check, ParallelCheck):
                levels = caller_levels(principal, "max_parallel_requests", check.default_limit)
                for level, ident, label, limit in levels:
                    if limit is not None:
                        key = _counters.parallel(level, ident)
                        self.owners.setdefault(("parallel_requests", level, label), check)
                        merged.add(key, ("parallel", level, label, check.lease_ttl), limit, check)
        # End users: one namespace per tenant unless global, and their own rate limits (per
        # kind and window, the tightest), named per request.
        scope = next((c.end_user_scope for c in checks if isinstance(c, RateCheck | BudgetCheck)),
                     "global")  # fmt: skip
        self.end_user_ns = namespace(scope, principal)
        end_user: dict[tuple[str, float], tuple[int, bool]] = {}
        for check in checks:
            if isinstance(check, RateCheck) and check.end_user_limit is not None:
                self.owners.setdefault((check.kind, "end_user", ""), check)
                known = end_user.get((check.kind, check.window))
                if (
                    known is None
                    or (known[1] and not check.shadow)
                    or (known[1] == check.shadow and check.end_user_limit < known[0])
                ):
                    end_user[(check.kind, check.window)] = (check.end_user_limit, check.shadow)
        self.end_user_rates = tuple(
            (kind, window, limit) for (kind, window), (limit, _) in end_user.items()
        )
        """Per end user: `(kind, window, limit)`; counters named per request."""
        # A registered customer's own limits apply where the stack has a window of the kind.
        self._end_user_kinds: dict[str, RateCheck] = {}
        for check in checks:
            if isinstance(check, RateCheck):
                self._end_user_kinds.setdefault(check.kind, check)
        self.shadow_prefixes = tuple(
            f"{_counters.rate(kind, window, 'end_user', '')}"
            for (kind, window), (_, shadow) in end_user.items()
            if shadow
        )
        requests: list[RateHit] = []
        tokens: list[tuple[str, str, str, int, float]] = []
        slots: list[SlotRequest] = []
        for key, (kind, level, label, span), limit in merged.items():
            if kind == "requests":
                requests.append(RateHit(key, "requests", level, label, limit, 1, span))
            elif kind == "tokens":
                tokens.append((key, level, label, limit, span))
            else:
                slots.append(SlotRequest(key, level, label, limit, span))
        self.requests = tuple(requests)
        self.tokens = tuple(tokens)
        self.slots = tuple(slots)
        # Per-model limits on the key: worked out per model, the first time it is asked for.
        key_record = principal.key if principal is not None else None
        has_per_model = key_record is not None and (
            key_record.model_rpm_limit or key_record.model_tpm_limit
        )
        self._rate_checks = [c for c in checks if isinstance(c, RateCheck)] if has_per_model else []
        self._key_ref: tuple[Any, str, str] = (
            key_record,
            (principal.key_hash or "") if principal is not None else "",
            (principal.key_masked or "") if principal is not None else "",
        )
        self._model_rates: dict[str, tuple[tuple[str, str, str, int, float], ...]] = {}
        self._static: list[BudgetScope] = []
        self._timed: list[Timed] = []
        self._end_user: tuple[BudgetCheck, int | None] | None = None
        self._model: tuple[Any, ...] | None = None
        self._models: dict[str, tuple[BudgetScope | Timed, ...]] = {}
        if budgets:
            self._budgets([c for c in checks if isinstance(c, BudgetCheck)], principal, merged)
        self.shadow_keys = merged.shadowed
        """Counters only shadow checks enforce: a refusal there is reported, not answered."""
        self.fail_closed = any(c.on_store_error == "fail_closed" for c in self.owners.values())
        self.clamp = any(isinstance(c, BudgetCheck) and c.clamp_max_tokens for c in checks)

    def owner(self, reason: str, level: str, label: str) -> Check | None:
        """The check a refusal of `reason` at a level belongs to (the first that names it)."""
        named = reason != "budget" and level != "end_user"
        return self.owners.get((reason, level, label if named else ""))

    def shadowed(self, key: str) -> bool:
        """Whether only shadow checks enforce a counter (its refusals are reported only)."""
        return key in self.shadow_keys or key.startswith(self.shadow_prefixes)

    def end_user_limits(self, customer: Any) -> tuple[tuple[str, float, int], ...]:
        """The end-user windows of a request: the stack's, with a registered customer's own
        `rpm_limit` / `tpm_limit` in place of the stack's limit of that kind."""
        if customer is None:
            return self.end_user_rates
        limits = {(kind, window): limit for kind, window, limit in self.end_user_rates}
        for kind, attr in (("requests", "rpm_limit"), ("tokens", "tpm_limit")):
            own = getattr(customer, attr)
            check = self._end_user_kinds.get(kind)
            if own is not None and check is not None:
                limits = {k: v for k, v in limits.items() if k[0] != kind}
                limits[(kind, check.window)] = own
                self.owners.setdefault((kind, "end_user", ""), check)
        return tuple((kind, window, limit) for (kind, window), limit in limits.items())

    def end_user_counter(self, kind: str, window: float, end_user: str) -> str:
        """The counter of one end user's window, in this caller's end-user namespace."""
        return _counters.rate(kind, window, "end_user", self.end_user_ns + end_user)

    @property
    def has_budgets(self) -> bool:
        """Whether a budget check runs (every request is then charged to its levels)."""
        return bool(self._static or self._timed or self._end_user)

    def _budgets(
        self, checks: list[BudgetCheck], principal: Principal | None, merged: Merged
    ) -> None:
        # A level is charged once per request, however many budget checks name it (both track
        # the whole app, say), with the tightest limit among them: a check without a limit
        # there only tracks the spend.
        levels: dict[str, tuple[str, str, str | None, float | None, bool]] = {}
        for check in checks:
            found: list[tuple[str, str, str, Any, Any]] = [
                ("global", _counters.GLOBAL, "global", check.max_budget, None)
            ]
            if principal is not None and not principal.is_master:
                found += record_levels(principal)
                key = principal.key
                if key is not None and key.model_max_budget and self._model is None:
                    self._model = (key, principal.key_hash, principal.key_masked, check)
            for level, counter, label, limit, record in found:
                nano = to_nano(limit) if record is None else limit
                merged.add(counter, ("budget", level, label, 0.0), nano, check, unlimited=True)
                if counter not in levels:
                    self.owners.setdefault(("budget", level, ""), check)
                    if record is None:
                        duration, anchor = check.budget_duration, None
                    else:
                        duration, anchor = record.budget_duration, record.created_at
                    levels[counter] = (level, label, duration, anchor, check.calendar_aligned)
        for counter, (level, label, duration, anchor, aligned) in levels.items():
            limit = merged.limit(counter)
            if duration is None:
                self._static.append(BudgetScope(counter, level, label, limit, None))
            else:
                self._timed.append((counter, level, label, limit, duration, anchor, aligned))
        # End users: the tightest end-user budget among the checks, with that check's period.
        limited = [c for c in checks if c.max_end_user_budget is not None]
        chosen = min(limited, key=lambda c: to_nano(c.max_end_user_budget) or 0, default=None)
        chosen = chosen or (checks[0] if checks else None)
        if chosen is not None:
            self._end_user = (chosen, to_nano(chosen.max_end_user_budget))
            self.owners.setdefault(("budget", "end_user", ""), chosen)

    def budget_scopes(
        self, end_user: str | None, model: str | None, now: float, customer: Any = None
    ) -> tuple[BudgetScope, ...]:
        """Every budget level a request is charged to, limited or not (spend is tracked).

        A registered customer (`CustomerRecord`) named as the end user brings its own budget
        and period in place of the stack's end-user budget.
        """
        scopes = [*self._static, *(timed_scope(timed, now) for timed in self._timed)]
        if self._model is not None and model:
            scopes.extend(
                scope if isinstance(scope, BudgetScope) else timed_scope(scope, now)
                for scope in self._model_scopes(model)
            )
        if end_user and self._end_user is not None:
            check, limit = self._end_user
            key = _counters.budget("end_user", self.end_user_ns + end_user)
            duration, anchor = check.end_user_budget_duration, None
            if customer is not None and customer.max_budget is not None:
                limit, anchor = customer.max_budget, customer.created_at
                duration = customer.budget_duration
            aligned = check.calendar_aligned
            end = _counters.period_end(duration, now, anchor, aligned=aligned)
            scopes.append(BudgetScope(key, "end_user", end_user, limit, end))
        return tuple(scopes)

    def model_rates(self, model: str) -> tuple[tuple[str, str, str, int, float], ...]:
        """The key's per-model windows a request for `model` hits: `(key, kind, label,
        limit, window)`, one per rate check of the kind (`model_rpm_limit`, `model_tpm_limit`).
        """
        if not self._rate_checks:
            return ()
        found = self._model_rates.get(model)
        if found is None:
            key, key_hash, masked = self._key_ref
            rates = []
            for check in self._rate_checks:
                limits = key.model_rpm_limit if check.kind == "requests" else key.model_tpm_limit
                limit = per_model(limits, model)
                if limit is not None:
                    ident = f"key:{key_hash}:{base_model(model)}"
                    counter = _counters.rate(check.kind, check.window, "model", ident)
                    label = f"{base_model(model)} on {masked}"
                    self.owners.setdefault((check.kind, "model", label), check)
                    rates.append((counter, check.kind, label, limit, check.window))
            found = tuple(rates)
            if len(self._model_rates) >= MAX_MODELS:
                self._model_rates.clear()
            self._model_rates[model] = found
        return found

    def _model_scopes(self, model: str) -> tuple[BudgetScope | Timed, ...]:
        found = self._models.get(model)
        if found is None:
            key, key_hash, masked, check = self._model or (None, "", "", None)
            budgeted = budgeted_model(key.model_max_budget, model) if key else None
            if budgeted is None:
                found = ()
            else:
                label = f"{budgeted} on {masked}"
                self.owners.setdefault(("budget", "model", ""), check)
                counter = _counters.key_model(key_hash, budgeted)
                limit = key.model_max_budget[budgeted]
                # A budget with its own period (LiteLLM's time_period) rolls on it; the others
                # roll with the key's budget.
                duration = key.model_budget_duration.get(budgeted, key.budget_duration)
                if duration is None:
                    found = (BudgetScope(counter, "model", label, limit, None),)
                else:
                    aligned = check.calendar_aligned
                    found = ((counter, "model", label, limit, duration, key.created_at,
                              aligned),)  # fmt: skip
            if len(self._models) >= MAX_MODELS:
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
