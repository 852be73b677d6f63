"""Whom a guarded route call is counted against: a key, user, team, end user, IP or callable.

Never a plain key: a key is counted by its hash and shown masked.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Awaitable, Callable
from typing import Literal

from starlette.requests import Request

from llmfence._core.auth import api_key_from_headers
from llmfence._core.services import Services
from llmfence._route_ledger import Ledger, request_context
from llmfence.exceptions import InvalidRequestError

__all__ = ["PERS", "Per", "Who", "who_is"]

Per = Literal["key", "user", "team", "end_user", "ip"] | Callable[[Request], str | Awaitable[str]]
PERS = ("key", "user", "team", "end_user", "ip")
Who = tuple[str, str, str]  # (level, counter id, what messages show)
# An end user is read from bodies of ordinary size, and named by at most this many characters
# (an id becomes part of a counter's name).
_MAX_END_USER_BODY = 1 << 20
_MAX_IDENTITY = 256


async def who_is(services: Services, per: Per, request: Request, ledger: Ledger) -> Who:
    """Whom a request is counted against: (level, counter id, label). Never a plain key."""
    if callable(per):
        value = per(request)
        name = await value if inspect.isawaitable(value) else value
        return "caller", f"caller:{name}", name
    if per == "ip":
        address = _client_ip(request, services.trusted_proxies)
        return "ip", f"ip:{address}", address
    if per == "end_user":
        end_user = ledger.end_user = await _end_user(request)
        if not end_user:
            raise InvalidRequestError(
                "This route counts end users: name one in a `user` query parameter or the "
                "JSON body's `user` field.",
                param="user",
            )
        if len(end_user) > _MAX_IDENTITY:
            raise InvalidRequestError(
                f"`user` is longer than {_MAX_IDENTITY} characters.", param="user"
            )
        return "end_user", f"end_user:{end_user}", end_user
    principal = ledger.principal
    if principal is None:
        ctx = request_context(request)
        principal = ctx.principal if ctx is not None else None
        if principal is None:  # the middlewares did not run: authenticate here (401 if bad)
            api_key = api_key_from_headers(request.headers)
            principal = await services.authenticator.authenticate(api_key)
        ledger.principal = principal
    # "team" falls back to the user, and both to the key, so every caller has a counter.
    if per == "team" and principal.team_id:
        return "team", f"team:{principal.team_id}", principal.team_id
    if per in ("team", "user") and principal.user_id:
        return "user", f"user:{principal.user_id}", principal.user_id
    if principal.key_hash is None:
        return "key", "key:master", "master key"
    return "key", f"key:{principal.key_hash}", principal.key_masked or "key"


def _client_ip(request: Request, trusted_proxies: int) -> str:
    """The client's address: the N-th from the right of X-Forwarded-For behind N proxies."""
    if trusted_proxies:
        hops = [
            hop.strip()
            for value in request.headers.getlist("x-forwarded-for")
            for hop in value.split(",")
            if hop.strip()
        ]
        if hops:
            # Entries left of the trusted ones are whatever the client chose to send.
            return hops[-trusted_proxies] if len(hops) >= trusted_proxies else hops[0]
    return request.client.host if request.client is not None else "unknown"


async def _end_user(request: Request) -> str | None:
    """The end user: a `user` query parameter, else the JSON body's `user` field."""
    name = request.query_params.get("user")
    if name:
        return name
    ctx = request_context(request)
    if ctx is not None and ctx.end_user:
        return ctx.end_user
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > _MAX_END_USER_BODY:
        raise InvalidRequestError("The body is too large to read its `user`.", param="user")
    try:
        body = json.loads(await request.body())  # Starlette caches it for the endpoint
    except (ValueError, RecursionError):
        return None
    user = body.get("user") if isinstance(body, dict) else None
    return user if isinstance(user, str) and user else None
