"""The admin HTTP API: virtual keys, users, teams, spend, and the hosted BudgetManager protocol.

Bodies and field names follow LiteLLM's proxy (`/key/generate`, `/user/new`, …), so a client
written for it can point at an llmfence app. Every route needs the master key. A plain key is
shown once, in the response that creates it, and never again: everything else shows its masked
form.

```python
fence.install(app, admin=True)              # the routes, beside the middleware stack
app.mount("/admin", admin_app(fence))       # or as a separate app
```
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmfence._core.auth import api_key_from_headers
from llmfence._duration import parse_duration
from llmfence._money import nano_to_decimal, nano_to_usd, usd_to_nano
from llmfence.exceptions import ConfigurationError, InvalidRequestError, LLMFenceError
from llmfence.stores import BudgetScope, KeyRecord, TeamRecord, UserRecord, hash_key

if TYPE_CHECKING:
    from llmfence._fence import Fence

__all__ = ["admin_app", "admin_routes"]

Handler = Callable[[Request, dict[str, Any]], Awaitable[Any]]

_LIMIT_FIELDS = ("rpm_limit", "tpm_limit", "max_parallel_requests")
_RECORD_FIELDS = (
    "max_budget",
    "budget_duration",
    *_LIMIT_FIELDS,
    "models",
    "metadata",
)
_KEY_FIELDS = (
    *_RECORD_FIELDS,
    "user_id",
    "team_id",
    "key_alias",
    "duration",
    "key",
    "model_max_budget",
)


class _AdminError(LLMFenceError):
    def __init__(self, status: int, code: str, kind: str, message: str) -> None:
        super().__init__(message)
        self.status_code = status
        self.code = code
        self.type = kind


def _not_found(what: str) -> _AdminError:
    return _AdminError(404, "not_found", "invalid_request_error", f"{what} was not found.")


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat().replace("+00:00", "Z")


def _usd(nano: int | None) -> float | None:
    return None if nano is None else nano_to_usd(nano)


# -- validation ------------------------------------------------------------------------------


def _fields(body: Mapping[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
    """Validate the known fields of a body; the values in storage form (money in nano-USD)."""
    unknown = sorted(set(body) - set(allowed) - {"key", "keys", "user_id", "team_id"})
    if unknown:
        raise InvalidRequestError(f"Unknown field {unknown[0]!r}.", param=unknown[0])
    out: dict[str, Any] = {}
    for name in allowed:
        if name not in body or body[name] is None:
            continue
        value = body[name]
        if name == "max_budget":
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise InvalidRequestError("'max_budget' must be a number ≥ 0.", param=name)
            out[name] = usd_to_nano(value)
        elif name in _LIMIT_FIELDS:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequestError(f"'{name}' must be an integer ≥ 0.", param=name)
            out[name] = value
        elif name in ("budget_duration", "duration"):
            if not isinstance(value, str):
                raise InvalidRequestError(f"'{name}' must be a string like '30d'.", param=name)
            try:
                parse_duration(value)
            except ConfigurationError as error:
                raise InvalidRequestError(str(error), param=name) from error
            out[name] = value
        elif name == "models":
            if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
                raise InvalidRequestError("'models' must be an array of strings.", param=name)
            out[name] = tuple(value)
        elif name in ("metadata", "model_max_budget"):
            if not isinstance(value, dict):
                raise InvalidRequestError(f"'{name}' must be an object.", param=name)
            if name == "model_max_budget":
                if not all(
                    isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
                    for v in value.values()
                ):
                    raise InvalidRequestError("'model_max_budget' values must be ≥ 0.", param=name)
                value = {m: usd_to_nano(v) for m, v in value.items()}
            out[name] = value
        else:  # ids, aliases, the key itself
            if not isinstance(value, str) or not value or len(value) > 256:
                raise InvalidRequestError(f"'{name}' must be a non-empty string.", param=name)
            out[name] = value
    return out


def _checked_key(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("sk-") or len(value) < 20:
        raise InvalidRequestError(
            "'key' must start with 'sk-' and be at least 20 characters long.", param="key"
        )
    return value


# -- the routes ------------------------------------------------------------------------------


def admin_routes(fence: Fence) -> list[Route]:
    """The admin API as Starlette routes, for `app.router.routes.extend(...)` or a `Mount`.

    Args:
        fence: The fence whose store, key cache and budgets the routes manage.
    """
    store = fence.store
    authenticator = fence.authenticator

    def route(path: str, method: str, handler: Handler) -> Route:
        async def endpoint(request: Request) -> Response:
            try:
                api_key = api_key_from_headers(request.headers)
                if not api_key:
                    raise _AdminError(
                        401,
                        "invalid_api_key",
                        "invalid_request_error",
                        "The admin API needs the master key.",
                    )
                if not authenticator.is_master(api_key):
                    raise _AdminError(
                        403,
                        "forbidden",
                        "permission_error",
                        "Only the master key may use the admin API.",
                    )
                body: dict[str, Any] = {}
                if method == "POST":
                    try:
                        body = json.loads(
                            await request.body() or b"{}", parse_constant=_reject_constant
                        )
                    except (ValueError, RecursionError) as error:
                        raise InvalidRequestError("The body is not valid JSON.") from error
                    if not isinstance(body, dict):
                        raise InvalidRequestError("The body must be a JSON object.")
                else:
                    body = dict(request.query_params)
                return JSONResponse(await handler(request, body))
            except LLMFenceError as error:
                return JSONResponse(error.to_openai(), status_code=error.status_code)

        return Route(path, endpoint, methods=[method])

    async def key_info(record: KeyRecord) -> dict[str, Any]:
        scope = BudgetScope(
            f"key:{record.key_hash}",
            "key",
            record.key_masked,
            record.max_budget,
            _period_end(fence, record.budget_duration, record.created_at),
        )
        [state] = await store.budgets([scope], fence.clock())
        return {
            "key_name": record.key_masked,
            "key_alias": record.key_alias,
            "spend": nano_to_usd(state.spent),
            "total_spend": nano_to_usd(state.total),
            "max_budget": _usd(record.max_budget),
            "budget_duration": record.budget_duration,
            "budget_reset_at": _iso(state.resets_at) if record.budget_duration else None,
            "model_max_budget": {m: nano_to_usd(v) for m, v in record.model_max_budget.items()},
            "rpm_limit": record.rpm_limit,
            "tpm_limit": record.tpm_limit,
            "max_parallel_requests": record.max_parallel_requests,
            "models": list(record.models),
            "user_id": record.user_id,
            "team_id": record.team_id,
            "expires": _iso(record.expires),
            "metadata": dict(record.metadata),
            "created_at": _iso(record.created_at),
        }

    async def generate(body: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
        fields = {**defaults, **_fields(body, _KEY_FIELDS)}
        if "key" in body:
            fields["key"] = _checked_key(body["key"])
        money = {k: fields.pop(k) for k in ("max_budget", "model_max_budget") if k in fields}
        budget = money.get("max_budget")
        try:
            plain, record = await fence.generate_key(
                **fields,
                max_budget=None if budget is None else nano_to_decimal(budget),
                model_max_budget={
                    m: nano_to_decimal(v) for m, v in money.get("model_max_budget", {}).items()
                },
            )
        except ConfigurationError as error:
            raise InvalidRequestError(str(error), param="key") from error
        return {"key": plain, "expires": _iso(record.expires), **(await key_info(record))}

    async def key_generate(request: Request, body: dict[str, Any]) -> Any:
        return await generate(body, {})

    async def find_key(value: object) -> KeyRecord:
        if not isinstance(value, str) or not value:
            raise InvalidRequestError("'key' is required.", param="key")
        record = await store.get_key(hash_key(value))
        if record is None:
            raise _not_found("The key")
        return record

    async def key_info_route(request: Request, body: dict[str, Any]) -> Any:
        record = await find_key(body.get("key"))
        return {"key": record.key_masked, "info": await key_info(record)}

    async def key_update(request: Request, body: dict[str, Any]) -> Any:
        record = await find_key(body.get("key"))
        changes = _fields(
            {k: v for k, v in body.items() if k != "key"},
            tuple(f for f in _KEY_FIELDS if f != "key"),
        )
        if "duration" in changes:
            changes["expires"] = parse_duration(changes.pop("duration")).period_end(fence.clock())
        updated = await store.update_key(record.key_hash, changes)
        authenticator.invalidate_key(record.key_hash)
        if updated is None:
            raise _not_found("The key")
        return {"key": updated.key_masked, "info": await key_info(updated)}

    async def key_delete(request: Request, body: dict[str, Any]) -> Any:
        keys = body.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise InvalidRequestError("'keys' must be an array of keys.", param="keys")
        records = [await find_key(key) for key in keys]
        for record in records:
            await store.delete_key(record.key_hash)
            authenticator.invalidate_key(record.key_hash)
        return {"deleted_keys": [record.key_masked for record in records]}

    def limits_info(record: UserRecord | TeamRecord) -> dict[str, Any]:
        return {
            "max_budget": _usd(record.max_budget),
            "budget_duration": record.budget_duration,
            **{name: getattr(record, name) for name in _LIMIT_FIELDS},
            "models": list(record.models),
            "metadata": dict(record.metadata),
            "created_at": _iso(record.created_at),
        }

    async def spend_of(level: str, ident: str, record: UserRecord | TeamRecord) -> dict[str, Any]:
        scope = BudgetScope(
            f"{level}:{ident}",
            level,
            ident,
            record.max_budget,
            _period_end(fence, record.budget_duration, record.created_at),
        )
        [state] = await store.budgets([scope], fence.clock())
        return {
            "spend": nano_to_usd(state.spent),
            "total_spend": nano_to_usd(state.total),
            "budget_reset_at": _iso(state.resets_at) if record.budget_duration else None,
        }

    async def user_new(request: Request, body: dict[str, Any]) -> Any:
        fields = _fields(body, (*_RECORD_FIELDS, "user_id", "team_id", "key_alias", "duration"))
        user_id = fields.pop("user_id", None) or str(uuid.uuid4())
        key_fields: dict[str, Any] = {
            k: fields.pop(k) for k in ("key_alias", "duration") if k in fields
        }
        try:
            record = await fence.new_user(user_id, **_usd_fields(fields))
        except ConfigurationError as error:
            raise _AdminError(400, "user_exists", "invalid_request_error", str(error)) from error
        key = await generate({"user_id": user_id, **key_fields}, {})
        return {
            **key,
            "user_id": user_id,
            "team_id": record.team_id,
            "max_budget": _usd(record.max_budget),
        }

    async def record_info(
        level: str, ident: str, record: UserRecord | TeamRecord, keys: list[KeyRecord]
    ) -> dict[str, Any]:
        info = {
            f"{level}_id": ident,
            **limits_info(record),
            **(await spend_of(level, ident, record)),
        }
        if isinstance(record, UserRecord):
            info["team_id"] = record.team_id
        return {
            f"{level}_id": ident,
            f"{level}_info": info,
            "keys": [await key_info(key) for key in keys],
        }

    async def user_info(request: Request, body: dict[str, Any]) -> Any:
        user_id = body.get("user_id")
        record = await store.get_user(user_id) if isinstance(user_id, str) else None
        if record is None:
            raise _not_found("The user")
        keys = await store.list_keys(user_id=record.user_id)
        return await record_info("user", record.user_id, record, keys)

    async def team_new(request: Request, body: dict[str, Any]) -> Any:
        fields = _fields(body, (*_RECORD_FIELDS, "team_id", "team_alias"))
        team_id = fields.pop("team_id", None) or str(uuid.uuid4())
        alias = fields.pop("team_alias", None)
        if alias is not None:
            fields["metadata"] = {**fields.get("metadata", {}), "team_alias": alias}
        try:
            record = await fence.new_team(team_id, **_usd_fields(fields))
        except ConfigurationError as error:
            raise _AdminError(400, "team_exists", "invalid_request_error", str(error)) from error
        return {"team_id": team_id, **limits_info(record)}

    async def team_info(request: Request, body: dict[str, Any]) -> Any:
        team_id = body.get("team_id")
        record = await store.get_team(team_id) if isinstance(team_id, str) else None
        if record is None:
            raise _not_found("The team")
        keys = await store.list_keys(team_id=record.team_id)
        return await record_info("team", record.team_id, record, keys)

    async def spend_logs(request: Request, body: dict[str, Any]) -> Any:
        key = body.get("api_key") or body.get("key")
        records = await store.spend_records(
            key_hash=hash_key(key) if key else None,
            user_id=body.get("user_id"),
            team_id=body.get("team_id"),
            model=body.get("model"),
            start=_time_param(body, "start_date"),
            end=_time_param(body, "end_date"),
            limit=_int_param(body, "limit", 1000),
        )
        return [
            {
                "request_id": r.request_id,
                "api_key": r.key_masked,
                "model": r.model,
                "spend": nano_to_usd(r.cost),
                "prompt_tokens": r.input_tokens,
                "completion_tokens": r.output_tokens,
                "total_tokens": r.input_tokens + r.output_tokens,
                "cached_tokens": r.cached_tokens,
                "user": r.user_id,
                "team_id": r.team_id,
                "end_user": r.end_user,
                "startTime": _iso(r.timestamp),
                "status": r.status,
                "provenance": r.provenance,
                "price_source": r.price_source,
                "latency_ms": r.latency_ms,
                "path": r.path,
            }
            for r in records
        ]

    async def global_spend(request: Request, body: dict[str, Any]) -> Any:
        check = fence.budget_check
        scope = BudgetScope(
            "global", "global", "global", None, _period_end(fence, check.budget_duration)
        )
        [state] = await store.budgets([scope], fence.clock())
        return {
            "spend": nano_to_usd(state.spent),
            "max_budget": check.max_budget,
            "total_spend": nano_to_usd(state.total),
        }

    async def get_budget(request: Request, body: dict[str, Any]) -> Any:
        name = body.get("project_name")
        if not isinstance(name, str) or not name:
            return {"status": "error", "message": "'project_name' is required."}
        document = await store.get_project(name)
        return {"status": "error"} if document is None else {"status": "success", "data": document}

    async def set_budget(request: Request, body: dict[str, Any]) -> Any:
        name, user_dict = body.get("project_name"), body.get("user_dict")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("'project_name' is required.", param="project_name")
        if not isinstance(user_dict, dict):
            raise InvalidRequestError("'user_dict' must be an object.", param="user_dict")
        await store.set_project(name, user_dict)
        return {"status": "success"}

    return [
        route("/key/generate", "POST", key_generate),
        route("/key/info", "GET", key_info_route),
        route("/key/update", "POST", key_update),
        route("/key/delete", "POST", key_delete),
        route("/user/new", "POST", user_new),
        route("/user/info", "GET", user_info),
        route("/team/new", "POST", team_new),
        route("/team/info", "GET", team_info),
        route("/spend/logs", "GET", spend_logs),
        route("/global/spend", "GET", global_spend),
        route("/get_budget", "POST", get_budget),
        route("/set_budget", "POST", set_budget),
    ]


def admin_app(fence: Fence) -> Starlette:
    """The admin API as a Starlette app of its own, to mount anywhere."""
    return Starlette(routes=admin_routes(fence))


def _usd_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Validated fields as `Fence`'s creation methods take them: budgets back in USD (exact)."""
    if fields.get("max_budget") is not None:
        return {**fields, "max_budget": nano_to_decimal(fields["max_budget"])}
    return fields


def _reject_constant(name: str) -> None:
    # NaN and Infinity are not JSON: no budget, limit or stored document may hold them.
    raise ValueError(f"{name} is not valid JSON")


def _period_end(fence: Fence, duration: str | None, anchor: float = 0.0) -> float | None:
    """When a level's current period ends, as the budget guard computes it."""
    if duration is None:
        return None
    parsed = parse_duration(duration, aligned=fence.budget_check.calendar_aligned)
    return parsed.period_end(fence.clock(), anchor or None)


def _time_param(params: Mapping[str, Any], name: str) -> float | None:
    value = params.get(name)
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as error:
        raise InvalidRequestError(
            f"'{name}' must be a date, a datetime or a Unix time.", param=name
        ) from error
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if name == "end_date" and len(str(value)) == 10:
        return moment.timestamp() + 86_400 - 1e-6  # a date ends at the end of its day
    return moment.timestamp()


def _int_param(params: Mapping[str, Any], name: str, default: int) -> int:
    value = params.get(name)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except (TypeError, ValueError) as error:
        raise InvalidRequestError(f"'{name}' must be an integer.", param=name) from error
    if number < 1:
        raise InvalidRequestError(f"'{name}' must be at least 1.", param=name)
    return number
