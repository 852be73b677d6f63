"""Over HTTP: uvicorn serving the bare app, and the same app behind `Fence(...).install(app)`.

Each variant runs in its own uvicorn process (1 worker, 127.0.0.1, a free port,
`--no-access-log`, uvicorn's default loop and HTTP implementation as installed), both started
once and kept for the whole run, so that the stack's process has served every request by the
end (at least 100k at 32 connections by default): the garbage collector's full passes, which
come every so many thousand requests, are then inside the figures. The bare app is the
upstream of `bench_stack.py` (`canned_llm_app` by default, `--upstream mock` for
`llmfence.testing.mock_llm_app`); the stack is the whole stack over a `MemoryStore`, with a
generated key (of a user) whose limits never refuse. Every request is the small chat request of
`bench_stack.py`, a keep-alive `POST /v1/chat/completions` with a bearer key.

The load generator is `wrk` when it is on PATH (a Lua script sets the POST body and the header,
and reports its latency histogram), else a Python asyncio client on raw keep-alive HTTP/1.1
sockets, in a process of its own (closed loop: each connection sends its next request when the
previous response is complete). `--quick` always uses the Python client. Variants are
interleaved: several shorter runs, alternating bare/stack, at 1 connection and then at 32;
req/s is the median of the runs, p50/p99/max come from every latency of the variant pooled.
Ratios stack / bare are printed next to the issue's targets (32 connections; PASS/MISS is
information, never an exit code). Each server also reports its garbage collections (counted by a
`gc.callbacks` hook in both variants alike) when it stops.

Every process the script starts is stopped by its PID when it ends, on Ctrl-C and on SIGTERM;
the servers also stop by themselves if the script disappears.

Run: `python benchmarks/bench_http.py [--quick] [--requests N] [--rounds R] [--connections C]
[--client auto|wrk|python] [--upstream canned|mock] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from _harness import (
    fmt_ratio,
    parse_args,
    print_table,
    source_revision,
    verdict,
    write_json,
)

HERE = Path(__file__).resolve().parent
PATH = "/v1/chat/completions"
VARIANTS = ("bare", "stack")
DEFAULT_REQUESTS = 100_000
TARGET_RPS = 0.45  # stack req/s / bare req/s, at least, at 32 connections
TARGET_P99 = 3.0  # stack p99 / bare p99, at most, at 32 connections
TARGET_MIN_REQUESTS = 100_000  # the targets count only after this many requests per variant
ENV = "LLMFENCE_BENCH_HTTP"  # the server's settings, as JSON in the environment
RUN_TIMEOUT = 900.0  # seconds any one load run may take
SERVER_LIFETIME = 6 * 3600.0  # a server stops by itself after this long, whatever happens


# -- the servers (this module is imported by uvicorn in each server process) --------------------


def server_app() -> Any:
    """uvicorn's `--factory`: the app of one variant, as `ENV` describes it."""
    import gc

    import bench_stack
    from starlette.applications import Starlette

    from llmfence import Fence, MemoryStore

    settings = json.loads(os.environ[ENV])
    app: Starlette = bench_stack.upstream(settings["upstream"])
    fence: Fence | None = None
    if settings["variant"] == "stack":
        fence = Fence(
            store=MemoryStore(),
            master_key=bench_stack.MASTER_KEY,
            max_budget=1_000_000,
            budget_duration="30d",
        )
        fence.install(app)
    collections = [0, 0, 0]
    pauses: list[float] = []
    started = [0.0]

    def watch_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        generation = info["generation"]
        collections[generation] += 1
        if generation == 2:
            pauses.append((time.perf_counter() - started[0]) * 1e3)

    async def watchdog() -> None:
        """Stop when the benchmark that started this server is gone, or after a long while."""
        deadline = time.monotonic() + SERVER_LIFETIME
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != settings["parent"] or time.monotonic() > deadline:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        if fence is not None:
            await fence.new_user("alice", **bench_stack.LIMITS)
            await fence.generate_key(key=settings["key"], user_id="alice", **bench_stack.LIMITS)
        guard = asyncio.create_task(watchdog())
        gc.callbacks.append(watch_gc)
        try:
            yield
        finally:
            gc.callbacks.remove(watch_gc)
            guard.cancel()
            report = {
                "collections": collections,
                "gen2_pauses_ms": pauses,
                "tracked_objects": len(gc.get_objects()),
            }
            write_report(settings["stats"], report)

    app.router.lifespan_context = lifespan
    return app


def write_report(path: str, report: Mapping[str, Any]) -> None:
    """Where a server leaves its GC report when it stops."""
    Path(path).write_text(json.dumps(report))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """One uvicorn process serving one variant."""

    def __init__(self, variant: str, *, key: str, upstream: str, workdir: Path) -> None:
        self.variant = variant
        self.port = free_port()
        self.stats_path = workdir / f"{variant}-gc.json"
        self.log_path = workdir / f"{variant}.log"
        settings = {
            "variant": variant,
            "key": key,
            "upstream": upstream,
            "stats": str(self.stats_path),
            "parent": os.getpid(),
        }
        command = [
            sys.executable, "-m", "uvicorn", "bench_http:server_app", "--factory",
            "--app-dir", str(HERE), "--host", "127.0.0.1", "--port", str(self.port),
            "--workers", "1", "--no-access-log", "--log-level", "warning",
        ]  # fmt: skip
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command,
            env={**os.environ, ENV: json.dumps(settings)},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches the script, which stops it by PID
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, request: bytes, timeout: float = 60.0) -> dict[str, str]:
        """Send the benchmark's request until the server answers it; return its headers."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"the {self.variant} server exited:\n{self.log()}")
            try:
                status, headers, body = http_exchange(self.port, request)
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"the {self.variant} server did not answer in {timeout:.0f} s:\n"
                        f"{self.log()}"
                    ) from None
                time.sleep(0.1)
                continue
            if status != 200:
                raise SystemExit(f"the {self.variant} server answered {status}: {body[:300]!r}")
            return headers

    def stop(self) -> dict[str, Any] | None:
        """Stop the process (by its PID) and return its GC report, if it wrote one."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
        try:
            report: dict[str, Any] = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return None
        return report


def http_exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request on a new connection: status, headers (lower-cased names) and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("connection closed before the response ended")
            data += chunk
            end = data.find(b"\r\n\r\n")
            if end < 0:
                continue
            lines = data[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "-1"))
            if length < 0:
                raise OSError("a response without content-length")
            if len(data) >= end + 4 + length:
                return int(lines[0].split()[1]), headers, data[end + 4 : end + 4 + length]


def chat_request(key: str) -> tuple[bytes, bytes]:
    """The small chat request of `bench_stack.py`: its body, and the whole HTTP/1.1 request."""
    question = "Hey, how's it going? What is item 7 on my last invoice?"
    body = json.dumps(
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": question},
            ],
            "user": "bob",
        }
    ).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: llmfence-bench\r\n"
        f"Accept: application/json\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return body, head.encode() + body


# -- the Python load generator (runs in a process of its own: `--load-client`) -------------------


class _Load:
    """What the connections of one run share."""

    def __init__(self, request: bytes, count: int, connections: int) -> None:
        self.request = request
        self.remaining = count
        self.open = connections
        self.latencies: list[int] = []
        self.errors: Counter[str] = Counter()
        self.last = 0
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0 and not self.finished.done():
            self.finished.set_result(None)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request in flight at a time, the next as soon as the
    previous response is complete."""

    def __init__(self, load: _Load) -> None:
        self.load = load
        self.buffer = bytearray()
        self.need = -1
        self.status = 0
        self.sent = 0
        self.busy = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def fire(self) -> None:
        load = self.load
        assert self.transport is not None
        if load.remaining <= 0:
            self.busy = False
            self.transport.close()
            return
        load.remaining -= 1
        self.busy = True
        self.sent = time.perf_counter_ns()
        self.transport.write(load.request)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        while True:
            if self.need < 0:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buffer[:end]).lower()
                self.status = int(head[9:12])
                at = head.find(b"\r\ncontent-length:")
                if at < 0:
                    self.failed("response without content-length")
                    return
                stop = head.find(b"\r\n", at + 2)
                self.need = end + 4 + int(head[at + 17 : stop if stop > 0 else len(head)])
            if len(buffer) < self.need:
                return
            del buffer[: self.need]
            self.need = -1
            now = time.perf_counter_ns()
            load = self.load
            load.latencies.append((now - self.sent) // 1000)
            load.last = now
            if self.status != 200:
                load.errors[f"status {self.status}"] += 1
            self.busy = False
            self.fire()
            if not self.busy:
                return

    def failed(self, why: str) -> None:
        self.load.errors[why] += 1
        self.busy = False
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy:
            self.load.errors["connection lost mid-request"] += 1
        self.load.closed()


async def _run_load(port: int, request: bytes, connections: int, count: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    load = _Load(request, count, connections)
    opened = []
    for _ in range(connections):
        _, protocol = await loop.create_connection(lambda: _Connection(load), "127.0.0.1", port)
        opened.append(protocol)
    start = time.perf_counter_ns()
    load.last = start
    for protocol in opened:
        protocol.fire()
    try:
        await asyncio.wait_for(load.finished, RUN_TIMEOUT)
    except TimeoutError:
        load.errors["run timed out"] += 1
        for protocol in opened:
            if protocol.transport is not None:
                protocol.transport.abort()
    return {
        "requests": len(load.latencies),
        "seconds": (load.last - start) / 1e9,
        "latencies_us": load.latencies,
        "errors": dict(load.errors),
    }


def load_client() -> None:
    """`--load-client`: run the loads the script asks for on stdin, one JSON line each, and
    answer each with a JSON line; stop at the end of stdin (also when the script is gone)."""
    for line in sys.stdin:
        order = json.loads(line)
        result = asyncio.run(
            _run_load(
                order["port"],
                order["request"].encode("latin-1"),
                order["connections"],
                order["count"],
            )
        )
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()


# -- driving the load ---------------------------------------------------------------------------


@dataclass
class Run:
    """One load run against one server."""

    requests: int
    seconds: float
    latencies: Counter[int]  # µs -> how many requests took that long
    errors: dict[str, int]

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


class PythonClient:
    """The asyncio load generator, in a process of its own, driven over its stdin/stdout."""

    name = "python asyncio client (raw keep-alive HTTP/1.1 sockets, own process)"

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--load-client"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )

    def run(self, port: int, connections: int, count: int, seconds: float) -> Run:
        del seconds
        order = {
            "port": port,
            "request": self.request.decode("latin-1"),
            "connections": connections,
            "count": count,
        }
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(json.dumps(order).encode() + b"\n")
        stdin.flush()
        line = _readline(stdout, RUN_TIMEOUT + 60)
        if not line:
            raise SystemExit("the load generator stopped")
        result = json.loads(line)
        return Run(
            result["requests"], result["seconds"], Counter(result["latencies_us"]), result["errors"]
        )

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        _stop(self.process)


class WrkClient:
    """`wrk`, one thread, with a Lua script for the POST and one that dumps its histogram."""

    name = "wrk (1 thread)"

    def __init__(self, binary: str, body: bytes, key: str, workdir: Path) -> None:
        self.binary = binary
        text = body.decode()
        if "]==]" in text:
            raise ValueError("the body cannot go into a Lua long string")
        self.script = workdir / "chat.lua"
        self.script.write_text(
            'wrk.method = "POST"\n'
            f"wrk.body = [==[{text}]==]\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            'wrk.headers["Accept"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {key}"\n'
            "done = function(summary, latency, requests)\n"
            "  local e = summary.errors\n"
            '  io.write(string.format("LLMFENCE {\\"requests\\":%d,\\"duration_us\\":%d,'
            '\\"errors\\":{\\"connect\\":%d,\\"read\\":%d,\\"write\\":%d,\\"status\\":%d,'
            '\\"timeout\\":%d},\\"histogram\\":[", summary.requests, summary.duration,'
            " e.connect, e.read, e.write, e.status, e.timeout))\n"
            "  for i = 1, #latency do\n"
            "    local value, count = latency(i)\n"
            '    if i > 1 then io.write(",") end\n'
            '    io.write(string.format("[%d,%d]", value, count))\n'
            "  end\n"
            '  io.write("]}\\n")\n'
            "end\n"
        )

    def run(self, port: int, connections: int, count: int, seconds: float) -> Run:
        del count
        duration = max(1, round(seconds))
        command = [
            self.binary, "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
            "-s", str(self.script), f"http://127.0.0.1:{port}{PATH}",
        ]  # fmt: skip
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=duration + 60, check=False
        )
        found = [line for line in done.stdout.splitlines() if line.startswith("LLMFENCE ")]
        if done.returncode != 0 or not found:
            raise SystemExit(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
        result = json.loads(found[-1].removeprefix("LLMFENCE "))
        errors = {name: n for name, n in result["errors"].items() if n}
        latencies = Counter(dict(result["histogram"]))
        return Run(result["requests"], result["duration_us"] / 1e6, latencies, errors)

    def close(self) -> None:
        pass


Client = PythonClient | WrkClient


def _readline(stream: IO[bytes], timeout: float) -> bytes:
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise SystemExit(f"the load generator did not answer in {timeout:.0f} s")
    return stream.readline()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@dataclass
class Series:
    """Every run of one variant at one number of connections."""

    runs: list[Run] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(run.requests for run in self.runs)

    @property
    def per_second(self) -> float:
        return statistics.median(run.per_second for run in self.runs)

    def latencies(self) -> Counter[int]:
        pooled: Counter[int] = Counter()
        for run in self.runs:
            pooled.update(run.latencies)
        return pooled

    def errors(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for run in self.runs:
            total.update(run.errors)
        return dict(total)


def percentile(latencies: Mapping[int, int], fraction: float) -> float:
    """The `fraction` quantile (nearest rank) of a histogram µs -> count, in ms."""
    total = sum(latencies.values())
    if total == 0:
        return math.nan
    rank = max(1, math.ceil(fraction * total))
    seen = 0
    for value in sorted(latencies):
        seen += latencies[value]
        if seen >= rank:
            return value / 1000
    return max(latencies) / 1000


def interleave(
    client: Client,
    servers: Mapping[str, Server],
    connections: int,
    total: int,
    rounds: int,
    rates: dict[str, float],
) -> dict[str, Series]:
    """At least `total` requests per variant in `rounds` runs or more, alternating variants.

    A count-bounded client sends `total / rounds` requests per run; wrk runs for the seconds
    that many requests should take at the variant's last measured rate (`rates`, updated).
    """
    series = {variant: Series() for variant in servers}
    per_run = math.ceil(total / rounds)
    order = list(servers)
    round_ = 0
    while round_ < rounds or any(s.requests < total for s in series.values()):
        if round_ >= 3 * rounds:
            break  # wrk's rate guesses were far off; report what was measured
        for variant in order if round_ % 2 == 0 else order[::-1]:
            seconds = per_run / max(rates.get(variant, 1.0), 1.0)
            run = client.run(servers[variant].port, connections, per_run, seconds)
            if run.errors:
                raise SystemExit(f"{variant}, {connections} connections: errors {run.errors}")
            series[variant].runs.append(run)
            rates[variant] = run.per_second
        round_ += 1
    return series


# -- the report ---------------------------------------------------------------------------------


def fmt_ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def report(
    phases: Mapping[int, Mapping[str, Series]],
    gc_reports: Mapping[str, dict[str, Any] | None],
    total: int,
    quick: bool,
) -> dict[str, Any]:
    rows = []
    ratio_rows = []
    data: dict[str, Any] = {}
    for connections, series in phases.items():
        figures = {}
        for variant, s in series.items():
            pooled = s.latencies()
            figures[variant] = {
                "requests": s.requests,
                "runs": len(s.runs),
                "req_per_s": s.per_second,
                "p50_ms": percentile(pooled, 0.50),
                "p99_ms": percentile(pooled, 0.99),
                "p99.9_ms": percentile(pooled, 0.999),
                "max_ms": max(pooled) / 1000 if pooled else math.nan,
            }
            f = figures[variant]
            rows.append(
                [
                    str(connections),
                    variant,
                    f"{f['requests']:,} in {f['runs']}",
                    f"{f['req_per_s']:,.0f}",
                    fmt_ms(f["p50_ms"]),
                    fmt_ms(f["p99_ms"]),
                    fmt_ms(f["p99.9_ms"]),
                    fmt_ms(f["max_ms"]),
                ]
            )
        bare, stack = figures["bare"], figures["stack"]
        ratios = {
            "req_per_s": stack["req_per_s"] / bare["req_per_s"],
            "p50": stack["p50_ms"] / bare["p50_ms"],
            "p99": stack["p99_ms"] / bare["p99_ms"],
            "p99.9": stack["p99.9_ms"] / bare["p99.9_ms"],
        }
        ratio_rows.append(
            [
                str(connections),
                fmt_ratio(ratios["req_per_s"]),
                fmt_ratio(ratios["p50"]),
                fmt_ratio(ratios["p99"]),
                fmt_ratio(ratios["p99.9"]),
            ]
        )
        data[str(connections)] = {**figures, "stack_over_bare": ratios}
    print_table(
        "Requests/s (median of the runs) and latency in ms (all requests of a variant pooled)",
        (
            "connections",
            "variant",
            "requests in runs",
            "req/s",
            "p50 ms",
            "p99 ms",
            "p99.9 ms",
            "max ms",
        ),
        rows,
        left=2,
    )
    print_table("Stack / bare", ("connections", "req/s", "p50", "p99", "p99.9"), ratio_rows, left=1)

    targets = []
    busiest = max(phases)
    enough = all(s.requests >= TARGET_MIN_REQUESTS for s in phases[busiest].values())
    ratios = data[str(busiest)]["stack_over_bare"]
    for label, measured, limit, at_least in (
        (f"req/s stack / bare, {busiest} connections", ratios["req_per_s"], TARGET_RPS, True),
        (f"p99 stack / bare, {busiest} connections", ratios["p99"], TARGET_P99, False),
    ):
        judged = verdict(measured, limit, at_least=at_least) if enough else "—"
        targets.append({"target": label, "measured": measured, "limit": limit, "verdict": judged})
    target_rows = [
        [
            t["target"],
            fmt_ratio(t["measured"]),
            ("≥ " if "req/s" in t["target"] else "≤ ") + fmt_ratio(t["limit"]),
            t["verdict"],
        ]
        for t in targets
    ]
    print_table(
        "Targets (informational; PASS/MISS is never an exit code)",
        ("target", "measured", "target", "verdict"),
        target_rows,
    )
    if not enough:
        print(
            f"(no verdict: the targets count after {TARGET_MIN_REQUESTS:,} requests per variant;"
            f" this run sent {total:,}{', --quick' if quick else ''})"
        )

    gc_rows = []
    for variant, gc_report in gc_reports.items():
        if gc_report is None:
            gc_rows.append([variant, "—", "—", "—", "—", "—", "—"])
            continue
        pauses = gc_report["gen2_pauses_ms"]
        gen0, gen1, gen2 = gc_report["collections"]
        gc_rows.append(
            [
                variant,
                f"{gen0:,}",
                f"{gen1:,}",
                f"{gen2:,}",
                fmt_ms(max(pauses)) if pauses else "—",
                fmt_ms(sum(pauses)) if pauses else "—",
                f"{gc_report['tracked_objects']:,}",
            ]
        )
    print_table(
        "Garbage collections in each server over the whole run (warm-up included)",
        ("server", "gen 0", "gen 1", "gen 2", "gen-2 max ms", "gen-2 total ms", "objects at end"),
        gc_rows,
    )
    return {"phases": data, "targets": targets, "gc": dict(gc_reports)}


# -- main ---------------------------------------------------------------------------------------


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requests",
        type=int,
        default=None,
        help=f"requests per variant at the most connections (default {DEFAULT_REQUESTS:,})",
    )
    parser.add_argument("--connections", type=int, default=32, help="the busy phase's connections")
    parser.add_argument(
        "--client", choices=("auto", "wrk", "python"), default="auto",
        help="load generator: wrk when on PATH (auto; not with --quick), or the Python one",
    )  # fmt: skip
    parser.add_argument(
        "--upstream", choices=("canned", "mock"), default="canned",
        help="the bare app, as in bench_stack.py",
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--load-client", action="store_true", help=argparse.SUPPRESS)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def main() -> None:
    settings, args = parse_args(__doc__ or "", rounds=10, extra=options)
    if args.load_client:
        load_client()
        return
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started in background
    total = args.requests or (400 if settings.quick else DEFAULT_REQUESTS)
    single = max(settings.rounds, total // 10 if not settings.quick else 100)
    rounds = settings.rounds if not settings.quick else 2
    warmup = min(2_000, max(100, total // 50))
    wrk = shutil.which("wrk")
    use_wrk = args.client == "wrk" or (args.client == "auto" and wrk and not settings.quick)
    if use_wrk and wrk is None:
        raise SystemExit("--client wrk: wrk is not on PATH")
    key = "sk-bench-" + secrets.token_urlsafe(24)
    body, request = chat_request(key)

    import uvicorn

    import llmfence

    print("llmfence benchmark: HTTP (uvicorn, bare app vs. the same app behind Fence)")
    print(
        f"llmfence {llmfence.__version__} at {source_revision()}; uvicorn {uvicorn.__version__}, "
        f"1 worker, defaults as installed ({_uvicorn_defaults()}); upstream {args.upstream}; "
        f"MemoryStore; Python {platform.python_version()}"
    )

    servers: dict[str, Server] = {}
    client: Client | None = None
    gc_reports: dict[str, dict[str, Any] | None] = {}
    phases: dict[int, dict[str, Series]] = {}
    with tempfile.TemporaryDirectory(prefix="llmfence-bench-http-") as tmp:
        workdir = Path(tmp)
        try:
            for variant in VARIANTS:
                servers[variant] = Server(variant, key=key, upstream=args.upstream, workdir=workdir)
            for variant, server in servers.items():
                headers = server.wait_ready(request)
                metered = "x-ratelimit-remaining-requests" in headers
                if metered != (variant == "stack"):
                    raise SystemExit(f"the {variant} server is {'' if metered else 'not '}metered")
            client = (
                WrkClient(wrk or "wrk", body, key, workdir) if use_wrk else PythonClient(request)
            )
            print(
                f"load: {client.name}; {total:,}+ requests per variant at {args.connections} "
                f"connections and {single:,}+ at 1, in {rounds}+ runs per variant each, "
                f"alternating bare/stack; warm-up {warmup:,} per variant (not counted)"
            )
            rates: dict[str, float] = {}
            for variant, server in servers.items():
                run = client.run(server.port, args.connections, warmup, 1.0)
                rates[variant] = run.per_second
            for connections, count in ((1, single), (args.connections, total)):
                phases[connections] = interleave(
                    client, servers, connections, count, rounds, dict(rates)
                )
        finally:
            if client is not None:
                client.close()
            for variant, server in servers.items():
                gc_reports[variant] = server.stop()
        payload = report(phases, gc_reports, total, settings.quick)
    elapsed = time.perf_counter() - started
    print(f"done in {elapsed:.1f} s")
    if args.json:
        write_json(
            args.json,
            {
                "benchmark": "bench_http",
                "llmfence": llmfence.__version__,
                "revision": source_revision(),
                "python": platform.python_version(),
                "uvicorn": uvicorn.__version__,
                "upstream": args.upstream,
                "client": client.name if client is not None else None,
                "quick": settings.quick,
                "requests_per_variant": total,
                **payload,
                "seconds": elapsed,
            },
        )
        print(f"results written to {args.json}")


def _uvicorn_defaults() -> str:
    """The loop and HTTP implementation uvicorn's `auto` picks here."""
    import importlib.util

    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"loop {loop}, http {http}"


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; every process this script started is stopped", file=sys.stderr)
        sys.exit(130)
