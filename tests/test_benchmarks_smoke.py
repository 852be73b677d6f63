"""Every benchmark script runs with `--quick` and prints its table; timings are not checked."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("script", "header"),
    [
        ("bench_core.py", "| measurement"),
        ("bench_store.py", "| operation"),
        ("bench_stack.py", "| scenario"),
    ],
)
def test_benchmark_runs_quick(script: str, header: str) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert header in result.stdout
    assert "done in" in result.stdout
