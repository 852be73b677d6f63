"""What every store's spend log shares: which running totals a record counts in, and filters.

Both stores keep the same totals under the same names and answer `spend_records` with the same
filters; this module is the one place that says how. Filters read a record by position, so they
work alike on a `SpendRecord`, on the plain tuple `MemoryStore` keeps, and on the JSON array
`RedisStore` stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from ._types import SpendRecord

__all__ = ["Filters", "matches", "total_key", "total_keys"]

_REQUEST_ID: Final = SpendRecord._fields.index("request_id")
_MODEL: Final = SpendRecord._fields.index("model")
_TIMESTAMP: Final = SpendRecord._fields.index("timestamp")
_KEY_HASH: Final = SpendRecord._fields.index("key_hash")
_USER_ID: Final = SpendRecord._fields.index("user_id")
_TEAM_ID: Final = SpendRecord._fields.index("team_id")

Filters = tuple[str | None, str | None, str | None, str | None, float | None, float | None]
"""`spend_records`' filters in order: key hash, user id, team id, model, start, end."""


def total_keys(record: SpendRecord) -> list[str]:
    """The running totals a record counts in, each named `<group>:<name>`.

    Every record counts in `global:`; then in its key, user, team, model and end user, each
    when the record names one.
    """
    keys = ["global:"]
    if record.key_hash:
        keys.append("key:" + record.key_hash)
    if record.user_id:
        keys.append("user:" + record.user_id)
    if record.team_id:
        keys.append("team:" + record.team_id)
    if record.model:
        keys.append("model:" + record.model)
    if record.end_user:
        keys.append("end_user:" + record.end_user)
    return keys


def total_key(group: str, name: str) -> str:
    """The name `total_keys` gives one group's totals (`"global"` ignores `name`)."""
    return "global:" if group == "global" else f"{group}:{name}"


def matches(values: Sequence[Any], filters: Filters, request_id: str | None = None) -> bool:
    """Whether a record, given as its values in field order, passes every filter given."""
    key_hash, user_id, team_id, model, start, end = filters
    return (
        (request_id is None or values[_REQUEST_ID] == request_id)
        and (key_hash is None or values[_KEY_HASH] == key_hash)
        and (user_id is None or values[_USER_ID] == user_id)
        and (team_id is None or values[_TEAM_ID] == team_id)
        and (model is None or values[_MODEL] == model)
        and (start is None or values[_TIMESTAMP] >= start)
        and (end is None or values[_TIMESTAMP] <= end)
    )
