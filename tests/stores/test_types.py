"""The values that cross the store boundary: spend records as tuples, quick frozen states."""

from __future__ import annotations

import copy
import dataclasses
import gc
import inspect
import pickle
from typing import Any

import pytest

from llmfence.stores import (
    Admission,
    AdmissionResult,
    BudgetScope,
    BudgetState,
    RateHit,
    RateState,
    Refusal,
    Settlement,
    SlotRequest,
    SpendRecord,
    SpendTotals,
)
from llmfence.stores._quick import quick_init

QUICK = (
    Admission,
    AdmissionResult,
    BudgetScope,
    BudgetState,
    RateHit,
    RateState,
    Refusal,
    Settlement,
    SlotRequest,
    SpendTotals,
)


def test_spend_record_is_a_named_tuple_built_by_keyword() -> None:
    record = SpendRecord(request_id="r", timestamp=1.5, model="m", cost=7, user_id="u")
    assert isinstance(record, tuple)
    assert record.provenance == "provider-reported"
    assert record.status == 200
    assert SpendRecord._fields[:4] == ("request_id", "timestamp", "model", "cost")
    assert SpendRecord.__doc__ is not None
    assert "Never holds a key" in SpendRecord.__doc__


def test_spend_record_dict_round_trip_ignores_unknown_fields() -> None:
    record = SpendRecord(request_id="r", timestamp=1.5, model="m", cost=7, key_hash="h")
    data = record.to_dict()
    assert data["key_hash"] == "h"
    assert list(data) == list(SpendRecord._fields)
    assert SpendRecord.from_dict({**data, "later_field": 1}) == record
    assert SpendRecord.from_dict(
        {"request_id": "r", "timestamp": 1.5, "model": "m", "cost": 7}
    ) == (SpendRecord(request_id="r", timestamp=1.5, model="m", cost=7))


def test_a_plain_tuple_of_a_record_leaves_the_garbage_collector_alone() -> None:
    # What MemoryStore keeps: the named tuple stays tracked (CPython only untracks exact
    # tuples), its plain tuple does not once a collection has seen it.
    record = SpendRecord(request_id="r", timestamp=1.5, model="m", cost=7, user_id="u")
    kept = tuple(record)
    gc.collect()
    assert not gc.is_tracked(kept)
    assert SpendRecord._make(kept) == record


@pytest.mark.parametrize("cls", QUICK)
def test_quick_states_keep_their_dataclass_signature(cls: type[Any]) -> None:
    parameters = list(inspect.signature(cls).parameters.values())
    fields = dataclasses.fields(cls)
    assert [p.name for p in parameters] == [f.name for f in fields]
    for parameter, f in zip(parameters, fields, strict=True):
        assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        expected = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        assert parameter.default == expected
    assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"


def test_quick_states_are_frozen_equal_and_copyable() -> None:
    state = RateState("k", "tokens", "key", 10, 5, 1.0, 60.0)
    same = RateState(
        key="k", kind="tokens", level="key", limit=10, remaining=5, reset_after=1.0, window=60.0
    )
    assert state == same
    assert hash(state) == hash(same)
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.remaining = 4  # type: ignore[misc]
    assert dataclasses.replace(state, remaining=4).remaining == 4
    assert pickle.loads(pickle.dumps(state)) == state
    assert copy.deepcopy(state) == state
    assert Settlement("r", 1.0, 5).tokens is None
    with pytest.raises(TypeError):
        RateState("k")  # type: ignore[call-arg]


def test_quick_init_refuses_what_it_cannot_build() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class WithFactory:
        items: list[int] = dataclasses.field(default_factory=list)

    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class KeywordOnly:
        name: str

    for cls in (WithFactory, KeywordOnly):
        with pytest.raises(TypeError):
            quick_init(cls)
