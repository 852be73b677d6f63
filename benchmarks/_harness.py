"""What the benchmark scripts share: options, batched timing, tables and chat workloads.

A measurement runs an operation in batches; each batch is timed with `time.perf_counter` and
gives one µs-per-operation sample. Batches of every case in a comparison are interleaved round
by round (the order rotating), so machine noise (2 shared cores) lands on all of them alike and
the ratios between them stay meaningful even when the absolute numbers drift.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

__all__ = [
    "AsyncBatch",
    "Batch",
    "Settings",
    "Stats",
    "arun_rounds",
    "canned_llm_app",
    "finish",
    "fmt_ratio",
    "fmt_us",
    "history",
    "machine",
    "parse_args",
    "parse_settings",
    "print_table",
    "run_rounds",
    "source_revision",
    "text",
    "timed",
    "verdict",
    "write_json",
]

Batch = Callable[[int], float]
"""Runs an operation `n` times and returns the seconds the timed part took."""

AsyncBatch = Callable[[int], Awaitable[float]]
"""`Batch` for coroutines, awaited in the caller's event loop."""


@dataclass(frozen=True, slots=True)
class Settings:
    """How long to measure.

    Attributes:
        quick: `--quick`: a few seconds in all, for the smoke test; numbers are rough.
        rounds: Batches timed per case; the median of them is reported.
        batch_seconds: What one batch should take; sets the operations per batch.
    """

    quick: bool
    rounds: int
    batch_seconds: float


@dataclass(frozen=True, slots=True)
class Stats:
    """µs per operation over the rounds of one case."""

    median: float
    best: float
    n: int
    """Operations per batch."""

    @property
    def per_second(self) -> float:
        """Operations per second at the median."""
        return 1e6 / self.median if self.median > 0 else float("inf")


def parse_settings(description: str, *, rounds: int = 15, batch_seconds: float = 0.05) -> Settings:
    """Parse the command line every script accepts (`--quick`, `--rounds`)."""
    return parse_args(description, rounds=rounds, batch_seconds=batch_seconds)[0]


def parse_args(
    description: str,
    *,
    rounds: int = 15,
    batch_seconds: float = 0.05,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Settings, argparse.Namespace]:
    """`parse_settings` for a script with options of its own, added by `extra`.

    Returns:
        The settings, and every parsed option (the script's own ones included).
    """
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a few seconds, rough numbers")
    parser.add_argument("--rounds", type=int, default=None, help="batches timed per case")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.quick:
        return Settings(True, args.rounds or 3, batch_seconds / 10), args
    return Settings(False, args.rounds or rounds, batch_seconds), args


def _calibrate(elapsed: float, n: int, target: float, cap: int) -> int:
    """Operations per batch so that a batch takes about `target` seconds."""
    per_op = max(elapsed / n, 1e-9)
    return max(1, min(cap, round(target / per_op)))


def _stats(samples: Sequence[float], n: int) -> Stats:
    return Stats(statistics.median(samples), min(samples), n)


def run_rounds(
    cases: Mapping[str, Batch], settings: Settings, *, max_batch: int = 1_000_000
) -> dict[str, Stats]:
    """Time every case: calibrate once, then `settings.rounds` interleaved batches each.

    Args:
        cases: Batch functions by name.
        settings: Rounds and batch length.
        max_batch: Upper bound on operations per batch (e.g. for inputs built per batch).

    Returns:
        µs-per-operation statistics by case name, in the order of `cases`.
    """
    names = list(cases)
    sizes: dict[str, int] = {}
    for name in names:
        batch = cases[name]
        batch(1)  # warm up: first-use costs (imports, caches, lazy setup) are not measured
        n = 1
        while True:
            elapsed = batch(n)
            if elapsed >= settings.batch_seconds / 5 or n >= max_batch:
                break
            n = min(max_batch, n * 4)
        sizes[name] = _calibrate(elapsed, n, settings.batch_seconds, max_batch)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(settings.rounds):
        gc.collect()
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            n = sizes[name]
            samples[name].append(cases[name](n) / n * 1e6)
    return {name: _stats(samples[name], sizes[name]) for name in names}


async def arun_rounds(
    cases: Mapping[str, AsyncBatch], settings: Settings, *, max_batch: int = 1_000_000
) -> dict[str, Stats]:
    """`run_rounds` for coroutine batches, in the running event loop."""
    names = list(cases)
    sizes: dict[str, int] = {}
    for name in names:
        batch = cases[name]
        await batch(1)
        n = 1
        while True:
            elapsed = await batch(n)
            if elapsed >= settings.batch_seconds / 5 or n >= max_batch:
                break
            n = min(max_batch, n * 4)
        sizes[name] = _calibrate(elapsed, n, settings.batch_seconds, max_batch)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(settings.rounds):
        gc.collect()
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            n = sizes[name]
            samples[name].append(await cases[name](n) / n * 1e6)
    return {name: _stats(samples[name], sizes[name]) for name in names}


def timed(operation: Callable[[], object], n: int) -> float:
    """Seconds for `n` calls of `operation` (a `Batch` for operations that need no input)."""
    start = time.perf_counter()
    for _ in range(n):
        operation()
    return time.perf_counter() - start


def fmt_us(value: float) -> str:
    """µs with sensible precision."""
    if value < 10:
        return f"{value:.2f}"
    if value < 1000:
        return f"{value:.1f}"
    return f"{value:,.0f}"


def fmt_ratio(value: float) -> str:
    """A ratio as `×` below 10, else rounded."""
    return f"{value:.2f}×" if value < 10 else f"{value:.0f}×"


def verdict(measured: float, target: float, *, at_least: bool = False) -> str:
    """`PASS` when `measured <= target` (`>=` with `at_least`), else `MISS` (informational,
    never an exit code)."""
    met = measured >= target if at_least else measured <= target
    return "PASS" if met else "MISS"


def source_revision() -> str:
    """Which llmfence the numbers are of: the short commit of the git tree it is imported
    from, `+dirty` when that tree's `src/` has uncommitted changes, else `unknown`."""
    import llmfence

    root = Path(llmfence.__file__).resolve().parents[2]
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return f"unknown ({root})"
    return f"{commit}+dirty" if dirty else commit


def write_json(path: str | Path, payload: Mapping[str, Any]) -> None:
    """Write results as indented JSON (for `--json PATH`)."""
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")


def machine() -> str:
    """The machine, as the tables name it."""
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs visible"


def finish(
    path: str | None, benchmark: str, started: float, quick: bool, payload: Mapping[str, Any]
) -> None:
    """Print how long the script took; with `path` (`--json`), write `payload` there, after
    what every script's JSON says first (which script, llmfence's version and commit, Python,
    the machine, whether `--quick`)."""
    import llmfence

    elapsed = time.perf_counter() - started
    print(f"done in {elapsed:.1f} s")
    if path:
        head = {
            "benchmark": benchmark,
            "llmfence": llmfence.__version__,
            "revision": source_revision(),
            "python": platform.python_version(),
            "machine": machine(),
            "quick": quick,
        }
        write_json(path, {**head, **payload, "seconds": elapsed})
        print(f"results written to {path}")


def print_table(
    title: str, header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1
) -> None:
    """Print a markdown-style table: the first `left` columns left-aligned, the others right."""
    widths = [
        max(len(header[i]), *(len(row[i]) for row in rows)) if rows else len(header[i])
        for i in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "| " + " | ".join(parts) + " |"

    print(f"\n### {title}\n")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


# -- workloads -------------------------------------------------------------------------------

_VOCABULARY = (
    "the a of to and in is it that for on with as be this are by an at from or can will we "
    "model request token budget limit user key team stream usage price cost window lease "
    "reservation settle admit store redis memory middleware starlette gateway proxy provider "
    "completion prompt message system assistant function tool schema json response chunk event "
    "latency throughput concurrency minute second period reset spend record header error retry "
    "please explain how why what when which could would should summary example detail result "
    "python async await scope receive send body bytes encode decode count cache hit miss "
    "deployment region quota invoice account dashboard report metric alert incident review"
)
_WORDS = _VOCABULARY.split()


def text(rng: random.Random, words: int) -> str:
    """Plausible English-ish text: `words` words with punctuation, about 1.2 tokens a word."""
    out = []
    for i in range(words):
        word = rng.choice(_WORDS)
        out.append(word.capitalize() if i % 12 == 0 else word)
        if i % 12 == 11:
            out[-1] += "."
        elif i % 7 == 6:
            out[-1] += ","
    return " ".join(out)


def history(turns: int = 20, *, tag: str = "", seed: int = 0) -> list[dict[str, str]]:
    """A chat: a system prompt, then `turns` user/assistant pairs (~4k tokens for 20 turns).

    Args:
        turns: User/assistant pairs.
        tag: Put in front of every message's content, so that a new tag makes every message
            new to a token counter's cache.
        seed: Seed of the text.
    """
    rng = random.Random(seed)
    messages = [
        {"role": "system", "content": tag + "You are a helpful assistant. " + text(rng, 40)}
    ]
    for _ in range(turns):
        messages.append({"role": "user", "content": tag + text(rng, 35)})
        messages.append({"role": "assistant", "content": tag + text(rng, 120)})
    return messages


def canned_llm_app(
    reply: str, *, reply_tokens: int, chunks: int, paths: Sequence[str] = ("/v1/chat/completions",)
) -> Starlette:
    """An OpenAI chat upstream that costs next to nothing: the yardstick the stack is held to.

    Every answer is prebuilt at startup: a JSON completion with `reply`, or a stream of
    `reply` cut into `chunks` SSE events (plus the usage event when the body asks for
    `stream_options.include_usage`, and `[DONE]`). Per request it only reads and parses the
    body and fills in the usage: prompt tokens by a cheap character estimate, completion tokens
    `reply_tokens` (cut to the body's `max_tokens`). `llmfence.testing.mock_llm_app` instead
    tokenizes the reply and JSON-encodes every event per request, which is most of its time
    and would hide the stack's own cost in a ratio to it.
    """
    cuts = [len(reply) * i // chunks for i in range(chunks + 1)]
    pieces = [reply[start:end] for start, end in itertools.pairwise(cuts)]
    head = {"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0}

    def event(data: Mapping[str, Any] | str) -> bytes:
        payload = data if isinstance(data, str) else json.dumps(data)
        return f"data: {payload}\n\n".encode()

    events = [
        event({**head, "choices": [{"index": 0, "delta": {"content": p}}], "usage": None})
        for p in pieces
    ]
    done = event("[DONE]")
    choice = json.dumps(
        {"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}
    ).encode()

    async def handle(request: Request) -> Response:
        raw = await request.body()
        body = json.loads(raw)
        prompt = 3 + len(raw) // 4
        output = min(reply_tokens, body.get("max_tokens") or reply_tokens)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": output,
            "total_tokens": prompt + output,
        }
        model = json.dumps(body.get("model", "")).encode()
        if not body.get("stream"):
            content = (
                b'{"id":"chatcmpl-mock","object":"chat.completion","created":0,"model":%s,'
                b'"choices":[%s],"usage":%s}' % (model, choice, json.dumps(usage).encode())
            )
            return Response(content, media_type="application/json")
        tail = [done]
        if (body.get("stream_options") or {}).get("include_usage"):
            tail.insert(0, event({**head, "choices": [], "usage": usage}))

        async def stream() -> AsyncIterator[bytes]:
            for item in events:
                yield item
            for item in tail:
                yield item

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route(path, handle, methods=["POST"]) for path in paths])
