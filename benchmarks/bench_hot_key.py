"""The hot key on Redis Cluster (issue 12, item 4): how many requests one shared counter's shard
can take, against how many one app process sends; before and after global budget slices and
the sharded spend log, in one run.

Every metered request of a whole-app budget touches the global budget counter, and every
settlement appends to the spend log: with one slot for each, one node serves them all however
many nodes there are. This script starts a 3-master cluster and drives `RedisStore(cluster=True)`
from this process with many requests in flight, each one an admission (a global budget and a
key budget of its own, on another slot) and its settlement, for a few seconds, twice:

- **before**: `global_slices=False, spend_log_shards=1`: the global level admitted per request
  on its slot, one spend log (the layout before slices);
- **after**: the defaults on a cluster: the global level admitted from leased slices
  (`_redis_slices`), the spend log over 12 shards (`_redis_spendlog`).

After each, it reads each node's `INFO commandstats`:

- **per process**: requests per second this one process sustained (client-bound: Python builds
  and parses every call);
- **server µs per request** on each node, and what it holds (the global counter, the spend
  log or its shards): the CPU each request costs there (`usec` of EVALSHA/EVAL over the
  requests), so `1e6 / µs` is the most requests per second that node can take for all app
  instances together (Redis runs scripts on one thread); the busiest node's is the cluster's
  ceiling;
- **instances to saturate** = that ceiling / the per-process rate.

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
from _harness import finish, source_revision

from llmfence import RedisStore
from llmfence.stores import Admission, BudgetScope, Settlement, SpendRecord
from llmfence.stores._redis_keys import scope_of
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


VARIANTS: dict[str, dict[str, Any]] = {
    "before (per request, one log)": {"global_slices": False, "spend_log_shards": 1},
    "after (slices, 12 log shards)": {},
}


def holdings(cluster: redis.RedisCluster, store: RedisStore) -> dict[str, list[str]]:
    """What each node holds of the hot keys: the global counter, the spend log's shards."""
    held: dict[str, list[str]] = {}
    held.setdefault(node_of(cluster, "{llmfence:" + scope_of("global") + "}"), []).append(
        "global budget"
    )
    tags = store._spend_tags
    for i, spend_tag in enumerate(tags):
        what = "spend log" if len(tags) == 1 else f"log shard {i}"
        held.setdefault(node_of(cluster, spend_tag + "log"), []).append(what)
    return held


async def measure(
    servers: RedisClusterServers, seconds: float, options: dict[str, Any]
) -> dict[str, Any]:
    """One variant on a flushed cluster: the rate, and each node's µs per request."""
    servers.flush()
    store = RedisStore.from_url(servers.url, cluster=True, timeout=30.0, **options)
    await drive(store, 0.5)  # warm: connections, scripts, slot map, a first slice
    nodes = {f"127.0.0.1:{port}": redis.Redis(port=port) for port in servers.ports}
    before = {name: script_usec(client) for name, client in nodes.items()}
    started = time.perf_counter()
    requests = await drive(store, seconds)
    elapsed = time.perf_counter() - started
    after = {name: script_usec(client) for name, client in nodes.items()}
    with redis.RedisCluster(host="127.0.0.1", port=servers.ports[0]) as cluster:
        held = holdings(cluster, store)
    await store.aclose()
    for client in nodes.values():
        client.close()
    rows = []
    for name in nodes:
        usec = (after[name] - before[name]) / requests
        holds = ", ".join(held.get(name, [])) or "keys, homes"
        ceiling = 1e6 / usec if usec else float("inf")
        rows.append({"node": name, "holds": holds, "usec": usec, "ceiling": ceiling})
    return {"per_process": requests / elapsed, "seconds": elapsed, "nodes": rows}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    results: dict[str, Any] = {}
    with RedisClusterServers() as servers:
        for variant, options in VARIANTS.items():
            results[variant] = await measure(servers, args.seconds, options)
    host = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
    print(f"llmfence benchmark: the hot key on a 3-master Redis Cluster ({host})")
    print(f"llmfence at {source_revision()}; {IN_FLIGHT} requests in flight\n")
    for variant, result in results.items():
        per_process = result["per_process"]
        print(f"### {variant}: one app process, {per_process:,.0f} requests/s (admit + settle)\n")
        print(
            "| node | holds | server µs per request | ceiling req/s | app processes to saturate |"
        )
        print("|---|---|---:|---:|---:|")
        for row in result["nodes"]:
            ceiling = row["ceiling"]
            print(
                f"| {row['node']} | {row['holds']} | {row['usec']:.1f} | {ceiling:,.0f} "
                f"| {ceiling / per_process:.1f} |"
            )
        busiest = max(result["nodes"], key=lambda row: row["usec"])
        result["ceiling"] = busiest["ceiling"]
        print(f"\ncluster ceiling (busiest node): {busiest['ceiling']:,.0f} requests/s\n")
    first, last = (results[variant]["ceiling"] for variant in VARIANTS)
    print(f"ceiling after / before: {last / first:.2f}x")
    finish(args.json, "hot_key", started, False, {"variants": results})


if __name__ == "__main__":
    asyncio.run(main())
