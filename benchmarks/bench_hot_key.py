"""The hot key on Redis Cluster (issue 12, item 4): how many requests one shared counter's shard
can take, against how many one app process sends.

Every metered request of a whole-app budget touches the global budget counter, and every
settlement appends to the spend log: on a cluster each of those lives on one slot, so one node
serves them all however many nodes there are. This script starts a 3-master cluster and drives
`RedisStore(cluster=True)` from this process with many requests in flight, each one an
admission (a global budget and a key budget of its own, on another slot) and its settlement,
for a few seconds. Then it reads each node's `INFO commandstats`:

- **per process**: requests per second this one process sustained (client-bound: Python builds
  and parses every call);
- **server µs per request** on the node that holds the global counter and on the node that
  holds the spend log: the CPU each request costs there (`usec` of EVALSHA/EVAL over the
  requests), so `1e6 / µs` is the most requests per second that node can take for all app
  instances together (Redis runs scripts on one thread);
- **instances to saturate** = that ceiling / the per-process rate: how many app processes like
  this one it takes before the hot shard, not the apps, limits throughput.

Run: `python benchmarks/bench_hot_key.py [--seconds 5] [--json PATH]`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import time
from typing import Any

import redis
from _harness import source_revision, write_json

from llmfence import RedisStore
from llmfence.stores import Admission, BudgetScope, Settlement, SpendRecord
from llmfence.stores._redis_keys import SPEND, scope_of
from llmfence.testing import RedisClusterServers

HUGE = 10**15  # a budget nobody reaches: every admission passes
GLOBAL = BudgetScope("global", "global", "global", HUGE, None)
IN_FLIGHT = 64


def scopes(key: int) -> tuple[BudgetScope, ...]:
    return (GLOBAL, BudgetScope(f"key:k{key}", "key", f"k{key}", HUGE, None))


async def drive(store: RedisStore, seconds: float) -> int:
    """Admit and settle requests with `IN_FLIGHT` at once for `seconds`; how many finished."""
    ids = itertools.count()
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(lane: int) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            n = next(ids)
            request_id = f"hot-{lane}-{n}"
            now = time.time()
            await store.admit(Admission(request_id, now, budgets=scopes(n % 1000), cost=100))
            record = SpendRecord(request_id=request_id, timestamp=now, model="m", cost=90)
            await store.settle(Settlement(request_id, now, 90, None, record))
            done += 1

    await asyncio.gather(*(worker(lane) for lane in range(IN_FLIGHT)))
    return done


def script_usec(client: redis.Redis) -> float:
    """CPU µs a node spent in scripts so far (EVALSHA and EVAL together)."""
    stats: dict[str, Any] = client.info("commandstats")
    return sum(
        float(stats.get(f"cmdstat_{name}", {}).get("usec", 0)) for name in ("evalsha", "eval")
    )


def node_of(cluster: redis.RedisCluster, key: str) -> str:
    node = cluster.get_node_from_key(key)  # type: ignore[no-untyped-call]
    assert node is not None
    return f"{node.host}:{node.port}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with RedisClusterServers() as servers:
        store = RedisStore.from_url(servers.url, cluster=True, timeout=30.0)
        await drive(store, 0.5)  # warm: connections, scripts, slot map
        nodes = {f"127.0.0.1:{port}": redis.Redis(port=port) for port in servers.ports}
        before = {name: script_usec(client) for name, client in nodes.items()}
        started = time.perf_counter()
        requests = await drive(store, args.seconds)
        elapsed = time.perf_counter() - started
        after = {name: script_usec(client) for name, client in nodes.items()}
        await store.aclose()
        with redis.RedisCluster(host="127.0.0.1", port=servers.ports[0]) as cluster:
            hot = {
                "global budget": node_of(cluster, "{llmfence:" + scope_of("global") + "}"),
                "spend log": node_of(cluster, "{llmfence:" + SPEND + "}"),
            }
        for client in nodes.values():
            client.close()
    per_process = requests / elapsed
    host = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
    print(f"llmfence benchmark: the hot key on a 3-master Redis Cluster ({host})")
    print(f"llmfence at {source_revision()}; {IN_FLIGHT} requests in flight, {elapsed:.1f} s\n")
    print(f"one app process: {per_process:,.0f} requests/s (admit + settle)\n")
    print("| node | holds | server µs per request | ceiling req/s | app processes to saturate |")
    print("|---|---|---:|---:|---:|")
    rows = []
    for name in nodes:
        usec = (after[name] - before[name]) / requests
        holds = ", ".join(what for what, node in hot.items() if node == name) or "keys, homes"
        ceiling = 1e6 / usec if usec else float("inf")
        rows.append({"node": name, "holds": holds, "usec": usec, "ceiling": ceiling})
        print(f"| {name} | {holds} | {usec:.1f} | {ceiling:,.0f} | {ceiling / per_process:.1f} |")
    if args.json:
        write_json(args.json, {"per_process": per_process, "nodes": rows, "seconds": elapsed})


if __name__ == "__main__":
    asyncio.run(main())
