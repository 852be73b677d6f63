"""What the command line's two backends share: the error an operation fails with, and a key
named on the command line told apart from its token (hash)."""

from __future__ import annotations

import re
from typing import Any, Protocol

from llmfence.stores import hash_key

__all__ = ["Backend", "OperationError", "token_of"]

_TOKEN = re.compile(r"[0-9a-f]{64}")


class OperationError(Exception):
    """An operation that failed: not found, refused, unreachable (exit status 1). Its
    message is one line and never holds a key."""


def token_of(key: str) -> str:
    """The token (the sha256 hash `keys list` shows) of a key, or the token itself."""
    return key if _TOKEN.fullmatch(key) else hash_key(key)


class Backend(Protocol):
    """The operations the commands run: on a store (`_store`) or over HTTP (`_http`); both
    answer in the admin API's shapes."""

    async def aclose(self) -> None: ...
    async def create_key(self, body: dict[str, Any], create_missing: bool) -> dict[str, Any]: ...
    async def list_keys(self, filters: dict[str, Any]) -> list[dict[str, Any]]: ...
    async def key_info(self, key: str) -> dict[str, Any]: ...
    async def rotate_key(self, key: str, grace_period: str | None) -> dict[str, Any]: ...
    async def block_key(self, key: str, blocked: bool) -> dict[str, Any]: ...
    async def delete_keys(self, keys: list[str]) -> dict[str, Any]: ...
    async def create_record(
        self, level: str, body: dict[str, Any], create_missing: bool
    ) -> dict[str, Any]: ...
    async def list_records(self, level: str, filters: dict[str, Any]) -> list[dict[str, Any]]: ...
    async def record_info(self, level: str, ident: str) -> dict[str, Any]: ...
    async def update_record(
        self, level: str, body: dict[str, Any], create_missing: bool
    ) -> dict[str, Any]: ...
    async def delete_records(self, level: str, ids: list[str]) -> dict[str, Any]: ...
    async def spend_report(self, start: float, end: float, group_by: str) -> list[Any]: ...
