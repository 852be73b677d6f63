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

import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llmfence._budget_backends import (
    DictBackend,
    Entry,
    Hosted,
    LocalFile,
    message_text,
    model_and_usage,
    to_usd,
    usd,
)
from llmfence._budget_store import StoreBackend
from llmfence._duration import parse_duration
from llmfence._fields import budget_nano, checked_name
from llmfence._money import nano_to_usd, usd_to_nano
from llmfence._pricing import PriceBook
from llmfence._request import LLMRequest
from llmfence._tokens import TokenCounter
from llmfence._usage import Usage
from llmfence.exceptions import BudgetExceededError, ConfigurationError, LLMFenceError
from llmfence.stores import Store

__all__ = ["BudgetManager", "UnknownUserError"]

_DAY = 86_400
# LiteLLM's named durations, in days. A "month" is 28 days there; kept so files stay compatible.
_NAMED_DAYS = {"daily": 1, "weekly": 7, "monthly": 28, "yearly": 365}
_NO_INPUT = (
    "Either a chat completion object or the text response (model, input_text and output_text) "
    "needs to be passed in. Learn more - https://docs.litellm.ai/docs/budget_manager"
)


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
        self._backend: DictBackend | StoreBackend
        if store is not None:
            self._backend = StoreBackend(store, project_name, clock)
        elif api_base and client_type == "hosted":
            self._backend = DictBackend(Hosted(api_base, self.headers, project_name, timeout))
        else:
            self._backend = DictBackend(LocalFile(os.path.abspath("user_cost.json")))
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
            ConfigurationError: The duration, the budget (not a finite amount from 0 to
                `MAX_BUDGET_USD`) or the user id (1 to 256 characters of valid Unicode) is not
                valid; the message names it.
        """
        # A budget that is not a finite number, negative or absurdly large never gets stored,
        # nor a user id no store can name.
        if total_budget is None or isinstance(total_budget, str):  # type: ignore[unreachable]
            raise ConfigurationError(f"total_budget must be a number, not {total_budget!r}")
        budget_nano(total_budget)
        checked_name("user", user)
        entry: Entry = {"total_budget": total_budget}
        if duration is not None:
            start = self._clock() if created_at is None else created_at
            entry |= {"duration": _days(duration), "created_at": start, "last_updated_at": start}
        with self._lock:
            self._backend.put(user, entry)
        return dict(entry)

    def projected_cost(self, model: str, messages: Sequence[Mapping[str, Any]], user: str) -> float:
        """The user's current cost plus the prompt cost of `messages` (their joined contents)."""
        text = "".join(message_text(message.get("content")) for message in messages)
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
            model, usage = model_and_usage(completion_obj)
        else:
            raise ValueError(_NO_INPUT)
        cost = self._prices.cost(model, usage)
        with self._lock:
            if not self._backend.charge(user, model, cost):
                raise UnknownUserError(user)
            return {"user": to_usd(self._entry(user))}

    def get_current_cost(self, user: str) -> float:
        """What the user has spent in the current period, in USD (0 before any call)."""
        with self._lock:
            return usd(self._entry(user).get("current_cost", 0))

    def get_model_cost(self, user: str) -> dict[str, float] | int:
        """The user's spend per model, in USD; 0 (as in LiteLLM) before any call."""
        with self._lock:
            models: dict[str, int] | None = self._entry(user).get("model_cost")
        return 0 if models is None else {name: usd(nano) for name, nano in models.items()}

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
            if not self._backend.reset(user, None):
                raise UnknownUserError(user)
            return {"user": to_usd(self._entry(user))}

    def reset_on_duration(self, user: str) -> None:
        """Reset the user's spend if a whole duration has passed since the last reset.

        The new period starts now (`last_updated_at`). A user without a duration never resets.
        """
        with self._lock:
            period = _period(self._entry(user))
            if period is None:
                return
            now = self._clock()
            start, length = period
            if now - start >= length and not self._backend.reset(user, now):
                raise UnknownUserError(user)

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
            period = _period(entry)
            resets_at = None if period is None else period[0] + period[1]
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
        """Every user's entry, LiteLLM's `user_dict` (money in USD): the live state, so an
        edit in place counts (`user_dict[user]["last_updated_at"] -= 86_400`), as in LiteLLM.

        With a file or a hosted server it is the manager's own dict (saved at the next change
        or `save_data()`). With a store each entry writes its edits through to the store, and
        users come and go through `create_budget`."""
        with self._lock:
            if isinstance(self._backend, DictBackend):
                return self._backend.live()
            return self._backend.live(self._edit)

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

    def _edit(self, user: str, changes: Entry, removed: list[str]) -> None:
        with self._lock:
            assert isinstance(self._backend, StoreBackend)
            self._backend.edit(user, changes, removed)

    def _chat_tokens(self, model: str, text: str) -> int:
        message = {"role": "user", "content": text}
        return self._tokens.count(LLMRequest(endpoint="chat", model=model, messages=(message,)))


def _period(entry: Entry) -> tuple[float, float] | None:
    """The user's period as (start, length in seconds), or None for a budget without a duration.

    LiteLLM's rule, not the store's rolling periods (`_counters.period_end`): a period starts at
    the last reset (`last_updated_at`, else `created_at`) and lasts `duration` days (a month is
    28), and only `reset_on_duration` starts the next one.
    """
    if "duration" not in entry:
        return None
    start = entry["last_updated_at"] if "last_updated_at" in entry else entry.get("created_at", 0)
    return start, round(entry["duration"] * _DAY, 6)


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
