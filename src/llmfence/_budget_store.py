"""A `BudgetManager`'s entries in a `Store`: spend in its atomic budget counters, named by
`_counters.project` / `project_user`, the rest of each entry in the store's project document.
Many processes share them; `LiveEntry` writes hand edits of `user_dict` through."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import anyio.from_thread

from llmfence import _counters
from llmfence._budget_backends import Entry, to_nano, to_usd
from llmfence.stores import BudgetScope, Store

__all__ = ["LiveEntry", "StoreBackend"]


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

    def live(self, commit: Callable[[str, Entry, list[str]], None]) -> dict[str, Entry]:
        """Every entry (money in USD), each writing its edits through `commit`."""
        entries = ((user, self.entry(user)) for user in self.users())
        return {user: LiveEntry(user, to_usd(e), commit) for user, e in entries if e is not None}

    def edit(self, user: str, changes: Entry, removed: list[str]) -> None:
        """Fields of a user's entry set or removed by hand (`user_dict[user][...] = ...`)."""
        document, old = self._document(), self.entry(user)
        if old is None or user not in document:
            return  # deleted meanwhile
        entry = {k: v for k, v in old.items() if k not in removed} | to_nano(changes)
        meta = {k: v for k, v in entry.items() if k not in ("current_cost", "model_cost")}
        spend = entry.get("current_cost", 0), dict(entry.get("model_cost") or {})
        models = sorted({*document[user].get("models", []), *spend[1]})
        if spend != (old.get("current_cost", 0), old.get("model_cost", {})):
            # Spend set by hand: each counter starts again from the amount written.
            self._reset_counters(user, models)
            amounts = [spend[0], *(spend[1].get(m, 0) for m in models)]
            for scope, amount in zip(self._scopes(user, models), amounts, strict=True):
                if amount:
                    self._call(self._store.charge, [scope], amount, self._clock())
        document[user] = {**meta, "models": [m for m in models if spend[1].get(m)]}
        self._call(self._store.set_project, self._project, document)

    def save(self) -> dict[str, Any]:
        return {"status": "success"}  # every change is already in the store

    def close(self) -> None:
        if self._stop is not None:
            self._stop()
        self._portal = self._stop = None


class LiveEntry(dict[str, Any]):
    """A store-backed user's entry in `user_dict`: each edit of its own fields is written
    through (what changed, not the whole entry, so spend charged meanwhile is kept)."""

    def __init__(
        self, user: str, entry: Entry, commit: Callable[[str, Entry, list[str]], None]
    ) -> None:
        super().__init__(entry)
        self._user, self._commit = user, commit

    def _edit(self, op: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        before = dict(self)
        result = op(self, *args, **kwargs)
        changes = {k: v for k, v in self.items() if k not in before or before[k] is not v}
        removed = [k for k in before if k not in self]
        if changes or removed:
            self._commit(self._user, changes, removed)
        return result

    def __setitem__(self, key: str, value: Any) -> None:
        self._edit(dict.__setitem__, key, value)

    def __delitem__(self, key: str) -> None:
        self._edit(dict.__delitem__, key)

    def __ior__(self, other: Any) -> LiveEntry:  # type: ignore[override,misc]
        self._edit(dict.update, other)
        return self

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._edit(dict.update, *args, **kwargs)

    def pop(self, *args: Any) -> Any:
        return self._edit(dict.pop, *args)

    def popitem(self) -> tuple[str, Any]:
        return self._edit(dict.popitem)  # type: ignore[no-any-return]

    def setdefault(self, key: str, default: Any = None) -> Any:
        return self._edit(dict.setdefault, key, default)

    def clear(self) -> None:
        self._edit(dict.clear)


def _stop_portal(manager: Any, portal: anyio.from_thread.BlockingPortal, store: Store) -> None:
    try:
        portal.call(store.aclose)
    finally:
        manager.__exit__(None, None, None)
