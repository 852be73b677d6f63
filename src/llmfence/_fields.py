"""The fields keys, users and teams share, and the key-only ones: checked once, for every caller.

Two doors lead to a key, user or team record: `Fence`'s Python methods (`generate_key`,
`new_user`, `new_team`) and the admin HTTP API, which takes the same fields as JSON. Both check
them here, so a value one accepts the other accepts too, and both store it in the same form:
money as integer nano-USD, limits as non-negative ints, durations as the strings
`parse_duration` reads. The Python door raises `ConfigurationError`; the JSON door first checks
the JSON types and raises `InvalidRequestError` naming the field (`param`), which the admin API
answers with an OpenAI-shaped 400 (`_fields_json`). The options of `Fence` and the middlewares
are checked by `_options`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from decimal import Decimal
from typing import Any

from ._counters import period_end
from ._duration import parse_duration
from ._money import usd_to_nano
from .exceptions import ConfigurationError

__all__ = [
    "KEY_FIELDS",
    "LIMIT_FIELDS",
    "LOOKUP_FIELDS",
    "MAX_BUDGET_USD",
    "MAX_DAILY_LIMIT",
    "MAX_METADATA_BYTES",
    "MAX_NAME_LENGTH",
    "MIN_KEY_LENGTH",
    "RECORD_FIELDS",
    "TEAM_FIELDS",
    "USER_FIELDS",
    "ModelBudget",
    "budget_amount",
    "budget_nano",
    "checked_duration",
    "checked_key",
    "checked_limit",
    "checked_metadata",
    "checked_name",
    "daily_limit",
    "key_expiry",
    "limit_fields",
    "model_budget_periods",
    "model_budgets",
    "model_limits",
]

LIMIT_FIELDS = ("rpm_limit", "tpm_limit", "rpd_limit", "tpd_limit", "max_parallel_requests")
"""The rate and concurrency limits of a key, user or team."""
RECORD_FIELDS = (
    "max_budget",
    "soft_budget",
    "budget_duration",
    *LIMIT_FIELDS,
    "models",
    "metadata",
)
"""The fields keys, users and teams share."""
KEY_FIELDS = (
    *RECORD_FIELDS,
    "user_id",
    "team_id",
    "key_alias",
    "duration",
    "key",
    "model_max_budget",
    "model_rpm_limit",
    "model_tpm_limit",
    "budget_id",
)
"""The fields of a key (`/key/generate`, `/key/update`)."""
USER_FIELDS = (*RECORD_FIELDS, "user_id", "team_id", "key_alias", "duration", "budget_id")
"""The fields of `/user/new` (the alias and duration are its first key's)."""
TEAM_FIELDS = (*RECORD_FIELDS, "team_id", "team_alias")
"""The fields of `/team/new`."""
MIN_KEY_LENGTH = 20
"""The shortest caller-chosen key accepted (`sk-` and 17 more characters)."""

# Fields any admin body may carry besides its own: the routes read them to find a record.
LOOKUP_FIELDS = frozenset({"key", "keys", "user_id", "team_id", "create_missing"})
MAX_NAME_LENGTH = 256
"""The longest id, alias or model name accepted: each names records and counters in the store."""
MAX_METADATA_BYTES = 16 * 1024
"""The largest `metadata` accepted, as compact JSON: it is kept with the record, in the cache."""
MAX_BUDGET_USD = 1_000_000_000
"""The largest budget accepted, in USD: larger ones are a typo or an attempt at an overflow."""


# -- the Python door: typed arguments, ConfigurationError --------------------------------------


def checked_limit(name: str, value: int | None) -> int | None:
    """`value` if it is a valid limit (an int ≥ 0, or None), else a `ConfigurationError`."""
    # bool is an int subclass, and `True` is no limit.
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigurationError(f"{name} must be a non-negative int or None, not {value!r}")
    return value


MAX_DAILY_LIMIT = 100_000_000
"""The largest daily limit: a day's bucket stays exact in Redis's Lua numbers below it."""


def daily_limit(name: str, value: int | None) -> int | None:
    """A per-day limit: an int from 0 to `MAX_DAILY_LIMIT`, or None.

    Raises:
        ConfigurationError: It is not.
    """
    checked = checked_limit(name, value)
    if checked is not None and checked > MAX_DAILY_LIMIT:
        raise ConfigurationError(f"{name} must be at most {MAX_DAILY_LIMIT:_}, not {value!r}")
    return checked


def budget_nano(usd: float | Decimal | str | None) -> int | None:
    """A budget in USD as nano-USD, or None for none.

    Raises:
        ConfigurationError: The amount is not a finite number, or is negative, or is larger
            than `MAX_BUDGET_USD`.
    """
    return None if usd is None else budget_amount(usd)


def checked_duration(value: str | None, name: str | None = None) -> str | None:
    """`value` if `parse_duration` reads it (or it is None), else a `ConfigurationError`
    (whose message starts with `name`, the argument, when given)."""
    if value is not None:
        try:
            parse_duration(value)
        except ConfigurationError as error:
            if name is None:
                raise
            raise ConfigurationError(f"{name}: {error}") from None
    return value


def checked_name(name: str, value: object) -> str:
    """An id, alias or model name: a non-empty string of at most `MAX_NAME_LENGTH` characters
    that is valid Unicode (no lone surrogates: they have no UTF-8 form, so no name in Redis).

    Raises:
        ConfigurationError: It is not.
    """
    if not isinstance(value, str) or not value or len(value) > MAX_NAME_LENGTH:
        raise ConfigurationError(
            f"{name} must be a non-empty string of at most {MAX_NAME_LENGTH} characters"
        )
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ConfigurationError(f"{name} must be valid Unicode text") from None
    return value


def checked_metadata(name: str, value: Mapping[str, Any] | None) -> dict[str, Any]:
    """Free-form record metadata: JSON of at most `MAX_METADATA_BYTES`, valid Unicode, finite.

    Raises:
        ConfigurationError: It is not.
    """
    metadata = dict(value or {})
    try:
        size = len(json.dumps(metadata, ensure_ascii=False, allow_nan=False).encode())
    except UnicodeEncodeError:
        raise ConfigurationError(f"{name} must be valid Unicode text") from None
    except (TypeError, ValueError, RecursionError):
        raise ConfigurationError(f"{name} must be JSON with finite numbers") from None
    if size > MAX_METADATA_BYTES:
        raise ConfigurationError(f"{name} must be at most {MAX_METADATA_BYTES} bytes of JSON")
    return metadata


def checked_key(key: str) -> str:
    """A caller-chosen key, if it starts with `sk-` and has at least `MIN_KEY_LENGTH` characters.

    Raises:
        ConfigurationError: It does not.
    """
    if not key.startswith("sk-") or len(key) < MIN_KEY_LENGTH:
        raise ConfigurationError("a key must start with 'sk-' and be at least 20 characters")
    return key


ModelBudget = float | Decimal | str | Mapping[str, Any]
"""A per-model budget: USD, or LiteLLM's `{"budget_limit": USD, "time_period": "1d"}`."""


def model_budgets(budgets: Mapping[str, ModelBudget] | None) -> dict[str, int]:
    """A key's per-model budgets (`model_max_budget`), in USD, as nano-USD.

    Each is an amount, or LiteLLM's `{"budget_limit": amount, "time_period": duration}` (see
    `model_budget_periods` for the periods).

    Raises:
        ConfigurationError: A budget is not a finite number, or is negative, or an object
            without `budget_limit`.
    """
    out = {}
    for model, value in (budgets or {}).items():
        checked_name("a model_max_budget model", model)
        if isinstance(value, Mapping):
            if value.get("budget_limit") is None:
                raise ConfigurationError(f"model_max_budget[{model!r}] needs a budget_limit")
            value = value["budget_limit"]
        out[model] = budget_amount(value)
    return out


def model_budget_periods(budgets: Mapping[str, ModelBudget] | None) -> dict[str, str]:
    """The periods per-model budgets give themselves (`time_period`); others use the key's.

    Raises:
        ConfigurationError: A period `parse_duration` does not read.
    """
    out = {}
    for model, value in (budgets or {}).items():
        if isinstance(value, Mapping) and value.get("time_period") is not None:
            period = value["time_period"]
            if not isinstance(period, str):
                raise ConfigurationError(f"model_max_budget[{model!r}].time_period: a duration")
            out[model] = checked_duration(period) or period
    return out


def model_limits(name: str, limits: Mapping[str, int] | None) -> dict[str, int]:
    """Per-model rate limits (`model_rpm_limit`, `model_tpm_limit`): model → int ≥ 0.

    Raises:
        ConfigurationError: A limit that is not an int ≥ 0.
    """
    out = {}
    for model, limit in (limits or {}).items():
        checked_name(f"a {name} model", model)
        checked = checked_limit(f"{name}[{model!r}]", limit)
        if checked is None:
            raise ConfigurationError(f"{name}[{model!r}] must be an int ≥ 0")
        out[str(model)] = checked
    return out


def key_expiry(duration: str | None, now: float) -> float | None:
    """When a key created (or renewed) at `now` with lifetime `duration` expires; None: never.

    Raises:
        ConfigurationError: `parse_duration` does not read the duration.
    """
    return period_end(duration, now)


def limit_fields(
    max_budget: float | Decimal | None,
    budget_duration: str | None,
    rpm_limit: int | None,
    tpm_limit: int | None,
    max_parallel_requests: int | None,
    models: Iterable[str],
    metadata: Mapping[str, Any] | None,
    *,
    created_at: float,
    rpd_limit: int | None = None,
    tpd_limit: int | None = None,
    soft_budget: float | Decimal | None = None,
) -> dict[str, Any]:
    """The fields keys, users and teams share, checked, in the form their records store.

    Args:
        max_budget: USD, or None for no budget.
        budget_duration: How often the budget resets (`"30d"`, `"monthly"`…), or None.
        rpm_limit: Requests per minute, or None.
        tpm_limit: Tokens per minute, or None.
        max_parallel_requests: Requests at once, or None.
        models: The models (or access groups) allowed; empty allows all.
        metadata: Free-form data kept with the record.
        created_at: When the record is created: its budget periods roll from then.
        rpd_limit: Requests per day, or None.
        tpd_limit: Tokens per day, or None (at most `MAX_DAILY_LIMIT`).
        soft_budget: USD at which spend is reported (budget alerts), or None; checked as
            `max_budget` is.

    Returns:
        Keyword arguments for `KeyRecord`, `UserRecord` and `TeamRecord`: `max_budget` and
        `soft_budget` in nano-USD, `models` a tuple, `metadata` a dict, and the rest as given.

    Raises:
        ConfigurationError: A budget that is negative, larger than `MAX_BUDGET_USD` or not a
            number, a duration `parse_duration` does not read, a limit that is not an int ≥ 0,
            a model name that is not a string of at most `MAX_NAME_LENGTH` characters, or
            metadata that is not JSON of at most `MAX_METADATA_BYTES`.
    """
    return {
        "max_budget": budget_nano(max_budget),
        "soft_budget": _soft_budget(soft_budget),
        "budget_duration": checked_duration(budget_duration),
        "rpm_limit": checked_limit("rpm_limit", rpm_limit),
        "tpm_limit": checked_limit("tpm_limit", tpm_limit),
        "rpd_limit": daily_limit("rpd_limit", rpd_limit),
        "tpd_limit": daily_limit("tpd_limit", tpd_limit),
        "max_parallel_requests": checked_limit("max_parallel_requests", max_parallel_requests),
        "models": tuple(checked_name("a models entry", model) for model in models),
        "metadata": checked_metadata("metadata", metadata),
        "created_at": created_at,
    }


def _soft_budget(usd: float | Decimal | None) -> int | None:
    try:
        return budget_nano(usd)
    except ConfigurationError as error:
        raise ConfigurationError(f"soft_budget: {error}") from None


def budget_amount(usd: float | Decimal | str) -> int:
    nano = usd_to_nano(usd)
    if nano < 0:
        raise ConfigurationError("a budget must not be negative")
    if nano > MAX_BUDGET_USD * 1_000_000_000:
        raise ConfigurationError(f"a budget must be at most {MAX_BUDGET_USD:_} USD")
    return nano
