"""llmfence in a FastAPI app's OpenAPI schema: the admin API's routes with their bodies, and the
refusals the middlewares and route guards may answer with.

FastAPI documents only its own `APIRoute`s, so on a FastAPI app `Fence.install(app, admin=True)`
registers the admin endpoints through an `APIRouter` (`admin_router`), one operation per method,
with JSON schemas as `openapi_extra` (no pydantic models: the routes read their bodies
themselves, as on Starlette). The refusals (401/403/429/503, OpenAI-shaped, or Anthropic-shaped
on `*/messages`) are added to the generated schema of every metered path and guarded route.
FastAPI is imported only when the app is a FastAPI app: it stays optional.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from ._admin_docs import ROUTE_DOCS
from ._fields import KEY_FIELDS, RECORD_FIELDS, TEAM_FIELDS, USER_FIELDS
from ._request import endpoint_for_path

if TYPE_CHECKING:
    from fastapi import APIRouter

    from ._fence import Fence
    from .middleware._paths import PathRules

__all__ = [
    "admin_router",
    "document_refusals",
    "install_routes",
    "is_fastapi",
    "refusal_responses",
]

Schema = dict[str, Any]
SECURITY = "llmfenceKey"
_TAG = "llmfence admin"

_STR: Schema = {"type": ["string", "null"]}
_INT: Schema = {"type": ["integer", "null"], "minimum": 0}
_USD: Schema = {"type": ["number", "null"], "minimum": 0, "description": "USD"}
_TIME: Schema = {"type": ["string", "null"], "format": "date-time"}
_NAMES: Schema = {"type": "array", "items": {"type": "string"}}
_PERIOD: Schema = {"type": ["string", "null"], "examples": ["30d", "monthly", "24h"]}
_TYPES: dict[str, Schema] = {
    "max_budget": _USD,
    "soft_budget": _USD,
    "spend": _USD,
    "total_spend": _USD,
    "budget_duration": _PERIOD,
    "duration": _PERIOD,
    **dict.fromkeys(("rpm_limit", "tpm_limit", "rpd_limit", "tpd_limit"), _INT),
    "max_parallel_requests": _INT,
    "models": _NAMES,
    "keys": _NAMES,
    "metadata": {"type": "object"},
    "model_max_budget": {
        "type": "object",
        "additionalProperties": {
            "anyOf": [
                {"type": "number"},
                {
                    "type": "object",
                    "properties": {"budget_limit": {"type": "number"}, "time_period": _PERIOD},
                },
            ]
        },
    },
    "model_rpm_limit": {"type": "object", "additionalProperties": {"type": "integer"}},
    "model_tpm_limit": {"type": "object", "additionalProperties": {"type": "integer"}},
    "limit": {"type": "integer", "minimum": 1},
    "start_date": {"type": "string", "examples": ["2026-11-01"]},
    "end_date": {"type": "string", "examples": ["2026-11-30"]},
    "user_dict": {"type": "object"},
    "create_missing": {"type": "boolean"},
    **dict.fromkeys(("budget_reset_at", "expires", "created_at", "startTime"), _TIME),
    **dict.fromkeys(("prompt_tokens", "completion_tokens", "total_tokens"), _INT),
}


def _object(names: Iterable[str], required: Iterable[str] = (), **extra: Schema) -> Schema:
    properties = {name: _TYPES.get(name, _STR) for name in names} | extra
    schema: Schema = {"type": "object", "properties": properties}
    return schema | ({"required": list(required)} if required else {})


_KEY_INFO_FIELDS = (
    "key_name", "key_alias", "spend", "total_spend", "max_budget", "soft_budget", "budget_duration",
    "budget_reset_at", "model_max_budget", "model_rpm_limit", "model_tpm_limit", "rpm_limit",
    "tpm_limit", "rpd_limit", "tpd_limit", "max_parallel_requests", "models", "user_id",
    "team_id", "expires", "metadata", "created_at",
)  # fmt: skip
_SPEND_LOG_FIELDS = (
    "request_id", "api_key", "model", "spend", "prompt_tokens", "completion_tokens",
    "total_tokens", "user", "team_id", "end_user", "startTime", "status", "path",
)  # fmt: skip
_KEY_INFO = _object(_KEY_INFO_FIELDS)
_KEY = {"type": "string", "description": "A key (`sk-…`): plain in requests, masked in answers"}
_KEY_AND_INFO = _object((), key=_KEY, info=_KEY_INFO)
_SPEND = _object(("spend", "max_budget", "total_spend"))
_STATUS = _object(("status", "message"), data={"type": "object"})


def _info(level: str) -> Schema:
    return _object(
        (f"{level}_id",), **{f"{level}_info": {"type": "object"}}, keys={"items": _KEY_INFO}
    )


# Each route's summary, request fields (a body, or a GET's query), required ones, answer.
_ROUTES: dict[str, tuple[str, Iterable[str], tuple[str, ...], Schema]] = {
    "/key/generate": (
        "Create a virtual key (its plain form is shown once, here)",
        KEY_FIELDS,
        (),
        _object(_KEY_INFO_FIELDS, key=_KEY),
    ),
    "/key/info": ("A key's info and spend (a key may read its own)", ("key",), (), _KEY_AND_INFO),
    "/key/update": ("Change a key's budget, limits or models", KEY_FIELDS, ("key",), _KEY_AND_INFO),
    "/key/delete": ("Delete keys", ("keys",), ("keys",), _object((), deleted_keys=_NAMES)),
    "/user/new": (
        "Create a user and its first key",
        USER_FIELDS,
        (),
        _object((*_KEY_INFO_FIELDS, "user_id"), key=_KEY),
    ),
    "/user/info": ("A user's budget, spend and keys", ("user_id",), ("user_id",), _info("user")),
    "/team/new": ("Create a team", TEAM_FIELDS, (), _object((*RECORD_FIELDS, "team_id"))),
    "/team/info": ("A team's budget, spend and keys", ("team_id",), ("team_id",), _info("team")),
    "/spend/logs": (
        "Spend records, newest first (a key reads its own)",
        ("api_key", "request_id", "user_id", "team_id", "model", "start_date", "end_date", "limit"),
        (),
        {"type": "array", "items": _object(_SPEND_LOG_FIELDS)},
    ),
    "/global/spend": ("The whole app's spend and budget", (), (), _SPEND),
    "/get_budget": (
        "A hosted BudgetManager's project (LiteLLM's protocol)",
        ("project_name",),
        ("project_name",),
        _STATUS,
    ),
    "/set_budget": (
        "Save a hosted BudgetManager's project (LiteLLM's protocol)",
        ("project_name", "user_dict"),
        ("project_name",),
        _STATUS,
    ),
}

_OPENAI_ERROR: Schema = _object(
    (),
    ("error",),
    error=_object(
        ("message", "type", "param", "code"),
        ("message", "type", "param", "code"),
    ),
)
_ANTHROPIC_ERROR: Schema = _object(
    (),
    ("type", "error"),
    type={"const": "error"},
    error=_object(("type", "message"), ("type", "message")),
)
_RETRY = {
    "retry-after": {
        "description": "Seconds until the call may pass",
        "schema": {"type": "integer"},
    },
    "x-should-retry": {
        "description": "`false` when retrying cannot help (a budget, a request over a limit)",
        "schema": {"type": "string"},
    },
}
_REFUSALS: dict[int, tuple[str, dict[str, Any]]] = {
    400: ("Not a body llmfence can meter (or an unknown model)", {}),
    401: ("No API key, or an unknown, expired or blocked one", {}),
    403: ("The key may not use this model", {}),
    413: ("The body is over the size cap", {}),
    429: ("A rate limit or a budget refused the call (nothing was charged)", _RETRY),
    503: ("The store is unavailable and the guard fails closed", _RETRY),
}


def refusal_responses(
    statuses: Iterable[int] = (401, 403, 429, 503), *, anthropic: bool = False
) -> dict[int | str, dict[str, Any]]:
    """What llmfence may answer instead of a route, as FastAPI's `responses=` takes it.

    Args:
        statuses: Which refusals (400, 401, 403, 413, 429, 503).
        anthropic: Document both error shapes (a route of Anthropic's API, `*/messages`).
    """
    schema = {"anyOf": [_OPENAI_ERROR, _ANTHROPIC_ERROR]} if anthropic else _OPENAI_ERROR
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        description, headers = _REFUSALS[status]
        answer = {"description": description, "content": {"application/json": {"schema": schema}}}
        out[status] = answer | ({"headers": headers} if headers else {})
    return out


def _request(method: str, fields: Iterable[str], required: tuple[str, ...]) -> Schema:
    names = list(fields)
    if method == "GET":
        return {
            "parameters": [
                {"name": n, "in": "query", "required": n in required, "schema": _TYPES.get(n, _STR)}
                for n in names
            ]
        }
    body = _object(names, required) if names else {"type": "object"}
    content = {"application/json": {"schema": body}}
    return {"requestBody": {"required": bool(required), "content": content}}


def admin_router(fence: Fence) -> APIRouter:
    """The admin API as a FastAPI `APIRouter`, documented in the app's OpenAPI schema.

    ```python
    app.include_router(admin_router(fence))      # what fence.install(app, admin=True) does
    ```
    """
    from fastapi import APIRouter

    from .admin import admin_routes

    router = APIRouter(tags=[_TAG])
    errors: dict[int | str, dict[str, Any]] = {
        status: {"description": text, "content": {"application/json": {"schema": _OPENAI_ERROR}}}
        for status, text in (
            (400, "A field is missing or not valid"),
            (401, "No key"),
            (403, "Not the master key (or, on a self-service route, another key's records)"),
            (404, "No such key, user or team"),
        )
    }
    for route in admin_routes(fence):
        summary, fields, required, answer = _ROUTES.get(route.path) or (
            *ROUTE_DOCS.get(route.path, (route.path, (), ())),
            {"type": "object"},
        )
        for method in sorted((route.methods or set()) - {"HEAD"}):
            ok = {"description": "OK", "content": {"application/json": {"schema": answer}}}
            router.add_api_route(
                route.path,
                route.endpoint,
                methods=[method],
                name=f"{route.path.strip('/').replace('/', '_')}_{method.lower()}",
                summary=summary,
                response_model=None,
                responses={200: ok, **errors},
                openapi_extra={
                    **_request(method, fields, required),
                    "security": [{SECURITY: []}],
                },
            )
    return router


def install_routes(app: Any, fence: Fence, *, admin: bool) -> None:
    """What `Fence.install` adds to an app's routes: the admin API (`admin`), through
    `admin_router` on a FastAPI app, as plain routes on Starlette; and, on a FastAPI app,
    the refusals in its OpenAPI schema."""
    fastapi = is_fastapi(app)
    if admin and fastapi:
        app.include_router(admin_router(fence))
    elif admin:
        from .admin import admin_routes

        app.router.routes.extend(admin_routes(fence))
    if fastapi:
        document_refusals(app, fence.paths)


def is_fastapi(app: object) -> bool:
    """Whether `app` is a FastAPI app (without importing FastAPI when nobody did)."""
    fastapi = sys.modules.get("fastapi")
    return fastapi is not None and isinstance(app, fastapi.FastAPI)


def document_refusals(app: Any, paths: PathRules) -> None:
    """Add llmfence's refusals to a FastAPI app's OpenAPI schema, when it is generated: the
    metered paths' POST operations, every operation of a guarded route, and the bearer key
    scheme. Operations keep the responses they declare themselves."""
    original: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema = original()
        if fresh:
            _add_refusals(schema, paths, _guarded_paths(app.routes))
        return schema

    app.openapi = openapi


def _add_refusals(schema: dict[str, Any], paths: PathRules, guarded: set[str]) -> None:
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})[SECURITY] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An llmfence virtual key, or the master key (also `x-api-key`)",
    }
    for path, operations in schema.get("paths", {}).items():
        if paths.is_exempt(path):
            continue
        metered, anthropic = _metered(path, paths)
        for method, operation in operations.items():
            if method not in _METHODS or not isinstance(operation, dict):
                continue
            if metered and method == "post":
                statuses: Iterable[int] = (400, 401, 403, 413, 429, 503)
            elif path in guarded:
                statuses = (401, 429, 503)
            else:
                statuses = (401,)  # key auth guards every path it does not exempt
            responses = operation.setdefault("responses", {})
            for status, answer in refusal_responses(statuses, anthropic=anthropic).items():
                responses.setdefault(str(status), answer)
            operation.setdefault("security", [{SECURITY: []}])


_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})
# What a templated path (`/v1/{path:path}`, a forwarding route) may end with on an LLM API.
_LLM_SUFFIXES = ("chat/completions", "completions", "embeddings", "responses", "messages")


def _metered(path: str, paths: PathRules) -> tuple[bool, bool]:
    """Whether llmfence may meter a documented path, and whether as Anthropic's API. A
    templated one may when an LLM endpoint fits where its first parameter starts."""
    if "{" not in path:
        return paths.is_metered(path), endpoint_for_path(path) == "messages"
    prefix = path[: path.index("{")]
    if not prefix.endswith("/"):
        return False, False
    fits = [suffix for suffix in _LLM_SUFFIXES if paths.is_metered(prefix + suffix)]
    return bool(fits), "messages" in fits


def _guarded_paths(routes: Iterable[Any]) -> set[str]:
    """The paths of FastAPI routes with a route guard (a decorator, or `Depends(guard)`)."""
    from .guards import RouteGuard

    found = set()
    for route in routes:
        dependant = getattr(route, "dependant", None)
        if dependant is None:
            continue
        stack, guarded = [dependant], hasattr(route.endpoint, "__llmfence__")
        while stack and not guarded:
            node = stack.pop()
            guarded = isinstance(node.call, RouteGuard)
            stack.extend(node.dependencies)
        if guarded:
            found.add(route.path_format)
    return found
