"""The command line's grammar: `llmfence keys|users|teams|spend …` as argparse parsers, and
the admin API body a command's options make.

Options are the admin API's fields spelled as flags (`--max-budget` is `max_budget`), so a
command's body is the JSON the matching route takes, whichever backend runs it. The connection
options (`--store`, `--url`, `--master-key`, `--json`) are accepted before the command or after
it: each leaf parser repeats them with `SUPPRESS` defaults, so a later one does not reset an
earlier one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

__all__ = ["UsageError", "body_of", "build_parser"]

# `--by` as the command line says it, and as `/spend/report`'s `group_by` says it.
SPEND_GROUPS = {
    "key": "api_key",
    "user": "user",
    "team": "team",
    "model": "model",
    "end-user": "customer",
}

# Each option's admin API field, in the order bodies list them.
_FIELDS = {
    "alias": "key_alias",
    "team_alias": "team_alias",
    "user_id": "user_id",
    "team_id": "team_id",
    "max_budget": "max_budget",
    "budget_duration": "budget_duration",
    "rpm_limit": "rpm_limit",
    "tpm_limit": "tpm_limit",
    "max_parallel_requests": "max_parallel_requests",
    "models": "models",
    "duration": "duration",
    "budget_id": "budget_id",
    "metadata": "metadata",
}


class UsageError(Exception):
    """A command line that does not parse, or names no store and no URL (exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line (raised, for `main` to print), not the
    usage block argparse prints and exits on."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see `{self.prog} --help`)")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:  # pragma: no cover - argparse calls error() for its messages
            sys.stderr.write(message)
        raise SystemExit(status)


def _metadata(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('--metadata takes a JSON object, e.g. \'{"env": "ci"}\'')
    return value


def _models(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _connection(parser: argparse.ArgumentParser, default: Any) -> None:
    group = parser.add_argument_group("where (also from LLMFENCE_STORE, LLMFENCE_URL, …)")
    group.add_argument(
        "--store",
        default=default,
        metavar="URL",
        help="a store URL: sqlite:///file.db, redis://host:6379/0, redis+cluster://… "
        "(env LLMFENCE_STORE)",
    )
    group.add_argument(
        "--url",
        default=default,
        help="a running app's admin API, e.g. http://localhost:8000 (env LLMFENCE_URL)",
    )
    group.add_argument(
        "--master-key",
        default=default,
        metavar="KEY",
        help="the app's master key, with --url (env LLMFENCE_MASTER_KEY; prefer the variable: "
        "command lines are visible to other users)",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="print the result as JSON",
    )


def _limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-budget", type=float, metavar="USD", help="budget in USD")
    parser.add_argument(
        "--budget-duration", metavar="PERIOD", help="budget period: 30d, 24h, daily, monthly…"
    )
    parser.add_argument("--rpm-limit", type=int, metavar="N", help="requests per minute")
    parser.add_argument("--tpm-limit", type=int, metavar="N", help="tokens per minute")
    parser.add_argument("--max-parallel-requests", type=int, metavar="N", help="requests at once")
    parser.add_argument(
        "--models",
        type=_models,
        action="extend",
        metavar="A,B",
        help="models or access groups allowed (comma-separated, repeatable)",
    )
    parser.add_argument("--metadata", type=_metadata, metavar="JSON", help="a JSON object")


def build_parser() -> argparse.ArgumentParser:
    """The `llmfence` parser: one subcommand per admin operation."""
    top = _Parser(
        prog="llmfence",
        description="Manage llmfence keys, users and teams, and read spend, in a store or "
        "through a running app's admin API.",
    )
    _connection(top, None)
    common = _Parser(add_help=False)
    _connection(common, argparse.SUPPRESS)
    groups = top.add_subparsers(dest="group", metavar="{keys,users,teams,spend}")
    groups.required = True

    def leaf(sub: Any, name: str, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(name, help=text, parents=[common])
        parser.description = text
        return parser

    keys = groups.add_parser("keys", help="virtual keys").add_subparsers(dest="command")
    keys.required = True
    create = leaf(keys, "create", "create a key; prints the key once")
    create.add_argument("--alias", help="a unique name for the key")
    create.add_argument("--user-id", help="the user the key belongs to")
    create.add_argument("--team-id", help="the team the key belongs to")
    create.add_argument("--duration", metavar="PERIOD", help="expiry: 30d, 12h…")
    create.add_argument("--budget-id", metavar="TIER", help="a budget tier")
    create.add_argument(
        "--create-missing", action="store_true", help="create the user and team if missing"
    )
    _limits(create)
    listing = leaf(keys, "list", "list keys")
    listing.add_argument("--user-id")
    listing.add_argument("--team-id")
    listing.add_argument("--alias")
    help_key = "the key, or its token (hash) as `keys list` shows it"
    for name, text in (
        ("info", "a key's budget, spend and limits"),
        ("block", "block a key: its requests get 401"),
        ("unblock", "unblock a key"),
    ):
        leaf(keys, name, text).add_argument("key", help=help_key)
    rotate = leaf(keys, "rotate", "a new key with the old one's spend and limits; prints it once")
    rotate.add_argument("key", help=help_key)
    rotate.add_argument(
        "--grace-period", metavar="PERIOD", help="the old key works this long (24h…)"
    )
    leaf(keys, "delete", "delete keys").add_argument("key", nargs="+", help=help_key)

    for group, level in (("users", "user"), ("teams", "team")):
        sub = groups.add_parser(group, help=f"{level}s").add_subparsers(dest="command")
        sub.required = True
        create = leaf(sub, "create", f"create a {level}")
        update = leaf(sub, "update", f"change a {level}'s fields")
        for parser in (create, update):
            parser.add_argument(f"{level}_id", metavar=f"{level.upper()}_ID")
            _limits(parser)
            parser.add_argument("--budget-id", metavar="TIER", help="a budget tier")
            if level == "user":
                parser.add_argument("--team-id", help="the user's team")
                parser.add_argument(
                    "--create-missing", action="store_true", help="create the team if missing"
                )
            else:
                parser.add_argument("--alias", dest="team_alias", help="the team's name")
        listing = leaf(sub, "list", f"list {level}s")
        if level == "user":
            listing.add_argument("--team-id", help="only this team's users")
        leaf(sub, "info", f"a {level}'s budget, spend and keys").add_argument(
            f"{level}_id", metavar=f"{level.upper()}_ID"
        )
        leaf(sub, "delete", f"delete {level}s and their keys").add_argument(
            f"{level}_ids", nargs="+", metavar=f"{level.upper()}_ID"
        )

    spend = leaf(groups, "spend", "spend per key, user, team, model or end user")
    spend.add_argument("--by", choices=list(SPEND_GROUPS), default="key")
    spend.add_argument(
        "--since", default="7d", metavar="WHEN", help="7d, 24h… ago, or a date (default 7d)"
    )
    spend.add_argument("--until", metavar="WHEN", help="a date or time (default now)")
    return top


def body_of(args: argparse.Namespace, *, skip: Sequence[str] = ()) -> dict[str, Any]:
    """The admin API body an add/update command's options make (unset options left out)."""
    body: dict[str, Any] = {}
    for option, field in _FIELDS.items():
        value = getattr(args, option, None)
        if value is not None and option not in skip:
            body[field] = value
    return body
