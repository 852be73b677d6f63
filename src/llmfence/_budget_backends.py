"""Where a `BudgetManager` keeps its users' entries: a file, a hosted server, or a `Store`.

`DictBackend` holds the entries in memory and saves them whole after every change, through
`LocalFile` (LiteLLM's `user_cost.json`, replaced atomically) or `Hosted` (LiteLLM's
`/get_budget` and `/set_budget` protocol). `StoreBackend` keeps spend in the store's atomic budget
counters, named by `_counters.project` / `project_user`, and the rest of each entry in the
store's project document. All backends speak integer nano-USD; `to_usd` and `to_nano` convert
an entry at the edges (LiteLLM's files hold floats). A backend's `charge` and `reset` return
False for an unknown user: the manager raises.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio.from_thread

from llmfence import _counters
from llmfence._money import nano_to_usd, usd_to_nano
from llmfence._usage import Usage, usage_from_json
from llmfence.exceptions import ConfigurationError, StoreError
from llmfence.stores import BudgetScope, Store

if TYPE_CHECKING:
    import httpx

__all__ = [
    "DictBackend",
    "Entry",
    "Hosted",
    "LocalFile",
    "StoreBackend",
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
    """Entries in memory, loaded from a file or server and saved back after every change."""

    def __init__(self, persistence: LocalFile | Hosted) -> None:
        self._persistence = persistence
        try:
            self.load()
        except BaseException:
            persistence.close()  # the manager is never built, so nothing else would close it
            raise

    def load(self) -> None:
        self._data = {user: to_nano(entry) for user, entry in self._persistence.read().items()}

    def users(self) -> list[str]:
        return list(self._data)

    def entry(self, user: str) -> Entry | None:
        return self._data.get(user)

    def put(self, user: str, entry: Entry) -> None:
        self._commit(user, dict(entry))

    def charge(self, user: str, model: str, cost: int) -> bool:
        if user not in self._data:
            return False
        entry = copy.deepcopy(self._data[user])
        entry["current_cost"] = entry.get("current_cost", 0) + cost
        models = entry.setdefault("model_cost", {})
        models[model] = models.get(model, 0) + cost
        self._commit(user, entry)
        return True

    def reset(self, user: str, now: float | None) -> bool:
        if user not in self._data:
            return False
        entry = copy.deepcopy(self._data[user])
        entry |= {"current_cost": 0, "model_cost": {}}
        if now is not None:
            entry["last_updated_at"] = now
        self._commit(user, entry)
        return True

    def save(self) -> dict[str, Any]:
        return self._persistence.write({user: to_usd(e) for user, e in self._data.items()})

    def _commit(self, user: str, entry: Entry) -> None:
        # Saved first, kept after: a save that fails (a server error, a full disk) leaves the
        # manager as it was, so a retried update is not counted twice.
        data = {**self._data, user: entry}
        self._persistence.write({name: to_usd(e) for name, e in data.items()})
        self._data = data

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


class StoreBackend:
    """Spend in the store's atomic budget counters; the rest in the project document.

    The document holds LiteLLM's entry without money, plus `"models"`, the models charged since
    the last reset (a counter cannot be listed). Only creating a budget, the first charge of a
    model and resets rewrite the document; two processes doing those for the same project at
    the same instant may lose one write (spend is never lost: the counters hold it).
    """

    def __init__(self, store: Store, project: str, clock: Callable[[], float]) -> None:
        # Not the bare project name: the admin API's `/set_budget` keeps LiteLLM's whole
        # documents (money included) under that name, in another shape.
        self._store, self._clock = store, clock
        self._project = _counters.project(project)
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._stop: weakref.finalize[Any, Any] | None = None

    def _call(self, func: Callable[..., Any], *args: Any) -> Any:
        if self._portal is None:
            # One private event loop for the manager's life: a store's connections belong
            # to the loop that opened them.
            manager = anyio.from_thread.start_blocking_portal()
            self._portal = manager.__enter__()
            self._stop = weakref.finalize(self, _stop_portal, manager, self._portal, self._store)
        return self._portal.call(func, *args)

    def _document(self) -> dict[str, Any]:
        return self._call(self._store.get_project, self._project) or {}

    def _scopes(self, user: str, models: Sequence[str]) -> list[BudgetScope]:
        # (Names are quoted: a user named "a:model:b" cannot share a counter with user "a".)
        user_scope = BudgetScope(_counters.project_user(self._project, user), "user", user)
        return [user_scope] + [
            BudgetScope(_counters.project_user(self._project, user, model), "model", model)
            for model in models
        ]

    def _reset_counters(self, user: str, models: Sequence[str]) -> None:
        for scope in self._scopes(user, models):
            self._call(self._store.reset_budget, scope.key, None, self._clock())

    def load(self) -> None:
        pass

    def users(self) -> list[str]:
        return list(self._document())

    def entry(self, user: str) -> Entry | None:
        meta = self._document().get(user)
        if meta is None:
            return None
        entry = {key: value for key, value in meta.items() if key != "models"}
        # The user's own counter is read whatever the document says: it is the truth, and a
        # document write lost to a concurrent one must not hide the user's spend.
        models = list(meta.get("models", []))
        states = self._call(self._store.budgets, self._scopes(user, models), self._clock())
        if "models" in meta or states[0].spent:
            entry["current_cost"] = states[0].spent
            entry["model_cost"] = {
                model: s.spent for model, s in zip(models, states[1:], strict=True)
            }
        return entry

    def put(self, user: str, entry: Entry) -> None:
        document = self._document()
        if user in document:  # a new budget starts from zero spent, as in LiteLLM
            self._reset_counters(user, document[user].get("models", []))
        document[user] = entry
        self._call(self._store.set_project, self._project, document)

    def charge(self, user: str, model: str, cost: int) -> bool:
        document = self._document()
        if user not in document:
            return False
        models = document[user].setdefault("models", [])
        if model not in models:
            models.append(model)
            self._call(self._store.set_project, self._project, document)
        self._call(self._store.charge, self._scopes(user, [model]), cost, self._clock())
        return True

    def reset(self, user: str, now: float | None) -> bool:
        document = self._document()
        if user not in document:
            return False
        self._reset_counters(user, document[user].get("models", []))
        document[user]["models"] = []
        if now is not None:
            document[user]["last_updated_at"] = now
        self._call(self._store.set_project, self._project, document)
        return True

    def save(self) -> dict[str, Any]:
        return {"status": "success"}  # every change is already in the store

    def close(self) -> None:
        if self._stop is not None:
            self._stop()
        self._portal = self._stop = None


def _stop_portal(manager: Any, portal: anyio.from_thread.BlockingPortal, store: Store) -> None:
    try:
        portal.call(store.aclose)
    finally:
        manager.__exit__(None, None, None)


def usd(nano: int) -> float:
    return nano_to_usd(nano) if nano else 0  # LiteLLM's files and prints say 0, not 0.0


def to_usd(entry: Entry) -> Entry:
    return _convert(entry, usd)


def to_nano(entry: Entry) -> Entry:
    return _convert(entry, usd_to_nano)


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
