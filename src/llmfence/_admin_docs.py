"""What the OpenAPI schema says of the admin API's registry routes (`_admin_keys`,
`_admin_users`, `_admin_customers`, `_admin_spend`): a summary, the fields each takes (query
parameters for GET, the JSON body's for POST) and the required ones."""

from __future__ import annotations

from typing import Final

from ._fields import RECORD_FIELDS

__all__ = ["ROUTE_DOCS"]

_LIMITS: Final = ("max_budget", "budget_duration", "rpm_limit", "tpm_limit")
_CUSTOMER: Final = ("user_id", "alias", "blocked", *_LIMITS, "budget_id", "metadata")
_TIER: Final = ("budget_id", *_LIMITS, "max_parallel_requests")
_REPORT: Final = ("start_date", "end_date", "group_by")

ROUTE_DOCS: Final[dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]]] = {
    "/key/list": (
        "Keys, a page at a time (their hashes, or whole with return_full_object=true)",
        ("page", "size", "user_id", "team_id", "key_alias", "return_full_object"),
        (),
    ),
    "/key/regenerate": (
        "Rotate a key: a new key with the old one's spend and limits; the old one works for "
        "grace_period, then stops",
        ("key", "grace_period", "new_key"),
        ("key",),
    ),
    "/key/block": ("Block a key (its requests get 401)", ("key",), ("key",)),
    "/key/unblock": ("Unblock a key", ("key",), ("key",)),
    "/user/list": ("Users, a page at a time", ("page", "page_size", "user_ids", "team"), ()),
    "/user/update": (
        "Change a user's budget, limits, team or tier",
        ("user_id", *RECORD_FIELDS, "team_id", "budget_id", "create_missing"),
        ("user_id",),
    ),
    "/user/delete": ("Delete users and their keys", ("user_ids",), ("user_ids",)),
    "/team/list": ("Teams (or those a user is a member of)", ("user_id",), ()),
    "/team/update": (
        "Change a team's budget, limits, alias or tier",
        ("team_id", *RECORD_FIELDS, "team_alias", "budget_id"),
        ("team_id",),
    ),
    "/team/delete": ("Delete teams and their keys", ("team_ids",), ("team_ids",)),
    "/team/member_add": (
        "Add members ({role, user_id}) with a budget of their own inside the team",
        ("team_id", "member", "max_budget_in_team", "budget_duration"),
        ("team_id", "member"),
    ),
    "/team/member_delete": ("Remove a member from a team", ("team_id", "user_id"), ("team_id",)),
    "/customer/new": ("Register a customer (an end user) with its own budget", _CUSTOMER, ()),
    "/customer/info": ("A customer's budget and spend", ("end_user_id",), ("end_user_id",)),
    "/customer/update": ("Change a customer", _CUSTOMER, ("user_id",)),
    "/customer/delete": ("Delete customers", ("user_ids",), ("user_ids",)),
    "/customer/block": ("Block customers (their requests get 400)", ("user_ids",), ("user_ids",)),
    "/customer/unblock": ("Unblock customers", ("user_ids",), ("user_ids",)),
    "/customer/list": ("Every customer", (), ()),
    "/budget/new": ("Create a budget tier", _TIER, ()),
    "/budget/info": ("Budget tiers by id", ("budgets", "budget_id"), ()),
    "/budget/update": (
        "Change a budget tier (every record naming it follows)",
        _TIER,
        ("budget_id",),
    ),
    "/budget/delete": ("Delete a budget tier", ("id",), ("id",)),
    "/budget/list": ("Every budget tier", (), ()),
    "/spend/report": (
        "Spend per day, grouped by team, customer, api_key, user or model",
        _REPORT,
        ("start_date", "end_date"),
    ),
    "/global/spend/report": (
        "LiteLLM's name for /spend/report",
        _REPORT,
        ("start_date", "end_date"),
    ),
}
