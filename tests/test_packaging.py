"""What `pyproject.toml` declares is what the nox sessions test: the classifiers name the
Pythons `nox -s tests` runs on, and every runtime requirement has the floor `nox -s lowest`
installs."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import noxfile
from packaging.requirements import Requirement

ROOT = Path(__file__).parent.parent


def project() -> dict[str, Any]:
    table: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return table


def test_the_classifiers_name_the_pythons_the_tests_session_runs_on() -> None:
    prefix = "Programming Language :: Python :: "
    named = [c.removeprefix(prefix) for c in project()["classifiers"] if c.startswith(prefix)]
    assert [v for v in named if v.startswith("3.")] == noxfile.PYTHONS
    assert project()["requires-python"] == f">={noxfile.PYTHONS[0]}"


def test_every_runtime_requirement_has_the_floor_the_lowest_session_pins() -> None:
    extras = project()["optional-dependencies"]
    runtime = list(project()["dependencies"])
    for extra in set(extras) - noxfile.NOT_RUNTIME_EXTRAS:
        runtime.extend(extras[extra])
    floors = noxfile.runtime_floors()
    assert {Requirement(line).name for line in runtime} == set(floors)
    for line in runtime:
        requirement = Requirement(line)
        assert requirement.specifier.contains(floors[requirement.name]), line
