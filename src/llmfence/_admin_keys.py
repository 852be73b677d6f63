"""The admin API's key routes beyond create/info/update/delete: `/key/list`,
`/key/regenerate`, `/key/block`, `/key/unblock` (LiteLLM's bodies and field names)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ._admin_shapes import Handlers, checked, flag, key_views
from ._admin_views import int_param, iso
from ._fields_json import json_key, json_name
from .exceptions import InvalidRequestError

if TYPE_CHECKING:
    from ._fence import Fence

__all__ = ["key_handlers"]


def key_handlers(fence: Fence) -> Handlers:
    """The key routes, for `admin_routes` to put behind the master key."""

    def key_of(body: dict[str, Any]) -> str:
        value = body.get("key")
        if not isinstance(value, str) or not value:
            raise InvalidRequestError("'key' is required.", param="key")
        return json_name("key", value)

    async def key_list(body: dict[str, Any]) -> Any:
        """`GET /key/list?page=1&size=10&user_id=&team_id=&key_alias=&return_full_object=`"""
        records = await fence.list_keys(
            user_id=body.get("user_id") or None,
            team_id=body.get("team_id") or None,
            key_alias=body.get("key_alias") or None,
        )
        page, size = int_param(body, "page", 1), int_param(body, "size", 10)
        shown = records[(page - 1) * size : page * size]
        keys: list[Any] = [record.key_hash for record in shown]
        if flag(body, "return_full_object"):
            keys = await key_views(fence, shown)
        return {
            "keys": keys,
            "total_count": len(records),
            "current_page": page,
            "total_pages": math.ceil(len(records) / size),
        }

    async def regenerate(body: dict[str, Any]) -> Any:
        """`POST /key/regenerate {"key", "grace_period": "24h", "new_key"}`"""
        new_key = body.get("new_key")
        grace = body.get("grace_period")
        if grace is not None and not isinstance(grace, str):
            raise InvalidRequestError("'grace_period' must be a duration like '24h'.")
        plain, record = await checked(
            fence.regenerate_key(
                key_of(body),
                grace_period=grace or None,
                new_key=None if new_key is None else json_key(new_key),
            )
        )
        [view] = await key_views(fence, [record])
        return {"key": plain, **view, "expires": iso(record.expires)}

    async def block(body: dict[str, Any]) -> Any:
        """`POST /key/block {"key"}`: the key's requests get 401 until unblocked."""
        [view] = await key_views(fence, [await checked(fence.block_key(key_of(body)))])
        return view

    async def unblock(body: dict[str, Any]) -> Any:
        """`POST /key/unblock {"key"}`"""
        [view] = await key_views(fence, [await checked(fence.unblock_key(key_of(body)))])
        return view

    return [
        ("/key/list", "GET", key_list),
        ("/key/regenerate", "POST", regenerate),
        ("/key/block", "POST", block),
        ("/key/unblock", "POST", unblock),
    ]
