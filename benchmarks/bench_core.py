"""The LLM core on the hot path: parsing a body, counting its tokens, pricing it, scanning SSE.

Measures µs per `parse_request` (a small chat and a ~4k-token, 20-turn chat), per
`TokenCounter.count` at first sight and for a resent history (the per-message cache), per
`PriceBook.cost` / `projected` on a cache hit, and per 200-byte SSE chunk through
`StreamUsageScanner` and `UsageChunkFilter`. The cache's worth is printed as a ratio measured in
the same run (resent / first sight), because absolute µs on a shared 2-core machine drift from
run to run while ratios between interleaved batches hold; the absolute targets are printed
beside the measurements as PASS/MISS, for information only.

Run: `python benchmarks/bench_core.py [--quick]`.
"""

from __future__ import annotations

import json
import time

from _harness import (
    Batch,
    Settings,
    Stats,
    fmt_us,
    history,
    parse_settings,
    print_table,
    run_rounds,
    timed,
    verdict,
)

import llmfence
from llmfence import (
    PriceBook,
    StreamUsageScanner,
    TokenCounter,
    Usage,
    UsageChunkFilter,
    parse_request,
)

PATH = "/v1/chat/completions"
MODEL = "gpt-4o-mini"
CHUNK = 200
TARGET_RESENT = 0.20  # resent / first sight
TARGET_PRICE_US = 5.0
TARGET_CHUNK_US = 1.0
TABLE_HEADER = ("measurement", "µs median", "µs best", "target", "verdict")


def chat_body(messages: list[dict[str, str]], **extra: object) -> bytes:
    """A chat completions body as a client sends it."""
    return json.dumps({"model": MODEL, "messages": messages, **extra}).encode()


SMALL = chat_body(
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hey, how's it going? Can you summarise my last invoice?"},
    ],
    max_tokens=256,
    user="alice",
)


# -- parse_request ---------------------------------------------------------------------------


def parse_cases(large: bytes) -> dict[str, Batch]:
    return {
        "small": lambda n: timed(lambda: parse_request(SMALL, PATH), n),
        "large": lambda n: timed(lambda: parse_request(large, PATH), n),
    }


# -- TokenCounter ----------------------------------------------------------------------------


def resend(base: list[dict[str, str]], i: int) -> llmfence.LLMRequest:
    """The history plus one new short user message, parsed from bytes as a server would."""
    messages = [*base, {"role": "user", "content": f"And what about item {i}? Be brief."}]
    return parse_request(chat_body(messages), PATH)


def count_cases(base: list[dict[str, str]]) -> dict[str, Batch]:
    serial = iter(range(10**12))
    warm = TokenCounter()
    warm.count(resend(base, -1))

    def first_sight(n: int) -> float:
        # A fresh counter per call: nothing of the request is cached.
        work = [(TokenCounter(), resend(base, next(serial))) for _ in range(n)]
        start = time.perf_counter()
        for counter, request in work:
            counter.count(request)
        return time.perf_counter() - start

    def resent(n: int) -> float:
        # One counter that saw the history: only the new message is encoded.
        requests = [resend(base, next(serial)) for _ in range(n)]
        start = time.perf_counter()
        for request in requests:
            warm.count(request)
        return time.perf_counter() - start

    return {"first": first_sight, "resent": resent}


# -- pricing ---------------------------------------------------------------------------------


def price_cases() -> dict[str, Batch]:
    book = PriceBook()
    usage = Usage(input_tokens=1_234, output_tokens=321, cached_input_tokens=1_024)
    book.cost(MODEL, usage)  # resolved once; what follows are cache hits

    def cold(n: int) -> float:
        books = [PriceBook() for _ in range(n)]
        start = time.perf_counter()
        for fresh in books:
            fresh.cost(MODEL, usage)
        return time.perf_counter() - start

    return {
        "cost": lambda n: timed(lambda: book.cost(MODEL, usage), n),
        "projected": lambda n: timed(lambda: book.projected(MODEL, 1_234, 4_096), n),
        "cold": cold,
    }


# -- SSE -------------------------------------------------------------------------------------


def openai_stream(deltas: list[str], *, include_usage: bool) -> bytes:
    """An OpenAI chat completions stream, byte for byte as the API sends it."""
    head = {
        "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
        "object": "chat.completion.chunk",
        "created": 1_741_569_952,
        "model": "gpt-4o-mini-2024-07-18",
        "service_tier": "default",
        "system_fingerprint": "fp_06737a9306",
    }
    tail = {"usage": None} if include_usage else {}

    def event(delta: dict[str, object], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        payload = {**head, "choices": [choice], **tail}
        return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    events = [event({"role": "assistant", "content": "", "refusal": None})]
    events += [event({"content": d}) for d in deltas]
    events.append(event({}, "stop"))
    if include_usage:
        usage = {
            "prompt_tokens": 4_038,
            "completion_tokens": len(deltas),
            "total_tokens": 4_038 + len(deltas),
            "prompt_tokens_details": {"cached_tokens": 3_968, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
        payload = {**head, "choices": [], "usage": usage}
        events.append(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return b"".join(events)


def rechunk(stream: bytes, size: int = CHUNK) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def sse_cases(deltas: list[str]) -> tuple[dict[str, Batch], dict[str, int]]:
    """Batches that each process `n` whole streams; the second dict gives chunks per stream."""
    with_usage = rechunk(openai_stream(deltas, include_usage=True))
    without = rechunk(openai_stream(deltas, include_usage=False))
    counter = TokenCounter()

    def scanner(n: int) -> float:
        elapsed = 0.0
        for _ in range(n):
            scan = StreamUsageScanner()
            start = time.perf_counter()
            for chunk in with_usage:
                scan.feed(chunk)
            elapsed += time.perf_counter() - start
            if not scan.finish().input_tokens:
                raise RuntimeError("the scanner missed the usage chunk")
        return elapsed

    def filtered(n: int) -> float:
        elapsed = 0.0
        for _ in range(n):
            scan = StreamUsageScanner()
            strip = UsageChunkFilter(scan)
            start = time.perf_counter()
            for chunk in with_usage:
                strip.feed(chunk)
            strip.finish()
            elapsed += time.perf_counter() - start
            if not (strip.stripped and scan.finish().input_tokens):
                raise RuntimeError("the filter missed the usage chunk")
        return elapsed

    def estimated(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            scan = StreamUsageScanner(lambda s: counter.count_text(s, MODEL))
            for chunk in without:
                scan.feed(chunk)
            scan.finish()
        return time.perf_counter() - start

    chunks = {"scanner": len(with_usage), "filtered": len(with_usage), "estimated": len(without)}
    return {"scanner": scanner, "filtered": filtered, "estimated": estimated}, chunks


def main() -> None:
    settings: Settings = parse_settings(__doc__ or "")
    started = time.perf_counter()
    base = history(20)
    large = chat_body(base)
    deltas = [" " + w for w in json.loads(large)["messages"][2]["content"].split()] * 4
    deltas = deltas[:400]

    print("llmfence benchmark: core (parse, tokens, prices, SSE)")
    print(f"llmfence {llmfence.__version__}; model {MODEL}; {settings.rounds} rounds per case")

    parsed = run_rounds(parse_cases(large), settings)
    counts = run_rounds(count_cases(base), settings, max_batch=2_000)
    prices = run_rounds(price_cases(), settings, max_batch=20_000)
    streams, chunks = sse_cases(deltas)
    scans = run_rounds(streams, settings)

    def row(label: str, stats: Stats, target: float | None = None, per: int = 1) -> list[str]:
        median, best = stats.median / per, stats.best / per
        if target is None:
            return [label, fmt_us(median), fmt_us(best), "", ""]
        return [label, fmt_us(median), fmt_us(best), f"≤ {target:g} µs", verdict(median, target)]

    tokens = TokenCounter().count(parse_request(large, PATH))
    print_table(
        "parse_request(body, path)",
        TABLE_HEADER,
        [
            row(f"small chat body ({len(SMALL)} B)", parsed["small"]),
            row(f"20-turn chat body ({len(large):,} B, {tokens:,} tokens)", parsed["large"]),
        ],
    )

    ratio = counts["resent"].median / counts["first"].median
    rows = [
        row(f"first sight: 20 turns + 1 new message ({tokens:,} tokens)", counts["first"]),
        row("resent: 20 turns cached + 1 new message", counts["resent"]),
        [
            "ratio resent / first sight",
            f"{ratio:.1%}",
            f"{counts['resent'].best / counts['first'].best:.1%}",
            f"≤ {TARGET_RESENT:.0%}",
            verdict(ratio, TARGET_RESENT),
        ],
    ]
    print_table("TokenCounter().count(request)", TABLE_HEADER, rows)

    print_table(
        f"PriceBook ({MODEL})",
        TABLE_HEADER,
        [
            row("cost(model, Usage(...)), cache hit", prices["cost"], TARGET_PRICE_US),
            row("projected(model, 1234, 4096), cache hit", prices["projected"]),
            row("cost on a fresh PriceBook (first resolve)", prices["cold"]),
        ],
    )

    per = chunks["scanner"]
    print_table(
        f"SSE, per {CHUNK}-byte chunk (OpenAI chat stream, {len(deltas)} deltas, {per} chunks)",
        TABLE_HEADER,
        [
            row("StreamUsageScanner().feed(chunk)", scans["scanner"], TARGET_CHUNK_US, per),
            row("UsageChunkFilter(scanner).feed(chunk)", scans["filtered"], None, per),
            row(
                "no usage chunk: feed + finish (tiktoken estimate), amortized",
                scans["estimated"],
                None,
                chunks["estimated"],
            ),
        ],
    )
    print(f"done in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
