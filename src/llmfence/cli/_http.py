"""The command line over a running app's admin API (`--url`, `--master-key`), with httpx.

Each operation is one admin route (two for listings, a page at a time); the answers are the
routes' own JSON. A plain key given on the command line travels in a POST body, never in a
URL, so servers do not log it.
"""

from __future__ import annotations

import math
from typing import Any

from llmfence.stores import hash_key

from ._ops import OperationError, token_of

__all__ = ["HttpBackend"]

_PAGE = 100


class HttpBackend:
    """The admin API of the app at `url`, called with `master_key`."""

    def __init__(self, url: str, master_key: str, *, timeout: float = 30.0) -> None:
        try:
            import httpx
        except ImportError as error:  # pragma: no cover - httpx is in the dev extra
            raise OperationError("--url needs httpx: pip install 'llmfence[cli]'") from error
        self._httpx = httpx
        self._url = url.rstrip("/")
        self._client = httpx.AsyncClient(
            base_url=self._url,
            headers={"Authorization": f"Bearer {master_key}"},
            timeout=timeout,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            if method == "GET":
                response = await self._client.get(path, params=body or {})
            else:
                response = await self._client.post(path, json=body or {})
        except self._httpx.HTTPError as error:
            # httpx's message names the URL (no key: that is in a header) and the cause.
            reason = str(error) or type(error).__name__
            raise OperationError(f"cannot reach {self._url}: {reason}") from error
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if response.status_code >= 400:
            message = None
            if isinstance(answer, dict):
                detail = answer.get("error")
                message = (
                    detail.get("message") if isinstance(detail, dict) else answer.get("detail")
                )
            raise OperationError(
                f"{response.status_code} from {path}: {message or response.reason_phrase}"
            )
        if answer is None:
            raise OperationError(
                f"{path} answered something other than JSON: is {self._url} "
                "an llmfence app with admin=True?"
            )
        return answer

    async def _pages(self, path: str, params: dict[str, Any], items: str, size: str) -> list[Any]:
        out: list[Any] = []
        page = 1
        while True:
            answer = await self._call("GET", path, {**params, "page": page, size: _PAGE})
            out.extend(answer[items])
            total = answer.get("total_pages") or math.ceil(answer.get("total", 0) / _PAGE)
            if page >= total:
                return out
            page += 1

    # -- keys ------------------------------------------------------------------------------

    async def create_key(self, body: dict[str, Any], create_missing: bool) -> dict[str, Any]:
        answer = await self._call(
            "POST", "/key/generate", {**body, "create_missing": create_missing}
        )
        return {"key": answer["key"], "token": hash_key(answer["key"]), **_without(answer)}

    async def list_keys(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        params = {**filters, "return_full_object": "true"}
        return await self._pages("/key/list", params, "keys", "size")

    async def key_info(self, key: str) -> dict[str, Any]:
        answer = await self._call("POST", "/key/info", {"key": key})
        return {"token": token_of(key), **answer["info"]}

    async def rotate_key(self, key: str, grace_period: str | None) -> dict[str, Any]:
        body = {"key": key, **({"grace_period": grace_period} if grace_period else {})}
        answer = await self._call("POST", "/key/regenerate", body)
        return {"key": answer["key"], **_without(answer)}

    async def block_key(self, key: str, blocked: bool) -> dict[str, Any]:
        path = "/key/block" if blocked else "/key/unblock"
        answer: dict[str, Any] = await self._call("POST", path, {"key": key})
        return answer

    async def delete_keys(self, keys: list[str]) -> dict[str, Any]:
        answer: dict[str, Any] = await self._call("POST", "/key/delete", {"keys": keys})
        return answer

    # -- users and teams -------------------------------------------------------------------

    async def create_record(
        self, level: str, body: dict[str, Any], create_missing: bool
    ) -> dict[str, Any]:
        if level == "team":
            answer: dict[str, Any] = await self._call("POST", "/team/new", body)
            return answer
        answer = await self._call("POST", "/user/new", {**body, "create_missing": create_missing})
        # /user/new also makes the user a first key (as LiteLLM's does); the command line
        # prints no key it was not asked for, so that key goes (`keys create --user-id`).
        await self._call("POST", "/key/delete", {"keys": [answer["key"]]})
        info = await self.record_info("user", body["user_id"])
        return dict(info["user_info"])

    async def list_records(self, level: str, filters: dict[str, Any]) -> list[dict[str, Any]]:
        if level == "team":
            answer: list[dict[str, Any]] = await self._call("GET", "/team/list")
            return answer
        params = {"team": filters["team_id"]} if filters.get("team_id") else {}
        return await self._pages("/user/list", params, "users", "page_size")

    async def record_info(self, level: str, ident: str) -> dict[str, Any]:
        answer: dict[str, Any] = await self._call("GET", f"/{level}/info", {f"{level}_id": ident})
        return answer

    async def update_record(
        self, level: str, body: dict[str, Any], create_missing: bool
    ) -> dict[str, Any]:
        if level == "team":
            answer: dict[str, Any] = await self._call("POST", "/team/update", body)
            return dict(answer["data"])
        return dict(
            await self._call("POST", "/user/update", {**body, "create_missing": create_missing})
        )

    async def delete_records(self, level: str, ids: list[str]) -> dict[str, Any]:
        answer: dict[str, Any] = await self._call("POST", f"/{level}/delete", {f"{level}_ids": ids})
        return answer

    # -- spend -----------------------------------------------------------------------------

    async def spend_report(self, start: float, end: float, group_by: str) -> list[Any]:
        params = {"start_date": start, "end_date": end, "group_by": group_by}
        answer: list[Any] = await self._call("GET", "/spend/report", params)
        return answer


def _without(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in answer.items() if k != "key"}
