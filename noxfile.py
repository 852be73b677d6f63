"""Developer sessions: `nox -s tests lint typecheck examples bench lowest`."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import nox
from packaging.requirements import Requirement
from packaging.version import Version

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"

ROOT = Path(__file__).parent
# Every Python the classifiers in pyproject.toml name (a test keeps the two lists equal).
PYTHONS = ["3.11", "3.12", "3.13"]
# The extras that are not part of what users install: the tools, the docs, the benchmarks' peers.
NOT_RUNTIME_EXTRAS = {"dev", "bench", "docs"}


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """Run the whole test suite, Redis included, on every supported Python (`nox -s tests-3.13`
    for one). A Python that is not on PATH is skipped, or with `CI` set a failure."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHONS[0])
def lowest(session: nox.Session) -> None:
    """Run the whole test suite with every runtime dependency and runtime extra at the lowest
    version `pyproject.toml` allows (its `>=` floor, pinned by a constraints file), on the
    oldest supported Python; the tools (pytest, FastAPI, the SDKs, ...) are the newest that
    agree with those pins. The session fails if an installed version is not its floor.
    """
    floors = runtime_floors()
    constraints = Path(session.create_tmp()) / "floors.txt"
    constraints.write_text("".join(f"{name}=={floor}\n" for name, floor in floors.items()))
    session.install("-c", str(constraints), "-e", ".[dev]")
    report = session.run(
        "python", "-c",
        "import importlib.metadata as m, json, sys;"
        "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))",
        *floors, silent=True,
    )  # fmt: skip
    installed: dict[str, str] = json.loads(str(report).strip().splitlines()[-1])
    wrong = {n: got for n, got in installed.items() if Version(got) != Version(floors[n])}
    if wrong:
        session.error(f"not at their floors: {wrong} (floors: {floors})")
    session.log("at their floors: " + ", ".join(f"{n}=={v}" for n, v in floors.items()))
    session.run("pytest", *session.posargs)


def runtime_floors() -> dict[str, str]:
    """The `>=` floor of every runtime dependency and runtime extra in `pyproject.toml`, by
    name (the highest, where two extras name one package). A requirement without one is an
    error: nothing could test the oldest version it accepts."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    lines = list(project["dependencies"])
    for extra in sorted(set(extras) - NOT_RUNTIME_EXTRAS):
        lines.extend(extras[extra])
    floors: dict[str, str] = {}
    for line in lines:
        requirement = Requirement(line)
        lows = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if len(lows) != 1:
            raise ValueError(f"{line!r} in pyproject.toml needs exactly one `>=` floor")
        name = requirement.name
        floors[name] = max(floors.get(name, lows[0]), lows[0], key=Version)
    return floors


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """Check formatting and lint with ruff, and the import contracts with import-linter."""
    session.install("-e", ".", "ruff", "import-linter")
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")
    session.run("lint-imports")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """Type-check src, tests, examples and benchmarks with mypy --strict."""
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session(python="3.11")
def fuzz(session: nox.Session) -> None:
    """A bounded atheris run (60 s) over the request parser, the SSE scanner and the path
    classifier: `nox -s fuzz -- -max_total_time=600` for longer. A finding stops the run and is
    written to `crash-*`."""
    session.install("-e", ".", "atheris")
    session.run("python", "fuzz/fuzz_request.py", "-max_total_time=60", *session.posargs)


@nox.session(python="3.11")
def examples(session: nox.Session) -> None:
    """Run every example: the scripts end to end, the gateway against the mock upstream."""
    session.install("-e", ".[dev]")
    session.run("pytest", "tests/test_examples.py", "-p", "no:cacheprovider")


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """Build the documentation site (`docs/`, `mkdocs.yml`) with `mkdocs build --strict`: a
    broken link, a page missing from the nav or a docstring mkdocstrings cannot read fails it.

    The site goes to a temporary directory; `nox -s docs -- --site-dir site` keeps it in
    `site/` (ignored by git). Offline: no plugin fetches anything. The code blocks of the pages
    are run by `tests/test_docs.py` (in `nox -s tests`), not here.
    """
    session.install("-e", ".[docs]")
    site = Path(session.create_tmp()) / "site"
    session.env["NO_MKDOCS_2_WARNING"] = "1"  # material's notice about its successor
    session.run("mkdocs", "build", "--strict", "--site-dir", str(site), *session.posargs)


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Run `benchmarks/run.py`: every comparison (peers in process, over HTTP, the gateway
    beside the LiteLLM proxy, cost growth, fairness, Redis round trips), tables printed and
    JSON written to `benchmarks/results/`.

    `nox -s bench -- --quick` for a rough pass in a minute or two; other arguments after `--` go
    to `run.py` (`--only gateway,roundtrips`, …). The LiteLLM proxy (`litellm[proxy]`) goes
    into a virtualenv of its own under `.nox/`, never into this one, and runs offline; the
    full run takes a while (100k+ requests per variant over HTTP, with `wrk` when on PATH).
    """
    session.install("-e", ".[dev,bench]")
    litellm = Path(session.virtualenv.location).parent / "bench-litellm"
    python = litellm / "bin" / "python"
    if not python.exists():
        session.run("python", "-m", "venv", str(litellm))
    session.run(str(python), "-m", "pip", "install", "-q", "litellm[proxy]", external=True)
    session.run(
        "python", str(ROOT / "benchmarks" / "run.py"), "--litellm-python", str(python),
        *session.posargs,
    )  # fmt: skip
