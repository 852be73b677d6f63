"""BudgetManager's `user_dict` is the live state (edits in place count, as in LiteLLM), and
`create_budget` refuses what its docstring says it refuses."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmfence import MemoryStore
from llmfence.budget_manager import BudgetManager
from llmfence.exceptions import ConfigurationError

from .test_budget_manager import CALL, FakeClock, FakeCompletion

_DAY = 86_400


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # user_cost.json lands here


@pytest.fixture
def completion() -> FakeCompletion:
    return FakeCompletion()


@pytest.fixture(params=["local", "memory-store"])
def make_manager(request: pytest.FixtureRequest) -> Iterator[Callable[..., BudgetManager]]:
    store = MemoryStore()
    made: list[BudgetManager] = []

    def make(**kwargs: Any) -> BudgetManager:
        if request.param == "memory-store":
            kwargs["store"] = store
        manager = BudgetManager("live_project", **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()


def test_litellm_duration_test_as_written(
    make_manager: Callable[..., BudgetManager], completion: FakeCompletion
) -> None:
    # LiteLLM's own test: move `last_updated_at` a day back by hand, and the budget resets.
    budget_manager = make_manager()
    user = "12345"
    budget_manager.create_budget(total_budget=10, user=user, duration="daily")
    budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user=user)
    assert budget_manager.get_current_cost(user) > 0
    budget_manager.user_dict[user]["last_updated_at"] -= _DAY
    budget_manager.update_budget_all_users()
    assert budget_manager.get_current_cost(user) == 0


def test_duration_and_budget_edited_in_place_count(
    make_manager: Callable[..., BudgetManager], completion: FakeCompletion
) -> None:
    clock = FakeClock(1000.0)
    budget_manager = make_manager(clock=clock)
    budget_manager.create_budget(total_budget=10, user="u", duration="monthly")
    budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="u")
    entry = budget_manager.user_dict["u"]
    entry["duration"] = 1  # a day instead of 28
    entry["total_budget"] = 0.5
    assert budget_manager.get_total_budget("u") == 0.5
    clock.now = 1000.0 + _DAY
    budget_manager.reset_on_duration("u")
    assert budget_manager.get_current_cost("u") == 0
    assert budget_manager.user_dict["u"]["last_updated_at"] == 1000.0 + _DAY


def test_spend_set_by_hand_counts_and_later_charges_add_to_it(
    make_manager: Callable[..., BudgetManager], completion: FakeCompletion
) -> None:
    budget_manager = make_manager()
    budget_manager.create_budget(total_budget=10, user="u")
    budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="u")
    budget_manager.user_dict["u"]["current_cost"] = 2.5
    assert budget_manager.get_current_cost("u") == 2.5
    budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="u")
    assert budget_manager.get_current_cost("u") == 2.5 + CALL


def test_an_edit_keeps_what_was_charged_after_the_entry_was_read(
    make_manager: Callable[..., BudgetManager], completion: FakeCompletion
) -> None:
    budget_manager = make_manager()
    budget_manager.create_budget(total_budget=10, user="u", duration="daily")
    entry = budget_manager.user_dict["u"]
    budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="u")
    entry["duration"] = 2
    assert budget_manager.get_current_cost("u") == CALL
    assert budget_manager.user_dict["u"]["duration"] == 2


def test_local_user_dict_is_the_managers_own_dict(completion: FakeCompletion) -> None:
    budget_manager = BudgetManager("p")
    users = budget_manager.user_dict
    assert budget_manager.user_dict is users
    budget_manager.create_budget(total_budget=1, user="u")
    held = users["u"]
    budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="u")
    assert held["current_cost"] == CALL  # a held entry sees later charges
    users["added"] = {"total_budget": 3}  # LiteLLM's users add entries by hand too
    assert budget_manager.get_users() == ["u", "added"]
    assert budget_manager.get_total_budget("added") == 3
    del users["added"]
    assert not budget_manager.is_valid_user("added")
    users["u"]["total_budget"] = 7
    assert budget_manager.save_data() == {"status": "success"}
    assert json.loads(Path("user_cost.json").read_text())["u"]["total_budget"] == 7
    assert json.dumps(budget_manager.user_dict)  # a plain dict, as LiteLLM's


def test_money_stays_exact_while_nobody_edits(completion: FakeCompletion) -> None:
    budget_manager = BudgetManager("p")
    budget_manager.create_budget(total_budget=1, user="u")
    for _ in range(3):
        budget_manager.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="u")
    assert budget_manager.get_current_cost("u") == 0.000237
    assert budget_manager.user_dict["u"]["current_cost"] == 0.000237


def test_store_edits_are_seen_by_another_manager(completion: FakeCompletion) -> None:
    store = MemoryStore()
    with (
        BudgetManager("p", store=store) as first,
        BudgetManager("p", store=store) as second,
    ):
        first.create_budget(total_budget=1, user="u", duration="daily")
        first.update_cost(completion_obj=completion("gpt-3.5-turbo", []), user="u")
        entry = first.user_dict["u"]
        entry["last_updated_at"] -= _DAY
        assert second.user_dict["u"]["last_updated_at"] == entry["last_updated_at"]
        entry.update(total_budget=2)
        assert second.get_total_budget("u") == 2
        entry["current_cost"] = 0
        assert second.get_current_cost("u") == 0
        assert entry.pop("duration") == 1
        assert "duration" not in second.user_dict["u"]


@pytest.mark.parametrize(
    "budget", [-1, -0.01, "10", float("nan"), float("inf"), float("-inf"), True, None, 1e300]
)
def test_create_budget_refuses_what_its_docstring_says(
    make_manager: Callable[..., BudgetManager], budget: Any
) -> None:
    budget_manager = make_manager()
    with pytest.raises(ConfigurationError):
        budget_manager.create_budget(total_budget=budget, user="u")
    assert not budget_manager.is_valid_user("u")


def test_create_budget_takes_ints_and_floats(make_manager: Callable[..., BudgetManager]) -> None:
    budget_manager = make_manager()
    budget_manager.create_budget(total_budget=10, user="i")
    budget_manager.create_budget(total_budget=0.25, user="f", created_at=time.time())
    assert budget_manager.get_total_budget("i") == 10
    assert budget_manager.get_total_budget("f") == 0.25
