"""What the command line prints: records as aligned `name  value` lines, lists and the spend
report as aligned columns, or the answer as JSON (`--json`).

Plain text, not `rich`: a few aligned columns need no dependency, and they stay readable
when piped to `grep`, `cut` or a log. USD amounts are summed as `Decimal`, never as floats.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

__all__ = ["dump", "fields", "money", "spend_rows", "table"]

# Which fields a record shows, in order; the rest are in `--json`.
SHOWN = (
    "key_name",
    "token",
    "key_alias",
    "user_id",
    "team_id",
    "team_alias",
    "blocked",
    "spend",
    "total_spend",
    "max_budget",
    "budget_duration",
    "budget_reset_at",
    "rpm_limit",
    "tpm_limit",
    "max_parallel_requests",
    "models",
    "budget_id",
    "expires",
    "metadata",
)


def dump(value: Any) -> str:
    """JSON, indented, keys in the answer's order."""
    return json.dumps(value, indent=2, default=str)


def money(value: Any) -> str:
    """A USD amount as `$0.000123` (no float noise, no exponent), or `-` for none."""
    if value is None:
        return "-"
    amount = Decimal(str(value))
    text = format(amount.quantize(Decimal("0.000001")) if amount < 1 else round(amount, 2), "f")
    return f"${text}"


def _cell(name: str, value: Any) -> str:
    if value is None or value == [] or value == {}:
        return "-"
    if name in ("spend", "total_spend", "max_budget"):
        return money(value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def fields(record: dict[str, Any]) -> str:
    """A record as aligned `name  value` lines, the fields worth reading first."""
    names = [name for name in SHOWN if name in record]
    width = max((len(name) for name in names), default=0)
    return "\n".join(f"{name:<{width}}  {_cell(name, record[name])}" for name in names)


def table(rows: Iterable[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Rows as aligned columns under upper-case headers; `columns` is `(field, header)`."""
    cells = [[header for _, header in columns]]
    cells += [[_cell(field, row.get(field)) for field, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in cells
    )


def spend_rows(report: list[dict[str, Any]], plural: str, name_field: str) -> list[dict[str, Any]]:
    """`/spend/report`'s days summed per group, largest first: `name`, `spend` (a `Decimal`),
    `tokens`, `share` (a percentage of the whole)."""
    totals: dict[Any, list[Any]] = {}
    for day in report:
        for group in day.get(plural, []):
            entry = totals.setdefault(group.get(name_field), [Decimal(0), 0])
            entry[0] += Decimal(str(group["total_spend"]))
            entry[1] += int(group.get("total_tokens", 0))
    whole = sum((spend for spend, _ in totals.values()), Decimal(0))
    rows = [
        {
            "name": name,
            "spend": spend,
            "tokens": tokens,
            "share": f"{spend / whole * 100:.1f}%" if whole else "-",
        }
        for name, (spend, tokens) in totals.items()
    ]
    rows.sort(key=lambda row: (-row["spend"], str(row["name"])))
    return rows


def when(timestamp: float) -> str:
    """A Unix time as the admin API writes times (ISO 8601, UTC, `Z`)."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
