"""Where a `BudgetManager` keeps its users' entries: a file or a hosted server (a `Store`: see
`_budget_store`).

`DictBackend` holds the entries in memory and saves them whole after every change, through
`LocalFile` (LiteLLM's `user_cost.json`, replaced atomically) or `Hosted` (LiteLLM's
`/get_budget` and `/set_budget` protocol). Backends speak integer nano-USD; `to_usd` and
`to_nano` convert an entry at the edges (LiteLLM's files hold floats). A backend's `charge` and
`reset` return False for an unknown user: the manager raises.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from llmfence._money import nano_to_usd, usd_to_nano
from llmfence._usage import Usage, usage_from_json
from llmfence.exceptions import ConfigurationError, StoreError

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DictBackend",
    "Entry",
    "Hosted",
    "LocalFile",
    "as_plain",
    "message_text",
    "model_and_usage",
    "to_nano",
    "to_usd",
    "usd",
]

Entry = dict[str, Any]
"""One user's entry, shaped as LiteLLM's; inside the manager spend is integer nano-USD."""


class DictBackend:
    """Entries in memory, loaded from a file or server and saved back after every change.

    The entries are LiteLLM's `user_dict` itself, live (money in USD, as in the file): an edit
    made in place through `BudgetManager.user_dict` counts, as in LiteLLM. Beside them, the
    exact nano-USD entry each change left; an entry that no longer reads as it did was edited
    by hand and is read from its USD again.
    """

    def __init__(self, persistence: LocalFile | Hosted) -> None:
        self._persistence = persistence
        self._data: dict[str, Entry] = {}
        self._exact: dict[str, Entry] = {}
        try:
            self.load()
        except BaseException:
            persistence.close()  # the manager is never built, so nothing else would close it
            raise

    def load(self) -> None:
        data = self._persistence.read()
        self._data.clear()  # the same dict: a caller holding `user_dict` sees the reload
        self._data.update(data)
        self._exact.clear()

    def live(self) -> dict[str, Entry]:
        return self._data

    def users(self) -> list[str]:
        return list(self._data)

    def entry(self, user: str) -> Entry | None:
        live = self._data.get(user)
        if live is None:
            return None
        exact = self._exact.get(user)
        if exact is not None and to_usd(exact) == live:
            return _convert(exact, _same)
        return to_nano(live)

    def put(self, user: str, entry: Entry) -> None:
        self._commit(user, dict(entry))

    def charge(self, user: str, model: str, cost: int) -> bool:
        entry = self.entry(user)
        if entry is None:
            return False
        entry["current_cost"] = entry.get("current_cost", 0) + cost
        models = entry.setdefault("model_cost", {})
        models[model] = models.get(model, 0) + cost
        self._commit(user, entry)
        return True

    def reset(self, user: str, now: float | None) -> bool:
        entry = self.entry(user)
        if entry is None:
            return False
        entry |= {"current_cost": 0, "model_cost": {}}
        if now is not None:
            entry["last_updated_at"] = now
        self._commit(user, entry)
        return True

    def save(self) -> dict[str, Any]:
        return self._persistence.write(self._data)

    def _commit(self, user: str, entry: Entry) -> None:
        # Saved first, kept after: a save that fails (a server error, a full disk) leaves the
        # manager as it was, so a retried update is not counted twice.
        shown = to_usd(entry)
        self._persistence.write({**self._data, user: shown})
        live = self._data.get(user)
        if live is None:
            self._data[user] = shown
        else:  # in place: a caller holding `user_dict[user]` sees the change
            live.clear()
            live.update(shown)
        self._exact[user] = entry

    def close(self) -> None:
        self._persistence.close()


class LocalFile:
    """LiteLLM's `user_cost.json`, replaced atomically so a reader never sees half a file."""

    def __init__(self, path: str) -> None:
        self._path = path

    def read(self) -> dict[str, Any]:
        try:
            with open(self._path, encoding="utf-8") as file:
                data = json.load(file)
        except FileNotFoundError:
            return {}
        if not isinstance(data, dict):
            raise ConfigurationError(f"{self._path} does not hold a JSON object of users")
        return data

    def write(self, user_dict: dict[str, Any]) -> dict[str, Any]:
        # A unique name in the same directory: os.replace is atomic only within a filesystem,
        # and two managers (or processes) must not write the same temp file.
        folder, name = os.path.split(self._path)
        temp = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(temp, "x", encoding="utf-8") as file:
                json.dump(user_dict, file, indent=4)
            os.replace(temp, self._path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return {"status": "success"}

    def close(self) -> None:
        pass


class Hosted:
    """LiteLLM's hosted protocol: `POST /get_budget` and `POST /set_budget` with JSON bodies."""

    def __init__(self, api_base: str, headers: dict[str, str], project: str, timeout: float):
        try:
            import httpx
        except ImportError as exc:  # pragma: no cover - httpx ships with the dev extras
            raise ImportError("client_type='hosted' needs httpx: pip install httpx") from exc
        self._base = api_base.rstrip("/")
        self._project = project
        self._client = httpx.Client(headers=headers, timeout=timeout)
        self._errors: tuple[type[Exception], ...] = (httpx.HTTPError, ValueError)

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        url = self._base + path
        try:
            response: httpx.Response = self._client.post(url, json=body)
            response.raise_for_status()
            return response.json()
        except self._errors as exc:
            raise StoreError(f"The budget server failed ({url}): {exc}") from exc

    def read(self) -> dict[str, Any]:
        answer = self._post("/get_budget", {"project_name": self._project})
        # {"status": "error"} means the project was never saved: no users yet.
        success = isinstance(answer, dict) and answer.get("status") == "success"
        data = answer.get("data") if success else None
        return data if isinstance(data, dict) else {}

    def write(self, user_dict: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = self._post(
            "/set_budget", {"project_name": self._project, "user_dict": user_dict}
        )
        return answer

    def close(self) -> None:
        self._client.close()


def usd(nano: int) -> float:
    return nano_to_usd(nano) if nano else 0  # LiteLLM's files and prints say 0, not 0.0


def to_usd(entry: Entry) -> Entry:
    return _convert(entry, usd)


def to_nano(entry: Entry) -> Entry:
    return _convert(entry, usd_to_nano)


def _same(value: Any) -> Any:
    return value


def _convert(entry: Entry, money: Callable[[Any], Any]) -> Entry:
    """A copy of an entry with `money` applied to the spend (`current_cost`, `model_cost`)."""
    out = dict(entry)
    if "current_cost" in out:
        out["current_cost"] = money(out["current_cost"])
    if isinstance(out.get("model_cost"), dict):
        out["model_cost"] = {name: money(value) for name, value in out["model_cost"].items()}
    return out


# -- reading what LiteLLM's callers hand in --------------------------------------------------


def message_text(content: Any) -> str:
    """A message's text: the string, or the text parts of a multimodal list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def as_plain(value: Any) -> Any:
    """A response as JSON-like data: mappings as they are, pydantic models dumped, else attrs."""
    if value is None or isinstance(value, Mapping | str | int | float | list):
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump()
    return {k: as_plain(v) for k, v in vars(value).items() if not k.startswith("_")}


def model_and_usage(completion_obj: Any) -> tuple[str, Usage]:
    body = as_plain(completion_obj)
    model = body.get("model") if isinstance(body, Mapping) else None
    usage = usage_from_json(body) if isinstance(body, Mapping) else None
    if not isinstance(model, str) or not model or usage is None:
        raise ValueError("completion_obj must be a chat completion with `model` and `usage`")
    return model, usage
