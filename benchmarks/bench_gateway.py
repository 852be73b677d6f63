"""The gateway people would otherwise deploy: `examples/fastapi_gateway.py` bare, with llmfence,
and the LiteLLM proxy, each forwarding to the same mock upstream over HTTP.

Processes, all on 127.0.0.1, each uvicorn with 1 worker:

- the mock upstream: `canned_llm_app` (prebuilt answers, a 200-chunk SSE stream on
  `"stream": true`), serving `/v1/chat/completions`;
- `gateway, bare`: `examples/fastapi_gateway.py`'s `create_app` (FastAPI + httpx, streaming
  every response through) with llmfence's middlewares taken out before it starts;
- `gateway + llmfence`: the same app as the example ships it (`Fence.install(app, admin=True)`,
  `MemoryStore`, a key of a user whose limits never refuse, a whole-app budget);
- `LiteLLM proxy` (only with `--litellm-python PATH`, the Python of a virtualenv holding
  `litellm[proxy]`, which `nox -s bench` makes): `litellm --config` with one model,
  `openai/gpt-4o-mini` at the mock upstream, the benchmark's key as its master key and no
  database (its virtual keys, budgets and limits need Postgres, so it checks the key only),
  offline (`LITELLM_LOCAL_MODEL_COST_MAP=True`, telemetry off, logs at ERROR);
- the mock upstream called directly, for reference.

Load: `wrk` (a Lua script for the POST body and the bearer key) when it is on PATH, else the
Python client of `bench_http.py`; the variants take turns in runs of a few seconds each (the
order reversed every other round). Per scenario (a small chat; a 200-chunk stream): at 1
connection the latency each adds over the bare gateway (p50, and the mean from req/s), at 32
connections req/s as a ratio to the bare gateway. The issue's targets for llmfence: at most
+0.1 ms per small request at 1 connection, at least 0.9× the bare gateway's req/s at 32
(PASS/MISS is information, never an exit code).

Run: `python benchmarks/bench_gateway.py [--quick] [--seconds S] [--rounds R]
[--litellm-python PATH] [--client auto|wrk|python] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from _harness import finish, fmt_ratio, parse_args, print_table, source_revision, verdict
from _variants import machine, new_key
from bench_http import (
    ENV,
    Client,
    Series,
    Server,
    _terminate,
    chat_request,
    interleave,
    latency_figures,
    pick_client,
    uvicorn_command,
)

import llmfence

HERE = Path(__file__).resolve().parent
EXAMPLES = HERE.parent / "examples"
PATH = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
UPSTREAM = "mock upstream, direct"
BARE = "gateway, bare"
FENCED = "gateway + llmfence"
LITELLM = "LiteLLM proxy"
TARGET_ADDED_MS = 0.1  # llmfence's added p50 per small request at 1 connection, at most
TARGET_RPS = 0.9  # llmfence gateway req/s / bare gateway req/s at 32 connections, at least
SMALL = "small chat"
STREAM = "200-chunk stream"


# -- the servers (imported by uvicorn in each process) ----------------------------------------


def upstream_app() -> Any:
    """uvicorn's `--factory` for the mock upstream."""
    from _harness import canned_llm_app
    from bench_stack import CHUNKS, REPLY

    return canned_llm_app(REPLY, reply_tokens=CHUNKS, chunks=CHUNKS, paths=(PATH,))


def gateway_app() -> Any:
    """uvicorn's `--factory` for the example gateway, bare or with llmfence (`ENV` says)."""
    sys.path.insert(0, str(EXAMPLES))
    from bench_stack import LIMITS, MASTER_KEY
    from fastapi_gateway import create_app

    from llmfence import MemoryStore

    settings = json.loads(os.environ[ENV])
    app, fence = create_app(
        upstream_base_url=settings["upstream"],
        upstream_api_key="sk-upstream-provider-key",
        store=MemoryStore(),
        master_key=MASTER_KEY,
        fence_options={"max_budget": 1_000_000, "budget_duration": "30d"},
    )
    if settings["variant"] == BARE:
        app.user_middleware.clear()  # llmfence's middlewares out; the app is otherwise the same
        return app
    started = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with started(app) as state:
            await fence.new_user("alice", **LIMITS)
            await fence.generate_key(key=settings["key"], user_id="alice", **LIMITS)
            yield state

    app.router.lifespan_context = lifespan
    return app


def litellm_config(workdir: Path, upstream: str, key: str) -> Path:
    """LiteLLM's config: the model at the mock upstream; the benchmark's key is its master key
    (it refuses to start without one, and without a database it has no virtual keys)."""
    path = workdir / "litellm.yaml"
    path.write_text(
        "general_settings:\n"
        f"  master_key: {key}\n"
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: {upstream}\n"
        "      api_key: sk-upstream-provider-key\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "  set_verbose: false\n"
    )
    return path


LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_TELEMETRY": "False",
    "LITELLM_LOG": "ERROR",
    "LITELLM_MODE": "PRODUCTION",
    "DISABLE_SCHEMA_UPDATE": "True",
    "NO_PROXY": "127.0.0.1,localhost",
}


# -- requests -------------------------------------------------------------------------------


def report(
    phases: dict[str, dict[int, dict[str, Series]]], busy: int, quick: bool
) -> dict[str, Any]:
    rows = []
    data: dict[str, Any] = {}
    targets: list[dict[str, Any]] = []
    for scenario, by_connections in phases.items():
        single = {v: latency_figures(s) for v, s in by_connections[1].items()}
        many = {v: latency_figures(s) for v, s in by_connections[busy].items()}
        base1, base32 = single[BARE], many[BARE]
        data[scenario] = {"1": single, str(busy): many}
        for variant in single:
            one, lots = single[variant], many[variant]
            mean = 1e3 / one["req_per_s"]
            added_p50 = one["p50_ms"] - base1["p50_ms"]
            added_mean = mean - 1e3 / base1["req_per_s"]
            ratio = lots["req_per_s"] / base32["req_per_s"]
            one.update(added_p50_ms=added_p50, added_mean_ms=added_mean)
            lots.update(req_per_s_over_bare=ratio)
            rows.append(
                [
                    scenario,
                    variant,
                    f"{one['p50_ms']:.3f}",
                    f"{added_p50:+.3f}" if variant != BARE else "—",
                    f"{added_mean:+.3f}" if variant != BARE else "—",
                    f"{one['p99_ms']:.2f}",
                    f"{lots['req_per_s']:,.0f}",
                    fmt_ratio(ratio),
                    f"{lots['p99_ms']:.1f}",
                ]
            )
        if FENCED in single:
            targets.append(
                {
                    "target": f"{scenario}: llmfence's added p50 at 1 connection, ms",
                    "measured": single[FENCED]["added_p50_ms"],
                    "limit": TARGET_ADDED_MS if scenario == SMALL else None,
                }
            )
            targets.append(
                {
                    "target": f"{scenario}: gateway + llmfence req/s / bare, {busy} connections",
                    "measured": many[FENCED]["req_per_s_over_bare"],
                    "limit": TARGET_RPS,
                    "at_least": True,
                }
            )
    print_table(
        "Gateways over HTTP: latency at 1 connection (ms) and throughput at "
        f"{busy} connections, ratios to the bare gateway",
        (
            "scenario",
            "variant",
            "p50 ms",
            "added p50",
            "added mean",
            "p99 ms",
            f"req/s @{busy}",
            "/ bare",
            f"p99 ms @{busy}",
        ),
        rows,
        left=2,
    )
    target_rows = []
    for t in targets:
        limit, measured, at_least = t["limit"], t["measured"], t.get("at_least", False)
        shown = fmt_ratio(measured) if at_least else f"{measured:+.3f} ms"
        goal = "—" if limit is None else f"≥ {fmt_ratio(limit)}" if at_least else f"≤ +{limit} ms"
        if limit is None or quick:
            t["verdict"] = "—"  # no verdict on a --quick run
        else:
            t["verdict"] = verdict(measured, limit, at_least=at_least)
        target_rows.append([t["target"], shown, goal, t["verdict"]])
    print_table(
        "Targets (informational; PASS/MISS is never an exit code)",
        ("target", "measured", "target", "verdict"),
        target_rows,
    )
    return {"scenarios": data, "targets": targets}


# -- main ---------------------------------------------------------------------------------------


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per run")
    parser.add_argument("--connections", type=int, default=32, help="the busy phase's connections")
    parser.add_argument(
        "--litellm-python", metavar="PATH", default=None,
        help="the Python of a virtualenv with litellm[proxy] (else no LiteLLM column)",
    )  # fmt: skip
    parser.add_argument(
        "--client", choices=("auto", "wrk", "python"), default="auto",
        help="load generator: wrk when on PATH (auto; not with --quick), or the Python one",
    )  # fmt: skip


def main() -> None:
    settings, args = parse_args(__doc__ or "", rounds=5, extra=options)
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    seconds = args.seconds or (0.3 if settings.quick else 3.0)
    rounds = 1 if settings.quick else settings.rounds
    key = new_key()
    print("llmfence benchmark: gateways (examples/fastapi_gateway.py bare and with llmfence, ")
    print(f"the LiteLLM proxy) over HTTP; llmfence {llmfence.__version__} at {source_revision()}")
    print(f"{machine()}, Python {platform.python_version()}; uvicorn, 1 worker each")
    note = None
    if args.litellm_python is None:
        note = "LiteLLM proxy: skipped: no --litellm-python (nox -s bench makes its virtualenv)"
    elif not Path(args.litellm_python).exists():
        note = f"LiteLLM proxy: skipped: {args.litellm_python} does not exist"
    if note:
        print(note)
    servers: dict[str, Server] = {}
    phases: dict[str, dict[int, dict[str, Series]]] = {}
    clients: list[Client] = []
    with tempfile.TemporaryDirectory(prefix="llmfence-bench-gateway-") as tmp:
        workdir = Path(tmp)
        try:
            upstream = Server(
                UPSTREAM, workdir=workdir, command=uvicorn_command("bench_gateway:upstream_app")
            )
            servers[UPSTREAM] = upstream
            base = f"http://127.0.0.1:{upstream.port}/v1"
            for variant in (BARE, FENCED):
                settings_env = {"variant": variant, "upstream": base, "key": key}
                servers[variant] = Server(
                    variant,
                    workdir=workdir,
                    command=uvicorn_command("bench_gateway:gateway_app"),
                    env={ENV: json.dumps(settings_env)},
                )
            if note is None:
                config = litellm_config(workdir, base, key)
                servers[LITELLM] = Server(
                    LITELLM,
                    workdir=workdir,
                    command=[
                        args.litellm_python,
                        "-m",
                        "litellm.proxy.proxy_cli",
                        "--config",
                        str(config),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        "{port}",
                        "--num_workers",
                        "1",
                    ],
                    env=LITELLM_ENV,
                )
            for variant, server in servers.items():
                _, request = chat_request(key, user=None)
                headers = server.wait_ready(request, timeout=180.0)
                metered = "x-ratelimit-remaining-requests" in headers
                if metered != (variant == FENCED):
                    raise SystemExit(f"{variant} is {'' if metered else 'not '}metered")
            for scenario, stream in ((SMALL, False), (STREAM, True)):
                body, request = chat_request(key, stream=stream, user=None)
                client = pick_client(
                    args.client, settings.quick, body, key, request, workdir, timeout=120.0
                )
                clients.append(client)
                rates: dict[str, float] = {}
                for variant, server in servers.items():  # warm-up, and a first rate
                    warm = client.run(server.port, 1, 10 if settings.quick else 50, 0.5)
                    rates[variant] = warm.per_second
                phases[scenario] = {
                    connections: interleave(client, servers, connections, 0, rounds, rates, seconds)
                    for connections in (1, args.connections)
                }
        finally:
            for client in clients:
                client.close()
            for server in servers.values():
                server.stop()
        print(f"load: {clients[0].name if clients else '—'}; {rounds} runs of {seconds:g} s")
        payload = report(phases, args.connections, settings.quick)
    if note:
        print(note)
    finish(
        args.json,
        "bench_gateway",
        started,
        settings.quick,
        {"rounds": rounds, "seconds_per_run": seconds, "litellm": note or "measured", **payload},
    )


if __name__ == "__main__":
    main()
