"""Developer sessions: `nox -s tests lint typecheck examples bench`."""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.default_venv_backend = "venv"

ROOT = Path(__file__).parent


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Run the whole test suite, Redis included."""
    session.install("-e", ".[dev]")
    session.run("pytest", *session.posargs)


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
def bench(session: nox.Session) -> None:
    """Run every `benchmarks/bench_*.py` (core, http, peers, stack, store) and print their tables.

    `nox -s bench -- --quick` for a rough pass in seconds. Arguments after `--` go to every
    script, so only the shared ones belong there (`--quick`, `--rounds N`); script options such
    as `--json PATH` are for running one script by hand. The full `bench_http.py` sends 100k+
    requests per variant (a few minutes), with `wrk` when it is on PATH.
    """
    session.install("-e", ".[dev,bench]")
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        session.run("python", str(script), *session.posargs)
