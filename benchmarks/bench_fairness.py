"""Fairness: small requests' latency while 50k-token prompts arrive at the same time.

In process, one event loop, as a uvicorn worker runs it: a client sends small chat requests one
after the other and times each; in the "with large prompts" phase, `--senders` other clients
(default 2) send ~50k-token chats seen for the first time (every message new to the token
counter), back to back, at the same time. A middleware that counts those tokens on the event
loop stalls every small request behind them for the whole count (tens of ms); llmfence counts
large uncached prompts in a worker thread, so the small requests wait only for what the large
ones do on the loop (reading and parsing their bodies, which the bare app does too). The table
also gives how many large requests completed and their median latency: what the worker thread
costs them while the loop is busy.

Variants (`_variants.build`): the bare app (its own body parsing is the floor), llmfence on
`MemoryStore`, and the naive middleware (tiktoken on the event loop). Phases and variants are
interleaved round by round; p50/p99 pool every small request of a variant and phase. The large
bodies are built before each phase (a JSON encode of 250 kB would itself stall the loop).

Run: `python benchmarks/bench_fairness.py [--quick] [--json PATH] [--seconds S] [--senders N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _harness import (
    finish,
    fmt_ratio,
    parse_args,
    print_table,
    source_revision,
)
from _variants import BARE, MEMORY, NAIVE, Built, Places, build, machine, new_key
from bench_growth import long_chat
from bench_stack import SMALL, call, chat, make_scope, scenarios

import llmfence

LARGE_TOKENS = 50_000
VARIANTS = (BARE, MEMORY, NAIVE)
TARGET_P99 = 2.0  # llmfence's small-request p99 with large prompts / without, at most


_BASE = long_chat(LARGE_TOKENS, seed=1)
_SERIAL = itertools.count()


def large_bodies(count: int) -> list[bytes]:
    """`count` ~50k-token chats, each of messages no other body (of this process) has."""
    return [
        chat([{**m, "content": f"[conversation {i}] " + m["content"]} for m in _BASE])
        for i in itertools.islice(_SERIAL, count)
    ]


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


async def phase(
    built: Built, seconds: float, large: list[bytes] | None, senders: int
) -> tuple[list[float], list[float]]:
    """Small requests for `seconds` (with `senders` clients sending `large` bodies, if given):
    their latencies in ms, and those of the large requests that completed."""
    small = scenarios()[SMALL]
    serial = itertools.count()
    stop = False
    done_large: list[float] = []
    queue = iter(large or [])

    async def sender() -> None:
        while not stop:
            body = next(queue, None)
            if body is None:
                return
            start = time.perf_counter()
            outcome, _ = await call(built.app, make_scope(body, built.key), body)
            if outcome.status != 200:
                raise RuntimeError(f"large request: status {outcome.status}")
            done_large.append((time.perf_counter() - start) * 1e3)

    tasks = [asyncio.create_task(sender()) for _ in range(senders if large else 0)]
    await asyncio.sleep(0)
    latencies = []
    deadline = time.perf_counter() + seconds
    try:
        while time.perf_counter() < deadline:
            body, _ = small(next(serial))
            scope = make_scope(body, built.key)
            start = time.perf_counter()
            outcome, _ = await call(built.app, scope, body)
            latencies.append((time.perf_counter() - start) * 1e3)
            if outcome.status != 200:
                raise RuntimeError(f"small request: status {outcome.status}")
            # A client over a socket gives the loop a turn between requests; without it, a
            # stack whose awaits never suspend would keep the loop from the other clients.
            await asyncio.sleep(0)
    finally:
        stop = True
        await asyncio.gather(*tasks)
    return latencies, done_large


async def run(settings_quick: bool, rounds: int, seconds: float, senders: int) -> dict[str, Any]:
    key = new_key()
    per_phase_large = max(4, int(seconds * 30)) * senders  # more than they can send
    samples: dict[tuple[str, str], list[float]] = {}
    large_done: dict[str, list[float]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="llmfence-bench-fairness-") as tmp:
        built = {v: await build(v, key, Places(Path(tmp))) for v in VARIANTS}
        try:
            for made in built.values():  # warm-up: imports, caches, first encodes
                await phase(made, 0.05, large_bodies(1), 1)
            for round_ in range(rounds):
                order = list(VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3])
                for variant in order:
                    for mode in ("alone", "with large prompts"):
                        large = None if mode == "alone" else large_bodies(per_phase_large)
                        found, done = await phase(built[variant], seconds, large, senders)
                        samples.setdefault((variant, mode), []).extend(found)
                        large_done[variant].extend(done)
        finally:
            for made in built.values():
                await made.close()
    rows = []
    data: dict[str, Any] = {}
    for variant in VARIANTS:
        alone = samples[(variant, "alone")]
        loaded = samples[(variant, "with large prompts")]
        figures: dict[str, Any] = {
            "small_requests_alone": len(alone),
            "small_requests_with_large": len(loaded),
            "large_requests": len(large_done[variant]),
            "large_p50_ms": percentile(large_done[variant], 0.5) if large_done[variant] else None,
            "p50_alone_ms": percentile(alone, 0.5),
            "p99_alone_ms": percentile(alone, 0.99),
            "p50_with_large_ms": percentile(loaded, 0.5),
            "p99_with_large_ms": percentile(loaded, 0.99),
            "max_with_large_ms": max(loaded),
        }
        figures["p99_ratio"] = figures["p99_with_large_ms"] / figures["p99_alone_ms"]
        data[variant] = figures
        rows.append(
            [
                variant,
                f"{len(alone):,} / {len(loaded):,}",
                f"{len(large_done[variant]):,}",
                f"{figures['large_p50_ms']:.0f}" if large_done[variant] else "—",
                f"{figures['p50_alone_ms']:.2f}",
                f"{figures['p99_alone_ms']:.2f}",
                f"{figures['p50_with_large_ms']:.2f}",
                f"{figures['p99_with_large_ms']:.2f}",
                f"{figures['max_with_large_ms']:.1f}",
                fmt_ratio(figures["p99_ratio"]),
            ]
        )
    print_table(
        f"Small requests alone and while {senders} clients send {LARGE_TOKENS // 1000}k-token "
        f"prompts (ms; {rounds} interleaved rounds of {seconds:g} s per phase)",
        (
            "variant",
            "small requests",
            "large done",
            "large p50 ms",
            "p50 alone",
            "p99 alone",
            "p50 with large",
            "p99 with large",
            "max with large",
            "p99 with / alone",
        ),
        rows,
    )
    measured = data[MEMORY]["p99_ratio"]
    judged = "PASS" if measured <= TARGET_P99 else "MISS"
    print_table(
        "Targets (informational; PASS/MISS is never an exit code)",
        ("target", "measured", "target", "verdict"),
        [
            [
                "llmfence small-request p99, with large prompts / alone",
                fmt_ratio(measured),
                f"≤ {fmt_ratio(TARGET_P99)}",
                judged if not settings_quick else "—",
            ]
        ],
    )
    target = {"target": "p99 with / alone", "measured": measured, "limit": TARGET_P99}
    return {"variants": data, "targets": [{**target, "verdict": judged}], "senders": senders}


def options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per phase")
    parser.add_argument("--senders", type=int, default=2, help="clients sending large prompts")


def main() -> None:
    settings, args = parse_args(__doc__ or "", rounds=5, extra=options)
    started = time.perf_counter()
    seconds = args.seconds or (0.3 if settings.quick else 2.0)
    rounds = 1 if settings.quick else settings.rounds
    print("llmfence benchmark: fairness (small requests beside 50k-token prompts, in process)")
    print(f"llmfence {llmfence.__version__} at {source_revision()}; {machine()}, ", end="")
    print(f"Python {platform.python_version()}")
    payload = asyncio.run(run(settings.quick, rounds, seconds, args.senders))
    finish(
        args.json,
        "bench_fairness",
        started,
        settings.quick,
        {"rounds": rounds, "seconds_per_phase": seconds, **payload},
    )


if __name__ == "__main__":
    main()
