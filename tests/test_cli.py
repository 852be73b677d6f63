"""`llmfence`, the command line: every command against a real Redis, an SQLite file and a
running app's admin API (a real uvicorn on 127.0.0.1), through `main(argv)`; the console
script once as a real subprocess."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from llmfence import Fence, MemoryStore, store_from_url
from llmfence.cli import main
from llmfence.testing import mock_llm_app

from ._live import serve

MASTER = "sk-master-cli-0123456789abcdef"
PRICES = {"house-model": {"input": 1000, "output": 2000}}


class Target:
    """Where the commands run: `argv` names it; `chat` sends real requests through a fence
    on the same state, returning each response."""

    def __init__(self, argv: list[str], url: str | None = None, store: str | None = None):
        self.argv = argv
        self.url = url
        self.store = store

    def chat(self, key: str, n: int = 1) -> list[httpx.Response]:
        body = {
            "model": "house-model",
            "max_tokens": 5,
            "user": "carol",
            "messages": [{"role": "user", "content": "hi"}],
        }
        headers = {"Authorization": f"Bearer {key}"}
        if self.url is not None:
            with httpx.Client(base_url=self.url, timeout=10) as client:
                return [
                    client.post("/v1/chat/completions", json=body, headers=headers)
                    for _ in range(n)
                ]

        async def through_a_fence() -> list[httpx.Response]:
            assert self.store is not None
            store = store_from_url(self.store)
            app = mock_llm_app()
            Fence(store=store, master_key=MASTER, prices=PRICES).install(app)
            transport = httpx.ASGITransport(app=app)
            try:
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    return [
                        await client.post("/v1/chat/completions", json=body, headers=headers)
                        for _ in range(n)
                    ]
            finally:
                await store.aclose()

        return anyio.run(through_a_fence)


@pytest.fixture(params=["redis", "sqlite", "http"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        yield Target(["--store", url], store=url)
    elif request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'fence.db'}"
        yield Target(["--store", url], store=url)
    else:
        app = mock_llm_app()
        Fence(store=MemoryStore(), master_key=MASTER, prices=PRICES).install(app, admin=True)
        with serve(app) as url:
            yield Target(["--url", url, "--master-key", MASTER], url=url)


class Cli:
    def __init__(self, target: Target, capsys: pytest.CaptureFixture[str]) -> None:
        self.target, self.capsys = target, capsys

    def __call__(self, *argv: str, status: int = 0) -> tuple[str, str]:
        code = main([*self.target.argv, *argv])
        out, err = self.capsys.readouterr()
        assert code == status, (argv, out, err)
        if status:
            assert err.startswith("llmfence: error: "), err
            assert err.count("\n") == 1, err
            assert "Traceback" not in err
        return out, err

    def json(self, *argv: str) -> Any:
        return json.loads(self(*argv, "--json")[0])


@pytest.fixture
def cli(target: Target, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(target, capsys)


def test_every_command(cli: Cli, target: Target) -> None:
    # teams and users
    team = cli.json(
        "teams",
        "create",
        "core",
        "--alias",
        "Core",
        "--max-budget",
        "5",
        "--budget-duration",
        "30d",
    )
    assert (team["team_id"], team["team_alias"], team["max_budget"]) == ("core", "Core", 5.0)
    user = cli.json(
        "users", "create", "alice", "--team-id", "core", "--max-budget", "3", "--rpm-limit", "10"
    )
    assert (user["user_id"], user["team_id"], user["max_budget"], user["rpm_limit"]) == (
        "alice",
        "core",
        3.0,
        10,
    )
    _, err = cli("users", "create", "bob", "--team-id", "nope", status=1)
    assert "nope" in err
    assert "does not exist" in err
    assert cli.json("users", "info", "alice")["keys"] == []  # no key made on the side

    # keys: create (the plain key printed once), list, info
    created = cli.json(
        "keys",
        "create",
        "--alias",
        "ci",
        "--user-id",
        "alice",
        "--team-id",
        "core",
        "--max-budget",
        "1",
        "--budget-duration",
        "30d",
        "--rpm-limit",
        "60",
        "--tpm-limit",
        "100000",
        "--max-parallel-requests",
        "2",
        "--models",
        "house-model,gpt-4o",
        "--metadata",
        '{"env": "ci"}',
    )
    key, token = created["key"], created["token"]
    assert key.startswith("sk-")
    assert token == hashlib.sha256(key.encode()).hexdigest()
    assert created["key_alias"] == "ci"
    assert created["models"] == ["house-model", "gpt-4o"]
    assert (created["rpm_limit"], created["tpm_limit"], created["max_parallel_requests"]) == (
        60,
        100000,
        2,
    )
    assert (created["max_budget"], created["budget_duration"]) == (1.0, "30d")
    out, err = cli("keys", "create", "--alias", "spare", "--duration", "30d")
    assert out.startswith("key  sk-")
    assert "shown once" in err
    spare = out.split()[1]
    out, _ = cli("keys", "list")
    assert out.splitlines()[0].split()[:3] == ["KEY", "ALIAS", "USER"]
    assert {row["key_alias"] for row in cli.json("keys", "list")} == {"ci", "spare"}
    assert [r["key_alias"] for r in cli.json("keys", "list", "--user-id", "alice")] == ["ci"]
    assert cli.json("keys", "info", token)["key_alias"] == "ci"
    assert cli.json("keys", "info", key)["token"] == token
    out, _ = cli("keys", "info", token)
    assert "key_alias              ci" in out
    assert key not in out

    # spend made by real requests through the fence
    answers = target.chat(key, 2)
    assert [a.status_code for a in answers] == [200, 200]
    usage = [a.json()["usage"] for a in answers]
    cost = sum(
        (Decimal(u["prompt_tokens"] * 1000 + u["completion_tokens"] * 2000) / 10**6 for u in usage),
        Decimal(0),
    )
    for by, name in (
        ("key", created["key_name"]),
        ("user", "alice"),
        ("team", "core"),
        ("model", "house-model"),
        ("end-user", "carol"),
    ):
        report = cli.json("spend", "--by", by, "--since", "7d")
        assert report["by"] == by
        assert report["rows"] == [
            {
                "name": name,
                "spend": float(cost),
                "total_tokens": sum(u["prompt_tokens"] + u["completion_tokens"] for u in usage),
            }
        ]
    out, _ = cli("spend", "--by", "model", "--since", "24h")
    assert out.splitlines()[1].split() == ["MODEL", "SPEND", "TOKENS", "SHARE"]
    assert out.splitlines()[2].split()[:2] == ["house-model", f"${cost:.6f}"]
    assert cli.json("spend", "--since", "2000-01-01", "--until", "2000-01-02")["rows"] == []

    # block, unblock: the key is refused, then served
    assert cli.json("keys", "block", token)["blocked"] is True
    assert [a.status_code for a in target.chat(key)] == [401]
    assert cli.json("keys", "unblock", token)["blocked"] is False
    assert [a.status_code for a in target.chat(key)] == [200]

    # rotate: a new key with the old one's spend; the old one works for the grace period
    rotated = cli.json("keys", "rotate", token, "--grace-period", "1h")
    new_key, new_token = rotated["key"], rotated["token"]
    assert new_key != key
    assert new_token == hashlib.sha256(new_key.encode()).hexdigest()
    assert rotated["spend"] == cli.json("keys", "info", key)["spend"] > 0
    out, err = cli("keys", "rotate", new_token)
    assert out.startswith("key  sk-")
    assert "shown once" in err
    newest = out.split()[1]
    _, err = cli("keys", "info", new_key, status=1)  # no grace: gone at once
    assert "not found" in err
    assert new_key not in err

    # users and teams: update, list, info
    assert cli.json("users", "update", "alice", "--max-budget", "4")["max_budget"] == 4.0
    cli("users", "update", "alice", status=2)
    assert [u["user_id"] for u in cli.json("users", "list")] == ["alice"]
    assert cli.json("users", "list", "--team-id", "other") == []
    out, _ = cli("users", "info", "alice")
    assert "user_id" in out
    assert "2 key(s)" in out
    updated = cli.json("teams", "update", "core", "--alias", "Core infra", "--rpm-limit", "100")
    assert (updated["team_alias"], updated["rpm_limit"]) == ("Core infra", 100)
    out, _ = cli("teams", "list")
    assert out.splitlines()[1].split()[:2] == ["core", "Core"]
    info = cli.json("teams", "info", "core")
    assert info["team_info"]["team_alias"] == "Core infra"
    assert len(info["keys"]) == 2

    # delete
    out, _ = cli("keys", "delete", spare)
    assert out.startswith("deleted sk-...")
    cli("keys", "info", spare, status=1)
    assert cli.json("keys", "delete", newest)["deleted_keys"] == ["sk-..." + newest[-4:]]
    assert cli.json("users", "delete", "alice") == {"deleted_users": ["alice"]}
    out, _ = cli("teams", "delete", "core")
    assert out == "deleted core\n"
    assert cli.json("users", "list") == []
    assert cli.json("teams", "list") == []
    assert cli.json("keys", "list") == []
    _, err = cli("teams", "info", "core", status=1)
    assert "not found" in err


def test_usage_errors_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("LLMFENCE_STORE", "LLMFENCE_URL", "LLMFENCE_MASTER_KEY"):
        monkeypatch.delenv(name, raising=False)
    store = f"sqlite:///{tmp_path / 'x.db'}"
    for argv, words in (
        (["keys", "list"], "name a store"),
        (["keys", "frob", "--store", store], "invalid choice"),
        (["keys", "create", "--store", store, "--max-budget", "lots"], "invalid float"),
        (["keys", "create", "--store", store, "--metadata", "[1]"], "JSON object"),
        (["spend", "--store", store, "--since", "whenever"], "--since"),
        (["keys", "list", "--url", "http://127.0.0.1:9"], "master key"),
        (["keys", "list", "--store", "mysql://db"], "no llmfence store"),
        (["keys", "list", "--store", store, "--url", "http://x"], "not both"),
    ):
        assert main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == ""
        assert err.startswith("llmfence: error: ")
        assert err.count("\n") == 1
        assert words in err, (argv, err)
    assert main(["--help"]) == 0
    assert "keys" in capsys.readouterr().out


def test_operation_errors_exit_1_and_never_show_a_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    app = mock_llm_app()
    Fence(store=MemoryStore(), master_key=MASTER).install(app, admin=True)
    wrong = "sk-wrong-master-key-0123456789"
    with serve(app) as url:
        # From the environment, as the options would give them.
        monkeypatch.setenv("LLMFENCE_URL", url)
        monkeypatch.setenv("LLMFENCE_MASTER_KEY", wrong)
        assert main(["keys", "list"]) == 1
        _, err = capsys.readouterr()
        assert "401" in err
        assert wrong not in err
        assert err.count("\n") == 1
        monkeypatch.setenv("LLMFENCE_MASTER_KEY", MASTER)
        assert main(["keys", "info", "sk-no-such-key-00000000000000"]) == 1
        _, err = capsys.readouterr()
        assert "404" in err
        assert "sk-no-such" not in err
        assert main(["keys", "list", "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == []
    monkeypatch.setenv("LLMFENCE_URL", url)  # the server is gone now
    assert main(["keys", "list"]) == 1
    _, err = capsys.readouterr()
    assert "cannot reach" in err
    assert err.count("\n") == 1
    monkeypatch.delenv("LLMFENCE_URL")
    monkeypatch.setenv("LLMFENCE_STORE", f"sqlite:///{tmp_path / 'env.db'}")
    assert main(["users", "info", "nobody"]) == 1
    assert "nobody" in capsys.readouterr().err


def _script() -> str:
    """The installed console script (`pip install -e .` makes it, beside the interpreter)."""
    path = Path(sys.executable).parent / "llmfence"
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail("no llmfence console script: pip install -e .")
        pytest.skip("no llmfence console script: pip install -e .")
    return str(path)


def test_the_console_script_and_python_m(tmp_path: Path) -> None:
    env = {**os.environ, "LLMFENCE_STORE": f"sqlite:///{tmp_path / 'fence.db'}"}
    env.pop("LLMFENCE_URL", None)
    run = subprocess.run(
        [_script(), "keys", "create", "--alias", "sub", "--max-budget", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    key = run.stdout.split()[1]
    assert key.startswith("sk-")
    assert "shown once" in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "llmfence.cli", "keys", "info", key, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["key_alias"] == "sub"
    run = subprocess.run(
        [_script(), "keys", "info", "nope"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert (run.returncode, run.stdout) == (1, "")
    assert run.stderr == "llmfence: error: The key was not found.\n"
