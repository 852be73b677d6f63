"""llmfence beside what users would pick instead, in-process over ASGI, in one run.

The scenarios, the upstream and the way a request is driven are `bench_stack.py`'s: the app is
called directly with a prebuilt scope, `receive` and `send` (no sockets, no HTTP client), for a
small chat request with a JSON response, a ~4k-token 20-turn chat seen for the first time, the
same history resent with one new message, and a response streamed as 200 SSE chunks. The bare
app is `canned_llm_app` (prebuilt answers). In front of it, each variant:

- `llmfence, MemoryStore`: `Fence(...).install(app)`, the whole stack, a key of a user whose
  limits never refuse, a whole-app budget (as in `bench_stack.py`);
- `llmfence, SQLiteStore`: the same over a new SQLite file in a temporary directory;
- `llmfence, RedisStore`: the same over a private redis-server (`llmfence.testing.RedisServer`);
- `slowapi`: as its documentation sets it up: `Limiter` in `app.state.limiter`, the
  `RateLimitExceeded` handler, `SlowAPIMiddleware` (a Starlette `BaseHTTPMiddleware`), a
  per-minute default limit keyed per API key (the bearer token), in-memory storage, the default
  fixed-window strategy and no headers (the documented defaults). Skipped, with a line saying
  so, when slowapi is not installed (`pip install -e '.[bench]'`);
- `naive middleware`: `benchmarks/_naive.py`, a hand-written pure-ASGI middleware doing bearer
  auth, one body parse, tiktoken counting and `limits` RPM/TPM, and nothing else (its
  docstring lists what it leaves out).

Variants come from `_variants.build`; each is built fresh for every scenario (new store, new
counters), checked to answer 200 and stream every chunk, and the rate limiters of slowapi and
the naive middleware are checked to bite (a copy with a limit of one request refuses the
second). The cases of a scenario are interleaved round by round; the table gives µs per
request (median of the rounds), the ratio to the bare app, which holds on a noisy shared
machine where the absolute µs do not, and each variant's overhead (its µs less the bare app's)
over the naive middleware's. For the ~4k-token chat seen for the first time that last ratio
has a target (issue 15, item 7): llmfence on `MemoryStore` at most `TARGET_FIRST_SIGHT` of the
naive middleware's cost, which is mostly counting the prompt's tokens; llmfence reserves with
a byte bound of the prompt instead when it fits comfortably (`Meter(lazy_counting=True)`).

Run: `python benchmarks/bench_peers.py [--quick] [--json PATH] [--no-redis]`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _harness import (
    AsyncBatch,
    Settings,
    Stats,
    arun_rounds,
    fmt_ratio,
    fmt_us,
    parse_args,
    print_table,
    source_revision,
    verdict,
    write_json,
)
from _variants import (
    BARE,
    FENCES,
    MEMORY,
    NAIVE,
    NEVER,
    REDIS,
    SLOWAPI,
    VARIANTS,
    Built,
    Places,
    build,
    check_bites,
    check_peer,
    load_slowapi,
    machine,
    new_key,
)
from bench_stack import MODEL, SMALL, batch, scenarios
from bench_stack import check as check_fence

import llmfence
from llmfence.testing import RedisServer, find_redis_server

TABLE_HEADER = ("variant", "µs / request", "overhead µs", "req/s", "/ bare", "overhead / naive")
FIRST_SIGHT = "(b) ~4k-token chat, first sight"
TARGET_FIRST_SIGHT = 0.3
"""llmfence's overhead on a first-sight ~4k-token chat, at most this fraction of the naive's."""


@dataclass
class Results:
    """Stats by scenario and variant; why a variant was skipped, by variant."""

    scenarios: dict[str, dict[str, Stats]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


async def run(
    settings: Settings,
    places: Places,
    slowapi: dict[str, Any] | None,
    skipped: dict[str, str],
) -> Results:
    results = Results(skipped=dict(skipped))
    names = list(scenarios())
    variants = [v for v in VARIANTS if v not in skipped]
    key = new_key()
    built: list[Built] = []

    async def fresh(variant: str, rpm: int = NEVER) -> Built:
        made = await build(variant, key, places, slowapi=slowapi, rpm=rpm)
        built.append(made)
        return made

    try:
        # Once, before any timing: every llmfence variant meters and records every scenario,
        # the peers answer every scenario and their limiters are in the path.
        for variant in variants:
            if variant in FENCES:
                made = await fresh(variant)
                assert made.fence is not None
                await check_fence(made.app, made.fence, key, names)
            elif variant in (SLOWAPI, NAIVE):
                await check_bites(variant, (await fresh(variant, rpm=1)).app, key)

        serial = itertools.count()
        for name, make in scenarios().items():
            # Fresh variants per scenario: no state carried from one scenario to the next.
            apps = {variant: await fresh(variant) for variant in variants}
            for variant, made in apps.items():
                if variant not in FENCES:
                    await check_peer(variant, made.app, key, name)
            cases: dict[str, AsyncBatch] = {
                variant: batch(made.app, key, make, serial) for variant, made in apps.items()
            }
            results.scenarios[name] = await arun_rounds(cases, settings, max_batch=5_000)
    finally:
        for made in built:
            await made.close()
    return results


def report(results: Results, settings: Settings, started: float) -> dict[str, Any]:
    """Print one table per scenario; return the same figures for `--json`."""
    data: dict[str, dict[str, Any]] = {}
    targets: list[str] = []
    for name, stats in results.scenarios.items():
        bare = stats[BARE].median
        naive = stats[NAIVE].median - bare if NAIVE in stats else None
        rows = []
        data[name] = {}
        for variant in VARIANTS:
            if variant not in stats:
                rows.append([variant, "—", "—", "—", "skipped", "—"])
                continue
            median = stats[variant].median
            versus = (median - bare) / naive if naive and variant != BARE else None
            rows.append(
                [
                    variant,
                    fmt_us(median),
                    "—" if variant == BARE else fmt_us(median - bare),
                    f"{stats[variant].per_second:,.0f}",
                    fmt_ratio(median / bare),
                    "—" if versus is None else fmt_ratio(versus),
                ]
            )
            data[name][variant] = {
                "us": median,
                "best_us": stats[variant].best,
                "ratio": median / bare,
                "requests_per_batch": stats[variant].n,
                "overhead_vs_naive": versus,
            }
            if name == FIRST_SIGHT and variant == MEMORY and versus is not None:
                targets.append(
                    f"{name}: llmfence (MemoryStore) overhead / naive's: {versus:.2f}× "
                    f"(target ≤ {TARGET_FIRST_SIGHT}×: {verdict(versus, TARGET_FIRST_SIGHT)}); "
                    f"small chat / bare: {stats_ratio(results, SMALL, MEMORY)}"
                )
        title = f"{name}: µs per request (median of {settings.rounds} interleaved rounds)"
        print_table(title, TABLE_HEADER, rows)
    for line in targets:
        print()
        print(line)
    if results.skipped:
        print()
        for variant, reason in results.skipped.items():
            print(f"{variant}: skipped: {reason}")
    elapsed = time.perf_counter() - started
    print(f"done in {elapsed:.1f} s")
    return {
        "benchmark": "bench_peers",
        "llmfence": llmfence.__version__,
        "revision": source_revision(),
        "python": platform.python_version(),
        "machine": machine(),
        "quick": settings.quick,
        "rounds": settings.rounds,
        "scenarios": data,
        "skipped": results.skipped,
        "seconds": elapsed,
    }


def stats_ratio(results: Results, scenario: str, variant: str) -> str:
    """A variant's ratio to the bare app in another scenario of the run, for the target line."""
    stats = results.scenarios.get(scenario, {})
    if variant not in stats or BARE not in stats:
        return "—"
    return fmt_ratio(stats[variant].median / stats[BARE].median)


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--no-redis", action="store_true", help="skip the RedisStore variant")


def main() -> None:
    settings, args = parse_args(__doc__ or "", rounds=15, batch_seconds=0.1, extra=options)
    started = time.perf_counter()
    print("llmfence benchmark: peers (bare app, llmfence, slowapi, a naive middleware)")
    print(f"llmfence {llmfence.__version__} at {source_revision()}; model {MODEL}; ", end="")
    print(f"in-process ASGI; {settings.rounds} rounds per case, interleaved")
    print(f"machine: {machine()}, Python {platform.python_version()}; shared and noisy:")
    print("read the ratios to the bare app (same run), not the absolute µs")
    skipped: dict[str, str] = {}
    slowapi, slowapi_note = load_slowapi()
    print(slowapi_note)
    if slowapi is None:
        skipped[SLOWAPI] = slowapi_note
    binary = None if args.no_redis else find_redis_server()
    with tempfile.TemporaryDirectory(prefix="llmfence-bench-peers-") as tmp:
        if binary is None:
            skipped[REDIS] = "--no-redis" if args.no_redis else "no redis-server found"
            results = asyncio.run(run(settings, Places(Path(tmp)), slowapi, skipped))
        else:
            with RedisServer(binary) as server:
                print(f"redis-server: {binary} on 127.0.0.1:{server.port}")
                places = Places(Path(tmp), server.url)
                results = asyncio.run(run(settings, places, slowapi, skipped))
    payload = report(results, settings, started)
    if args.json:
        write_json(args.json, payload)
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
