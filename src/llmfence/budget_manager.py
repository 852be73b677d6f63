"""LiteLLM's `BudgetManager`, method for method: per-user USD budgets behind a sync API.

Switch by changing the import (`from litellm import BudgetManager` → `from llmfence.budget_manager
import BudgetManager`); every method keeps LiteLLM's name, arguments and return shape. State lives
in one of three places, picked as LiteLLM picks it:

- `client_type="local"` (default): `user_cost.json` in the working directory, in LiteLLM's exact
  format (`json.dump(user_dict, f, indent=4)`, money as floats); an existing file loads unchanged.
- `client_type="hosted"`: LiteLLM's protocol against `api_base` — `POST /get_budget` and
  `POST /set_budget`, which an llmfence app serves with `Fence.install(app, admin=True)`.
- `store=`: an llmfence `Store` (e.g. `RedisStore`) shared by many processes. Spend goes to the
  store's budget counters, which add atomically; the rest of each user's entry (budget,
  duration, times, models used) is kept in the store's project document.

Where llmfence differs from LiteLLM, on purpose: money is summed as integer nano-USD (no float
drift: three calls of $0.000079 make $0.000237); one lock serializes every method and each change
is saved before the method returns, to a temp file then renamed (LiteLLM saves from a new thread
per update, and the threads race on the file); `created_at` defaults to the time of the call
(LiteLLM's default is frozen at import); an unknown user raises `UnknownUserError`, a `KeyError`
that names the user; durations also take `"30s"`, `"30m"`, `"30h"`, `"30d"`, `"2w"`; budgets
without a duration and `reset_cost` are saved too.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import anyio.from_thread

from llmfence._duration import parse_duration
from llmfence._money import nano_to_usd, usd_to_nano
from llmfence._pricing import PriceBook
from llmfence._request import LLMRequest
from llmfence._tokens import TokenCounter
from llmfence._usage import Usage, usage_from_json
from llmfence.exceptions import BudgetExceededError, ConfigurationError, LLMFenceError, StoreError
from llmfence.stores import BudgetScope, Store

if TYPE_CHECKING:
    import httpx

__all__ = ["BudgetManager", "UnknownUserError"]

_DAY = 86_400
# LiteLLM's named durations, in days. A "month" is 28 days there; kept so files stay compatible.
_NAMED_DAYS = {"daily": 1, "weekly": 7, "monthly": 28, "yearly": 365}
_NO_INPUT = (
    "Either a chat completion object or the text response (model, input_text and output_text) "
    "needs to be passed in. Learn more - https://docs.litellm.ai/docs/budget_manager"
)

Entry = dict[str, Any]
"""One user's entry, shaped as LiteLLM's; inside the manager spend is integer nano-USD."""


class UnknownUserError(LLMFenceError, KeyError):
    """No budget exists for the user. A `KeyError`, as LiteLLM raises, so old handlers still work.

    Attributes:
        user: The user id asked for.
    """

    status_code = 404
    code = "user_not_found"
    type = "invalid_request_error"

    def __init__(self, user: str) -> None:
        super().__init__(f"No budget for user {user!r}; call create_budget(...) first.")
        self.user = user

    def __str__(self) -> str:
        return self.message  # KeyError's own __str__ would print the message in quotes


class BudgetManager:
    """Per-user budgets with LiteLLM's `BudgetManager` API. Thread-safe.

    Args:
        project_name: Names the budget set (the hosted server's and the store's document).
        client_type: `"local"` (the `user_cost.json` file) or `"hosted"` (`api_base`).
        api_base: The server speaking LiteLLM's `/get_budget` / `/set_budget` protocol;
            required for `"hosted"` (LiteLLM's own hosted service no longer exists).
        headers: HTTP headers for the hosted server, e.g. `{"Authorization": "Bearer sk-…"}`.
        store: Keep budgets in this store instead, shared by every process using it. The
            manager runs it on a private event loop and owns it from then on (`close()` closes
            it): give it a store of its own, e.g. `RedisStore.from_url(url)` on the same URL
            as your app's, never the store an app's event loop uses.
        clock: Unix time (a fake clock in tests).
        prices: The prices to charge with; genai-prices by default.
        timeout: Seconds each hosted HTTP request may take.

    Raises:
        ConfigurationError: Unknown `client_type`, `"hosted"` without `api_base`, or `store`
            with `"hosted"`.
    """

    def __init__(
        self,
        project_name: str,
        client_type: str = "local",
        api_base: str | None = None,
        headers: Mapping[str, str] | None = None,
        store: Store | None = None,
        *,
        clock: Callable[[], float] = time.time,
        prices: PriceBook | None = None,
        timeout: float = 10.0,
    ) -> None:
        if client_type not in ("local", "hosted"):
            raise ConfigurationError(
                f"client_type must be 'local' or 'hosted', not {client_type!r}"
            )
        if store is not None and client_type != "local":
            raise ConfigurationError("pass either store= or client_type='hosted', not both")
        if client_type == "hosted" and not api_base:
            raise ConfigurationError("client_type='hosted' needs api_base, the server's URL")
        self.project_name = project_name
        self.client_type = client_type
        self.api_base = api_base
        self.headers = dict(headers or {"Content-Type": "application/json"})
        self._clock = clock
        self._prices = prices or PriceBook()
        self._tokens = TokenCounter()
        self._lock = threading.RLock()
        self._backend: _DictBackend | _StoreBackend
        if store is not None:
            self._backend = _StoreBackend(store, project_name, clock)
        elif api_base and client_type == "hosted":
            self._backend = _DictBackend(_Hosted(api_base, self.headers, project_name, timeout))
        else:
            self._backend = _DictBackend(_LocalFile(os.path.abspath("user_cost.json")))
        # Closes the HTTP client or the store's event loop when the manager is collected or
        # the interpreter exits, whichever comes first; `close()` does it now.
        self._finalizer = weakref.finalize(self, self._backend.close)

    # -- LiteLLM's methods ---------------------------------------------------------------------

    def create_budget(
        self,
        total_budget: float,
        user: str,
        duration: str | None = None,
        created_at: float | None = None,
    ) -> Entry:
        """Create (or replace, spend included) a user's budget.

        Args:
            total_budget: The budget in USD.
            user: The user id.
            duration: How often spend resets: `"daily"` (1 day), `"weekly"` (7), `"monthly"`
                (28, as LiteLLM counts it), `"yearly"` (365), or `"30s"`, `"30m"`, `"30h"`,
                `"30d"`, `"2w"`. Stored in days, fractional below a day. `None`: never.
            created_at: Unix time the period starts; now by default.

        Returns:
            The user's entry: `{"total_budget"}`, plus `"duration"` (days), `"created_at"`
            and `"last_updated_at"` with a duration.

        Raises:
            ConfigurationError: The duration or the budget is not valid; the message names it.
        """
        usd_to_nano(total_budget)  # reject a budget that is not a finite number
        entry: Entry = {"total_budget": total_budget}
        if duration is not None:
            start = self._clock() if created_at is None else created_at
            entry |= {"duration": _days(duration), "created_at": start, "last_updated_at": start}
        with self._lock:
            self._backend.put(user, entry)
        return dict(entry)

    def projected_cost(self, model: str, messages: Sequence[Mapping[str, Any]], user: str) -> float:
        """The user's current cost plus the prompt cost of `messages` (their joined contents)."""
        text = "".join(_text(message.get("content")) for message in messages)
        prompt = self._prices.projected(model, self._tokens.count_text(text, model), 0)
        with self._lock:
            return nano_to_usd(self._entry(user).get("current_cost", 0) + prompt)

    def get_total_budget(self, user: str) -> float:
        """The user's budget in USD."""
        with self._lock:
            budget: float = self._entry(user)["total_budget"]
            return budget

    def update_cost(
        self,
        user: str,
        completion_obj: Any = None,
        model: str | None = None,
        input_text: str | None = None,
        output_text: str | None = None,
    ) -> dict[str, Entry]:
        """Charge a call to the user: from a response, or from the texts sent and received.

        Args:
            user: The user id.
            completion_obj: An OpenAI-format response: a dict, or an object with `model` and
                `usage` (an `openai` `ChatCompletion`, a LiteLLM `ModelResponse`…).
            model: With `input_text` and `output_text`: the model the texts went through.
            input_text: The prompt; counted as one user message, as LiteLLM counts it.
            output_text: The completion; counted the same way.

        Returns:
            `{"user": entry}`, the user's entry after the charge.

        Raises:
            ValueError: Neither a response nor the model and both texts were given, or the
                response has no `model` or `usage`.
            UnknownUserError: No budget exists for the user.
            UnknownModelError: No price is known for the model.
        """
        if model and input_text is not None and output_text is not None:
            usage = Usage(
                self._chat_tokens(model, input_text), self._chat_tokens(model, output_text)
            )
        elif completion_obj is not None:
            model, usage = _model_and_usage(completion_obj)
        else:
            raise ValueError(_NO_INPUT)
        cost = self._prices.cost(model, usage)
        with self._lock:
            self._backend.charge(user, model, cost)
            return {"user": _to_usd(self._entry(user))}

    def get_current_cost(self, user: str) -> float:
        """What the user has spent in the current period, in USD (0 before any call)."""
        with self._lock:
            return _usd(self._entry(user).get("current_cost", 0))

    def get_model_cost(self, user: str) -> dict[str, float] | int:
        """The user's spend per model, in USD; 0 (as in LiteLLM) before any call."""
        with self._lock:
            models: dict[str, int] | None = self._entry(user).get("model_cost")
        return 0 if models is None else {name: _usd(nano) for name, nano in models.items()}

    def is_valid_user(self, user: str) -> bool:
        """Whether a budget exists for the user."""
        with self._lock:
            return user in self._backend.users()

    def get_users(self) -> list[str]:
        """Every user with a budget."""
        with self._lock:
            return self._backend.users()

    def reset_cost(self, user: str) -> dict[str, Entry]:
        """Set the user's spend back to 0; returns `{"user": entry}`."""
        with self._lock:
            self._backend.reset(user, None)
            return {"user": _to_usd(self._entry(user))}

    def reset_on_duration(self, user: str) -> None:
        """Reset the user's spend if a whole duration has passed since the last reset.

        The new period starts now (`last_updated_at`). A user without a duration never resets.
        """
        with self._lock:
            entry = self._entry(user)
            if "duration" not in entry:
                return
            now = self._clock()
            last = entry["last_updated_at"] if "last_updated_at" in entry else entry["created_at"]
            if now - last >= round(entry["duration"] * _DAY, 6):
                self._backend.reset(user, now)

    def update_budget_all_users(self) -> None:
        """`reset_on_duration` for every user (run it from a scheduler, or before checks)."""
        with self._lock:
            for user in self._backend.users():
                self.reset_on_duration(user)

    def save_data(self) -> dict[str, Any]:
        """Save every entry: `{"status": "success"}`, or the hosted server's answer."""
        with self._lock:
            return self._backend.save()

    def load_data(self) -> None:
        """Read the file or the hosted server again (the store is read on every call anyway)."""
        with self._lock:
            self._backend.load()

    # -- llmfence's additions ------------------------------------------------------------------

    def check_budget(self, user: str) -> None:
        """Raise unless the user may make a call: allowed while spend <= budget, as LiteLLM checks.

        Raises:
            BudgetExceededError: The user has spent more than the budget.
            UnknownUserError: No budget exists for the user.
        """
        with self._lock:
            entry = self._entry(user)
        spent, budget = entry.get("current_cost", 0), entry["total_budget"]
        if spent > usd_to_nano(budget):
            resets_at = None
            if "duration" in entry:
                resets_at = entry.get("last_updated_at", 0) + entry["duration"] * _DAY
            raise BudgetExceededError(
                nano_to_usd(spent),
                budget,
                f"Budget exceeded for user {user!r}: spent ${nano_to_usd(spent)}, "
                f"budget ${budget}.",
                scope="user",
                resets_at=resets_at,
            )

    @property
    def user_dict(self) -> dict[str, Entry]:
        """A copy of every user's entry, as LiteLLM's `user_dict` (money in USD)."""
        with self._lock:
            return {user: _to_usd(self._entry(user)) for user in self._backend.users()}

    def close(self) -> None:
        """Release the HTTP client or the store (and its event loop). Also runs at exit."""
        with self._lock:
            self._finalizer()

    def __enter__(self) -> BudgetManager:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------

    def _entry(self, user: str) -> Entry:
        entry = self._backend.entry(user)
        if entry is None:
            raise UnknownUserError(user)
        return entry

    def _chat_tokens(self, model: str, text: str) -> int:
        message = {"role": "user", "content": text}
        return self._tokens.count(LLMRequest(endpoint="chat", model=model, messages=(message,)))


class _DictBackend:
    """Entries in memory, loaded from a file or server and saved back after every change."""

    def __init__(self, persistence: _LocalFile | _Hosted) -> None:
        self._persistence = persistence
        try:
            self.load()
        except BaseException:
            persistence.close()  # the manager is never built, so nothing else would close it
            raise

    def load(self) -> None:
        self._data = {user: _to_nano(entry) for user, entry in self._persistence.read().items()}

    def users(self) -> list[str]:
        return list(self._data)

    def entry(self, user: str) -> Entry | None:
        return self._data.get(user)

    def put(self, user: str, entry: Entry) -> None:
        self._commit(user, dict(entry))

    def charge(self, user: str, model: str, cost: int) -> None:
        entry = copy.deepcopy(self._get(user))
        entry["current_cost"] = entry.get("current_cost", 0) + cost
        models = entry.setdefault("model_cost", {})
        models[model] = models.get(model, 0) + cost
        self._commit(user, entry)

    def reset(self, user: str, now: float | None) -> None:
        entry = copy.deepcopy(self._get(user))
        entry |= {"current_cost": 0, "model_cost": {}}
        if now is not None:
            entry["last_updated_at"] = now
        self._commit(user, entry)

    def save(self) -> dict[str, Any]:
        return self._persistence.write({user: _to_usd(e) for user, e in self._data.items()})

    def _commit(self, user: str, entry: Entry) -> None:
        # Saved first, kept after: a save that fails (a server error, a full disk) leaves the
        # manager as it was, so a retried update is not counted twice.
        data = {**self._data, user: entry}
        self._persistence.write({name: _to_usd(e) for name, e in data.items()})
        self._data = data

    def close(self) -> None:
        self._persistence.close()

    def _get(self, user: str) -> Entry:
        entry = self._data.get(user)
        if entry is None:
            raise UnknownUserError(user)
        return entry


class _LocalFile:
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


class _Hosted:
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


class _StoreBackend:
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
        self._project = f"bm:{quote(project, safe='')}"
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
        # Quoted, so a user named "a:model:b" cannot share a counter with user "a".
        base = f"{self._project}:{quote(user, safe='')}"
        return [BudgetScope(base, "user", user)] + [
            BudgetScope(f"{base}:model:{quote(model, safe='')}", "model", model) for model in models
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

    def charge(self, user: str, model: str, cost: int) -> None:
        document = self._document()
        if user not in document:
            raise UnknownUserError(user)
        models = document[user].setdefault("models", [])
        if model not in models:
            models.append(model)
            self._call(self._store.set_project, self._project, document)
        self._call(self._store.charge, self._scopes(user, [model]), cost, self._clock())

    def reset(self, user: str, now: float | None) -> None:
        document = self._document()
        if user not in document:
            raise UnknownUserError(user)
        self._reset_counters(user, document[user].get("models", []))
        document[user]["models"] = []
        if now is not None:
            document[user]["last_updated_at"] = now
        self._call(self._store.set_project, self._project, document)

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


def _days(duration: str) -> float:
    """A duration in days, as LiteLLM stores it (1, 7, 28, 365 for the named ones)."""
    named = _NAMED_DAYS.get(duration.strip().lower()) if isinstance(duration, str) else None
    if named is not None:
        return named
    seconds = parse_duration(duration).seconds
    if seconds is None:
        raise ConfigurationError(
            f"Invalid budget duration {duration!r}: use 'daily', 'weekly', 'monthly' (28 days), "
            "'yearly' (365 days) or a fixed length such as '30s', '30m', '30h', '30d', '2w'."
        )
    days, rest = divmod(seconds, _DAY)
    return days if rest == 0 else seconds / _DAY


def _usd(nano: int) -> float:
    return nano_to_usd(nano) if nano else 0  # LiteLLM's files and prints say 0, not 0.0


def _to_usd(entry: Entry) -> Entry:
    return _convert(entry, _usd)


def _to_nano(entry: Entry) -> Entry:
    return _convert(entry, usd_to_nano)


def _convert(entry: Entry, money: Callable[[Any], Any]) -> Entry:
    """A copy of an entry with `money` applied to the spend (`current_cost`, `model_cost`)."""
    out = dict(entry)
    if "current_cost" in out:
        out["current_cost"] = money(out["current_cost"])
    if isinstance(out.get("model_cost"), dict):
        out["model_cost"] = {name: money(value) for name, value in out["model_cost"].items()}
    return out


def _text(content: Any) -> str:
    """A message's text: the string, or the text parts of a multimodal list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, Mapping))
    return ""


def _plain(value: Any) -> Any:
    """A response as JSON-like data: mappings as they are, pydantic models dumped, else attrs."""
    if value is None or isinstance(value, Mapping | str | int | float | list):
        return value
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump()
    return {k: _plain(v) for k, v in vars(value).items() if not k.startswith("_")}


def _model_and_usage(completion_obj: Any) -> tuple[str, Usage]:
    body = _plain(completion_obj)
    model = body.get("model") if isinstance(body, Mapping) else None
    usage = usage_from_json(body) if isinstance(body, Mapping) else None
    if not isinstance(model, str) or not model or usage is None:
        raise ValueError("completion_obj must be a chat completion with `model` and `usage`")
    return model, usage
