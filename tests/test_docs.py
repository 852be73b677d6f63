"""Every code block of the documentation site (docs/**/*.md) and of README.md runs, as written.

The conventions (docs/contributing.md):

- A page's ```python blocks run in order in one namespace, as one program: a later block may
  use what an earlier one defined. Top-level `await` is allowed (each block runs on the test's
  event loop).
- `<!-- docs-test: hidden ... -->` is Python the reader does not see, run in the same namespace
  at that point: a setup a block needs (a fake LLM client) or a check of what the prose says
  (the status a request got).
- ```bash blocks run with `bash -euo pipefail` in a temporary directory, with `llmfence` on
  `PATH`, `LLMFENCE_STORE` set to a fresh SQLite file there, and `localhost:8000` replaced by a
  live uvicorn on 127.0.0.1 serving a gateway on `MemoryStore` (the admin API included): `$M`
  is its master key, `$KEY` a key made for the page.
- ```text blocks are diagrams and printed output, not code: they are not run.
- `<!-- docs-test: skip REASON -->` on the line before a block leaves it out, with its reason.
  Any other block that does not run fails the test, as does a block in another language.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

import llmfence
from llmfence import Fence, MemoryStore
from llmfence.testing import mock_llm_app

from ._live import serve

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = [*sorted(DOCS.rglob("*.md")), ROOT / "README.md"]
MASTER = "sk-docs-master-key"
RUN = {"python", "bash"}
NOT_CODE = {"text"}

pytestmark = pytest.mark.anyio

_FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)[^\n]*$")
_SKIP = re.compile(r"^\s*<!-- docs-test: skip (?P<reason>\S.*?)\s*-->\s*$")
_HIDDEN = re.compile(r"^\s*<!-- docs-test: hidden\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block (or hidden block) of a page."""

    page: Path
    line: int
    lang: str
    code: str
    skip: str | None = None
    hidden: bool = False

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The page's fenced blocks and hidden blocks, in order, with their skip marks."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    skip: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if _HIDDEN.match(line) is not None:
            end = lines.index("-->", i + 1)
            found.append(Block(page, i + 1, "python", "\n".join(lines[i + 1 : end]), hidden=True))
            i = end + 1
            continue
        if (mark := _SKIP.match(line)) is not None:
            skip = mark["reason"]
            i += 1
            continue
        if (fence := _FENCE.match(line)) is not None:
            indent = fence["indent"]
            end = i + 1
            while lines[end].rstrip() != f"{indent}```":
                end += 1
            body = "\n".join(x.removeprefix(indent) for x in lines[i + 1 : end])
            found.append(Block(page, i + 1, fence["lang"], body + "\n", skip=skip))
            skip = None
            i = end + 1
            continue
        if line.strip():
            assert skip is None, f"{page}:{i + 1}: a skip mark must come right before a block"
        i += 1
    return found


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


async def run_python(block: Block, namespace: dict[str, Any]) -> None:
    """Run one block in the page's namespace, awaiting it if it awaits at top level."""
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    code = compile(block.code, block.where, "exec", flags=flags, dont_inherit=True)
    result = eval(code, namespace)
    if inspect.iscoroutine(result):
        await result


@contextlib.contextmanager
def live_gateway() -> Iterator[tuple[str, str]]:
    """A gateway on `MemoryStore` with the admin API, served by uvicorn; its URL and a key."""
    app = mock_llm_app()
    Fence(store=MemoryStore(), master_key=MASTER).install(app, admin=True)
    with serve(app) as url:
        made = httpx.post(
            f"{url}/key/generate", json={}, headers={"authorization": f"Bearer {MASTER}"}
        )
        made.raise_for_status()
        yield url, made.json()["key"]


# Every curl of a block fails the block on an HTTP error, and ends its output with a newline.
_CURL = 'curl() { command curl -sS --fail-with-body "$@"; echo; }\n'


def run_bash(block: Block, url: str, key: str, tmp: Path) -> None:
    """Run one bash block against the live gateway and a fresh SQLite store."""
    port = url.rsplit(":", 1)[1]
    script = _CURL + block.code.replace("localhost:8000", f"127.0.0.1:{port}")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "M": MASTER,
        "KEY": key,
        "LLMFENCE_STORE": f"sqlite:///{tmp / 'llmfence.db'}",
    }
    for name in ("LLMFENCE_URL", "LLMFENCE_MASTER_KEY"):
        env.pop(name, None)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{block.where}\n{done.stdout}\n{done.stderr}"


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
async def test_every_block_of_the_page_runs(page: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    found = blocks(page)
    namespace: dict[str, Any] = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    shell = [b for b in found if b.lang == "bash" and b.skip is None]
    with contextlib.ExitStack() as stack:
        url, key = stack.enter_context(live_gateway()) if shell else ("", "")
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        monkeypatch.chdir(tmp)  # files a block writes (a SQLite store, user_cost.json) go here
        for block in found:
            assert block.lang in RUN | NOT_CODE, (
                f"{block.where}: a ```{block.lang} block is never run"
            )
            if block.skip is not None or block.lang in NOT_CODE:
                continue
            if block.lang == "python":
                await run_python(block, namespace)
            else:
                run_bash(block, url, key, tmp)


def test_skip_marks_are_few_and_give_a_reason() -> None:
    skipped = [b for page in PAGES for b in blocks(page) if b.skip is not None]
    for block in skipped:
        assert len(block.skip or "") >= 10, f"{block.where}: say why the block cannot run"
    code = [b for page in PAGES for b in blocks(page) if b.lang in RUN]
    assert len(skipped) * 5 <= len(code), "most blocks must run"


def test_the_api_reference_names_every_public_name_once() -> None:
    text = (DOCS / "reference" / "api.md").read_text()
    named = re.findall(r"^::: llmfence\.(\w+)$", text, re.M)
    assert sorted(named) == sorted(llmfence.__all__)


def test_the_middleware_tables_match_the_signatures() -> None:
    text = (DOCS / "reference" / "middlewares.md").read_text()
    for section in text.split("\n## `")[1:]:
        name, _, body = section.partition("`")
        rows = re.findall(r"^\| `(\w+)` \| (.+?) \| ", body, re.M)
        parameters = inspect.signature(getattr(llmfence, name).__init__).parameters
        assert [row[0] for row in rows] == [p for p in parameters if p != "self"], name
        for option, default in rows:
            expected = parameters[option].default
            if expected is inspect.Parameter.empty:
                assert default == "positional", (name, option)
            else:
                written = default.split(" ")[0].strip("`").replace('"', "'")
                assert written == repr(expected), (name, option, default)


def test_the_admin_routes_reference_names_every_route() -> None:
    from llmfence.admin import admin_routes

    text = (DOCS / "reference" / "admin-routes.md").read_text()
    for route in admin_routes(Fence()):
        for method in sorted((route.methods or set()) - {"HEAD"}):
            assert re.search(rf"`{method} {re.escape(route.path)}(?![\w/])", text), (
                method,
                route.path,
            )


def test_every_key_field_is_documented_for_key_generate() -> None:
    from llmfence._fields import KEY_FIELDS

    text = (DOCS / "reference" / "admin-routes.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `POST /key/generate`"))
    for field in KEY_FIELDS:
        assert f"`{field}`" in row, field


def test_the_tests_the_docs_name_exist() -> None:
    """`tests/…py::test_name` (or a file's base name, and `::name` after it) in the docs."""
    tests: dict[str, list[Path]] = {}
    for path in (ROOT / "tests").rglob("test_*.py"):
        tests.setdefault(path.name, []).append(path)
    for page in PAGES:
        last: Path | None = None
        for path, name in re.findall(
            r"`((?:tests/)?[\w/]*test_\w+\.py)?(?:::(\w+))?`", page.read_text()
        ):
            if path:
                if path.startswith("tests/"):
                    last = ROOT / path
                else:
                    [last] = tests[path]  # a name two folders share needs its folder
                assert last.exists(), (page.name, path)
            if name:
                assert last is not None, (page.name, name)
                assert re.search(rf"def {name}\(", last.read_text()), (page.name, last, name)
