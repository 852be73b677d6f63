from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmfence import _sse, _usage
from llmfence._usage import StreamUsageScanner, Usage, UsageChunkFilter, usage_from_json

DATA = Path(__file__).parent / "data"
ENDINGS = {"lf": b"\n", "crlf": b"\r\n", "cr": b"\r"}


def recorded(name: str, ending: bytes = b"\n") -> bytes:
    # The recordings use LF; their JSON holds no raw line break, so any LF is a line ending.
    return (DATA / name).read_bytes().replace(b"\n", ending)


CHAT = "openai_chat_usage.sse"
CHAT_NO_USAGE = "openai_chat_no_usage.sse"
ANTHROPIC = "anthropic_messages.sse"
RESPONSES = "openai_responses.sse"

EXPECTED = {
    CHAT: Usage(input_tokens=1117, output_tokens=14, cached_input_tokens=1024),
    ANTHROPIC: Usage(
        input_tokens=472 + 2048 + 1024,
        output_tokens=89,
        cached_input_tokens=2048,
        cache_write_tokens=1024,
    ),
    RESPONSES: Usage(input_tokens=3712, output_tokens=9, cached_input_tokens=3584),
    CHAT_NO_USAGE: Usage(output_tokens=49, estimated=True),  # len() of the text below
}
NO_USAGE_TEXT = 'get_weather{"city":"Zürich"}Checking the weather.'
STREAMS = sorted(EXPECTED)


def scan(chunks: Iterable[bytes], count: Callable[[str], int] | None = len) -> Usage:
    scanner = StreamUsageScanner(count)
    for chunk in chunks:
        scanner.feed(chunk)
    return scanner.finish()


def split_at(body: bytes, points: Iterable[int]) -> list[bytes]:
    cuts = [0, *sorted(points), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(cuts)]


def sse(*events: Any, ending: bytes = b"\n") -> bytes:
    """An SSE body: each event is a dict (sent as `data: <json>`) or raw text."""
    out = b""
    for event in events:
        text = event if isinstance(event, str) else "data: " + json.dumps(event)
        out += text.encode().replace(b"\n", ending) + ending * 2
    return out


# --- usage_from_json ---------------------------------------------------------------------------

CHAT_BODY = {
    "id": "chatcmpl-B9MHDbslfkBeAs8l4bebGdFOJ6PeG",
    "object": "chat.completion",
    "created": 1741570283,
    "model": "gpt-4o-2024-08-06",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 1117,
        "completion_tokens": 46,
        "total_tokens": 1163,
        "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    },
    "service_tier": "default",
    "system_fingerprint": "fp_fc9f1d7035",
}
COMPLETIONS_BODY = {
    "id": "cmpl-uqkvlQyYK7bGYrRHQ0eXlWi7",
    "object": "text_completion",
    "created": 1589478378,
    "model": "gpt-3.5-turbo-instruct",
    "choices": [
        {"text": "\n\nThis is a test", "index": 0, "logprobs": None, "finish_reason": "length"}
    ],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
}
EMBEDDINGS_BODY = {
    "object": "list",
    "data": [{"object": "embedding", "embedding": [0.0023064255, -0.009327292], "index": 0}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 8, "total_tokens": 8},
}
RESPONSES_BODY = {
    "id": "resp_67ccd3a9da748190baa7f1570fe91ac604becb25c45c1d41",
    "object": "response",
    "created_at": 1741476777,
    "status": "completed",
    "model": "gpt-4o-2024-08-06",
    "output": [
        {
            "type": "message",
            "id": "msg_67ccd3acc8d48190a77525dc6de64b4104becb25c45c1d41",
            "status": "completed",
            "role": "assistant",
            "content": [
                {"type": "output_text", "text": "In a peaceful grove...", "annotations": []}
            ],
        }
    ],
    "max_output_tokens": None,
    "usage": {
        "input_tokens": 328,
        "input_tokens_details": {"cached_tokens": 256},
        "output_tokens": 52,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 380,
    },
}
ANTHROPIC_BODY = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-20250514",
    "content": [{"type": "text", "text": "Hi! My name is Claude."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 2095,
        "cache_creation_input_tokens": 2051,
        "cache_read_input_tokens": 10240,
        "cache_creation": {"ephemeral_5m_input_tokens": 2051, "ephemeral_1h_input_tokens": 0},
        "output_tokens": 503,
        "service_tier": "standard",
    },
}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (CHAT_BODY, Usage(input_tokens=1117, output_tokens=46, cached_input_tokens=1024)),
        (COMPLETIONS_BODY, Usage(input_tokens=5, output_tokens=7)),
        (EMBEDDINGS_BODY, Usage(input_tokens=8)),
        (RESPONSES_BODY, Usage(input_tokens=328, output_tokens=52, cached_input_tokens=256)),
        (
            ANTHROPIC_BODY,
            Usage(
                input_tokens=2095 + 10240 + 2051,
                output_tokens=503,
                cached_input_tokens=10240,
                cache_write_tokens=2051,
            ),
        ),
        # Anthropic without prompt caching in play.
        ({"type": "message", "usage": {"input_tokens": 12, "output_tokens": 6}}, Usage(12, 6)),
        # A gateway (LiteLLM) reporting an Anthropic call in OpenAI's shape: prompt_tokens is
        # already the total, the cache fields are parts of it.
        (
            {
                "usage": {
                    "prompt_tokens": 3000,
                    "completion_tokens": 10,
                    "cache_read_input_tokens": 2000,
                    "cache_creation_input_tokens": 500,
                }
            },
            Usage(3000, 10, cached_input_tokens=2000, cache_write_tokens=500),
        ),
    ],
    ids=[
        "chat",
        "completions",
        "embeddings",
        "responses",
        "anthropic",
        "anthropic-plain",
        "litellm",
    ],
)
def test_usage_from_json(body: dict[str, Any], expected: Usage) -> None:
    assert usage_from_json(body) == expected
    assert usage_from_json(json.dumps(body).encode()) == expected
    assert usage_from_json(json.dumps(body, indent=2).encode()) == expected


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2]",
        b"null",
        b'"usage"',
        b"{}",
        b'{"usage": null}',
        b'{"usage": "lots"}',
        b'{"usage": []}',
        b'{"usage": {}}',
        b'{"usage": {"total_tokens": 10}}',
        b'{"usage": {"prompt_tokens": true, "completion_tokens": false}}',
        b'{"usage": {"prompt_tokens": -1, "completion_tokens": 1.5}}',
        b'{"usage": {"prompt_tokens": "10", "completion_tokens": null}}',
        b'{"error": {"message": "Rate limit reached", "type": "requests"}}',
        b"[" * 100_000,
        b'{"usage": {"prompt_tokens": 1' + b"0" * 5000 + b"}}",  # beyond int() digit limits
        b"data: {}\n\n",
    ],
)
def test_usage_from_json_garbage(body: bytes) -> None:
    assert usage_from_json(body) is None


def test_usage_from_json_ignores_bad_fields_only() -> None:
    bad = {"usage": {"prompt_tokens": 10, "completion_tokens": -3, "prompt_tokens_details": 7}}
    assert usage_from_json(bad) == Usage(input_tokens=10)
    # A cached count above the total is capped: `cached_input_tokens` is a part of the input.
    over = {"usage": {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 99}}}
    assert usage_from_json(over) == Usage(input_tokens=10, cached_input_tokens=10)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
USAGE_KEYS = st.sampled_from(
    ["prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
     "cache_read_input_tokens", "cache_creation_input_tokens", "prompt_tokens_details",
     "input_tokens_details", "cached_tokens"]
)  # fmt: skip


@given(st.dictionaries(USAGE_KEYS, JSON | st.dictionaries(USAGE_KEYS, JSON)))
def test_usage_from_json_never_raises_on_any_usage_object(usage: dict[str, Any]) -> None:
    result = usage_from_json({"usage": usage})
    assert (
        result is None
        or min(result.input_tokens, result.output_tokens, result.cached_input_tokens) >= 0
    )


@given(st.binary() | JSON.map(lambda value: json.dumps(value).encode()))
def test_usage_from_json_never_raises_on_any_body(body: bytes) -> None:
    usage_from_json(body)


# --- StreamUsageScanner: recorded streams ------------------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_recorded_stream(name: str, ending: str) -> None:
    scanner = StreamUsageScanner(len)
    scanner.feed(recorded(name, ENDINGS[ending]))
    assert scanner.finish() == EXPECTED[name]
    assert scanner.usage_seen is (name != CHAT_NO_USAGE)
    assert scanner.streamed_text() == ("" if scanner.usage_seen else NO_USAGE_TEXT)


def test_estimate_uses_the_given_counter_or_a_crude_default() -> None:
    body = recorded(CHAT_NO_USAGE)
    assert scan([body], None) == Usage(output_tokens=-(-len(NO_USAGE_TEXT) // 4), estimated=True)
    assert scan([body], lambda text: 7) == Usage(output_tokens=7, estimated=True)


def test_anthropic_cut_short_keeps_the_input_and_counts_the_output() -> None:
    # The client went away after a few deltas: message_start told the input, not the output.
    body = recorded(ANTHROPIC)
    body = body[
        : body.index(b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1')
    ]
    scanner = StreamUsageScanner(len)
    scanner.feed(body)
    assert not scanner.usage_seen
    text = "The user wants a greeting.Hello! Grüße 👋 — how can I help?"
    assert scanner.streamed_text() == text
    assert scanner.finish() == Usage(
        input_tokens=3544,
        output_tokens=len(text),
        cached_input_tokens=2048,
        cache_write_tokens=1024,
        estimated=True,
    )
    # A partial report's output count is a floor for the estimate.
    assert scan([body], lambda text: 1).output_tokens == 2


def test_responses_stream_cut_short_counts_the_deltas() -> None:
    body = recorded(RESPONSES)
    body = body[: body.index(b"event: response.completed")]
    assert scan([body]) == Usage(output_tokens=len("Hi there! Ça va 🙂?"), estimated=True)


@pytest.mark.parametrize("kind", ["response.incomplete", "response.failed"])
def test_responses_incomplete_or_failed_report_usage(kind: str) -> None:
    usage = {"input_tokens": 20, "output_tokens": 16, "input_tokens_details": {"cached_tokens": 0}}
    body = sse(
        f'event: {kind}\ndata: {{"type":"{kind}","sequence_number":9,'
        f'"response":{{"status":"incomplete","usage":{json.dumps(usage)}}}}}'
    )
    assert scan([body]) == Usage(20, 16)


def test_legacy_completions_stream_without_usage() -> None:
    chunk = {"id": "cmpl-8", "object": "text_completion", "model": "gpt-3.5-turbo-instruct"}
    body = sse(
        {**chunk, "choices": [{"text": "Once", "index": 0, "finish_reason": None}]},
        {**chunk, "choices": [{"text": " upon", "index": 0, "finish_reason": None}]},
        {**chunk, "choices": [{"text": "", "index": 0, "finish_reason": "length"}]},
        "data: [DONE]",
    )
    assert scan([body]) == Usage(output_tokens=len("Once upon"), estimated=True)


def test_openai_refusal_and_reasoning_deltas_are_counted() -> None:
    body = sse(
        {"choices": [{"index": 0, "delta": {"refusal": "I can't"}}]},
        {"choices": [{"index": 0, "delta": {"reasoning_content": "Hmm"}}]},
        {"choices": [{"index": 0, "delta": {"content": None, "tool_calls": None}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"function": None}, 3]}}]},
        {"choices": [None, {"index": 1, "delta": "text"}]},
    )
    assert scan([body]) == Usage(output_tokens=len("I can'tHmm"), estimated=True)


def test_anthropic_message_delta_updates_input_fields() -> None:
    start = {
        "type": "message_start",
        "message": {
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1}
        },
    }
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"input_tokens": 12, "cache_read_input_tokens": None, "output_tokens": 30},
    }
    body = sse(
        "event: message_start\ndata: " + json.dumps(start),
        "event: message_delta\ndata: " + json.dumps(delta),
    )
    assert scan([body]) == Usage(input_tokens=17, output_tokens=30, cached_input_tokens=5)


def test_stream_with_nothing() -> None:
    assert scan([]) == Usage(estimated=True)
    assert scan([b"", b": keep-alive\n\n", b"data: [DONE]\n\n"]) == Usage(estimated=True)
    assert scan([b'{"error": {"message": "no stream for you"}}']) == Usage(estimated=True)


# --- StreamUsageScanner: SSE syntax ------------------------------------------------------------

USAGE_EVENT = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}


@pytest.mark.parametrize(
    "body",
    [
        b'data:{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n',
        # One JSON document over several data lines, joined with LF.
        b'data: {"choices": [],\ndata: "usage":\ndata:  {"prompt_tokens": 3,\n'
        b'data: "completion_tokens": 4}}\n\n',
        b": this is a comment\nid: 7\nretry: 1000\nevent: chunk\nfoo: bar\n"
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n',
        b'\xef\xbb\xbfdata: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\n',
        # No blank line before the end of the body.
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}',
        # Mixed line endings, and extra blank lines.
        b"\r\n\n: hi\r\ndata: [DONE]\r\r\n\r"
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4}}\n\r\n\n\n',
    ],
)
def test_sse_syntax(body: bytes) -> None:
    assert scan([body]) == Usage(3, 4)
    assert scan([body[i : i + 1] for i in range(len(body))]) == Usage(3, 4)


def test_garbage_events_are_skipped() -> None:
    events = [
        b'data: {"choices":[],"usage":{"prompt_tokens":3,',  # cut short
        b'data: [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[_tokens"',
        b"data: " + b"[" * 100_000 + b'"_tokens"',  # too deep for json
        b'data: {"choices":[{"delta":{"content":"ok"}}]}',
        b'data: {"usage":{"prompt_tokens":true,"output_tokens":"5"}}',
        b'data: \xff\xfe{"_tokens"',  # not UTF-8
    ]
    assert scan([b"\n\n".join(events)]) == Usage(output_tokens=2, estimated=True)


def test_usage_null_everywhere_is_no_usage() -> None:
    body = recorded(CHAT)
    body = body[: body.rindex(b"data: ", 0, body.index(b'"choices":[]'))]
    assert b'"usage":null' in body
    text = "Café au lait ☕ is naïve — 日本語 too! 🎉"
    assert scan([body]) == Usage(output_tokens=len(text), estimated=True)


def test_text_kept_for_an_estimate_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_usage, "_MAX_RAW", 1000)
    monkeypatch.setattr(_usage, "_MAX_PENDING", 500)
    event = sse({"choices": [{"index": 0, "delta": {"content": "abc"}}]})
    scanner = StreamUsageScanner(len)
    for _ in range(500):
        scanner.feed(event)
        assert scanner._pending_size <= 500
        assert scanner._raw_size <= 1000 + 500 + len(event)
    assert scanner.finish() == Usage(output_tokens=1500, estimated=True)


def test_an_endless_event_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sse, "_MAX_EVENT", 10_000)
    monkeypatch.setattr(_usage, "_MAX_PENDING", 3000)
    scanner = StreamUsageScanner()
    scanner.feed(b"data: ")
    for _ in range(100):
        scanner.feed(b"x" * 1000)
        assert scanner._tail_size <= 10_000
        assert scanner._pending_size <= 3000
    scanner.feed(b"\n\n" + sse(USAGE_EVENT))
    assert scanner.finish() == Usage(3, 4)


def test_a_large_event_in_tiny_chunks_is_linear() -> None:
    # 400 KB in 1-byte chunks: quadratic rescanning would take minutes (and hit the timeout).
    text = "x" * 400_000
    completed = {"type": "response.completed", "response": {"output_text": text, **RESPONSES_BODY}}
    for ending in (b"\n", b"\r\n"):
        body = sse("event: response.completed\ndata: " + json.dumps(completed), ending=ending)
        assert scan(body[i : i + 1] for i in range(len(body))) == Usage(328, 52, 256)


# --- StreamUsageScanner: any split gives the same usage ----------------------------------------


def recorded_streams() -> Iterator[tuple[str, bytes]]:
    for name in STREAMS:
        for ending in ENDINGS.values():
            yield name, recorded(name, ending)


@pytest.mark.parametrize(("name", "body"), list(recorded_streams()))
def test_every_single_split_point(name: str, body: bytes) -> None:
    expected = EXPECTED[name]
    for i in range(len(body) + 1):
        assert scan([body[:i], body[i:]]) == expected, i


@pytest.mark.parametrize(("name", "body"), list(recorded_streams()))
def test_one_byte_chunks(name: str, body: bytes) -> None:
    assert scan([body[i : i + 1] for i in range(len(body))]) == EXPECTED[name]


@settings(max_examples=300)
@given(st.sampled_from(list(recorded_streams())), st.data())
def test_any_chunking(stream: tuple[str, bytes], data: st.DataObject) -> None:
    name, body = stream
    points = data.draw(st.sets(st.integers(0, len(body)), max_size=40))
    assert scan(split_at(body, points)) == EXPECTED[name]


@settings(max_examples=200)
@given(st.sampled_from(STREAMS), st.data())
def test_mixed_line_endings(name: str, data: st.DataObject) -> None:
    lines = recorded(name).split(b"\n")
    endings = data.draw(st.lists(st.sampled_from(list(ENDINGS.values())), min_size=len(lines)))
    body = b""
    previous = b""
    for line, ending in zip(lines, endings, strict=False):
        if previous == b"\r" and not line and ending == b"\n":
            ending = b"\r\n"  # CR then LF would be one line ending, not two
        body += line + ending
        previous = ending
    points = data.draw(st.sets(st.integers(0, len(body)), max_size=20))
    assert scan(split_at(body, points)) == EXPECTED[name]


def reference_events(body: bytes, *, complete_only: bool = False) -> list[list[bytes]]:
    """The non-empty events of an SSE body, by the spec, unterminated last one included."""
    events: list[list[bytes]] = []
    lines: list[bytes] = []
    *terminated, unterminated = re.split(rb"\r\n|\r|\n", body)
    for line in terminated:
        if line:
            lines.append(line)
        elif lines:
            events.append(lines)
            lines = []
    if complete_only:
        return events
    lines += [unterminated] if unterminated else []
    return [*events, lines] if lines else events


@settings(max_examples=500)
@given(
    st.binary(max_size=60).map(lambda raw: bytes(b"\r\nab"[byte % 4] for byte in raw)), st.data()
)
def test_framing_matches_the_spec_for_any_split(body: bytes, data: st.DataObject) -> None:
    # Whatever the chunks, the complete regions cut the body into the spec's events, and a CR
    # at a chunk's end never gets split from its LF.
    framer = _sse.SSEFramer()
    events: list[list[bytes]] = []
    regions = []
    for chunk in split_at(body, data.draw(st.sets(st.integers(0, len(body))))):
        regions.append(framer._push(chunk))
        # Only an incomplete event is held back (and a final CR, which may start a CRLF).
        held = b"".join(framer._tail)
        assert reference_events(held.removesuffix(b"\r"), complete_only=True) == []
    regions.append(framer._take_tail())
    assert b"".join(regions) == body
    for region in regions:
        events += reference_events(region)
    assert events == reference_events(body)


@pytest.mark.parametrize(
    ("chunks", "regions"),
    [
        ([b"a\n\nb\n", b"\nc"], [b"a\n\n", b"b\n\n"]),  # a boundary across chunks
        ([b"a\r\n\r\nb\r\rc"], [b"a\r\n\r\nb\r\r"]),  # CR CR after a CRLF boundary
        ([b"a\r\n\r\n\r\nb"], [b"a\r\n\r\n\r\n"]),  # a run of blank lines is one cut
        ([b"a\r\n\r", b"\nb"], [b"", b"a\r\n\r\n"]),  # a final CR waits for its LF
        ([b"a\r\n\r", b"b"], [b"", b"a\r\n\r"]),
        ([b"a\n", b"\r", b"\n", b"b"], [b"", b"", b"a\n\r\n", b""]),
    ],
)
def test_framing_cuts(chunks: list[bytes], regions: list[bytes]) -> None:
    framer = _sse.SSEFramer()
    assert [framer._push(chunk) for chunk in chunks] == regions


@settings(max_examples=300)
@given(st.lists(st.sampled_from([b"\n", b"\r", b"x", b'_tokens"', b"data: "]), max_size=30))
def test_events_with_a_needle_are_the_events_that_hold_it(pieces: list[bytes]) -> None:
    done = b"".join(pieces)
    wanted = [event for event in _sse.events(done) if b'_tokens"' in event]
    found = _sse.events_with(done, b'_tokens"')
    # The same events, give or take blank lines at their start, which carry no field.
    assert [event.lstrip(b"\n") for event in found] == [event.lstrip(b"\n") for event in wanted]
    assert [_sse.event_data(event) for event in found] == [
        _sse.event_data(event) for event in wanted
    ]


@settings(max_examples=200)
@given(st.sampled_from(list(recorded_streams())), st.data())
def test_framing_many_chunks_at_once_reads_the_same(
    stream: tuple[str, bytes], data: st.DataObject
) -> None:
    # The scanner frames its chunks in batches; at any point, what it reports is what framing
    # every chunk as it comes would report.
    _, body = stream
    chunks = split_at(body, data.draw(st.sets(st.integers(0, len(body)), max_size=30)))
    batched, eager = StreamUsageScanner(len), StreamUsageScanner(len)
    for chunk in chunks:
        batched.feed(chunk)
        eager.feed(chunk)
        eager._frame()
        if data.draw(st.booleans()):
            assert batched.usage_seen == eager.usage_seen
            assert batched.streamed_text() == eager.streamed_text()
    assert batched.finish() == eager.finish()


def test_the_scanner_frames_when_asked_or_when_enough_is_pending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_usage, "_MAX_PENDING", 100)
    body = recorded(CHAT)
    usage_at = body.index(b'"choices":[]')
    scanner = StreamUsageScanner(len)
    scanner.feed(body[:50])
    assert scanner._pending_size == 50
    assert scanner.streamed_text() == ""
    assert scanner._pending_size == 0
    seen = []
    scanner.feed(body[50:usage_at])
    assert scanner._pending_size == 0  # over the bound: framed at once
    seen.append(scanner.usage_seen)
    scanner.feed(body[usage_at:])
    seen.append(scanner.usage_seen)
    assert seen == [False, True]
    assert scanner.finish() == EXPECTED[CHAT]


SSE_PIECES = [
    b"data:", b" ", b"\n", b"\r", b"{", b"}", b",", b'"_tokens"', b'{"usage":{"output_tokens":1',
    b"2}}", b'"choices":[{"text":"x"}]', b"event: message_start", b'"type":"message_start"',
]  # fmt: skip


@settings(max_examples=300)
@given(st.lists(st.sampled_from(SSE_PIECES), max_size=40).map(b"".join), st.data())
def test_garbage_streams_never_raise_and_split_invariant(body: bytes, data: st.DataObject) -> None:
    points = data.draw(st.sets(st.integers(0, len(body)), max_size=10))
    assert scan(split_at(body, points)) == scan([body])


# --- UsageChunkFilter --------------------------------------------------------------------------


def without_usage_chunk(body: bytes, ending: bytes) -> bytes:
    events = body.split(ending * 2)
    kept = [event for event in events if b'"choices":[],"usage":{' not in event]
    assert len(kept) == len(events) - 1
    return (ending * 2).join(kept)


def run_filter(chunks: Iterable[bytes]) -> tuple[bytes, bool]:
    usage_filter = UsageChunkFilter()
    out = b"".join(usage_filter.feed(chunk) for chunk in chunks) + usage_filter.finish()
    return out, usage_filter.stripped


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_filter_removes_exactly_the_usage_chunk(ending: str) -> None:
    body = recorded(CHAT, ENDINGS[ending])
    expected = without_usage_chunk(body, ENDINGS[ending])
    assert run_filter([body]) == (expected, True)
    for i in range(len(body) + 1):
        assert run_filter([body[:i], body[i:]]) == (expected, True), i
    assert run_filter(body[i : i + 1] for i in range(len(body))) == (expected, True)


@pytest.mark.parametrize("name", [CHAT_NO_USAGE, ANTHROPIC, RESPONSES])
def test_filter_passes_other_streams_untouched(name: str) -> None:
    body = recorded(name)
    assert run_filter([body]) == (body, False)
    assert run_filter(body[i : i + 7] for i in range(0, len(body), 7)) == (body, False)


def test_filter_keeps_usage_in_a_chunk_with_choices() -> None:
    # Some servers put usage on the last content chunk: that one is content, it stays.
    body = sse(
        {"choices": [{"index": 0, "delta": {"content": "hi"}}], "usage": USAGE_EVENT["usage"]}
    )
    assert run_filter([body]) == (body, False)


@settings(max_examples=300)
@given(st.sampled_from(sorted(ENDINGS)), st.data())
def test_filter_any_chunking(ending: str, data: st.DataObject) -> None:
    body = recorded(CHAT, ENDINGS[ending])
    points = data.draw(st.sets(st.integers(0, len(body)), max_size=40))
    assert run_filter(split_at(body, points)) == (without_usage_chunk(body, ENDINGS[ending]), True)


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_filter_takes_a_whole_long_stream_in_one_chunk(ending: str) -> None:
    # A transport that buffers (httpx's ASGITransport, a proxy) hands over the stream at once:
    # only the events holding the marker are looked at, so 20k events cost 20k, not 20k².
    blank = ENDINGS[ending] * 2
    content = [
        f'data: {{"choices":[{{"index":0,"delta":{{"content":"w{i}"}}}}]}}'.encode()
        for i in range(20_000)
    ]
    decoy = b'data: {"choices":[{"index":0,"delta":{"content":"prompt_tokens\\""}}]}'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":20001}}'
    events = [*content[:10_000], decoy, *content[10_000:], usage, b"data: [DONE]"]
    body = blank.join(events) + blank
    kept = [event for event in events if event != usage]
    assert run_filter([body]) == (blank.join(kept) + blank, True)


def test_filter_holds_back_only_the_incomplete_event() -> None:
    body = recorded(CHAT)
    events = [event + b"\n\n" for event in body.split(b"\n\n")[:-1]]
    usage_filter = UsageChunkFilter()
    for event in events[:3]:
        assert usage_filter.feed(event) == event  # whole events go straight through
    assert usage_filter.feed(events[3][:50]) == b""
    assert usage_filter.feed(events[3][50:] + events[4][:10]) == events[3]
    assert usage_filter.finish() == events[4][:10]


@pytest.mark.parametrize("name", STREAMS)
def test_filter_feeds_a_scanner(name: str) -> None:
    body = recorded(name, b"\r\n")
    scanner = StreamUsageScanner(len)
    usage_filter = UsageChunkFilter(scanner)
    for i in range(0, len(body), 13):
        usage_filter.feed(body[i : i + 13])
    usage_filter.finish()
    assert scanner.finish() == EXPECTED[name]
