"""What the admin API reads from a request and writes in its responses, apart from its routes.

Responses keep LiteLLM's proxy shapes (`spend`, `max_budget` in USD as floats, ISO 8601 times
with a `Z`, the masked key as `key_name`), so a client written for the proxy reads them. A plain
key never appears here: records hold only its hash and masked form.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request

from ._core.auth import Authenticator, Principal
from ._json import loads_strict
from ._money import nano_to_decimal, nano_to_usd
from .exceptions import InvalidRequestError, LLMFenceError
from .stores import BudgetState, KeyRecord, SpendRecord, TeamRecord, UserRecord, hash_key

__all__ = [
    "MAX_INT_PARAM",
    "AdminError",
    "admin_caller",
    "as_usd",
    "int_param",
    "iso",
    "key_view",
    "limits_view",
    "not_found",
    "own_body",
    "read_body",
    "spend_log_view",
    "spend_view",
    "time_param",
    "usd",
]

_DAY = 86_400


class AdminError(LLMFenceError):
    """An admin API refusal with its own status, code and type (auth, not found, conflicts)."""

    def __init__(self, status: int, code: str, kind: str, message: str) -> None:
        super().__init__(message)
        self.status_code = status
        self.code = code
        self.type = kind


def not_found(what: str) -> AdminError:
    """A 404 for a key, user or team that does not exist."""
    return AdminError(404, "not_found", "invalid_request_error", f"{what} was not found.")


async def admin_caller(
    authenticator: Authenticator, api_key: str | None, own: str | None
) -> Principal | None:
    """Who calls an admin route: `None` for the master key; on a route a key may use for its
    own records (`own`), the calling key's principal.

    Raises:
        AdminError: No key (401), or a key other than the master on a master-only route (403).
        LLMFenceError: On a self-service route, a key that is unknown, expired or blocked (401).
    """
    if not api_key:
        raise AdminError(
            401, "invalid_api_key", "invalid_request_error", "The admin API needs the master key."
        )
    if authenticator.is_master(api_key):
        return None
    if own is None:
        raise AdminError(
            403, "forbidden", "permission_error", "Only the master key may use the admin API."
        )
    return await authenticator.authenticate(api_key)


def own_body(body: dict[str, Any], api_key: str, caller: Principal, field: str) -> dict[str, Any]:
    """A self-service request as its route reads it: `field` (`key`, `api_key`) is the calling
    key, by default, and may name no other key; `user_id` and `team_id`, if given, are its own.

    Raises:
        AdminError: The body names another key, user or team (403; never echoing a key).
    """
    given = body.get(field) or body.get("key")
    if given not in (None, ""):
        if not isinstance(given, str):
            raise InvalidRequestError(f"'{field}' must be a key.", param=field)
        # The key's own hash: a regenerated key's counters (`caller.key_hash`) are the old one's.
        own = caller.key.key_hash if caller.key is not None else caller.key_hash
        if not hmac.compare_digest(hash_key(given).encode(), (own or "").encode()):
            raise _not_yours("another key's")
    for name, mine in (("user_id", caller.user_id), ("team_id", caller.team_id)):
        if body.get(name) not in (None, "", mine):
            raise _not_yours(f"another {name[:-3]}'s")
    return {**{k: v for k, v in body.items() if k != "key"}, field: api_key}


def _not_yours(whose: str) -> AdminError:
    return AdminError(
        403,
        "forbidden",
        "permission_error",
        f"A key may read only its own info and spend, not {whose}; the master key reads all.",
    )


async def read_body(request: Request) -> dict[str, Any]:
    """A POST's JSON object, or a GET's query parameters.

    Raises:
        InvalidRequestError: The body is not a JSON object (NaN and Infinity are not JSON: no
            budget, limit or stored document may hold them).
    """
    if request.method != "POST":
        return dict(request.query_params)
    try:
        body = loads_strict(await request.body() or b"{}")
    except (ValueError, RecursionError) as error:
        raise InvalidRequestError("The body is not valid JSON.") from error
    if not isinstance(body, dict):
        raise InvalidRequestError("The body must be a JSON object.")
    return body


def iso(moment: float | None) -> str | None:
    """Unix time as ISO 8601 in UTC with a `Z`, or None."""
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


def usd(nano: int | None) -> float | None:
    """Nano-USD as a float of USD, or None."""
    return None if nano is None else nano_to_usd(nano)


def as_usd(fields: dict[str, Any]) -> dict[str, Any]:
    """Checked fields as `Fence`'s creation methods take them: budgets back in USD (exact)."""
    out = dict(fields)
    for name in ("max_budget", "soft_budget"):
        if out.get(name) is not None:
            out[name] = nano_to_decimal(out[name])
    if "model_max_budget" in out:
        periods = out.pop("model_budget_duration", {})
        out["model_max_budget"] = {
            m: {"budget_limit": nano_to_decimal(v), "time_period": periods[m]}
            if m in periods
            else nano_to_decimal(v)
            for m, v in out["model_max_budget"].items()
        }
    return out


def spend_view(state: BudgetState, duration: str | None) -> dict[str, Any]:
    """A level's spend in its current period, all time, and when the period resets."""
    return {
        "spend": nano_to_usd(state.spent),
        "total_spend": nano_to_usd(state.total),
        "budget_reset_at": iso(state.resets_at) if duration else None,
    }


def key_view(record: KeyRecord, state: BudgetState) -> dict[str, Any]:
    """A key's info (`/key/info`'s `info`), with its budget's state."""
    spend = spend_view(state, record.budget_duration)
    return {
        "key_name": record.key_masked,
        "key_alias": record.key_alias,
        "spend": spend["spend"],
        "total_spend": spend["total_spend"],
        "max_budget": usd(record.max_budget),
        "soft_budget": usd(record.soft_budget),
        "budget_duration": record.budget_duration,
        "budget_reset_at": spend["budget_reset_at"],
        "model_max_budget": {
            m: {"budget_limit": nano_to_usd(v), "time_period": record.model_budget_duration[m]}
            if m in record.model_budget_duration
            else nano_to_usd(v)
            for m, v in record.model_max_budget.items()
        },
        "model_rpm_limit": dict(record.model_rpm_limit),
        "model_tpm_limit": dict(record.model_tpm_limit),
        "rpm_limit": record.rpm_limit,
        "tpm_limit": record.tpm_limit,
        "rpd_limit": record.rpd_limit,
        "tpd_limit": record.tpd_limit,
        "max_parallel_requests": record.max_parallel_requests,
        "models": list(record.models),
        "user_id": record.user_id,
        "team_id": record.team_id,
        "expires": iso(record.expires),
        "metadata": dict(record.metadata),
        "created_at": iso(record.created_at),
        "blocked": record.blocked,
        "budget_id": record.budget_id,
    }


def limits_view(record: UserRecord | TeamRecord) -> dict[str, Any]:
    """A user's or team's budget, limits, models and metadata."""
    return {
        "max_budget": usd(record.max_budget),
        "soft_budget": usd(record.soft_budget),
        "budget_duration": record.budget_duration,
        "rpm_limit": record.rpm_limit,
        "tpm_limit": record.tpm_limit,
        "rpd_limit": record.rpd_limit,
        "tpd_limit": record.tpd_limit,
        "max_parallel_requests": record.max_parallel_requests,
        "models": list(record.models),
        "metadata": dict(record.metadata),
        "created_at": iso(record.created_at),
    }


def spend_log_view(record: SpendRecord) -> dict[str, Any]:
    """One entry of `/spend/logs`, in LiteLLM's field names."""
    return {
        "request_id": record.request_id,
        "api_key": record.key_masked,
        "model": record.model,
        "spend": nano_to_usd(record.cost),
        "prompt_tokens": record.input_tokens,
        "completion_tokens": record.output_tokens,
        "total_tokens": record.input_tokens + record.output_tokens,
        "cached_tokens": record.cached_tokens,
        "user": record.user_id,
        "team_id": record.team_id,
        "end_user": record.end_user,
        "startTime": iso(record.timestamp),
        "status": record.status,
        "provenance": record.provenance,
        "price_source": record.price_source,
        "latency_ms": record.latency_ms,
        "path": record.path,
    }


def time_param(params: Mapping[str, Any], name: str) -> float | None:
    """A time filter: Unix seconds, an ISO date or datetime (UTC unless it says), or None.

    A bare date as `end_date` means the end of that day.

    Raises:
        InvalidRequestError: None of those.
    """
    value = params.get(name)
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        pass
    else:
        if not math.isfinite(number):
            raise InvalidRequestError(f"'{name}' must be a finite Unix time.", param=name)
        return number
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as error:
        raise InvalidRequestError(
            f"'{name}' must be a date, a datetime or a Unix time.", param=name
        ) from error
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if name == "end_date" and len(str(value)) == 10:
        return moment.timestamp() + _DAY - 1e-6  # a date ends at the end of its day
    return moment.timestamp()


MAX_INT_PARAM = 1_000_000
"""The largest integer parameter (`limit`) read: more is what no store can answer with."""


def int_param(params: Mapping[str, Any], name: str, default: int) -> int:
    """A positive integer parameter, or `default` if absent.

    Raises:
        InvalidRequestError: Not an integer from 1 to `MAX_INT_PARAM`.
    """
    value = params.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError) as error:
        raise InvalidRequestError(f"'{name}' must be an integer.", param=name) from error
    if not 1 <= number <= MAX_INT_PARAM:
        raise InvalidRequestError(f"'{name}' must be from 1 to {MAX_INT_PARAM}.", param=name)
    return number
