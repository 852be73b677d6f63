"""The admin HTTP API: virtual keys, users, teams, spend, and the hosted BudgetManager protocol.

Bodies and field names follow LiteLLM's proxy (`/key/generate`, `/user/new`, …), so a client
written for it can point at an llmfence app. Every route needs the master key, except that a
key may read its own info and spend (`/key/info`, `/spend/logs`, as GET or as POST with a JSON
body, which keeps keys out of URLs and logs). A plain key is shown once, in the response that
creates it, and never again: everything else shows its masked form.

```python
fence.install(app, admin=True)              # the routes, beside the middleware stack
app.mount("/admin", admin_app(fence))       # or as a separate app
```

The routes check fields with `_fields` (as `Fence`'s own methods do), name counters and compute
periods with `_counters` (as the budget guard does), and shape responses with `_admin_views`.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmfence import _counters
from llmfence._admin_customers import customer_handlers
from llmfence._admin_keys import key_handlers
from llmfence._admin_shapes import flag
from llmfence._admin_spend import spend_handlers
from llmfence._admin_users import user_handlers
from llmfence._admin_views import (
    AdminError,
    admin_caller,
    as_usd,
    int_param,
    iso,
    key_view,
    limits_view,
    not_found,
    own_body,
    read_body,
    spend_log_view,
    spend_view,
    time_param,
    usd,
)
from llmfence._core.auth import api_key_from_headers
from llmfence._fence_ops import RecordConflictError, RecordNotFoundError, ensure_alias_free
from llmfence._fields import (
    KEY_FIELDS,
    TEAM_FIELDS,
    USER_FIELDS,
    key_expiry,
)
from llmfence._fields_json import json_fields, json_key, json_name, json_project
from llmfence.exceptions import ConfigurationError, InvalidRequestError, LLMFenceError
from llmfence.stores import BudgetScope, BudgetState, KeyRecord, TeamRecord, UserRecord, hash_key
from llmfence.ui import refusals_handler, spend_page

if TYPE_CHECKING:
    from llmfence._fence import Fence

__all__ = ["admin_app", "admin_routes"]

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def admin_routes(fence: Fence) -> list[Route]:
    """The admin API as Starlette routes, for `app.router.routes.extend(...)` or a `Mount`.

    Args:
        fence: The fence whose store, key cache and budgets the routes manage.
    """
    store = fence.store
    authenticator = fence.authenticator

    def route(path: str, method: str, handler: Handler, *, own: str | None = None) -> Route:
        """A master-key route; with `own`, also one a key may call for itself (the body's
        `own` field, the key asked about, is then the caller's), as GET and POST (a POST's
        JSON body keeps the key out of URLs and access logs)."""

        async def endpoint(request: Request) -> Response:
            try:
                api_key = api_key_from_headers(request.headers)
                caller = await admin_caller(authenticator, api_key, own)
                body = await read_body(request)
                if caller is not None and own is not None:
                    body = own_body(body, api_key or "", caller, own)
                return JSONResponse(await handler(body))
            except LLMFenceError as error:
                return JSONResponse(error.to_openai(), status_code=error.status_code)

        return Route(path, endpoint, methods=[method, "POST"] if own else [method])

    async def budget_state(
        level: str, ident: str, label: str, record: KeyRecord | UserRecord | TeamRecord
    ) -> BudgetState:
        """A level's budget as the budget guard counts it: same counter, same period."""
        now = fence.clock()
        aligned = fence.budget_check.calendar_aligned
        end = _counters.period_end(record.budget_duration, now, record.created_at, aligned=aligned)
        scope = BudgetScope(_counters.budget(level, ident), level, label, record.max_budget, end)
        [state] = await store.budgets([scope], now)
        return state

    async def key_info(record: KeyRecord) -> dict[str, Any]:
        return key_view(
            record, await budget_state("key", record.scope_id, record.key_masked, record)
        )

    async def generate(body: dict[str, Any]) -> dict[str, Any]:
        fields = json_fields(body, KEY_FIELDS)
        if "key" in body:
            fields["key"] = json_key(body["key"])
        try:
            plain, record = await fence.generate_key(
                **as_usd(fields), create_missing=flag(body, "create_missing")
            )
        except (RecordNotFoundError, RecordConflictError):
            raise
        except ConfigurationError as error:
            raise InvalidRequestError(str(error), param="key") from error
        return {"key": plain, "expires": iso(record.expires), **(await key_info(record))}

    async def find_key(value: object) -> KeyRecord:
        if not isinstance(value, str) or not value:
            raise InvalidRequestError("'key' is required.", param="key")
        record = await store.get_key(hash_key(json_name("key", value)))
        if record is None and len(value) == 64:  # its hash (a token, as /key/list shows)
            record = await store.get_key(value)
        if record is None:
            raise not_found("The key")
        return record

    async def key_info_route(body: dict[str, Any]) -> Any:
        record = await find_key(body.get("key"))
        return {"key": record.key_masked, "info": await key_info(record)}

    async def key_update(body: dict[str, Any]) -> Any:
        record = await find_key(body.get("key"))
        changes = json_fields(
            {k: v for k, v in body.items() if k != "key"}, [f for f in KEY_FIELDS if f != "key"]
        )
        if "duration" in changes:
            changes["expires"] = key_expiry(changes.pop("duration"), fence.clock())
        await ensure_alias_free(store, changes.get("key_alias"), record.scope_id)
        updated = await store.update_key(record.key_hash, changes)
        authenticator.invalidate_key(record.key_hash)
        if updated is None:
            raise not_found("The key")
        return {"key": updated.key_masked, "info": await key_info(updated)}

    async def key_delete(body: dict[str, Any]) -> Any:
        keys = body.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise InvalidRequestError("'keys' must be an array of keys.", param="keys")
        records = [await find_key(key) for key in keys]
        for record in records:
            await store.delete_key(record.key_hash)
            authenticator.invalidate_key(record.key_hash)
        return {"deleted_keys": [record.key_masked for record in records]}

    async def user_new(body: dict[str, Any]) -> Any:
        fields = json_fields(body, USER_FIELDS)
        user_id = fields.pop("user_id", None) or str(uuid.uuid4())
        key_fields: dict[str, Any] = {
            k: fields.pop(k) for k in ("key_alias", "duration") if k in fields
        }
        try:
            record = await fence.new_user(
                user_id, **as_usd(fields), create_missing=flag(body, "create_missing")
            )
        except RecordNotFoundError:
            raise
        except ConfigurationError as error:
            raise AdminError(400, "user_exists", "invalid_request_error", str(error)) from error
        # The user's first key carries the user's team and metadata.
        carried = {"team_id": record.team_id, "metadata": dict(record.metadata)}
        key = await generate(
            {"user_id": user_id, **key_fields, **{k: v for k, v in carried.items() if v}}
        )
        state = await budget_state("user", user_id, user_id, record)
        return {  # the user's own budget, not its key's
            **key,
            "user_id": user_id,
            "team_id": record.team_id,
            "budget_id": record.budget_id,
            "metadata": dict(record.metadata),
            "max_budget": usd(record.max_budget),
            "budget_duration": record.budget_duration,
            "budget_reset_at": spend_view(state, record.budget_duration)["budget_reset_at"],
        }

    async def record_info(
        level: str, ident: str, record: UserRecord | TeamRecord, keys: list[KeyRecord]
    ) -> dict[str, Any]:
        state = await budget_state(level, ident, ident, record)
        info = {
            f"{level}_id": ident,
            **limits_view(record),
            **spend_view(state, record.budget_duration),
        }
        if isinstance(record, UserRecord):
            info["team_id"] = record.team_id
        else:
            info["team_alias"] = record.team_alias
        return {
            f"{level}_id": ident,
            f"{level}_info": info,
            "keys": [await key_info(key) for key in keys],
        }

    async def user_info(body: dict[str, Any]) -> Any:
        user_id = body.get("user_id")
        record = await store.get_user(json_name("user_id", user_id)) if user_id else None
        if record is None:
            raise not_found("The user")
        keys = await store.list_keys(user_id=record.user_id)
        return await record_info("user", record.user_id, record, keys)

    async def team_new(body: dict[str, Any]) -> Any:
        fields = json_fields(body, TEAM_FIELDS)
        team_id = fields.pop("team_id", None) or str(uuid.uuid4())
        try:
            record = await fence.new_team(team_id, **as_usd(fields))
        except ConfigurationError as error:
            raise AdminError(400, "team_exists", "invalid_request_error", str(error)) from error
        state = await budget_state("team", team_id, team_id, record)
        return {
            "team_id": team_id,
            "team_alias": record.team_alias,
            **limits_view(record),
            **spend_view(state, record.budget_duration),
        }

    async def team_info(body: dict[str, Any]) -> Any:
        team_id = body.get("team_id")
        record = await store.get_team(json_name("team_id", team_id)) if team_id else None
        if record is None:
            raise not_found("The team")
        keys = await store.list_keys(team_id=record.team_id)
        return await record_info("team", record.team_id, record, keys)

    async def spend_logs(body: dict[str, Any]) -> Any:
        key = body.get("api_key") or body.get("key")
        found = await store.get_key(hash_key(key)) if key else None
        records = await store.spend_records(
            # A regenerated key's records are kept under the key it replaced.
            key_hash=(found.scope_id if found else hash_key(key)) if key else None,
            request_id=body.get("request_id") or None,
            user_id=body.get("user_id"),
            team_id=body.get("team_id"),
            model=body.get("model"),
            start=time_param(body, "start_date"),
            end=time_param(body, "end_date"),
            limit=int_param(body, "limit", 1000),
        )
        return [spend_log_view(record) for record in records]

    async def global_spend(body: dict[str, Any]) -> Any:
        check = fence.budget_check
        now = fence.clock()
        end = _counters.period_end(check.budget_duration, now, aligned=check.calendar_aligned)
        scope = BudgetScope(_counters.GLOBAL, "global", "global", None, end)
        [state] = await store.budgets([scope], now)
        spend = spend_view(state, check.budget_duration)
        return {
            "spend": spend["spend"],
            "max_budget": check.max_budget,
            "total_spend": spend["total_spend"],
        }

    async def get_budget(body: dict[str, Any]) -> Any:
        name = body.get("project_name")
        if not isinstance(name, str) or not name:
            return {"status": "error", "message": "'project_name' is required."}
        document = await store.get_project(json_name("project_name", name))
        return {"status": "error"} if document is None else {"status": "success", "data": document}

    async def set_budget(body: dict[str, Any]) -> Any:
        name, user_dict = body.get("project_name"), body.get("user_dict")
        if not isinstance(name, str) or not name:
            raise InvalidRequestError("'project_name' is required.", param="project_name")
        await store.set_project(json_name("project_name", name), json_project(user_dict))
        return {"status": "success"}

    return [
        route("/key/generate", "POST", generate),
        route("/key/info", "GET", key_info_route, own="key"),
        route("/key/update", "POST", key_update),
        route("/key/delete", "POST", key_delete),
        route("/user/new", "POST", user_new),
        route("/user/info", "GET", user_info),
        route("/team/new", "POST", team_new),
        route("/team/info", "GET", team_info),
        route("/spend/logs", "GET", spend_logs, own="api_key"),
        route("/global/spend", "GET", global_spend),
        route("/get_budget", "POST", get_budget),
        route("/set_budget", "POST", set_budget),
        route("/spend/refusals", "GET", refusals_handler()),
        spend_page(),  # static: the page asks the operator for the master key
        *(
            route(path, method, handler)
            for handlers in (key_handlers, user_handlers, customer_handlers, spend_handlers)
            for path, method, handler in handlers(fence)
        ),
    ]


def admin_app(fence: Fence) -> Starlette:
    """The admin API as a Starlette app of its own, to mount anywhere."""
    return Starlette(routes=admin_routes(fence))
