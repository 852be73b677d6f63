"""The key/user/team field checks both doors share: the Python API's and the admin API's."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from llmfence._fields import (
    KEY_FIELDS,
    RECORD_FIELDS,
    TEAM_FIELDS,
    USER_FIELDS,
    budget_nano,
    checked_duration,
    checked_key,
    checked_limit,
    key_expiry,
    limit_fields,
    model_budgets,
)
from llmfence._fields_json import json_fields, json_key
from llmfence.exceptions import ConfigurationError, InvalidRequestError
from llmfence.stores import KeyRecord, TeamRecord, UserRecord

T0 = 1_795_000_000.0


def test_limit_fields_in_storage_form() -> None:
    fields = limit_fields(
        Decimal("0.1"), "30d", 4, 20_000, 2, ["gpt-4o", "group"], {"env": "t"}, created_at=T0
    )
    assert fields == {
        "max_budget": 100_000_000,
        "soft_budget": None,
        "budget_duration": "30d",
        "rpm_limit": 4,
        "tpm_limit": 20_000,
        "rpd_limit": None,
        "tpd_limit": None,
        "max_parallel_requests": 2,
        "models": ("gpt-4o", "group"),
        "metadata": {"env": "t"},
        "created_at": T0,
    }
    empty = limit_fields(None, None, None, None, None, (), None, created_at=T0)
    assert empty["max_budget"] is None
    assert empty["models"] == ()
    assert empty["metadata"] == {}
    # Every record type takes them as they are.
    KeyRecord(key_hash="h", key_masked="m", **fields)
    UserRecord(user_id="u", **fields)
    TeamRecord(team_id="t", **fields)


@pytest.mark.parametrize(
    "changes",
    [
        {"max_budget": -1},
        {"max_budget": float("nan")},
        {"max_budget": "lots"},
        {"budget_duration": "10 days"},
        {"rpm_limit": -1},
        {"tpm_limit": 1.5},
        {"max_parallel_requests": True},
    ],
)
def test_limit_fields_refuse_bad_values(changes: dict[str, Any]) -> None:
    args: dict[str, Any] = {
        "max_budget": None,
        "budget_duration": None,
        "rpm_limit": None,
        "tpm_limit": None,
        "max_parallel_requests": None,
        "models": (),
        "metadata": None,
    } | changes
    with pytest.raises(ConfigurationError):
        limit_fields(**args, created_at=T0)


def test_python_door_checks() -> None:
    assert checked_limit("rpm_limit", 0) == 0
    assert checked_limit("rpm_limit", None) is None
    with pytest.raises(ConfigurationError, match="rpm_limit must be a non-negative int"):
        checked_limit("rpm_limit", -1)
    assert budget_nano(0.000079) == 79_000
    assert budget_nano("1.5") == 1_500_000_000
    with pytest.raises(ConfigurationError, match="must not be negative"):
        budget_nano(-0.01)
    assert checked_duration("monthly") == "monthly"
    with pytest.raises(ConfigurationError, match="fortnight"):
        checked_duration("fortnight")
    assert checked_key("sk-" + "x" * 17) == "sk-" + "x" * 17
    for bad in ("sk-short", "pk-" + "x" * 30):
        with pytest.raises(ConfigurationError, match="'sk-'"):
            checked_key(bad)
    assert model_budgets({"gpt-4o": 1, "o3": Decimal("0.5")}) == {
        "gpt-4o": 1_000_000_000,
        "o3": 500_000_000,
    }
    assert model_budgets(None) == {}
    with pytest.raises(ConfigurationError, match="must not be negative"):
        model_budgets({"gpt-4o": -1})
    assert key_expiry("1h", T0) == T0 + 3600
    assert key_expiry(None, T0) is None
    with pytest.raises(ConfigurationError):
        key_expiry("soon", T0)


def test_json_fields_in_storage_form() -> None:
    body = {
        "max_budget": 10,
        "budget_duration": "30d",
        "rpm_limit": 4,
        "tpm_limit": None,  # null: as if absent
        "models": ["gpt-4o"],
        "metadata": {"a": 1},
        "model_max_budget": {"gpt-4o": 0.5},
        "key_alias": "ci",
        "duration": "1h",
        "user_id": "u1",
    }
    assert json_fields(body, KEY_FIELDS) == {
        "max_budget": 10_000_000_000,
        "budget_duration": "30d",
        "rpm_limit": 4,
        "models": ("gpt-4o",),
        "metadata": {"a": 1},
        "user_id": "u1",
        "key_alias": "ci",
        "duration": "1h",
        "model_max_budget": {"gpt-4o": 500_000_000},
        "model_budget_duration": {},
    }
    # Lookup fields may ride along where a route does not take them.
    assert json_fields({"key": "sk-x", "keys": [], "max_budget": 0}, RECORD_FIELDS) == {
        "max_budget": 0
    }
    assert json_fields({"team_alias": "core"}, TEAM_FIELDS) == {"team_alias": "core"}
    assert json_fields({"duration": "2d"}, USER_FIELDS) == {"duration": "2d"}


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"max_budget": -1}, "max_budget", "'max_budget' must be a number from 0 to 1000000000"),
        ({"max_budget": "10"}, "max_budget", "'max_budget' must be a number from 0 to 1000000000"),
        ({"max_budget": True}, "max_budget", "'max_budget' must be a number from 0 to 1000000000"),
        (
            {"max_budget": float("inf")},
            "max_budget",
            "'max_budget' must be a number from 0 to 1000000000",
        ),
        ({"rpm_limit": 1.5}, "rpm_limit", "'rpm_limit' must be an integer ≥ 0."),
        ({"tpm_limit": True}, "tpm_limit", "'tpm_limit' must be an integer ≥ 0."),
        ({"max_parallel_requests": -2}, "max_parallel_requests", "integer ≥ 0"),
        ({"budget_duration": "10 days"}, "budget_duration", "Invalid budget duration"),
        ({"duration": 30}, "duration", "'duration' must be a string like '30d'."),
        ({"models": "gpt-4o"}, "models", "'models' must be an array of model names"),
        ({"models": [1]}, "models", "'models' must be an array of model names"),
        ({"metadata": []}, "metadata", "'metadata' must be an object."),
        ({"model_max_budget": []}, "model_max_budget", "'model_max_budget' must be an object."),
        ({"model_max_budget": {"m": -1}}, "model_max_budget", "must be an amount ≥ 0"),
        ({"model_max_budget": {"m": "1"}}, "model_max_budget", "must be an amount ≥ 0"),
        (
            {"user_id": 5},
            "user_id",
            "'user_id' must be a non-empty string of at most 256 characters",
        ),
        (
            {"key_alias": ""},
            "key_alias",
            "'key_alias' must be a non-empty string of at most 256 characters",
        ),
        (
            {"team_id": "x" * 257},
            "team_id",
            "'team_id' must be a non-empty string of at most 256 characters",
        ),
        ({"surprise": 1}, "surprise", "Unknown field 'surprise'."),
    ],
)
def test_json_fields_refuse_bad_values(body: dict[str, Any], param: str, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message.replace(".", r"\.")) as caught:
        json_fields(body, KEY_FIELDS)
    assert caught.value.param == param
    assert caught.value.status_code == 400


def test_json_key() -> None:
    assert json_key("sk-migrated-from-litellm-0001") == "sk-migrated-from-litellm-0001"
    for bad in ("sk-short", "pk-" + "x" * 30, 123, None):
        with pytest.raises(InvalidRequestError, match="'sk-'") as caught:
            json_key(bad)
        assert caught.value.param == "key"


def test_team_fields_take_no_key_fields() -> None:
    with pytest.raises(InvalidRequestError, match="duration"):
        json_fields({"duration": "1h"}, TEAM_FIELDS)
