"""The JSON door to keys, users, teams and BudgetManager projects: the admin API's bodies.

It checks the JSON types first and raises `InvalidRequestError` naming the field (`param`),
which the admin API answers with an OpenAI-shaped 400; values then go through the same checks
as `Fence`'s Python methods (`_fields`), so both doors accept the same values.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from decimal import Decimal
from typing import Any

from ._fields import (
    LIMIT_FIELDS,
    LOOKUP_FIELDS,
    MAX_BUDGET_USD,
    MAX_DAILY_LIMIT,
    MAX_NAME_LENGTH,
    budget_amount,
    checked_duration,
    checked_key,
    checked_limit,
    checked_metadata,
    checked_name,
    daily_limit,
    model_budget_periods,
    model_budgets,
    model_limits,
)
from .exceptions import ConfigurationError, InvalidRequestError

__all__ = ["json_fields", "json_key", "json_name", "json_project"]


def json_fields(body: Mapping[str, Any], allowed: Collection[str]) -> dict[str, Any]:
    """Check the fields of an admin API body; their values in the form records store.

    A field that is absent or `null` is left out. Besides `allowed`, a body may carry the
    fields routes find records by (`key`, `keys`, `user_id`, `team_id`); they are not checked
    unless allowed.

    Args:
        body: The parsed JSON body (or query parameters).
        allowed: The fields this route takes, e.g. `KEY_FIELDS`.

    Returns:
        The checked fields: budgets in nano-USD, `models` a tuple, durations, ids and limits
        as given.

    Raises:
        InvalidRequestError: An unknown field, or a value of the wrong type or out of range;
            `param` names the field.
    """
    unknown = sorted(set(body) - set(allowed) - LOOKUP_FIELDS)
    if unknown:
        raise InvalidRequestError(f"Unknown field {unknown[0]!r}.", param=unknown[0])
    out: dict[str, Any] = {}
    metadata = body.get("metadata")
    for name in allowed:
        value = body.get(name)
        if value is None and name in _IN_METADATA and isinstance(metadata, dict):
            value = metadata.get(name)  # where LiteLLM also takes them
        if value is not None:
            out[name] = _JSON_CHECKS.get(name, json_name)(name, value)
    if "model_max_budget" in out:
        budgets = out.pop("model_max_budget")
        out["model_max_budget"] = model_budgets(budgets)
        out["model_budget_duration"] = model_budget_periods(budgets)
    return out


def json_key(value: object) -> str:
    """A caller-chosen key from an admin body (`/key/generate`'s `key`).

    Raises:
        InvalidRequestError: Not a string starting with `sk-` of at least 20 characters.
    """
    try:
        if isinstance(value, str):
            return checked_key(value)
    except ConfigurationError:
        pass
    raise InvalidRequestError(
        "'key' must start with 'sk-' and be at least 20 characters long.", param="key"
    )


_PROJECT_AMOUNTS = ("total_budget", "current_cost")


def json_project(value: object) -> dict[str, Any]:
    """LiteLLM's `user_dict` (`/set_budget`): user → entry, kept as the project's document.

    Raises:
        InvalidRequestError: Not an object of objects; numbers that are not finite, or budgets
            and costs beyond `MAX_BUDGET_USD`; text that is not valid Unicode; nesting that no
            JSON encoder can write back.
    """
    param = "user_dict"
    if not isinstance(value, dict):
        raise InvalidRequestError(f"'{param}' must be an object.", param=param)
    try:
        json.dumps(value, ensure_ascii=False, allow_nan=False).encode()
    except UnicodeEncodeError:
        raise InvalidRequestError(f"'{param}' must be valid Unicode text.", param=param) from None
    except (ValueError, RecursionError):
        raise InvalidRequestError(
            f"'{param}' must hold finite numbers and nest at most a few levels.", param=param
        ) from None
    for user, entry in value.items():
        if not isinstance(entry, dict):
            raise InvalidRequestError(f"'{param}.{user}' must be an object.", param=param)
        for name in _PROJECT_AMOUNTS:
            amount = entry.get(name)
            if amount is not None and not (_is_number(amount) and abs(amount) <= MAX_BUDGET_USD):
                raise InvalidRequestError(
                    f"'{param}.{user}.{name}' must be a number of at most {MAX_BUDGET_USD} USD.",
                    param=param,
                )
    return value


def _is_number(value: object) -> bool:
    # JSON numbers only: bool is an int subclass, and strings are not amounts here.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json_budget(name: str, value: Any) -> int:
    try:
        if _is_number(value) and value >= 0:
            return budget_amount(value)
    except ConfigurationError:  # 1e999 is a JSON number, and an infinite float
        pass
    raise InvalidRequestError(
        f"'{name}' must be a number from 0 to {MAX_BUDGET_USD} (USD).", param=name
    )


def _json_limit(name: str, value: Any) -> int | None:
    try:
        return checked_limit(name, value)
    except ConfigurationError:
        raise InvalidRequestError(f"'{name}' must be an integer ≥ 0.", param=name) from None


def _json_daily_limit(name: str, value: Any) -> int | None:
    try:
        return daily_limit(name, value)
    except ConfigurationError:
        raise InvalidRequestError(
            f"'{name}' must be an integer from 0 to {MAX_DAILY_LIMIT}.", param=name
        ) from None


def _json_duration(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"'{name}' must be a string like '30d'.", param=name)
    try:
        checked_duration(value)
    except ConfigurationError as error:
        raise InvalidRequestError(str(error), param=name) from error
    return value


def _json_models(name: str, value: Any) -> tuple[str, ...]:
    try:
        if isinstance(value, list):
            return tuple(checked_name(name, model) for model in value)
    except ConfigurationError:
        pass
    raise InvalidRequestError(
        f"'{name}' must be an array of model names (strings of 1 to {MAX_NAME_LENGTH} characters).",
        param=name,
    )


def _json_object(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidRequestError(f"'{name}' must be an object.", param=name)
    return value


def _json_metadata(name: str, value: Any) -> dict[str, Any]:
    try:
        return checked_metadata(name, _json_object(name, value))
    except ConfigurationError as error:
        raise InvalidRequestError(f"'{name}': {error}.", param=name) from None


def _json_model_budgets(name: str, value: Any) -> dict[str, Any]:
    """Per-model budgets as given (checked): amounts, or LiteLLM's objects."""
    budgets = dict(_json_object(name, value))
    for model, budget in budgets.items():
        if isinstance(budget, dict):
            extra = set(budget) - {"budget_limit", "time_period"}
            limit = budget.get("budget_limit")
            amount = limit
            if isinstance(limit, str):  # LiteLLM's examples send "0.5": read it exactly
                try:
                    amount = Decimal(limit)
                except ArithmeticError:
                    amount = None
            if isinstance(amount, Decimal):
                valid = amount.is_finite() and amount >= 0
            else:
                valid = isinstance(amount, int | float) and _is_number(amount) and amount >= 0
            if extra or not valid:
                raise InvalidRequestError(
                    f"'{name}.{model}' must be an amount ≥ 0 or an object with budget_limit "
                    "(an amount ≥ 0) and time_period (a duration like '1d').",
                    param=name,
                )
            period = budget.get("time_period")
            if period is not None:
                _json_duration(f"{name}.{model}.time_period", period)
        elif not (_is_number(budget) and budget >= 0):
            raise InvalidRequestError(
                f"'{name}.{model}' must be an amount ≥ 0 or an object with budget_limit and "
                "time_period.",
                param=name,
            )
    try:
        model_budgets(budgets)
    except ConfigurationError as error:
        raise InvalidRequestError(
            f"'{name}': model names of 1 to {MAX_NAME_LENGTH} characters, and amounts from 0 "
            f"to {MAX_BUDGET_USD} (USD).",
            param=name,
        ) from error
    return budgets


def _json_model_limits(name: str, value: Any) -> dict[str, int]:
    limits = _json_object(name, value)
    try:
        return model_limits(name, limits)
    except ConfigurationError:
        raise InvalidRequestError(
            f"'{name}' must map model names (1 to {MAX_NAME_LENGTH} characters) to integers ≥ 0.",
            param=name,
        ) from None


def json_name(name: str, value: Any) -> str:
    """An id, alias or key from a JSON body: a string the store can name (`checked_name`).

    Raises:
        InvalidRequestError: It is not one; `param` names the field.
    """
    try:
        return checked_name(name, value)
    except ConfigurationError:
        raise InvalidRequestError(
            f"'{name}' must be a non-empty string of at most {MAX_NAME_LENGTH} characters "
            "(valid Unicode).",
            param=name,
        ) from None


_JSON_CHECKS = {
    "max_budget": _json_budget,
    "soft_budget": _json_budget,
    "budget_duration": _json_duration,
    "duration": _json_duration,
    **dict.fromkeys(LIMIT_FIELDS, _json_limit),
    "rpd_limit": _json_daily_limit,
    "tpd_limit": _json_daily_limit,
    "models": _json_models,
    "metadata": _json_metadata,
    "model_max_budget": _json_model_budgets,
    "model_rpm_limit": _json_model_limits,
    "model_tpm_limit": _json_model_limits,
}
# LiteLLM takes these at the top level or in `metadata`.
_IN_METADATA = frozenset({"model_rpm_limit", "model_tpm_limit", "model_max_budget"})
