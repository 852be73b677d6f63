"""The admin API's user and team routes beyond create/info: `/user/list`, `/user/update`,
`/user/delete`, `/team/list`, `/team/update`, `/team/delete`, `/team/member_add`,
`/team/member_delete` (LiteLLM's bodies and field names)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ._admin_shapes import Handlers, checked, flag, id_list, level_state, team_view, user_view
from ._admin_views import int_param
from ._fence_customers import ensure_budget
from ._fence_ops import ensure_refs
from ._fields import RECORD_FIELDS
from ._fields_json import json_fields, json_name
from ._money import nano_to_decimal
from .exceptions import InvalidRequestError
from .stores import TeamRecord, UserRecord

if TYPE_CHECKING:
    from ._fence import Fence

__all__ = ["user_handlers"]

_USER_UPDATE = (*RECORD_FIELDS, "user_id", "team_id", "budget_id")
_TEAM_UPDATE = (*RECORD_FIELDS, "team_id", "team_alias", "budget_id")


def user_handlers(fence: Fence) -> Handlers:
    """The user and team routes, for `admin_routes` to put behind the master key."""

    async def user(record: UserRecord) -> dict[str, Any]:
        return user_view(record, await level_state(fence, "user", record.user_id, record))

    async def team(record: TeamRecord) -> dict[str, Any]:
        return team_view(record, await level_state(fence, "team", record.team_id, record))

    def required(body: dict[str, Any], name: str) -> str:
        if not body.get(name):
            raise InvalidRequestError(f"'{name}' is required.", param=name)
        return json_name(name, body[name])

    async def user_list(body: dict[str, Any]) -> Any:
        """`GET /user/list?page=1&page_size=25&user_ids=a,b&team=`"""
        records = await fence.list_users()
        if body.get("user_ids"):
            wanted = set(str(body["user_ids"]).split(","))
            records = [r for r in records if r.user_id in wanted]
        if body.get("team"):
            records = [r for r in records if r.team_id == body["team"]]
        page, size = int_param(body, "page", 1), int_param(body, "page_size", 25)
        return {
            "users": [await user(r) for r in records[(page - 1) * size : page * size]],
            "total": len(records),
            "page": page,
            "page_size": size,
            "total_pages": math.ceil(len(records) / size),
        }

    async def user_update(body: dict[str, Any]) -> Any:
        """`POST /user/update {"user_id", "max_budget", "budget_duration", …}`"""
        user_id = required(body, "user_id")
        changes = json_fields(body, _USER_UPDATE)
        changes.pop("user_id", None)
        await checked(ensure_budget(fence.store, changes.get("budget_id")))
        if changes.get("team_id"):
            await checked(
                ensure_refs(
                    fence.store,
                    fence.authenticator,
                    fence.clock(),
                    None,
                    changes["team_id"],
                    flag(body, "create_missing"),
                )
            )
        return await user(await checked(fence.apply_user_changes(user_id, changes)))

    async def user_delete(body: dict[str, Any]) -> Any:
        """`POST /user/delete {"user_ids": [...]}`: the users and their keys."""
        return {"deleted_users": await checked(fence.delete_users(id_list(body, "user_ids")))}

    async def team_list(body: dict[str, Any]) -> Any:
        """`GET /team/list?user_id=`: every team (or those the user is a member of)."""
        records = await fence.list_teams()
        if body.get("user_id"):
            records = [r for r in records if body["user_id"] in r.members]
        return [await team(record) for record in records]

    async def team_update(body: dict[str, Any]) -> Any:
        """`POST /team/update {"team_id", "max_budget", "team_alias", …}`"""
        team_id = required(body, "team_id")
        changes = json_fields(body, _TEAM_UPDATE)
        changes.pop("team_id", None)
        await checked(ensure_budget(fence.store, changes.get("budget_id")))
        updated = await checked(fence.apply_team_changes(team_id, changes))
        return {"team_id": team_id, "data": await team(updated)}

    async def team_delete(body: dict[str, Any]) -> Any:
        """`POST /team/delete {"team_ids": [...]}`: the teams and their keys."""
        return {"deleted_teams": await checked(fence.delete_teams(id_list(body, "team_ids")))}

    async def member_add(body: dict[str, Any]) -> Any:
        """`POST /team/member_add {"team_id", "member": {"role", "user_id"},
        "max_budget_in_team", "budget_duration"}` (`member` may be an array)."""
        team_id = required(body, "team_id")
        members = body.get("member")
        members = members if isinstance(members, list) else [members]
        budget = json_fields(
            {"max_budget": body.get("max_budget_in_team"), **_only(body, "budget_duration")},
            ("max_budget", "budget_duration"),
        )
        amount = budget.get("max_budget")
        updated: TeamRecord | None = None
        for member in members:
            if not isinstance(member, dict) or not member.get("user_id"):
                raise InvalidRequestError(
                    '\'member\' must be {"role", "user_id"} (or an array of them).',
                    param="member",
                )
            updated = await checked(
                fence.add_team_member(
                    team_id,
                    json_name("user_id", member["user_id"]),
                    role=str(member.get("role", "user")),
                    max_budget_in_team=None if amount is None else nano_to_decimal(amount),
                    budget_duration=budget.get("budget_duration"),
                )
            )
        assert updated is not None
        view = await team(updated)
        added = {str(m["user_id"]) for m in members}
        users = [await fence.store.get_user(user_id) for user_id in sorted(added)]
        return {
            **view,
            "updated_users": [await user(u) for u in users if u is not None],
            "updated_team_memberships": [
                m for m in view["team_memberships"] if m["user_id"] in added
            ],
        }

    async def member_delete(body: dict[str, Any]) -> Any:
        """`POST /team/member_delete {"team_id", "user_id"}`"""
        team_id, user_id = required(body, "team_id"), required(body, "user_id")
        return await team(await checked(fence.delete_team_member(team_id, user_id)))

    return [
        ("/user/list", "GET", user_list),
        ("/user/update", "POST", user_update),
        ("/user/delete", "POST", user_delete),
        ("/team/list", "GET", team_list),
        ("/team/update", "POST", team_update),
        ("/team/delete", "POST", team_delete),
        ("/team/member_add", "POST", member_add),
        ("/team/member_delete", "POST", member_delete),
    ]


def _only(body: dict[str, Any], *names: str) -> dict[str, Any]:
    return {name: body[name] for name in names if name in body}
