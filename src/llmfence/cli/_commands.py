"""Each command: the backend operation it runs and what it prints."""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from llmfence._admin_spend import GROUPS
from llmfence._duration import parse_duration
from llmfence.exceptions import ConfigurationError

from ._ops import Backend
from ._output import dump, fields, money, spend_rows, table, when
from ._parser import SPEND_GROUPS, UsageError, body_of

__all__ = ["run"]

_KEY_COLUMNS = (
    ("key_name", "KEY"),
    ("key_alias", "ALIAS"),
    ("user_id", "USER"),
    ("team_id", "TEAM"),
    ("spend", "SPEND"),
    ("max_budget", "BUDGET"),
    ("budget_reset_at", "RESETS"),
    ("blocked", "BLOCKED"),
    ("token", "TOKEN"),
)
_RECORD_COLUMNS = {
    "user": (("user_id", "USER"), ("team_id", "TEAM")),
    "team": (("team_id", "TEAM"), ("team_alias", "ALIAS")),
}
_LIMIT_COLUMNS = (
    ("spend", "SPEND"),
    ("max_budget", "BUDGET"),
    ("budget_duration", "PERIOD"),
    ("budget_reset_at", "RESETS"),
    ("rpm_limit", "RPM"),
    ("tpm_limit", "TPM"),
)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _moment(text: str, now: float, name: str) -> float:
    """`--since`/`--until`: a duration ago (`7d`, `24h`), or an ISO date or time (UTC)."""
    try:
        return (
            datetime.fromisoformat(text.replace("Z", "+00:00")).replace(tzinfo=UTC).timestamp()
            if "-" in text
            else now - _seconds(text)
        )
    except ValueError as error:
        raise UsageError(
            f"{name} takes a duration such as 7d or 24h, or a date such as 2026-11-01"
        ) from error


def _seconds(text: str) -> float:
    try:
        seconds = parse_duration(text).seconds
    except ConfigurationError as error:
        raise ValueError(text) from error
    if seconds is None:  # a calendar period ("monthly"): no fixed length
        raise ValueError(text)
    return float(seconds)


async def run(args: argparse.Namespace, backend: Backend) -> None:
    """Run the command `args` names on `backend` and print its answer.

    Raises:
        OperationError: The operation failed.
        UsageError: An option's value is not understood.
    """
    as_json: bool = bool(args.json)
    if args.group == "keys":
        await _keys(args, backend, as_json)
    elif args.group == "spend":
        await _spend(args, backend, as_json)
    else:
        await _records(args, backend, as_json, args.group[:-1])


async def _keys(args: argparse.Namespace, backend: Backend, as_json: bool) -> None:
    command = args.command
    answer: Any
    if command == "create":
        answer = await backend.create_key(body_of(args), args.create_missing)
    elif command == "list":
        answer = await backend.list_keys(body_of(args))
        _out(dump(answer) if as_json else table(answer, _KEY_COLUMNS))
        return
    elif command == "info":
        answer = await backend.key_info(args.key)
    elif command == "rotate":
        answer = await backend.rotate_key(args.key, args.grace_period)
    elif command in ("block", "unblock"):
        answer = await backend.block_key(args.key, command == "block")
    else:
        answer = await backend.delete_keys(args.key)
        _out(dump(answer) if as_json else f"deleted {', '.join(answer['deleted_keys'])}")
        return
    if as_json:
        _out(dump(answer))
        return
    if "key" in answer:  # a new key, shown this once
        _out(f"key  {answer['key']}")
        sys.stderr.write("The key is shown once: keep it now. Other commands take its token.\n")
    _out(fields(answer))


async def _records(args: argparse.Namespace, backend: Backend, as_json: bool, level: str) -> None:
    command = args.command
    create_missing = bool(getattr(args, "create_missing", False))
    answer: Any
    if command == "create":
        answer = await backend.create_record(level, body_of(args), create_missing)
    elif command == "update":
        body = body_of(args)
        if len(body) == 1:
            raise UsageError(f"`{level}s update` needs at least one field to change")
        answer = await backend.update_record(level, body, create_missing)
    elif command == "list":
        answer = await backend.list_records(level, body_of(args))
        columns = (*_RECORD_COLUMNS[level], *_LIMIT_COLUMNS)
        _out(dump(answer) if as_json else table(answer, columns))
        return
    elif command == "info":
        answer = await backend.record_info(level, getattr(args, f"{level}_id"))
        if not as_json:
            keys = answer.get("keys", [])
            _out(fields(answer[f"{level}_info"]))
            _out(f"\n{len(keys)} key(s)" + ("\n" + table(keys, _KEY_COLUMNS) if keys else ""))
            return
    else:
        answer = await backend.delete_records(level, getattr(args, f"{level}_ids"))
        deleted = answer[f"deleted_{level}s"]
        _out(dump(answer) if as_json else f"deleted {', '.join(deleted)}")
        return
    _out(dump(answer) if as_json else fields(answer))


async def _spend(args: argparse.Namespace, backend: Backend, as_json: bool) -> None:
    now = time.time()
    start = _moment(args.since, now, "--since")
    end = _moment(args.until, now, "--until") if args.until else now
    group_by = SPEND_GROUPS[args.by]
    plural, name_field, _ = GROUPS[group_by]
    rows = spend_rows(await backend.spend_report(start, end, group_by), plural, name_field)
    total = sum((row["spend"] for row in rows), Decimal(0))
    if as_json:
        _out(
            dump(
                {
                    "by": args.by,
                    "since": when(start),
                    "until": when(end),
                    "total_spend": float(total),
                    "rows": [
                        {"name": r["name"], "spend": float(r["spend"]), "total_tokens": r["tokens"]}
                        for r in rows
                    ],
                }
            )
        )
        return
    shown = [{**row, "usd": money(row["spend"]), "tokens": str(row["tokens"])} for row in rows]
    header = args.by.upper().replace("-", " ")
    columns = (("name", header), ("usd", "SPEND"), ("tokens", "TOKENS"), ("share", "SHARE"))
    _out(f"spend by {args.by}, {when(start)} to {when(end)}: {money(total)}")
    _out(table(shown, columns) if rows else "(no spend)")
