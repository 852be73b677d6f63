"""BudgetManager: the seeds' flows as written, each LiteLLM defect fixed, every backend."""

from __future__ import annotations

import copy
import inspect
import json
import threading
import time
import types
import uuid
from collections.abc import Callable, Iterator
from functools import reduce
from operator import add
from pathlib import Path
from typing import Any

import anyio
import pytest
from openai.types.chat import ChatCompletion
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from llmfence import Fence, MemoryStore, PriceBook, RedisStore, Usage
from llmfence._money import usd_to_nano
from llmfence.budget_manager import BudgetManager, UnknownUserError
from llmfence.exceptions import BudgetExceededError, ConfigurationError, StoreError
from llmfence.stores import BudgetScope

from ._live import serve

# The notebook's recorded response (gpt-3.5-turbo-0613 at $1.50/$2.00 per million tokens:
# 14 × 1.5e-6 + 29 × 2e-6 = $0.000079 a call).
RESPONSE: dict[str, Any] = {
    "id": "chatcmpl-7yAUkHQV8xdfldzzZnnnuVU8pl31b",
    "object": "chat.completion",
    "created": 1694574378,
    "model": "gpt-3.5-turbo-0613",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Hello! I'm an AI, so I don't have emotions, but I'm here to "
                "assist you. How can I help you today?",
            },
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 14, "completion_tokens": 29, "total_tokens": 43},
}
CALL = 7.9e-05
MASTER_KEY = "sk-master-key-123"


class FakeCompletion:
    """Stands in for `litellm.completion`: returns the notebook's response, counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
        self.calls += 1
        return copy.deepcopy(RESPONSE)


class FakeClock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # user_cost.json lands here


@pytest.fixture
def completion() -> FakeCompletion:
    return FakeCompletion()


@pytest.fixture
def llmfence_server() -> Iterator[str]:
    """A real llmfence app serving the admin API, `/get_budget` and `/set_budget` included."""
    app = Starlette()
    fence = Fence(store=MemoryStore(), master_key=MASTER_KEY)
    fence.install(app, admin=True)
    with serve(app) as url:
        yield url


def hosted(url: str, project: str = "liteLLM_project") -> BudgetManager:
    headers = {"Authorization": f"Bearer {MASTER_KEY}"}
    return BudgetManager(project_name=project, client_type="hosted", api_base=url, headers=headers)


@pytest.fixture(params=["local", "memory-store"])
def make_manager(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., BudgetManager]]:
    """Builds managers on the local file or on a MemoryStore (one store for all of them)."""
    store = MemoryStore()
    made: list[BudgetManager] = []

    def make(**kwargs: Any) -> BudgetManager:
        if request.param == "memory-store":
            kwargs["store"] = store
        manager = BudgetManager("test_project", **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()


# -- the seeds, as written ---------------------------------------------------------------------


def test_quick_start(completion: FakeCompletion) -> None:
    budget_manager = BudgetManager(project_name="test_project")

    user = "1234"

    # create a budget if new user user
    if not budget_manager.is_valid_user(user):
        budget_manager.create_budget(total_budget=10, user=user)

    # check if a given call can be made
    response: dict[str, Any] | str
    if budget_manager.get_current_cost(user=user) <= budget_manager.get_total_budget(user):
        response = completion(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Hey, how's it going?"}]
        )
        budget_manager.update_cost(completion_obj=response, user=user)
    else:
        response = "Sorry - no budget!"

    assert completion.calls == 1
    assert budget_manager.get_current_cost(user) == CALL
    assert budget_manager.get_model_cost(user=user) == {"gpt-3.5-turbo-0613": CALL}
    assert budget_manager.save_data() == {"status": "success"}
    assert json.loads(Path("user_cost.json").read_text()) == {
        "1234": {
            "total_budget": 10,
            "current_cost": CALL,
            "model_cost": {"gpt-3.5-turbo-0613": CALL},
        }
    }


def run_notebook(budget_manager: BudgetManager, completion: FakeCompletion) -> str:
    """The notebook's two cells, as written; returns the user id."""
    user_id = str(uuid.uuid4())  # create a new user id
    daily_budget = 0.0002

    # Checks if a budget exists for a user
    if not budget_manager.is_valid_user(user_id):
        # Creates a $0.0002 budget if the user does not exisr
        print(f"No budget exists for user: {user_id}\n")
        print(f"Creating a budget for user: {user_id}, daily budget ${daily_budget}\n")
        budget_manager.create_budget(total_budget=daily_budget, user=user_id, duration="daily")

    # Makes a `litellm.completion()` request only if the user is under their budget
    current_spend_for_user = budget_manager.get_current_cost(user=user_id)
    budget_for_user = budget_manager.get_total_budget(user_id)
    print(
        f"User: {user_id} has spent ${current_spend_for_user}, "
        f"budget for user: ${budget_for_user}\n"
    )

    response: dict[str, Any] | str
    if current_spend_for_user <= budget_for_user:
        response = completion(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Hey, how's it going?"}]
        )
        budget_manager.update_cost(completion_obj=response, user=user_id)
    else:
        response = "Sorry - no budget!"

    print(response)

    for _ in range(10):
        # check if a given call can be made
        current_spend_for_user = budget_manager.get_current_cost(user=user_id)
        budget_for_user = budget_manager.get_total_budget(user_id)
        print(
            f"User: {user_id} has spent ${current_spend_for_user}, "
            f"budget for user: ${budget_for_user}\n"
        )
        if current_spend_for_user <= budget_for_user:
            response = completion(
                model="gpt-3.5-turbo",
                messages=[{"role": "user", "content": "Hey, how's it going?"}],
            )
            budget_manager.update_cost(completion_obj=response, user=user_id)
        else:
            response = "Sorry - no budget!"
            print(
                f"User: {user_id} has exceeded budget, current spend ${current_spend_for_user}, "
                f"budget for user: ${budget_for_user}\n"
            )
            break  # no more requests
    return user_id


def assert_notebook_output(output: str, user_id: str, completion: FakeCompletion) -> None:
    spent = [line for line in output.splitlines() if "has spent" in line]
    assert spent == [
        f"User: {user_id} has spent ${value}, budget for user: $0.0002"
        for value in ("0", "7.9e-05", "0.000158", "0.000237")
    ]
    assert (
        f"User: {user_id} has exceeded budget, current spend $0.000237, budget for user: $0.0002"
        in output
    )
    assert completion.calls == 3


def test_notebook_stops_after_three_calls_at_exact_figures(
    completion: FakeCompletion, capsys: pytest.CaptureFixture[str]
) -> None:
    budget_manager = BudgetManager(project_name="liteLLM_project")
    user_id = run_notebook(budget_manager, completion)
    assert_notebook_output(capsys.readouterr().out, user_id, completion)
    # LiteLLM prints 0.00015999999999999999 and 0.00023899999999999998 here.
    assert budget_manager.get_current_cost(user_id) == 0.000237
    entry = json.loads(Path("user_cost.json").read_text())[user_id]
    assert entry["duration"] == 1
    assert entry["current_cost"] == 0.000237


def test_notebook_against_an_llmfence_server(
    llmfence_server: str, completion: FakeCompletion, capsys: pytest.CaptureFixture[str]
) -> None:
    with hosted(llmfence_server) as budget_manager:
        user_id = run_notebook(budget_manager, completion)
    assert_notebook_output(capsys.readouterr().out, user_id, completion)
    assert not Path("user_cost.json").exists()
    # A new manager (another process, say) loads what the first saved on the server.
    with hosted(llmfence_server) as again:
        assert again.get_users() == [user_id]
        assert again.get_current_cost(user_id) == 0.000237
        assert again.get_model_cost(user_id) == {"gpt-3.5-turbo-0613": 0.000237}


def test_text_input_output() -> None:
    budget_manager = BudgetManager(project_name="test_project")
    user = "12345"
    budget_manager.create_budget(total_budget=10, user=user, duration="daily")

    input_text = "hello world"
    output_text = "it's a sunny day in san francisco"
    model = "gpt-3.5-turbo"

    budget_manager.update_cost(
        user=user, model=model, input_text=input_text, output_text=output_text
    )
    # Each text counted as one user message, as LiteLLM's token_counter counts it: 9 and 16
    # tokens, at gpt-3.5-turbo's $0.50 / $1.50 per million tokens.
    assert budget_manager.get_current_cost(user) == 2.85e-05
    assert budget_manager.get_model_cost(user) == {"gpt-3.5-turbo": 2.85e-05}


def test_save_and_reload(completion: FakeCompletion) -> None:
    first = BudgetManager(project_name="test_project")
    first.create_budget(total_budget=10, user="1234", duration="weekly", created_at=1000.0)
    first.update_cost(completion_obj=completion(model="gpt-3.5-turbo", messages=[]), user="1234")
    assert first.save_data() == {"status": "success"}

    second = BudgetManager(project_name="test_project")
    assert second.get_users() == ["1234"]
    assert second.user_dict == first.user_dict
    assert second.user_dict["1234"] == {
        "total_budget": 10,
        "duration": 7,
        "created_at": 1000.0,
        "last_updated_at": 1000.0,
        "current_cost": CALL,
        "model_cost": {"gpt-3.5-turbo-0613": CALL},
    }


def test_litellm_file_loads_unchanged_and_round_trips(completion: FakeCompletion) -> None:
    litellm_file: dict[str, Any] = {
        "1234": {
            "total_budget": 10,
            "duration": 1,
            "created_at": 1694574378.123,
            "last_updated_at": 1694574378.123,
            "current_cost": 0.000158,
            "model_cost": {"gpt-3.5-turbo-0613": 7.9e-05, "gpt-3.5-turbo": 7.9e-05},
        },
        "5678": {"total_budget": 0.5},
        "9999": {"total_budget": 1, "current_cost": 0, "model_cost": {}},
    }
    text = json.dumps(litellm_file, indent=4)  # how LiteLLM writes it
    Path("user_cost.json").write_text(text)

    budget_manager = BudgetManager(project_name="test_project")
    assert budget_manager.user_dict == litellm_file
    assert budget_manager.get_current_cost("1234") == 0.000158
    assert budget_manager.get_model_cost("5678") == 0  # LiteLLM's answer before any call
    budget_manager.save_data()
    assert Path("user_cost.json").read_text() == text  # byte for byte

    budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="1234")
    saved = json.loads(Path("user_cost.json").read_text())
    assert saved["1234"]["current_cost"] == 0.000237
    assert saved["1234"]["model_cost"]["gpt-3.5-turbo-0613"] == 0.000158
    assert saved["5678"] == {"total_budget": 0.5}


# -- the LiteLLM defects, fixed ----------------------------------------------------------------


def test_created_at_defaults_to_the_time_of_the_call() -> None:
    # LiteLLM's `created_at: float = time.time()` is evaluated once, at import.
    default = inspect.signature(BudgetManager.create_budget).parameters["created_at"].default
    assert default is None
    clock = FakeClock(1000.0)
    budget_manager = BudgetManager("test_project", clock=clock)
    assert budget_manager.create_budget(1, "a", duration="daily")["created_at"] == 1000.0
    clock.now = 5000.0
    entry = budget_manager.create_budget(1, "b", duration="daily")
    assert entry == {
        "total_budget": 1,
        "duration": 1,
        "created_at": 5000.0,
        "last_updated_at": 5000.0,
    }
    before = time.time()
    created = BudgetManager("other").create_budget(1, "c", duration="weekly")["created_at"]
    assert before <= created <= time.time()


def test_one_lock_no_thread_per_update_and_the_file_is_always_valid(
    completion: FakeCompletion,
) -> None:
    budget_manager = BudgetManager("test_project")
    budget_manager.create_budget(total_budget=100, user="u")
    response = completion("gpt-3.5-turbo", [])
    baseline = threading.active_count()
    stop = threading.Event()
    problems: list[str] = []
    most_threads = 0

    def watch() -> None:
        nonlocal most_threads
        while not stop.is_set():
            most_threads = max(most_threads, threading.active_count())
            try:
                json.loads(Path("user_cost.json").read_text())
            except (ValueError, OSError) as exc:
                problems.append(repr(exc))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        run_threads(lambda _: budget_manager.update_cost(completion_obj=response, user="u"))
    finally:
        stop.set()
        watcher.join()
    assert problems == []
    # The 8 workers and the watcher, nothing else: LiteLLM starts a thread per update.
    assert most_threads <= baseline + 9
    assert threading.active_count() == baseline
    assert not list(Path().glob(".user_cost.json.*"))  # no temp file left behind
    assert json.loads(Path("user_cost.json").read_text())["u"]["current_cost"] == 0.079


def test_money_does_not_drift(
    make_manager: Callable[..., BudgetManager], completion: FakeCompletion
) -> None:
    budget_manager = make_manager()
    budget_manager.create_budget(total_budget=1, user="u")
    for _ in range(10):
        budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="u")
    # What adding floats one by one (`+=`), as LiteLLM does, gives; sum() compensates on 3.12+.
    assert reduce(add, [CALL] * 10) != 0.00079
    assert budget_manager.get_current_cost("u") == 0.00079
    assert budget_manager.get_model_cost("u") == {"gpt-3.5-turbo-0613": 0.00079}


def run_threads(work: Callable[[int], object], threads: int = 8, calls: int = 125) -> None:
    """`work(thread_index)`, `calls` times in each of `threads` threads started together."""
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(index: int) -> None:
        try:
            start.wait()
            for _ in range(calls):
                work(index)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert errors == []


def test_thread_safe_8_threads_x_125_updates(
    make_manager: Callable[..., BudgetManager], completion: FakeCompletion
) -> None:
    budget_manager = make_manager()
    budget_manager.create_budget(total_budget=1, user="u")
    response = completion("gpt-3.5-turbo", [])
    run_threads(lambda _: budget_manager.update_cost(completion_obj=response, user="u"))
    assert budget_manager.get_current_cost("u") == 0.079  # exactly 1000 × $0.000079
    assert budget_manager.get_model_cost("u") == {"gpt-3.5-turbo-0613": 0.079}
    assert reduce(add, [CALL] * 1000) != 0.079  # `+=`, as LiteLLM adds


@pytest.mark.redis
def test_redis_two_managers_in_threads_share_spend(
    redis_url: str, completion: FakeCompletion
) -> None:
    response = completion("gpt-3.5-turbo", [])
    with (
        BudgetManager("shared", store=RedisStore.from_url(redis_url)) as one,
        BudgetManager("shared", store=RedisStore.from_url(redis_url)) as two,
    ):
        one.create_budget(total_budget=1, user="u", duration="monthly")
        assert two.is_valid_user("u")
        managers = [one, two]
        # Even threads charge through one manager, odd threads through the other.
        run_threads(lambda i: managers[i % 2].update_cost(completion_obj=response, user="u"))
        assert one.get_current_cost("u") == two.get_current_cost("u") == 0.079
        assert two.get_model_cost("u") == {"gpt-3.5-turbo-0613": 0.079}
    with BudgetManager("shared", store=RedisStore.from_url(redis_url)) as three:
        assert three.user_dict["u"]["current_cost"] == 0.079
        assert three.user_dict["u"]["duration"] == 28


def test_unknown_user_names_the_user_and_is_a_key_error(
    make_manager: Callable[..., BudgetManager],
) -> None:
    budget_manager = make_manager()
    calls: list[Callable[[], object]] = [
        lambda: budget_manager.get_total_budget("1234"),
        lambda: budget_manager.get_current_cost("1234"),
        lambda: budget_manager.get_model_cost("1234"),
        lambda: budget_manager.reset_cost("1234"),
        lambda: budget_manager.reset_on_duration("1234"),
        lambda: budget_manager.check_budget("1234"),
        lambda: budget_manager.projected_cost(
            "gpt-4o", [{"role": "user", "content": "hi"}], "1234"
        ),
        lambda: budget_manager.update_cost(user="1234", completion_obj=RESPONSE),
    ]
    for call in calls:
        with pytest.raises(UnknownUserError) as caught:
            call()
        assert isinstance(caught.value, KeyError)
        assert str(caught.value) == "No budget for user '1234'; call create_budget(...) first."
        assert caught.value.user == "1234"
    with pytest.raises(KeyError):  # what code written for LiteLLM catches
        budget_manager.get_current_cost("1234")
    assert budget_manager.is_valid_user("1234") is False


@pytest.mark.parametrize(
    ("duration", "days"),
    [
        ("daily", 1),
        ("weekly", 7),
        ("monthly", 28),
        ("yearly", 365),
        ("30s", 30 / 86_400),
        ("30m", 30 / 1440),
        ("30h", 1.25),
        ("30d", 30),
        ("2w", 14),
    ],
)
def test_durations(duration: str, days: float) -> None:
    entry = BudgetManager("test_project").create_budget(1, "u", duration=duration)
    assert entry["duration"] == days


@pytest.mark.parametrize("duration", ["fortnightly", "3mo", "1y", "30", "", "0d"])
def test_invalid_duration_names_the_value(duration: str) -> None:
    budget_manager = BudgetManager("test_project")
    with pytest.raises(ConfigurationError, match=repr(duration)) as caught:
        budget_manager.create_budget(1, "u", duration=duration)
    assert isinstance(caught.value, ValueError)
    assert not budget_manager.is_valid_user("u")


def test_reset_on_duration_with_a_fake_clock(
    make_manager: Callable[..., BudgetManager], completion: FakeCompletion
) -> None:
    clock = FakeClock(1000.0)
    budget_manager = make_manager(clock=clock)
    budget_manager.create_budget(total_budget=1, user="u", duration="30s")
    budget_manager.create_budget(total_budget=1, user="d", duration="daily")
    budget_manager.create_budget(total_budget=1, user="never")
    for user in ("u", "d", "never"):
        budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user=user)

    clock.now = 1029.9
    budget_manager.update_budget_all_users()
    assert [budget_manager.get_current_cost(u) for u in ("u", "d", "never")] == [CALL] * 3

    clock.now = 1030.0  # exactly one duration later: LiteLLM's `>=` resets
    budget_manager.update_budget_all_users()
    assert budget_manager.get_current_cost("u") == 0
    assert budget_manager.get_model_cost("u") == {}
    assert budget_manager.user_dict["u"]["last_updated_at"] == 1030.0
    assert budget_manager.get_current_cost("d") == CALL
    assert budget_manager.get_current_cost("never") == CALL  # no duration, never resets

    clock.now = 1000.0 + 86_400
    budget_manager.reset_on_duration("d")
    assert budget_manager.get_current_cost("d") == 0
    assert budget_manager.user_dict["d"]["created_at"] == 1000.0


# -- the rest of the API -----------------------------------------------------------------------


def test_reset_cost_and_recreate(
    make_manager: Callable[..., BudgetManager], completion: FakeCompletion
) -> None:
    budget_manager = make_manager()
    budget_manager.create_budget(total_budget=1, user="u")
    budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="u")
    assert budget_manager.reset_cost("u") == {
        "user": {"total_budget": 1, "current_cost": 0, "model_cost": {}}
    }
    budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="u")
    # A new budget replaces the entry, spend included, as LiteLLM's does.
    assert budget_manager.create_budget(total_budget=2, user="u") == {"total_budget": 2}
    assert budget_manager.get_current_cost("u") == 0
    assert budget_manager.get_model_cost("u") == 0
    assert budget_manager.get_users() == ["u"]


def test_update_cost_returns_the_entry_and_takes_objects(
    make_manager: Callable[..., BudgetManager],
) -> None:
    budget_manager = make_manager()
    budget_manager.create_budget(total_budget=1, user="u")
    result = budget_manager.update_cost(
        completion_obj=ChatCompletion.model_validate(RESPONSE), user="u"
    )
    assert result == {
        "user": {
            "total_budget": 1,
            "current_cost": CALL,
            "model_cost": {"gpt-3.5-turbo-0613": CALL},
        }
    }
    usage = types.SimpleNamespace(
        prompt_tokens=1000,
        completion_tokens=100,
        prompt_tokens_details=types.SimpleNamespace(cached_tokens=800),
    )
    plain = types.SimpleNamespace(model="gpt-4o", usage=usage)
    budget_manager.update_cost(completion_obj=plain, user="u")
    cached = PriceBook().cost("gpt-4o", Usage(1000, 100, cached_input_tokens=800))
    assert budget_manager.get_model_cost("u") == {
        "gpt-3.5-turbo-0613": CALL,
        "gpt-4o": cached / 1e9,
    }
    with pytest.raises(ValueError, match="Either a chat completion object"):
        budget_manager.update_cost(user="u")
    with pytest.raises(ValueError, match="Either a chat completion object"):
        budget_manager.update_cost(user="u", model="gpt-4o", input_text="only the input")
    with pytest.raises(ValueError, match="model"):
        budget_manager.update_cost(user="u", completion_obj={"choices": []})


def test_projected_cost_and_check_budget(
    make_manager: Callable[..., BudgetManager], completion: FakeCompletion
) -> None:
    budget_manager = make_manager()
    budget_manager.create_budget(total_budget=0.000158, user="u", duration="daily")
    messages = [{"role": "user", "content": "Hey, how's it going?"}]
    # 7 text tokens × gpt-3.5-turbo's $0.50 per million, prompt only (as LiteLLM projects).
    assert budget_manager.projected_cost("gpt-3.5-turbo", messages, "u") == 3.5e-06
    for _ in range(2):
        budget_manager.check_budget("u")
        budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="u")
    assert budget_manager.projected_cost("gpt-3.5-turbo", messages, "u") == 0.0001615
    budget_manager.check_budget("u")  # exactly at the budget: still allowed, as LiteLLM's <=
    budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="u")
    with pytest.raises(BudgetExceededError) as caught:
        budget_manager.check_budget("u")
    assert caught.value.current_cost == 0.000237
    assert caught.value.max_budget == 0.000158
    assert caught.value.resets_at is not None
    assert "'u'" in caught.value.message


def test_store_keeps_spend_in_counters_not_in_the_document(completion: FakeCompletion) -> None:
    store = MemoryStore()
    with BudgetManager("p", store=store, clock=FakeClock(1000.0)) as budget_manager:
        budget_manager.create_budget(total_budget=1, user="a:model:b", duration="daily")
        budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="a:model:b")
        budget_manager.create_budget(total_budget=1, user="a")
        assert budget_manager.get_current_cost("a") == 0  # no counter shared with "a:model:b"
    with BudgetManager("p", store=store) as again:
        assert again.get_current_cost("a:model:b") == CALL
        assert again.save_data() == {"status": "success"}  # every change is already stored
    # A closed manager starts a new event loop if it is used again.
    assert budget_manager.get_users() == ["a:model:b", "a"]
    budget_manager.close()

    async def document() -> dict[str, Any] | None:
        return await store.get_project("bm:p")

    assert anyio.run(document) == {
        "a:model:b": {
            "total_budget": 1,
            "duration": 1,
            "created_at": 1000.0,
            "last_updated_at": 1000.0,
            "models": ["gpt-3.5-turbo-0613"],
        },
        "a": {"total_budget": 1},
    }
    assert not Path("user_cost.json").exists()


def test_store_counters_keep_their_names(completion: FakeCompletion) -> None:
    # Stored spend lives under these names: they must never change.
    store = MemoryStore()
    with BudgetManager("my project", store=store, clock=FakeClock(1000.0)) as budget_manager:
        budget_manager.create_budget(total_budget=1, user="a:b c")
        budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="a:b c")

    async def spent(name: str) -> int:
        [state] = await store.budgets([BudgetScope(name, "user", "x")], 1000.0)
        return state.spent

    user = "bm:my%20project:a%3Ab%20c"
    assert anyio.run(spent, user) == usd_to_nano(CALL)
    assert anyio.run(spent, user + ":model:gpt-3.5-turbo-0613") == usd_to_nano(CALL)


def test_budget_exceeded_names_the_end_of_the_period(
    make_manager: Callable[..., BudgetManager], completion: FakeCompletion
) -> None:
    budget_manager = make_manager()
    budget_manager.create_budget(total_budget=0, user="u", duration="30m", created_at=1000.0)
    budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="u")
    with pytest.raises(BudgetExceededError) as caught:
        budget_manager.check_budget("u")
    assert caught.value.resets_at == 2800.0  # the period a reset_on_duration would end


def test_hosted_protocol(completion: FakeCompletion) -> None:
    """The exact requests LiteLLM's hosted client sends, against a minimal server."""
    seen: list[tuple[str, dict[str, Any], str | None]] = []
    saved: dict[str, Any] = {}

    async def get_budget(request: Request) -> JSONResponse:
        body = await request.json()
        seen.append(("get", body, request.headers.get("content-type")))
        if body["project_name"] not in saved:
            return JSONResponse({"status": "error"})
        return JSONResponse({"status": "success", "data": saved[body["project_name"]]})

    async def set_budget(request: Request) -> JSONResponse:
        body = await request.json()
        seen.append(("set", body, request.headers.get("content-type")))
        saved[body["project_name"]] = body["user_dict"]
        return JSONResponse({"status": "success", "stored": True})

    routes = [
        Route("/get_budget", get_budget, methods=["POST"]),
        Route("/set_budget", set_budget, methods=["POST"]),
    ]
    with serve(Starlette(routes=routes)) as url:
        budget_manager = BudgetManager("p", client_type="hosted", api_base=url + "/")
        assert budget_manager.get_users() == []
        budget_manager.create_budget(total_budget=10, user="u")
        budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="u")
        assert budget_manager.save_data() == {"status": "success", "stored": True}
        budget_manager.close()
    assert seen[0] == ("get", {"project_name": "p"}, "application/json")
    assert seen[-1] == (
        "set",
        {
            "project_name": "p",
            "user_dict": {
                "u": {
                    "total_budget": 10,
                    "current_cost": CALL,
                    "model_cost": {"gpt-3.5-turbo-0613": CALL},
                }
            },
        },
        "application/json",
    )
    assert [kind for kind, _, _ in seen] == ["get", "set", "set", "set"]  # saved every change


def test_hosted_errors(llmfence_server: str) -> None:
    with pytest.raises(ConfigurationError, match="api_base"):
        BudgetManager("p", client_type="hosted")
    with pytest.raises(StoreError, match="get_budget"):
        BudgetManager("p", client_type="hosted", api_base=llmfence_server)  # no master key
    with hosted(llmfence_server, "never-saved") as budget_manager:
        assert budget_manager.get_users() == []  # {"status": "error"}: nothing stored yet


def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="client_type"):
        BudgetManager("p", client_type="remote")
    with pytest.raises(ConfigurationError, match="store"):
        BudgetManager("p", client_type="hosted", api_base="http://x", store=MemoryStore())
    with pytest.raises(ConfigurationError):
        BudgetManager("p").create_budget(total_budget=float("nan"), user="u")


def test_a_failed_save_changes_nothing(completion: FakeCompletion) -> None:
    """A save the server refuses leaves the manager as it was: a retry is counted once."""
    saved: dict[str, Any] = {}
    failures = [1]

    async def get_budget(request: Request) -> JSONResponse:
        return JSONResponse({"status": "error"})

    async def set_budget(request: Request) -> JSONResponse:
        if failures[0]:
            failures[0] -= 1
            return JSONResponse({"error": "down"}, status_code=503)
        saved.update((await request.json())["user_dict"])
        return JSONResponse({"status": "success"})

    routes = [
        Route("/get_budget", get_budget, methods=["POST"]),
        Route("/set_budget", set_budget, methods=["POST"]),
    ]
    with serve(Starlette(routes=routes)) as url:
        budget_manager = BudgetManager("p", client_type="hosted", api_base=url)
        failures[0] = 0
        budget_manager.create_budget(total_budget=10, user="u")
        failures[0] = 1
        response = completion("gpt-3.5-turbo", [])
        with pytest.raises(StoreError):
            budget_manager.update_cost(completion_obj=response, user="u")
        assert budget_manager.get_current_cost("u") == 0
        budget_manager.update_cost(completion_obj=response, user="u")  # the caller retries
        assert budget_manager.get_current_cost("u") == CALL
        budget_manager.close()
    assert saved["u"]["current_cost"] == CALL


def test_store_mode_spend_survives_a_lost_document_write(completion: FakeCompletion) -> None:
    """Two processes rewrite the project document at once; the user's spend stays visible."""
    store = MemoryStore()
    first = BudgetManager("p", store=store)
    second = BudgetManager("p", store=store)
    first.create_budget(total_budget=0.0001, user="alice")
    stale = second._backend._document()  # type: ignore[union-attr]
    first.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="alice")
    # The second process writes back what it read before (without alice's models).
    second._backend._document = lambda: stale  # type: ignore[union-attr,method-assign]
    second.create_budget(total_budget=5, user="bob")
    assert first.get_current_cost("alice") == CALL
    first.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="alice")
    with pytest.raises(BudgetExceededError):
        first.check_budget("alice")
    first.close()
    second.close()
