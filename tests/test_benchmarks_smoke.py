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


@pytest.mark.parametrize("slowapi", [True, False], ids=["slowapi", "without-slowapi"])
def test_bench_peers_runs_quick(slowapi: bool, tmp_path: Path) -> None:
    """`bench_peers.py --quick` prints a table per scenario; without slowapi (its import made
    to fail) it says so and skips that column instead of failing."""
    if slowapi:
        pytest.importorskip("slowapi")
    results = tmp_path / "results.json"
    script = BENCHMARKS / "bench_peers.py"
    argv = [str(script), "--quick", "--json", str(results)]
    if not slowapi:
        argv.append("--no-redis")  # the Redis variant is covered by the other run
    hide = "" if slowapi else "sys.modules['slowapi'] = None; "
    code = (
        f"import runpy, sys; {hide}sys.path.insert(0, {str(BENCHMARKS)!r}); "
        f"sys.argv = {argv!r}; runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "| variant" in result.stdout
    assert "| naive middleware" in result.stdout
    assert "SQLiteStore is not built yet" in result.stdout
    assert "done in" in result.stdout
    assert ("slowapi is not installed" in result.stdout) is not slowapi
    payload = json.loads(results.read_text())
    assert len(payload["scenarios"]) == 4
    assert all("naive middleware" in cases for cases in payload["scenarios"].values())
