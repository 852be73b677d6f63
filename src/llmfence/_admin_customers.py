"""The admin API's customers (end users) and budget tiers: `/customer/new`, `/customer/info`,
`/customer/update`, `/customer/delete`, `/customer/block`, `/customer/unblock`,
`/customer/list`, and `/budget/new`, `/budget/info`, `/budget/update`, `/budget/delete`,
`/budget/list` (LiteLLM's bodies and field names)."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from ._admin_shapes import (
    Handlers,
    budget_view,
    checked,
    customer_view,
    flag,
    id_list,
    level_state,
)
from ._fields_json import json_fields, json_name
from .exceptions import InvalidRequestError
from .stores import BudgetTier, CustomerRecord

if TYPE_CHECKING:
    from ._fence import Fence

__all__ = ["customer_handlers"]

_LIMITS = ("max_budget", "budget_duration", "rpm_limit", "tpm_limit")
# A customer's own limits: a budget and RPM/TPM (a tier's parallel limit is for keys and users).
_CUSTOMER = ("user_id", "alias", *_LIMITS, "budget_id", "metadata")
_BUDGET = ("budget_id", *_LIMITS, "max_parallel_requests")


def customer_handlers(fence: Fence) -> Handlers:
    """The customer and budget routes, for `admin_routes` to put behind the master key."""

    async def view(record: CustomerRecord) -> dict[str, Any]:
        return customer_view(record, await level_state(fence, "end_user", record.user_id, record))

    def fields(body: dict[str, Any], allowed: tuple[str, ...]) -> dict[str, Any]:
        checked_fields = json_fields({k: v for k, v in body.items() if k != "blocked"}, allowed)
        if "blocked" in body:
            checked_fields["blocked"] = flag(body, "blocked")
        return checked_fields

    def required(body: dict[str, Any], *names: str) -> str:
        for name in names:
            if body.get(name):
                return json_name(name, body[name])
        raise InvalidRequestError(f"'{names[0]}' is required.", param=names[0])

    async def customer_new(body: dict[str, Any]) -> Any:
        """`POST /customer/new {"user_id", "max_budget", "budget_duration", "rpm_limit",
        "tpm_limit", "budget_id", "blocked", "alias", "metadata"}`"""
        values = fields(body, _CUSTOMER)
        values["user_id"] = required(body, "user_id")
        record = CustomerRecord(**values, created_at=fence.clock())
        return await view(await checked(fence.create_customer_record(record)))

    async def customer_info(body: dict[str, Any]) -> Any:
        """`GET /customer/info?end_user_id=`"""
        user_id = required(body, "end_user_id", "user_id")
        return await view(await checked(fence.get_customer(user_id)))

    async def customer_update(body: dict[str, Any]) -> Any:
        """`POST /customer/update {"user_id", …the fields of /customer/new}`"""
        user_id = required(body, "user_id")
        changes = fields(body, _CUSTOMER)
        changes.pop("user_id", None)
        return await view(await checked(fence.apply_customer_changes(user_id, changes)))

    async def customer_delete(body: dict[str, Any]) -> Any:
        """`POST /customer/delete {"user_ids": [...]}`"""
        deleted = await checked(fence.delete_customers(id_list(body, "user_ids")))
        return {"deleted_customers": deleted}

    async def customer_block(body: dict[str, Any]) -> Any:
        """`POST /customer/block {"user_ids": [...]}`: requests naming them get 400."""
        return {"blocked_users": await checked(fence.block_customers(id_list(body, "user_ids")))}

    async def customer_unblock(body: dict[str, Any]) -> Any:
        """`POST /customer/unblock {"user_ids": [...]}`"""
        ids = await checked(fence.unblock_customers(id_list(body, "user_ids")))
        return {"unblocked_users": ids}

    async def customer_list(body: dict[str, Any]) -> Any:
        """`GET /customer/list`"""
        return [await view(record) for record in await fence.list_customers()]

    async def budget_new(body: dict[str, Any]) -> Any:
        """`POST /budget/new {"budget_id", "max_budget", "budget_duration", "rpm_limit",
        "tpm_limit", "max_parallel_requests"}`"""
        values = json_fields(body, _BUDGET)
        budget_id = values.pop("budget_id", None) or str(uuid.uuid4())
        tier = BudgetTier(budget_id=budget_id, **values, created_at=fence.clock())
        return budget_view(await checked(fence.create_budget_record(tier)))

    async def budget_info(body: dict[str, Any]) -> Any:
        """`POST /budget/info {"budgets": [ids]}` (or `GET ?budget_id=`): a list."""
        ids = id_list(body, "budgets") if "budgets" in body else [required(body, "budget_id")]
        return [budget_view(await checked(fence.get_budget(budget_id))) for budget_id in ids]

    async def budget_update(body: dict[str, Any]) -> Any:
        """`POST /budget/update {"budget_id", …}`: every record naming it follows."""
        budget_id = required(body, "budget_id")
        changes = json_fields(body, _BUDGET)
        changes.pop("budget_id", None)
        return budget_view(await checked(fence.apply_budget_changes(budget_id, changes)))

    async def budget_delete(body: dict[str, Any]) -> Any:
        """`POST /budget/delete {"id"}` (or `"budget_id"`)"""
        return budget_view(await checked(fence.delete_budget(required(body, "id", "budget_id"))))

    async def budget_list(body: dict[str, Any]) -> Any:
        """`GET /budget/list`"""
        return [budget_view(tier) for tier in await fence.list_budgets()]

    return [
        ("/customer/new", "POST", customer_new),
        ("/customer/info", "GET", customer_info),
        ("/customer/update", "POST", customer_update),
        ("/customer/delete", "POST", customer_delete),
        ("/customer/block", "POST", customer_block),
        ("/customer/unblock", "POST", customer_unblock),
        ("/customer/list", "GET", customer_list),
        ("/budget/new", "POST", budget_new),
        ("/budget/info", "POST", budget_info),
        ("/budget/info", "GET", budget_info),
        ("/budget/update", "POST", budget_update),
        ("/budget/delete", "POST", budget_delete),
        ("/budget/list", "GET", budget_list),
    ]
