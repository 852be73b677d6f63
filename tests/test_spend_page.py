"""The spend page in a real headless Chromium (Playwright driving Debian's `chromium`), against
a real uvicorn serving an app whose spend was made by real requests through the fence."""

from __future__ import annotations

import os
import shutil
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from llmfence import Fence, MemoryStore
from llmfence.testing import mock_llm_app

from ._live import serve
from .conftest import required

MASTER = "sk-master-spend-page-0123456789"
# USD per million tokens: large, so the page's numbers are easy to read.
PRICES = {"input": 1000, "output": 2000}


def _chromium() -> str:
    """Debian's chromium (never a browser download); with `CI` set, missing is a failure."""
    path = shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None
    )
    return required(path, "no chromium (apt-get install -y chromium)")


def _usd(value: Decimal) -> str:
    """As the page writes amounts."""
    return "$" + (format(value, ".6f") if abs(value) < 1 else format(value, ".2f"))


def _cost(usage: dict[str, Any]) -> Decimal:
    tokens_in, tokens_out = usage["prompt_tokens"], usage["completion_tokens"]
    return Decimal(tokens_in * PRICES["input"] + tokens_out * PRICES["output"]) / 1_000_000


def _spend(url: str) -> tuple[dict[str, Decimal], list[int]]:
    """Known spend, by real requests through the fence: two keys of team `core`, two models;
    then two refusals (a budget, an unknown key). Returns the spend per key alias (from the
    responses' usage and the prices) and the refusals' statuses."""
    spent: dict[str, Decimal] = {}
    admin = {"Authorization": f"Bearer {MASTER}"}
    with httpx.Client(base_url=url, timeout=10) as client:

        def chat(key: str, model: str) -> httpx.Response:
            return client.post(
                "/v1/chat/completions",
                json={
                    "model": model,
                    "max_tokens": 20,
                    "messages": [{"role": "user", "content": "Say hi"}],
                },
                headers={"Authorization": f"Bearer {key}"},
            )

        client.post("/team/new", json={"team_id": "core", "max_budget": 2}, headers=admin)
        keys = {}
        for alias, budget in (("ci", 1), ("batch", 0.06)):
            body = {"key_alias": alias, "max_budget": budget, "team_id": "core"}
            answer = client.post(
                "/key/generate", json={**body, "budget_duration": "30d"}, headers=admin
            )
            keys[alias] = answer.json()["key"]
        for alias, model, n in (("ci", "house-model", 3), ("batch", "house-model-large", 1)):
            for _ in range(n):
                answer = chat(keys[alias], model)
                assert answer.status_code == 200, answer.text
                spent[alias] = spent.get(alias, Decimal(0)) + _cost(answer.json()["usage"])
        statuses = [
            chat(keys["batch"], "house-model-large").status_code,  # over its budget
            chat("sk-not-a-key-0000000000000", "house-model").status_code,
        ]
    return spent, statuses


def test_the_page_shows_spend_budgets_and_refusals(tmp_path: Path, record_property: Any) -> None:
    chromium = _chromium()
    fence = Fence(
        store=MemoryStore(),
        master_key=MASTER,
        max_budget=100,
        budget_duration="30d",
        prices={"house-model": PRICES, "house-model-large": PRICES},
    )
    app = mock_llm_app()
    fence.install(app, admin=True)
    with serve(app) as url:
        spent, statuses = _spend(url)
        shot, page = _browse(chromium, url, tmp_path)
    record_property("screenshot", str(shot))
    assert statuses == [429, 401]
    total = spent["ci"] + spent["batch"]
    assert page["total"] == _usd(total)
    assert page["range"] == _usd(total)
    # Keys by alias (the report names them masked; the key list gives their aliases).
    assert page["top-key"] == [["ci", _usd(spent["ci"])], ["batch", _usd(spent["batch"])]]
    assert page["top-model"] == [
        ["house-model", _usd(spent["ci"])],
        ["house-model-large", _usd(spent["batch"])],
    ]
    assert page["top-team"] == [["core", _usd(total)]]
    budgets = {tuple(row[:2]): row[2:] for row in page["budgets"]}
    assert budgets["key", "batch"][:3] == [
        _usd(spent["batch"]),
        "$0.060000",
        _usd(Decimal("0.06") - spent["batch"]),
    ]
    assert budgets["team", "core"][:3] == [_usd(total), "$2.00", _usd(2 - total)]
    assert budgets["global", "whole app"][1] == "$100.00"
    assert budgets["key", "ci"][4].endswith("UTC")  # when it resets
    # Newest first: the page's own wrong master key, the unknown key, then the budget (its
    # key shown masked, never whole).
    assert [row[1:3] for row in page["refusals"][:3]] == [
        ["401", "invalid_api_key"],
        ["401", "invalid_api_key"],
        ["429", "budget_exceeded"],
    ]
    assert page["refusals"][2][3] == "key"
    assert page["refusals"][2][4].startswith("sk-...")
    # This process's refusals (other tests' too, when they ran first), as many as are listed.
    assert int(page["refusal-count"]) == len(page["refusals"]) >= 3
    assert page["wrong"] == "That is not the master key."
    assert "sk-not-a-key" not in page["html"]
    assert page["foreign"] == []
    assert page["errors"] == []


def _browse(chromium: str, url: str, tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """Open the page in headless Chromium, log in with a wrong key and then the master key;
    what it shows (texts of the cards and table rows) and a screenshot of it."""
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "spend-page.png"
    seen: dict[str, Any] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            requests: list[str] = []
            errors: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            response = page.goto(f"{url}/ui/spend")
            assert response is not None
            assert "script-src 'sha256-" in response.headers["content-security-policy"]
            page.fill("#master-key", "sk-wrong-master-key-00000000")
            page.click("#load")
            page.wait_for_selector("#status.error")
            seen["wrong"] = page.text_content("#status")
            page.fill("#master-key", MASTER)
            page.click("#load")
            page.wait_for_selector("#content:not([hidden])", timeout=10_000)
            page.wait_for_selector("#refusals tbody tr")

            def rows(selector: str) -> list[list[str]]:
                cells: list[list[str]] = page.eval_on_selector_all(
                    selector,
                    "rows => rows.map(r => [...r.cells].map(c => c.textContent.trim()))",
                )
                return cells

            seen.update(
                total=page.text_content("#total-spend"),
                range=page.text_content("#range-spend"),
                **{"refusal-count": page.text_content("#refusal-count")},
                budgets=rows("#budgets tbody tr"),
                refusals=rows("#refusals tbody tr"),
                html=page.content(),
                **{
                    f"top-{kind}": [r[:2] for r in rows(f"#top-{kind} tbody tr")]
                    for kind in ("key", "user", "team", "model")
                },
            )
            page.screenshot(path=str(shot), full_page=True)
            # Self-contained: nothing fetched from anywhere but the app; no policy violation.
            seen["foreign"] = [r for r in requests if not r.startswith(url)]
            seen["errors"] = [e for e in errors if "401" not in e and "403" not in e]
        finally:
            browser.close()
    return shot, seen
