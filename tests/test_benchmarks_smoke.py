"""Every benchmark script runs with `--quick` and prints its table; timings are not checked.

Nothing is skipped in CI but the LiteLLM proxy's column of `bench_gateway.py`: `litellm[proxy]`
is not in the dev environment (`nox -s bench` installs it into a virtualenv of its own), so the
gateway runs here without it and must say that it skipped it.
"""

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
    assert "| llmfence, SQLiteStore" in result.stdout
    assert "done in" in result.stdout
    assert ("slowapi is not installed" in result.stdout) is not slowapi
    payload = json.loads(results.read_text())
    assert len(payload["scenarios"]) == 4
    assert all("naive middleware" in cases for cases in payload["scenarios"].values())


def run_script(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "done in" in result.stdout
    return result


def test_bench_http_serves_every_variant(tmp_path: Path) -> None:
    """Every variant under its own uvicorn, the ratios to the bare app and each server's
    garbage collections."""
    results = tmp_path / "http.json"
    out = run_script(
        [str(BENCHMARKS / "bench_http.py"), "--quick", "--requests", "40", "--json", str(results)]
    ).stdout
    for variant in ("SQLiteStore", "RedisStore", "slowapi", "naive middleware"):
        assert f"| 32    | {variant}" in out or f"| llmfence, {variant}" in out
    assert "| target" in out
    payload = json.loads(results.read_text())
    assert payload["targets"]
    assert set(payload["phases"]["32"]["over_bare app"]) >= {
        "llmfence, MemoryStore",
        "naive middleware",
    }


def test_bench_gateway_runs_quick_without_litellm(tmp_path: Path) -> None:
    """The example gateway bare and with llmfence over the mock upstream; the LiteLLM column is
    skipped with a note (litellm is not in the dev environment: the only skip)."""
    results = tmp_path / "gateway.json"
    argv = [str(BENCHMARKS / "bench_gateway.py"), "--quick", "--seconds", "0.1"]
    out = run_script([*argv, "--json", str(results)]).stdout
    assert "| small chat       | gateway + llmfence" in out
    assert "| 200-chunk stream | gateway, bare" in out
    assert "LiteLLM proxy: skipped: no --litellm-python" in out
    payload = json.loads(results.read_text())
    assert {t["verdict"] for t in payload["targets"]} == {"—"}  # no verdicts on --quick


def test_bench_growth_runs_quick(tmp_path: Path) -> None:
    results = tmp_path / "growth.json"
    argv = [str(BENCHMARKS / "bench_growth.py"), "--quick", "--max-keys", "100"]
    out = run_script([*argv, "--json", str(results)]).stdout
    assert "| tokens" in out
    assert "| llmfence, RedisStore  | 10 " in out
    payload = json.loads(results.read_text())
    assert "1000 tokens, first sight" in payload["prompt"]
    assert set(payload["keys"]) == {
        "llmfence, MemoryStore",
        "llmfence, SQLiteStore",
        "llmfence, RedisStore",
    }


def test_bench_growth_fills_stores_beyond_their_api_rows(tmp_path: Path) -> None:
    """SQLite's and Redis's rows past the first thousand are copied in; requests by any key
    among them are served (a copied row is a valid record)."""
    argv = [str(BENCHMARKS / "bench_growth.py"), "--quick", "--part", "keys", "--api-rows", "20"]
    out = run_script(argv).stdout
    assert "| llmfence, SQLiteStore | 1,000" in out
    assert "| llmfence, RedisStore  | 1,000" in out


def test_bench_fairness_runs_quick(tmp_path: Path) -> None:
    results = tmp_path / "fairness.json"
    argv = [str(BENCHMARKS / "bench_fairness.py"), "--quick", "--seconds", "0.1"]
    out = run_script([*argv, "--json", str(results)]).stdout
    assert "| naive middleware" in out
    variants = json.loads(results.read_text())["variants"]
    assert variants["llmfence, MemoryStore"]["small_requests_with_large"] > 0


def test_bench_roundtrips_counts_commands(tmp_path: Path) -> None:
    """Commands per request from the server, on one node and on a Cluster: at least the
    admission and the settlement (two round trips)."""
    results = tmp_path / "roundtrips.json"
    argv = [str(BENCHMARKS / "bench_roundtrips.py"), "--quick", "--requests", "4"]
    out = run_script([*argv, "--json", str(results)]).stdout
    assert "| RedisStore, Cluster of 3" in out
    for result in json.loads(results.read_text())["results"]:
        for figures in result["scenarios"].values():
            assert figures["round_trips_per_request"] >= 2
            assert figures["commands_per_request"] >= figures["round_trips_per_request"]


def test_run_gathers_the_pieces(tmp_path: Path) -> None:
    """`run.py` runs the pieces asked for and gathers their JSON in one file (and latest)."""
    argv = [
        str(BENCHMARKS / "run.py"), "--quick", "--only", "fairness,roundtrips",
        "--results", str(tmp_path), "--extra", "roundtrips:--no-cluster",
        "--extra", "roundtrips:--requests=3", "--extra", "fairness:--seconds=0.1",
    ]  # fmt: skip
    run_script(argv, timeout=240)
    [gathered] = tmp_path.glob("run-*.json")
    payload = json.loads(gathered.read_text())
    assert set(payload["pieces"]) == {"fairness", "roundtrips"}
    assert not payload["failed"]
    assert json.loads((tmp_path / "latest.json").read_text()) == payload


def test_bench_hot_key_measures_before_and_after(tmp_path: Path) -> None:
    """The hot key on a Cluster, with and without global budget slices and log shards: each
    node's script time per request, and the busiest node's ceiling, for both."""
    results = tmp_path / "hot_key.json"
    argv = [str(BENCHMARKS / "bench_hot_key.py"), "--seconds", "0.3"]
    out = run_script([*argv, "--json", str(results)]).stdout
    assert "ceiling after / before" in out
    payload = json.loads(results.read_text())["variants"]
    assert len(payload) == 2
    for variant in payload.values():
        assert variant["per_process"] > 0
        assert len(variant["nodes"]) == 3
        assert variant["ceiling"] > 0
    after = list(payload.values())[1]
    assert sum("log shard" in row["holds"] for row in after["nodes"]) == 3
