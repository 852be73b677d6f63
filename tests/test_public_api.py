"""The curated public surface stays in sync with what the package exports."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

import llmfence
from llmfence import ConfigurationError

DESIGN_NAMES = {
    "Fence",
    "MemoryStore",
    "RedisStore",
    "Store",
    "KeyAuthMiddleware",
    "RequestRateLimitMiddleware",
    "TokenRateLimitMiddleware",
    "ParallelRequestLimitMiddleware",
    "BudgetGuardMiddleware",
    "SpendRecorderMiddleware",
    "BudgetManager",
    "BudgetExceededError",
    "RateLimitExceededError",
}


def test_all_is_sorted_and_importable() -> None:
    assert llmfence.__all__ == sorted(llmfence.__all__)
    for name in llmfence.__all__:
        assert getattr(llmfence, name) is not None, name


def test_the_names_design_promises_are_exported() -> None:
    assert set(llmfence.__all__) >= DESIGN_NAMES


def test_every_public_name_is_documented() -> None:
    for name in llmfence.__all__:
        obj = getattr(llmfence, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), name


def test_public_modules_have_all() -> None:
    for module in (
        "llmfence.exceptions",
        "llmfence.admin",
        "llmfence.guards",
        "llmfence.testing",
        "llmfence.stores",
        "llmfence.middleware",
        "llmfence.budget_manager",
    ):
        imported = importlib.import_module(module)
        assert imported.__all__ == sorted(imported.__all__), module
        for name in imported.__all__:
            assert hasattr(imported, name), (module, name)


def test_middlewares_take_app_positionally_and_options_by_keyword() -> None:
    for name in DESIGN_NAMES:
        obj = getattr(llmfence, name)
        if not name.endswith("Middleware"):
            continue
        parameters = list(inspect.signature(obj).parameters.values())
        assert parameters[0].name == "app"
        assert all(p.kind is p.KEYWORD_ONLY for p in parameters[1:]), name


def test_version() -> None:
    assert llmfence.__version__


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("memory://", "MemoryStore"),
        ("sqlite:///{tmp}/a.db", "SQLiteStore"),
        ("redis://127.0.0.1:6379/0", "RedisStore"),
        ("rediss://127.0.0.1:6380", "RedisStore"),
        ("redis+cluster://127.0.0.1:7000", "RedisStore"),
    ],
)
def test_store_from_url_names_every_store(url: str, kind: str, tmp_path: Path) -> None:
    store = llmfence.store_from_url(url.format(tmp=tmp_path))
    assert type(store).__name__ == kind
    assert getattr(store, "_cluster", None) in (None, url.startswith("redis+cluster"))


def test_store_from_url_refuses_what_it_does_not_know_without_echoing_secrets() -> None:
    with pytest.raises(ConfigurationError) as bad:
        llmfence.store_from_url("postgres://user:s3cret@db/x")
    assert "s3cret" not in str(bad.value)
    with pytest.raises(ConfigurationError):
        llmfence.store_from_url("sqlite://")
