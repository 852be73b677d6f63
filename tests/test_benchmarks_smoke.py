"""Every benchmark script runs with `--quick` and prints its table; timings are not checked."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("script", "header", "writes_json"),
    [
        ("bench_core.py", "| measurement", False),
        ("bench_store.py", "| operation", False),
        ("bench_stack.py", "| scenario", True),
        ("bench_http.py", "| connections", True),
    ],
)
def test_benchmark_runs_quick(script: str, header: str, writes_json: bool, tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    extra = ["--json", str(results)] if writes_json else []
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", *extra],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert header in result.stdout
    assert "| target" in result.stdout or not writes_json
    assert "done in" in result.stdout
    if writes_json:
        assert json.loads(results.read_text())["targets"]


def test_memory_soak_runs_quick(tmp_path: Path) -> None:
    results = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "soak_memory.py"), "--quick", "--json", str(results)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "| phase" in result.stdout
    assert "RSS after warm-up" in result.stdout
    assert "done in" in result.stdout
    payload = json.loads(results.read_text())
    assert payload["warm"]["rss_mib"] > 0
    assert payload["end"]["requests"] >= payload["warm"]["requests"]
