"""The admin API's spend report: `/spend/report` (also at LiteLLM's `/global/spend/report`),
spend per day grouped by key, user, team, model or end user between two dates.

The report is built from the spend log, so it covers the records the store still keeps (its
`max_spend_records`); the running totals (`/global/spend`, `/key/info`…) count every record
ever appended.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from ._admin_shapes import Handlers
from ._admin_views import MAX_INT_PARAM, time_param
from ._money import nano_to_usd
from .exceptions import InvalidRequestError
from .stores import SpendRecord

if TYPE_CHECKING:
    from ._fence import Fence

__all__ = ["GROUPS", "spend_handlers", "spend_report"]

_DAY: Final = 86_400
GROUPS: Final = {
    # group_by: (the list's name, each entry's name field, the record field grouped on)
    "team": ("teams", "team_name", "team_id"),
    "customer": ("customers", "customer", "end_user"),
    "end_user": ("customers", "customer", "end_user"),
    "api_key": ("api_keys", "api_key", "key_masked"),
    "key": ("api_keys", "api_key", "key_masked"),
    "user": ("users", "user_id", "user_id"),
    "model": ("models", "model", "model"),
}
"""What `group_by` may name (LiteLLM's `team`, `customer`, `api_key`, and ours)."""


def spend_report(records: Iterable[SpendRecord], group_by: str) -> list[dict[str, Any]]:
    """Spend per UTC day, oldest first, and per group within each day, largest first; each
    group broken down by model and key (`metadata`), in LiteLLM's report shape."""
    plural, name_field, field = GROUPS[group_by]
    days: dict[int, dict[Any, dict[tuple[str, Any], list[int]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(lambda: [0, 0]))
    )
    for record in records:
        cell = days[int(record.timestamp // _DAY)][getattr(record, field)]
        counted = cell[(record.model, record.key_masked)]
        counted[0] += record.cost
        counted[1] += record.input_tokens + record.output_tokens
    report = []
    for day in sorted(days):
        groups = []
        for name, parts in days[day].items():
            groups.append(
                {
                    name_field: name,
                    "total_spend": nano_to_usd(sum(cost for cost, _ in parts.values())),
                    "total_tokens": sum(tokens for _, tokens in parts.values()),
                    "metadata": [
                        {
                            "model": model,
                            "api_key": key,
                            "spend": nano_to_usd(cost),
                            "total_tokens": tokens,
                        }
                        for (model, key), (cost, tokens) in parts.items()
                    ],
                }
            )
        groups.sort(key=lambda group: -group["total_spend"])
        moment = datetime.fromtimestamp(day * _DAY, UTC).isoformat()
        report.append({"group_by_day": moment, plural: groups})
    return report


def spend_handlers(fence: Fence) -> Handlers:
    """The report routes, for `admin_routes` to put behind the master key."""

    async def report(body: dict[str, Any]) -> Any:
        """`GET /spend/report?start_date=2026-11-01&end_date=2026-11-30&group_by=team`"""
        group_by = body.get("group_by") or "team"
        if group_by not in GROUPS:
            raise InvalidRequestError(
                f"'group_by' must be one of {', '.join(sorted(GROUPS))}.", param="group_by"
            )
        start, end = time_param(body, "start_date"), time_param(body, "end_date")
        if start is None or end is None:
            raise InvalidRequestError("'start_date' and 'end_date' are required (YYYY-MM-DD).")
        records = await fence.store.spend_records(start=start, end=end, limit=MAX_INT_PARAM)
        return spend_report(records, group_by)

    return [("/spend/report", "GET", report), ("/global/spend/report", "GET", report)]
