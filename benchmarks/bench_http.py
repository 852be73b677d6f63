"""Over HTTP: uvicorn serving the bare app and each variant of `_variants` in front of it.

The variants are those of `bench_peers.py`: the bare app, llmfence's whole stack on
`MemoryStore`, `SQLiteStore` (a file in a temporary directory) and `RedisStore` (a private
redis-server), slowapi, and the naive middleware (`--variants` picks some). Each variant runs
in its own uvicorn process (1 worker, 127.0.0.1, a free port, `--no-access-log`, uvicorn's
default loop and HTTP implementation as installed), all started
once and kept for the whole run, so that each process has served every request by the
end (at least 100k at 32 connections by default): the garbage collector's full passes, which
come every so many thousand requests, are then inside the figures. The bare app is the
upstream of `bench_stack.py` (`canned_llm_app`); llmfence's key (of a user) has limits that
never refuse. Every request is the small chat request of
`bench_stack.py`, a keep-alive `POST /v1/chat/completions` with a bearer key.

The load generator is `wrk` when it is on PATH (a Lua script sets the POST body and the header,
and reports its latency histogram), else a Python asyncio client on raw keep-alive HTTP/1.1
sockets, in a process of its own (closed loop: each connection sends its next request when the
previous response is complete). `--quick` always uses the Python client. Variants are
interleaved: several shorter runs, the variants in turn (the order reversed every other
round), at 1 connection and then at 32; req/s is the median of the runs, p50/p99/max come from
every latency of the variant pooled. Ratios to the bare app are printed, MemoryStore's next to
the issue's targets (32 connections; PASS/MISS is
information, never an exit code). Each server also reports its garbage collections (counted by a
`gc.callbacks` hook in both variants alike) when it stops.

Every process the script starts is stopped by its PID when it ends, on Ctrl-C and on SIGTERM;
the servers also stop by themselves if the script disappears.

Run: `python benchmarks/bench_http.py [--quick] [--requests N] [--rounds R] [--connections C]
[--client auto|wrk|python] [--variants A,B,…] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from _harness import (
    finish,
    fmt_ratio,
    parse_args,
    print_table,
    source_revision,
    verdict,
)
from _variants import (
    BARE,
    FENCES,
    MEMORY,
    REDIS,
    SHORT,
    SLOWAPI,
    VARIANTS,
    load_slowapi,
    machine,
    new_key,
)

from llmfence.testing import RedisServer, find_redis_server

HERE = Path(__file__).resolve().parent
PATH = "/v1/chat/completions"
DEFAULT_REQUESTS = 100_000
TARGET_RPS = 0.45  # stack req/s / bare req/s, at least, at 32 connections
TARGET_P99 = 3.0  # stack p99 / bare p99, at most, at 32 connections
TARGET_MIN_REQUESTS = 100_000  # the targets count only after this many requests per variant
ENV = "LLMFENCE_BENCH_HTTP"  # the server's settings, as JSON in the environment
RUN_TIMEOUT = 900.0  # seconds any one load run may take
SERVER_LIFETIME = 6 * 3600.0  # a server stops by itself after this long, whatever happens


# -- the servers (this module is imported by uvicorn in each server process) --------------------


def server_app() -> Any:
    """uvicorn's `--factory`: the app of one variant (`_variants.build`), as `ENV` describes it.

    The variant is built in the lifespan's startup, inside the server's event loop (the stores
    open their connections there), behind a thin shim that every variant has alike.
    """
    settings = json.loads(os.environ[ENV])
    return _Served(settings)


class _Served:
    """Builds the variant at startup, serves it, reports the garbage collections at shutdown."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.app: Any = None
        self.collections = [0, 0, 0]
        self.pauses: list[float] = []
        self.started = 0.0

    def watch_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        generation = info["generation"]
        self.collections[generation] += 1
        if generation == 2:
            self.pauses.append((time.perf_counter() - self.started) * 1e3)

    async def watchdog(self) -> None:
        """Stop when the benchmark that started this server is gone, or after a long while."""
        deadline = time.monotonic() + SERVER_LIFETIME
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != self.settings["parent"] or time.monotonic() > deadline:
                os.kill(os.getpid(), signal.SIGTERM)
                return

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        import gc

        from _variants import Places, build, load_slowapi

        settings = self.settings
        await receive()  # lifespan.startup
        places = Places(Path(settings["directory"]), settings.get("redis_url"))
        slowapi, _ = load_slowapi()
        built = await build(settings["variant"], settings["key"], places, slowapi=slowapi)
        self.app = built.app
        guard = asyncio.create_task(self.watchdog())
        gc.callbacks.append(self.watch_gc)
        await send({"type": "lifespan.startup.complete"})
        try:
            await receive()  # lifespan.shutdown
        finally:
            gc.callbacks.remove(self.watch_gc)
            guard.cancel()
            await built.close()
            report = {
                "collections": self.collections,
                "gen2_pauses_ms": self.pauses,
                "tracked_objects": len(gc.get_objects()),
            }
            write_report(settings["stats"], report)
        await send({"type": "lifespan.shutdown.complete"})


def write_report(path: str, report: Mapping[str, Any]) -> None:
    """Where a server leaves its GC report when it stops."""
    Path(path).write_text(json.dumps(report))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def uvicorn_command(factory: str, port: int | str = "{port}", app_dir: Path = HERE) -> list[str]:
    """uvicorn serving `factory` with one worker on 127.0.0.1:`port` (by default the
    placeholder `Server` fills in), no access log."""
    return [
        sys.executable, "-m", "uvicorn", factory, "--factory",
        "--app-dir", str(app_dir), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip


class Server:
    """One server process: by default uvicorn serving one variant of `_variants` (`settings`
    says which), or any `command` (its `{port}` filled in) with extra `env`."""

    def __init__(
        self,
        variant: str,
        *,
        workdir: Path,
        settings: Mapping[str, Any] | None = None,
        command: list[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.variant = variant
        self.port = free_port()
        slug = "".join(c if c.isalnum() else "-" for c in variant.lower())
        self.stats_path = workdir / f"{slug}-gc.json"
        self.log_path = workdir / f"{slug}.log"
        extra = dict(env or {})
        if command is None:
            settings = {**(settings or {}), "stats": str(self.stats_path), "parent": os.getpid()}
            extra[ENV] = json.dumps(settings)
            command = uvicorn_command("bench_http:server_app", self.port)
        else:
            command = [part.replace("{port}", str(self.port)) for part in command]
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **extra},
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
    """One request on a new connection: status, headers (lower-cased names) and body (with
    content-length, or chunked)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
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
            status = int(lines[0].split()[1])
            rest = data[end + 4 :]
            if headers.get("transfer-encoding", "").lower() == "chunked":
                if rest.endswith(b"0\r\n\r\n"):
                    return status, headers, _dechunk(rest)
                continue
            length = int(headers.get("content-length", "-1"))
            if length < 0:
                raise OSError("a response without content-length")
            if len(rest) >= length:
                return status, headers, rest[:length]


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    at = 0
    while True:
        stop = data.index(b"\r\n", at)
        size = int(data[at:stop].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[stop + 2 : stop + 2 + size]
        at = stop + 2 + size + 2


def chat_request(
    key: str, *, stream: bool = False, user: str | None = "bob"
) -> tuple[bytes, bytes]:
    """The small chat request of `bench_stack.py` (`stream`: as a 200-chunk stream): its body,
    and the whole HTTP/1.1 request."""
    question = "Hey, how's it going? What is item 7 on my last invoice?"
    fields: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": question},
        ],
    }
    if user is not None:
        fields["user"] = user
    if stream:
        fields["stream"] = True
    body = json.dumps(fields).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: llmfence-bench\r\n"
        f"Accept: */*\r\nContent-Type: application/json\r\n"
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
        self.scan = 0
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
                if at >= 0:
                    stop = head.find(b"\r\n", at + 2)
                    self.need = end + 4 + int(head[at + 17 : stop if stop > 0 else len(head)])
                elif b"\r\ntransfer-encoding: chunked" in head:
                    self.need = 0  # found by the last chunk, below
                    self.scan = end + 2  # the body's first chunk size follows "\r\n"
                else:
                    self.failed("response with neither content-length nor chunks")
                    return
            if self.need == 0:
                # Chunked: the response ends with the zero-size chunk, "\r\n0\r\n\r\n".
                last = buffer.find(b"\r\n0\r\n\r\n", self.scan)
                if last < 0:
                    self.scan = max(self.scan, len(buffer) - 7)
                    return
                self.need = last + 7
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

    def __init__(
        self, binary: str, body: bytes, key: str, workdir: Path, timeout: float = 10.0
    ) -> None:
        self.binary = binary
        self.timeout = timeout
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
            self.binary, "-t1", f"-c{connections}", f"-d{duration}s",
            "--timeout", f"{self.timeout:g}s",
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
    seconds: float | None = None,
) -> dict[str, Series]:
    """At least `total` requests per variant in `rounds` runs or more, alternating variants
    (the order reversed every other round); with `seconds`, exactly `rounds` runs of about that
    long per variant instead (longer where a variant's last rate would not let every connection
    finish three requests).

    A count-bounded client sends `total / rounds` requests per run (with `seconds`: what the
    variant's last rate says fits); wrk runs for the seconds that many requests should take at
    the variant's last measured rate (`rates`, updated), or for `seconds`.
    """
    series = {variant: Series() for variant in servers}
    per_run = math.ceil(total / rounds)
    order = list(servers)
    round_ = 0
    while round_ < rounds or any(s.requests < total for s in series.values()):
        if round_ >= 3 * rounds:
            break  # wrk's rate guesses were far off; report what was measured
        for variant in order if round_ % 2 == 0 else order[::-1]:
            rate = max(rates.get(variant, 1.0), 1.0)
            if seconds is None:
                count, length = per_run, per_run / rate
            else:
                # Long enough for every connection to finish a few requests at the last rate.
                length = max(seconds, 3 * connections / rate)
                count = max(20, round(rate * length))
            run = client.run(servers[variant].port, connections, count, length)
            if run.errors:
                raise SystemExit(f"{variant}, {connections} connections: errors {run.errors}")
            series[variant].runs.append(run)
            rates[variant] = run.per_second
        round_ += 1
    return series


# -- the report ---------------------------------------------------------------------------------


def fmt_ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:,.0f}"


def latency_figures(series: Series) -> dict[str, Any]:
    """req/s (median of the runs) and p50/p99/p99.9/max ms (every request pooled)."""
    pooled = series.latencies()
    return {
        "requests": series.requests,
        "runs": len(series.runs),
        "req_per_s": series.per_second,
        "p50_ms": percentile(pooled, 0.50),
        "p99_ms": percentile(pooled, 0.99),
        "p99.9_ms": percentile(pooled, 0.999),
        "max_ms": max(pooled) / 1000 if pooled else math.nan,
    }


def phase_tables(
    phases: Mapping[int, Mapping[str, Series]], baseline: str, scenario: str = "small chat"
) -> dict[str, Any]:
    """Print the figures of every variant and their ratios to `baseline`; return them."""
    rows = []
    ratio_rows = []
    data: dict[str, Any] = {}
    for connections, series in phases.items():
        figures = {variant: latency_figures(s) for variant, s in series.items()}
        base = figures[baseline]
        ratios: dict[str, dict[str, float]] = {}
        for variant, f in figures.items():
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
            if variant == baseline:
                continue
            ratios[variant] = {
                "req_per_s": f["req_per_s"] / base["req_per_s"],
                "p50": f["p50_ms"] / base["p50_ms"],
                "p99": f["p99_ms"] / base["p99_ms"],
                "p99.9": f["p99.9_ms"] / base["p99.9_ms"],
                "added_p50_ms": f["p50_ms"] - base["p50_ms"],
            }
            r = ratios[variant]
            ratio_rows.append(
                [
                    str(connections),
                    variant,
                    fmt_ratio(r["req_per_s"]),
                    fmt_ratio(r["p50"]),
                    fmt_ratio(r["p99"]),
                    fmt_ratio(r["p99.9"]),
                    f"{r['added_p50_ms']:+.3f}",
                ]
            )
        data[str(connections)] = {**figures, "over_" + baseline: ratios}
    print_table(
        f"{scenario}: requests/s (median of the runs) and latency in ms (all requests pooled)",
        ("conns", "variant", "requests in runs", "req/s", "p50 ms", "p99 ms", "p99.9", "max ms"),
        rows,
        left=2,
    )
    print_table(
        f"{scenario}: ratios to the {baseline}",
        ("conns", "variant", "req/s", "p50", "p99", "p99.9", "p50 added ms"),
        ratio_rows,
        left=2,
    )
    return data


def report(
    phases: Mapping[int, Mapping[str, Series]],
    gc_reports: Mapping[str, dict[str, Any] | None],
    total: int,
    quick: bool,
) -> dict[str, Any]:
    data = phase_tables(phases, BARE)
    targets = []
    busiest = max(phases)
    enough = all(s.requests >= TARGET_MIN_REQUESTS for s in phases[busiest].values())
    ratios = data[str(busiest)]["over_" + BARE].get(MEMORY)
    if ratios is not None:
        for label, measured, limit, at_least in (
            (f"req/s MemoryStore / bare, {busiest} conns", ratios["req_per_s"], TARGET_RPS, True),
            (f"p99 MemoryStore / bare, {busiest} conns", ratios["p99"], TARGET_P99, False),
        ):
            judged = verdict(measured, limit, at_least=at_least) if enough else "—"
            targets.append(
                {"target": label, "measured": measured, "limit": limit, "verdict": judged}
            )
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
    gc_table(gc_reports)
    return {"phases": data, "targets": targets, "gc": dict(gc_reports)}


def gc_table(gc_reports: Mapping[str, dict[str, Any] | None]) -> None:
    """Print each server's garbage collections over the run."""
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
        "--variants", default=",".join(SHORT),
        help="comma-separated variants (default all): " + ",".join(SHORT),
    )  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--load-client", action="store_true", help=argparse.SUPPRESS)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def pick_client(
    kind: str,
    quick: bool,
    body: bytes,
    key: str,
    request: bytes,
    workdir: Path,
    timeout: float = 10.0,
) -> Client:
    """wrk when asked, or on `auto` when it is on PATH and the run is not `--quick`; else the
    Python generator."""
    wrk = shutil.which("wrk")
    use_wrk = kind == "wrk" or (kind == "auto" and wrk and not quick)
    if use_wrk and wrk is None:
        raise SystemExit("--client wrk: wrk is not on PATH")
    return (
        WrkClient(wrk or "wrk", body, key, workdir, timeout) if use_wrk else PythonClient(request)
    )


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
    key = new_key()
    body, request = chat_request(key)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in SHORT]
    if unknown or "bare" not in names:
        raise SystemExit(f"--variants: unknown {unknown} or no 'bare'; know {','.join(SHORT)}")
    wanted = [SHORT[v] for v in names]
    skipped: dict[str, str] = {}
    slowapi, note = load_slowapi()
    if slowapi is None and SLOWAPI in wanted:
        skipped[SLOWAPI] = note
    binary = find_redis_server() if REDIS in wanted else None
    if REDIS in wanted and binary is None:
        skipped[REDIS] = "no redis-server found"
    variants = [v for v in VARIANTS if v in wanted and v not in skipped]

    import uvicorn

    import llmfence

    print("llmfence benchmark: HTTP (uvicorn, the bare app and each variant in front of it)")
    print(
        f"llmfence {llmfence.__version__} at {source_revision()}; uvicorn {uvicorn.__version__}, "
        f"1 worker, defaults as installed ({_uvicorn_defaults()}); canned upstream; "
        f"Python {platform.python_version()}; {machine()}"
    )
    for variant, why in skipped.items():
        print(f"{variant}: skipped: {why}")

    servers: dict[str, Server] = {}
    client: Client | None = None
    gc_reports: dict[str, dict[str, Any] | None] = {}
    phases: dict[int, dict[str, Series]] = {}
    with (
        contextlib.ExitStack() as stack,
        tempfile.TemporaryDirectory(prefix="llmfence-bench-http-") as tmp,
    ):
        workdir = Path(tmp)
        redis_url = None
        if binary is not None and REDIS in variants:
            redis_url = stack.enter_context(RedisServer(binary)).url
        try:
            for variant in variants:
                servers[variant] = Server(
                    variant,
                    workdir=workdir,
                    settings={
                        "variant": variant,
                        "key": key,
                        "directory": tmp,
                        "redis_url": redis_url,
                    },
                )
            for variant, server in servers.items():
                headers = server.wait_ready(request)
                metered = "x-ratelimit-remaining-requests" in headers
                if metered != (variant in FENCES):
                    raise SystemExit(f"the {variant} server is {'' if metered else 'not '}metered")
            client = pick_client(args.client, settings.quick, body, key, request, workdir)
            print(
                f"load: {client.name}; {total:,}+ requests per variant at {args.connections} "
                f"connections and {single:,}+ at 1, in {rounds}+ runs per variant each, "
                f"variants alternating; warm-up {warmup:,} per variant (not counted)"
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
    finish(
        args.json,
        "bench_http",
        started,
        settings.quick,
        {
            "uvicorn": uvicorn.__version__,
            "client": client.name if client is not None else None,
            "requests_per_variant": total,
            "skipped": skipped,
            **payload,
        },
    )


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
