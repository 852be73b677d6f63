"""LiteLLM's BudgetManager flow on llmfence, offline: per-user budgets with exact money.

The seed notebook gives a user a $0.0002 daily budget and calls the model until the budget is
spent. Here `completion` is a stand-in returning the notebook's recorded response, so the
example runs without an API key; swap in `litellm.completion` or an OpenAI client for real calls.

Run: `python examples/budget_manager.py` (it works in a temporary directory and leaves no
`user_cost.json` behind).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from llmfence.budget_manager import BudgetManager
from llmfence.exceptions import BudgetExceededError


def completion(model: str, messages: list[dict[str, str]]) -> dict[str, Any]:
    """A fake chat completion: the notebook's recorded `gpt-3.5-turbo-0613` response."""
    return {
        "id": "chatcmpl-7yAUkHQV8xdfldzzZnnnuVU8pl31b",
        "object": "chat.completion",
        "created": 1694574378,
        "model": "gpt-3.5-turbo-0613",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 14, "completion_tokens": 29, "total_tokens": 43},
    }


def main() -> None:
    """Spend a user's daily budget, then show the report and the saved file."""
    budget_manager = BudgetManager(project_name="liteLLM_project")
    user = "29af95f8-c3c6-4c8c-b080-8b2d18d25432"
    messages = [{"role": "user", "content": "Hey, how's it going?"}]

    if not budget_manager.is_valid_user(user):
        budget_manager.create_budget(total_budget=0.0002, user=user, duration="daily")
    budget = budget_manager.get_total_budget(user)

    calls = 0
    while True:
        try:
            budget_manager.check_budget(user)  # allowed while spend <= budget, as LiteLLM checks
        except BudgetExceededError as exc:
            print(f"refused: {exc.message}")
            break
        response = completion(model="gpt-3.5-turbo", messages=messages)
        budget_manager.update_cost(completion_obj=response, user=user)
        calls += 1
        print(f"call {calls}: spent ${budget_manager.get_current_cost(user)} of ${budget}")

    # Text in, text out: no response object needed.
    budget_manager.create_budget(total_budget=10, user="12345", duration="30d")
    budget_manager.update_cost(
        user="12345",
        model="gpt-3.5-turbo",
        input_text="hello world",
        output_text="it's a sunny day in san francisco",
    )

    print()
    print(f"{'user':<38} {'budget':>8} {'spent':>10}  per model")
    for name in budget_manager.get_users():
        print(
            f"{name:<38} {budget_manager.get_total_budget(name):>8} "
            f"{budget_manager.get_current_cost(name):>10}  {budget_manager.get_model_cost(name)}"
        )
    print(f"\nsave_data() -> {budget_manager.save_data()}")
    with open("user_cost.json", encoding="utf-8") as file:
        print(f"user_cost.json holds {len(file.read())} bytes, in LiteLLM's format")


if __name__ == "__main__":
    home = os.getcwd()
    with tempfile.TemporaryDirectory() as workdir:
        os.chdir(workdir)  # BudgetManager keeps user_cost.json in the working directory
        try:
            main()
        finally:
            os.chdir(home)
