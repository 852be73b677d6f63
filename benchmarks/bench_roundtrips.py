"""Round trips: the Redis commands a guarded request costs, counted by the server.

llmfence's whole stack over `RedisStore` on a private redis-server, then on a private Redis
Cluster (`llmfence.testing.RedisClusterServers`, 3 masters), serves N requests of each scenario
of `bench_stack.py` one after the other. The server counts what they cost:

- `INFO commandstats` before and after (summed over the cluster's nodes): every command the
  server ran per request, by name — scripts' own `redis.call`s included, since Redis counts
  them too (`INFO` itself left out);
- `MONITOR` in the same window (a second pass, so its cost stays out of the timing): the
  commands that came from a client, i.e. the network round trips, apart from those a Lua
  script ran inside one of them.

Beside them, in the same run and interleaved round by round: µs per small request through the
stack on that store, the bare app's, and a redis-py asyncio `PING` to the same server (one
round trip, the floor), so that the Redis cost reads as `(stack − bare) / PING`.

Run: `python benchmarks/bench_roundtrips.py [--quick] [--json PATH] [--requests N]
[--no-cluster]`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _harness import (
    AsyncBatch,
    Settings,
    arun_rounds,
    finish,
    fmt_ratio,
    fmt_us,
    parse_args,
    print_table,
    source_revision,
)
from _variants import BARE, REDIS, Places, build, machine, new_key
from bench_stack import SMALL, batch, call, make_scope, ping_batch, scenarios

import llmfence
from llmfence import RedisStore
from llmfence.testing import RedisClusterServers, RedisServer, find_redis_server

SENTINEL = "llmfence-roundtrips-sentinel"


def command_stats(urls: Sequence[str]) -> Counter[str]:
    """Calls by command, summed over the nodes at `urls`."""
    import redis

    total: Counter[str] = Counter()
    for url in urls:
        client = redis.Redis.from_url(url)
        try:
            for name, stats in client.info("commandstats").items():
                total[name.removeprefix("cmdstat_")] += int(stats["calls"])
        finally:
            client.close()
    return total


class Monitor:
    """`MONITOR` on one node, in a thread: counts commands from clients and from scripts until
    it sees the sentinel `ECHO`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.clients: Counter[str] = Counter()
        self.scripts = 0
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.sendall(b"MONITOR\r\n")
        self.buffer = b""
        if not self._line().startswith(b"+OK"):
            raise RuntimeError("MONITOR refused")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("MONITOR connection closed")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def _run(self) -> None:
        while True:
            line = self._line()
            source, _, command = line.partition(b"] ")
            name = command.split(b" ", 1)[0].strip(b'"').decode().lower()
            if SENTINEL.encode() in command:
                return
            if b" lua" in source:
                self.scripts += 1
            elif name not in ("info", "monitor"):
                self.clients[name] += 1

    def stop(self, timeout: float = 30.0) -> None:
        import redis

        redis.Redis(port=self.port).echo(SENTINEL)
        self.thread.join(timeout)
        self.sock.close()


async def count(
    app: Any, key: str, name: str, requests: int, ports: Sequence[int], urls: Sequence[str]
) -> dict[str, Any]:
    """Commands per request of scenario `name`: server totals, then client round trips."""
    make = scenarios()[name]
    serial = itertools.count()

    async def send(n: int) -> None:
        for _ in range(n):
            body, stream = make(next(serial))
            outcome, _ = await call(app, make_scope(body, key, stream=stream), body)
            if outcome.status != 200:
                raise RuntimeError(f"status {outcome.status}")

    await send(5)  # warm-up: scripts loaded, caches filled
    before = command_stats(urls)
    await send(requests)
    after = command_stats(urls)
    delta = after - before
    delta.pop("info", None)
    monitors = [Monitor(port) for port in ports]
    await send(requests)
    for monitor in monitors:
        monitor.stop()
    clients: Counter[str] = Counter()
    for monitor in monitors:
        clients.update(monitor.clients)
    clients.pop("echo", None)
    return {
        "requests": requests,
        "commands_per_request": sum(delta.values()) / requests,
        "by_command": {k: v / requests for k, v in sorted(delta.items())},
        "round_trips_per_request": sum(clients.values()) / requests,
        "round_trips_by_command": {k: v / requests for k, v in sorted(clients.items())},
        "script_commands_per_request": sum(m.scripts for m in monitors) / requests,
    }


async def measure(
    settings: Settings,
    label: str,
    store: RedisStore,
    ports: Sequence[int],
    requests: int,
    places: Places,
) -> dict[str, Any]:
    key = new_key()
    made = await build(REDIS, key, places, store=store)
    bare = await build(BARE, key, places)
    urls = [f"redis://127.0.0.1:{port}/0" for port in ports]
    try:
        counts = {
            name: await count(made.app, key, name, requests, ports, urls) for name in scenarios()
        }
        ping, close = ping_batch(urls[0])
        serial = itertools.count()
        cases: dict[str, AsyncBatch] = {
            "bare": batch(bare.app, key, scenarios()[SMALL], serial),
            "stack": batch(made.app, key, scenarios()[SMALL], serial),
            "ping": ping,
        }
        try:
            stats = await arun_rounds(cases, settings, max_batch=2_000)
        finally:
            await close()
    finally:
        await made.close()
    added = (stats["stack"].median - stats["bare"].median) / stats["ping"].median
    return {
        "store": label,
        "scenarios": counts,
        "small_us": {name: s.median for name, s in stats.items()},
        "small_added_over_ping": added,
    }


def report(results: list[dict[str, Any]]) -> None:
    rows = []
    for result in results:
        for name, figures in result["scenarios"].items():
            trips = ", ".join(
                f"{k} {v:g}" for k, v in figures["round_trips_by_command"].items() if v
            )
            rows.append(
                [
                    result["store"],
                    name,
                    f"{figures['round_trips_per_request']:.2f}",
                    trips,
                    f"{figures['commands_per_request']:.1f}",
                    f"{figures['script_commands_per_request']:.1f}",
                ]
            )
    print_table(
        "Redis commands per guarded request, counted by the server",
        (
            "store",
            "scenario",
            "round trips",
            "round trips by command",
            "commands (INFO commandstats)",
            "of them inside scripts (MONITOR)",
        ),
        rows,
        left=4,
    )
    rows = []
    for result in results:
        us = result["small_us"]
        rows.append(
            [
                result["store"],
                fmt_us(us["bare"]),
                fmt_us(us["stack"]),
                fmt_us(us["ping"]),
                fmt_ratio(result["small_added_over_ping"]),
            ]
        )
    print_table(
        "Small chat: µs per request beside a redis-py asyncio PING (interleaved rounds)",
        ("store", "bare µs", "stack µs", "PING µs", "(stack − bare) / PING"),
        rows,
    )


async def run_single(settings: Settings, url: str, port: int, requests: int, tmp: Path) -> Any:
    store = RedisStore.from_url(url)
    return await measure(settings, "RedisStore, one node", store, [port], requests, Places(tmp))


async def run_cluster(
    settings: Settings, cluster: RedisClusterServers, requests: int, tmp: Path
) -> Any:
    store = RedisStore.from_url(cluster.url, cluster=True)
    label = f"RedisStore, Cluster of {len(cluster.ports)}"
    return await measure(settings, label, store, cluster.ports, requests, Places(tmp))


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--requests", type=int, default=None, help="requests counted per scenario")
    parser.add_argument("--no-cluster", action="store_true", help="skip the Redis Cluster")


def main() -> None:
    import tempfile

    settings, args = parse_args(__doc__ or "", rounds=15, batch_seconds=0.1, extra=options)
    started = time.perf_counter()
    requests = args.requests or (20 if settings.quick else 500)
    print("llmfence benchmark: Redis round trips per guarded request")
    print(f"llmfence {llmfence.__version__} at {source_revision()}; {machine()}, ", end="")
    print(f"Python {platform.python_version()}")
    binary = find_redis_server()
    if binary is None:
        raise SystemExit("no redis-server: nothing to count")
    results = []
    with tempfile.TemporaryDirectory(prefix="llmfence-bench-roundtrips-") as tmp:
        with RedisServer(binary) as server:
            results.append(
                asyncio.run(run_single(settings, server.url, server.port, requests, Path(tmp)))
            )
        if not args.no_cluster:
            with RedisClusterServers(binary) as cluster:
                results.append(asyncio.run(run_cluster(settings, cluster, requests, Path(tmp))))
    report(results)
    finish(
        args.json,
        "bench_roundtrips",
        started,
        settings.quick,
        {"requests": requests, "results": results},
    )


if __name__ == "__main__":
    main()
