"""A bounded soak: RSS stays flat while clients send new end-user names without end.

In process, `Fence(...).install(app)` over a `MemoryStore` (a global budget, an end-user budget
of `max_end_user_budget` reset daily, `end_user_rpm_limit` and `end_user_tpm_limit`) in front
of a canned chat upstream is driven with requests of distinct end users, every one new to the
store, spread over a pool of keys made by `fence.generate_key` (some of them with a daily budget
of their own). A fake clock moves forward with every request, so simulated days go by and the
end users' periods end. Every few thousand requests the script samples the process's RSS
(`/proc/self/statm`, or `ru_maxrss` where there is none) and the store's entry counts. It
prints RSS after warm-up (the first third of the run: enough for the spend log to fill and for
a few periods to end) against RSS at the end, and their ratio; a ratio near 1 is the point.
Before the fix every new end user left a budget counter and a spend total behind for ever:
90 s here (60,416 requests after warm-up) went from 132.3 to 147.6 MiB (ratio 1.116) with
45,557 budget counters at the end; after it, from 130.5 to 130.7 MiB (ratio 1.001, 70,656
requests) with about 7,000 (the keys', and the end users of the last simulated day or so).

Run: `python benchmarks/soak_memory.py [--quick] [--seconds N] [--json PATH]`; at most two
minutes (`--seconds`, default 90), a few seconds with `--quick`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import resource
import sys
import time
from typing import Any

from _harness import canned_llm_app, parse_args, print_table, source_revision, write_json
from bench_stack import make_scope
from starlette.types import ASGIApp, Message

import llmfence
from llmfence import Fence, MemoryStore

PATH = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
MASTER_KEY = "sk-soak-master-key"
DAY = 86_400.0
REQUESTS_PER_DAY = 10_000  # simulated: the fake clock's step is a day over this many
QUICK_REQUESTS_PER_DAY = 1_000
CONCURRENCY = 16
SAMPLE_EVERY = 1024  # requests
SPEND_RECORDS = 10_000  # the log's bound (and so the end users' totals kept): warm-up fills it
MAX_SECONDS = 120.0
T0 = 1_795_000_000.0
HEADER = ("phase", "requests", "sim. days", "RSS MiB", "budgets", "buckets", "end-user totals")


class Clock:
    """A fake clock that the driver moves forward."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def rss_mib() -> float:
    """The process's resident set size now, MiB (its peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            pages = int(statm.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


async def call(app: ASGIApp, key: str, body: bytes) -> int:
    """One request into the ASGI app; its status."""
    status = 0
    done = asyncio.Event()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            done.set()

    await app(make_scope(body, key), receive, send)
    return status


def body_of(end_user: str) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hello to the soak test."}],
            "max_tokens": 16,
            "user": end_user,
        }
    ).encode()


def sample(phase: str, served: int, clock: Clock, store: MemoryStore) -> dict[str, Any]:
    gc.collect()
    # Read through the private tables where a store predates `entry_counts` (to run this
    # script against an older checkout, for the figure before the fix).
    counts = {"budgets": len(store._budgets), "buckets": len(store._buckets)}
    end_users = getattr(store, "_end_user_totals", None)
    if end_users is None:
        totals: dict[str, Any] = store._totals
        end_users = [name for name in totals if name.startswith("end_user:")]
    return {
        "phase": phase,
        "requests": served,
        "simulated_days": (clock.now - T0) / DAY,
        "rss_mib": rss_mib(),
        **counts,
        "end_user_totals": len(end_users),
    }


async def soak(seconds: float, keys_in_pool: int, per_day: int) -> dict[str, Any]:
    clock = Clock()
    store = MemoryStore(max_spend_records=SPEND_RECORDS)
    app = canned_llm_app("Hello from the soak upstream.", reply_tokens=8, chunks=1, paths=(PATH,))
    fence = Fence(
        store=store,
        master_key=MASTER_KEY,
        max_budget=1_000_000,
        budget_duration="30d",
        max_end_user_budget=0.01,
        end_user_budget_duration="1d",
        end_user_rpm_limit=3,
        end_user_tpm_limit=100_000,
        clock=clock,
    )
    fence.install(app)
    keys = []
    for i in range(keys_in_pool):
        daily: dict[str, Any] = {"max_budget": 100.0, "budget_duration": "1d"} if i % 2 else {}
        key, _ = await fence.generate_key(key_alias=f"soak-{i}", **daily)
        keys.append(key)
    baseline = sample("keys made", 0, clock, store)
    step = DAY / per_day
    started = time.perf_counter()
    warm_until = started + seconds / 3
    warm: dict[str, Any] | None = None
    samples = [baseline]
    served = refused = 0
    statuses: dict[int, int] = {}
    while True:
        batch = []
        for _ in range(CONCURRENCY):
            # Every end user is new (a short id, as a real client's), and sends twice.
            end_user = f"eu-{served // 2:09d}"
            batch.append(call(app, keys[served % len(keys)], body_of(end_user)))
            served += 1
            clock.now += step
        for status in await asyncio.gather(*batch):
            statuses[status] = statuses.get(status, 0) + 1
            refused += status != 200
        if served % SAMPLE_EVERY < CONCURRENCY:
            now = time.perf_counter()
            if warm is None and now >= warm_until:
                warm = sample("after warm-up", served, clock, store)
                samples.append(warm)
            elif warm is not None:
                samples.append(sample("running", served, clock, store))
            if now - started >= seconds:
                break
    end = sample("end", served, clock, store)
    samples.append(end)
    assert warm is not None
    return {
        "baseline": baseline,
        "warm": warm,
        "end": end,
        "samples": samples,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "seconds": time.perf_counter() - started,
        "rss_ratio": end["rss_mib"] / warm["rss_mib"],
    }


def row(entry: dict[str, Any]) -> list[str]:
    return [
        entry["phase"],
        f"{entry['requests']:,}",
        f"{entry['simulated_days']:.1f}",
        f"{entry['rss_mib']:.1f}",
        f"{entry['budgets']:,}",
        f"{entry['buckets']:,}",
        f"{entry['end_user_totals']:,}",
    ]


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument(
        "--seconds", type=float, default=90.0, help=f"how long to drive (at most {MAX_SECONDS})"
    )


def main() -> None:
    settings, args = parse_args(__doc__ or "", extra=options)
    seconds = 4.0 if settings.quick else min(args.seconds, MAX_SECONDS)
    pool = 20 if settings.quick else 500
    per_day = QUICK_REQUESTS_PER_DAY if settings.quick else REQUESTS_PER_DAY
    started = time.perf_counter()
    print("llmfence soak: RSS with distinct end users over a MemoryStore, fake clock")
    print(f"llmfence {llmfence.__version__} at {source_revision()}; {seconds:.0f} s; ", end="")
    print(f"{pool} keys; {per_day:,} requests per simulated day; every end user new")
    results = asyncio.run(soak(seconds, pool, per_day))
    rows = [row(results["baseline"]), row(results["warm"])]
    running = results["samples"][2:-1]
    rows += [row(s) for s in running[:: max(1, len(running) // 8)]]
    rows.append(row(results["end"]))
    print_table("RSS and store entries", HEADER, rows)
    warm, end = results["warm"], results["end"]
    print(
        f"\nRSS after warm-up {warm['rss_mib']:.1f} MiB, at the end {end['rss_mib']:.1f} MiB: "
        f"ratio {results['rss_ratio']:.3f} over {end['requests'] - warm['requests']:,} more "
        f"requests (statuses {results['statuses']})"
    )
    print(f"\ndone in {time.perf_counter() - started:.1f} s")
    if args.json:
        write_json(args.json, {"revision": source_revision(), **results})
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
