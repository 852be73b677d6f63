"""Usage reported by an LLM response: from JSON bodies and, incrementally, from SSE streams.

Providers report usage in three shapes, all normalized into `Usage`:

- OpenAI chat/completions/embeddings: `prompt_tokens` (cached ones included),
  `completion_tokens`, `prompt_tokens_details.cached_tokens`.
- OpenAI Responses: `input_tokens` (cached ones included), `output_tokens`,
  `input_tokens_details.cached_tokens`.
- Anthropic messages: `input_tokens` *without* the cache, plus `cache_read_input_tokens` and
  `cache_creation_input_tokens`, and `output_tokens`.

Streams are scanned by `StreamUsageScanner`, which runs on every body chunk a proxy forwards, so
its `feed` only frames events with `bytes` searches and parses nothing but the rare events that
may carry usage; text deltas are kept raw and parsed only if the stream ends without usage.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

__all__ = ["StreamUsageScanner", "Usage", "UsageChunkFilter", "usage_from_json"]


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage of one LLM call, normalized across providers.

    Attributes:
        input_tokens: Every prompt token, cached ones included.
        output_tokens: Completion tokens (reasoning tokens included).
        cached_input_tokens: Part of `input_tokens` read from the provider's prompt cache.
        cache_write_tokens: Part of `input_tokens` written to the prompt cache (Anthropic).
        estimated: True when llmfence counted the tokens itself instead of reading the
            provider's report.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    estimated: bool = False


# Every usage object of every provider has a key ending in `_tokens`, and inside a JSON string a
# quote is escaped, so only events with this marker can carry usage: the others are not parsed.
_MARK = b'_tokens"'
# A blank line ends an SSE event; a line ends with CRLF, LF or CR, and a CR followed by LF is
# one line ending, never two. Any two line endings in a row contain one of these.
_TWO_ENDINGS = (b"\n\n", b"\r\r", b"\n\r")
# Raw delta events kept for an estimate are parsed into text beyond this size, to bound memory.
_MAX_RAW = 4 << 20
# An event larger than this (no blank line in sight) is dropped rather than buffered forever.
_MAX_EVENT = 32 << 20
_RESPONSE_DONE = frozenset({"response.completed", "response.incomplete", "response.failed"})
# (key in a usage object, our field): `prompt_tokens` is a total; `input_tokens` is a total for
# the Responses API but excludes the cache for Anthropic, which `_to_usage` tells apart.
_FIELDS = (
    ("prompt_tokens", "prompt"),
    ("input_tokens", "input"),
    ("completion_tokens", "output"),
    ("output_tokens", "output"),
    ("cache_read_input_tokens", "cache_read"),
    ("cache_creation_input_tokens", "cache_write"),
)


def usage_from_json(body: bytes | Mapping[str, Any]) -> Usage | None:
    """Read the usage of a complete (non-streamed) JSON response body.

    Understands OpenAI chat completions, completions, embeddings and Responses bodies, and
    Anthropic messages bodies.

    Args:
        body: The raw body, or its already parsed JSON object.

    Returns:
        The normalized usage, or None when the body reports none (or is not JSON at all).
        Fields that are missing, negative or not integers are ignored; this never raises on a
        malformed body.
    """
    if isinstance(body, bytes | bytearray | memoryview):
        try:
            body = json.loads(bytes(body))
        except (ValueError, RecursionError):
            return None
    if not isinstance(body, Mapping):
        return None
    fields = _read_usage(body.get("usage"))
    return _to_usage(fields) if fields else None


def _rough_count(text: str) -> int:
    return -(-len(text) // 4)


class _SSEFramer:
    """Cuts a byte stream into runs of complete SSE events, whatever the chunk boundaries."""

    __slots__ = ("_cr", "_tail", "_tail_size")

    def __init__(self) -> None:
        self._tail: list[bytes] = []  # the incomplete last event, as the chunks that brought it
        self._tail_size = 0
        self._cr = False  # the stream has a CR: leave the LF-only fast path for good

    def _push(self, chunk: bytes) -> bytes:
        """Take a chunk; return the complete events it finishes (possibly b"")."""
        tail = self._tail
        if self._cr or 13 in chunk:  # (an int test is a bare memchr, the fastest)
            self._cr = True
            cut = self._cut_cr(chunk)
        else:
            # JSON data has no raw LF, so the last LF usually ends a blank line.
            last = chunk.rfind(10)
            if last > 0 and chunk[last - 1] == 10:
                cut = last + 1
            elif last < 0:
                cut = -1
            else:
                # Only the new chunk is searched: a "\n\n" straddles into it only at byte 0.
                cut = chunk.rfind(b"\n\n", 0, last) + 2
                if cut == 1 and not (tail and chunk[0] == 10 and tail[-1][-1] == 10):
                    cut = -1  # none, not even one straddling from the tail
        if not tail and cut == len(chunk):
            return chunk  # the usual case: whole events, nothing held back
        if cut < 0:
            if chunk:
                tail.append(chunk)
                self._tail_size += len(chunk)
                if self._tail_size > _MAX_EVENT:
                    tail.clear()
                    self._tail_size = 0
            return b""
        if tail:
            tail.append(chunk[:cut])
            done = b"".join(tail)
            tail.clear()
            self._tail_size = 0
        else:
            done = chunk[:cut]
        if cut < len(chunk):
            tail.append(chunk[cut:])
            self._tail_size = len(chunk) - cut
        return done

    def _cut_cr(self, chunk: bytes) -> int:
        if not chunk:
            return -1
        # A final CR may be the first half of a CRLF: wait for the next byte to know.
        end = len(chunk) - 1 if chunk[-1:] == b"\r" else len(chunk)
        last = chunk.rfind(10, 0, end)
        # The usual CRLF boundary; past its last LF, only a CR CR could make another.
        if (
            last >= 3
            and chunk[last - 3 : last + 1] == b"\r\n\r\n"
            and chunk.find(b"\r\r", last, end) < 0
        ):
            return _run_end(chunk, last + 1, end)
        # After a cut, the tail ends with at most one line ending plus a held-back CR, so its
        # last three bytes are all a boundary can start in.
        prev = b"".join(self._tail[-3:])[-3:]
        window = prev + chunk
        cut = _last_cut(window, end + len(prev))
        # A boundary wholly inside the tail (its held-back CR was one) completes all of it.
        return max(cut - len(prev), 0) if cut >= 0 else -1

    def _take_tail(self) -> bytes:
        done = b"".join(self._tail)
        self._tail.clear()
        self._tail_size = 0
        return done


class StreamUsageScanner(_SSEFramer):
    """Reads the usage of a streamed (SSE) response from its body chunks as they pass.

    Feed it every body chunk in order, then call `finish` once the body ended (or the client
    went away). Chunks may split events anywhere. Usage comes from OpenAI's final usage chunk
    (`stream_options.include_usage`), the Responses API's `response.completed` (or
    `.incomplete` / `.failed`) event, or Anthropic's `message_start` merged with its
    `message_delta` (later values win per field). Without a final report, the output is
    estimated from the streamed text deltas.

    `feed` is cheap: it parses only events that may carry usage, and keeps the others raw
    (bounded) until `finish` knows whether it must count their text.

    Args:
        count_tokens: Counts the tokens of the streamed text when the stream reports no usage;
            defaults to a crude one token per four characters.
    """

    __slots__ = ("_count", "_fields", "_final", "_raw", "_raw_size", "_text")

    def __init__(self, count_tokens: Callable[[str], int] | None = None) -> None:
        super().__init__()
        self._count = count_tokens or _rough_count
        self._fields: dict[str, int] = {}
        self._final = False
        self._raw: list[bytes] = []  # complete events not parsed yet, for an estimate
        self._raw_size = 0
        self._text: list[str] = []  # delta text parsed from `_raw` so far

    @property
    def usage_seen(self) -> bool:
        """Whether the provider's final usage report was seen (`finish` will not estimate)."""
        return self._final

    def feed(self, chunk: bytes) -> None:
        """Scan the next chunk of the response body.

        Args:
            chunk: The bytes exactly as received; any split point is fine.
        """
        done = self._push(chunk)
        if done:
            self._complete(done)

    def finish(self) -> Usage:
        """End the stream and return its usage.

        An unterminated last event is read too. Without a final usage report, `output_tokens`
        is counted from the text deltas (at least what a partial report said), `input_tokens`
        is what a partial report said or 0 (the caller knows its prompt), and `estimated` is
        True.

        Returns:
            The usage of the whole stream, or of what was streamed so far.
        """
        rest = self._take_tail()
        if rest:
            self._complete(rest)
        reported = _to_usage(self._fields)
        if self._final:
            return reported
        text = self.streamed_text()
        counted = self._count(text) if text else 0
        return Usage(
            input_tokens=reported.input_tokens,
            output_tokens=max(reported.output_tokens, counted),
            cached_input_tokens=reported.cached_input_tokens,
            cache_write_tokens=reported.cache_write_tokens,
            estimated=True,
        )

    def streamed_text(self) -> str:
        """The text of the deltas in the complete events so far (content, tool arguments…).

        What a stream cut short has shown its client, for a caller that counts it itself. Kept
        only until the provider's final usage report arrives; "" after that.
        """
        self._compact()
        return "".join(self._text)

    def _complete(self, done: bytes) -> None:
        if done.find(_MARK) >= 0:  # (faster than `in`)
            self._find_usage(done)
        if self._final:
            return
        self._raw.append(done)
        self._raw_size += len(done)
        if self._raw_size > _MAX_RAW:
            self._compact()

    def _find_usage(self, done: bytes) -> None:
        for event in _events(done):
            if _MARK not in event:
                continue
            found = _event_usage(_parse_event(event))
            if found is not None:
                fields, final = found
                self._fields.update(fields)
                self._final = self._final or final
        if self._final:
            # The report is authoritative: the text kept for an estimate is not needed any more.
            self._raw.clear()
            self._raw_size = 0
            self._text.clear()

    def _compact(self) -> None:
        if not self._raw:
            return
        done = b"".join(self._raw)
        self._raw.clear()
        self._raw_size = 0
        data = [d for d in map(_event_data, _events(done)) if d is not None and d != b"[DONE]"]
        try:
            # One parse of all events as a JSON array costs half as much as one per event.
            parsed = json.loads(b"[" + b",".join(data) + b"]")
        except (ValueError, RecursionError):
            parsed = None
        if not isinstance(parsed, list) or len(parsed) != len(data):
            parsed = [_loads(d) for d in data]  # some event is not JSON: skip only that one
        for obj in parsed:
            _collect_text(obj, self._text)


class UsageChunkFilter(_SSEFramer):
    """Removes OpenAI's usage-only chunk from a stream, passing every other byte through.

    For an upstream asked for `stream_options.include_usage` on behalf of a client that did not
    ask: the event whose JSON has a non-null `usage` and `"choices": []` is dropped, with its
    blank line. Only an incomplete trailing event is held back between chunks (or a complete
    one whose final CR may yet turn out to be the first half of a CRLF).

    Args:
        scanner: Also feed the scanner, sharing this filter's framing work. Then feed only the
            filter, and call the filter's `finish` before the scanner's.
    """

    __slots__ = ("_scanner", "_stripped")

    def __init__(self, scanner: StreamUsageScanner | None = None) -> None:
        super().__init__()
        self._scanner = scanner
        self._stripped = False

    @property
    def stripped(self) -> bool:
        """Whether a usage chunk was removed."""
        return self._stripped

    def feed(self, chunk: bytes) -> bytes:
        """Take the next body chunk and return the bytes to forward now (possibly b"").

        Args:
            chunk: The bytes exactly as received; any split point is fine.
        """
        done = self._push(chunk)
        if not done:
            return done
        if self._scanner is not None:
            self._scanner._complete(done)
        return self._strip(done) if done.find(_MARK) >= 0 else done

    def finish(self) -> bytes:
        """End the stream and return the held-back bytes (filtered too)."""
        rest = self._take_tail()
        if not rest:
            return rest
        if self._scanner is not None:
            self._scanner._complete(rest)
        return self._strip(rest) if _MARK in rest else rest

    def _strip(self, done: bytes) -> bytes:
        kept: list[bytes] = []
        start = 0
        while start < len(done):
            end = _next_cut(done, start)
            if end < 0:
                end = len(done)  # an unterminated last event, at `finish`
            event = done[start:end]
            if _MARK in event and _is_usage_chunk(event):
                self._stripped = True
            else:
                kept.append(event)
            start = end
        return b"".join(kept)


def _last_cut(buf: bytes, end: int) -> int:
    """The end of the last blank-line run in `buf[:end]`, or -1."""
    # Two line endings in a row contain LF LF, CR CR or LF CR; one line ending (LF, CR, CRLF)
    # contains none of them.
    found = max(buf.rfind(b"\n\n", 0, end), buf.rfind(b"\r\r", 0, end), buf.rfind(b"\n\r", 0, end))
    return -1 if found < 0 else _run_end(buf, found + 2, end)


def _next_cut(buf: bytes, start: int) -> int:
    """The end of the first blank-line run in `buf[start:]`, or -1."""
    found = [i for i in (buf.find(pattern, start) for pattern in _TWO_ENDINGS) if i >= 0]
    return _run_end(buf, min(found) + 2, len(buf)) if found else -1


def _run_end(buf: bytes, i: int, end: int) -> int:
    while i < end and buf[i] in b"\r\n":
        i += 1
    return i


def _events(done: bytes) -> list[bytes]:
    if b"\r" in done:
        done = done.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return done.split(b"\n\n")


def _event_data(event: bytes) -> bytes | None:
    """The `data` of one SSE event (LF line endings), or None if it has none."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]  # the usual single line
    data: list[bytes] = []
    for line in event.split(b"\n"):
        line = line.removeprefix(b"\xef\xbb\xbf")  # a BOM may open the stream
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
        elif line == b"data":
            data.append(b"")
        # Comments (":"), `event`, `id`, `retry` and unknown fields say nothing about usage.
    return b"\n".join(data) if data else None


def _parse_event(event: bytes) -> Any:
    data = _event_data(event)
    return None if data is None or data == b"[DONE]" else _loads(data)


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _is_usage_chunk(event: bytes) -> bool:
    """Whether an event is OpenAI's usage-only chunk: a non-null `usage` and no choices."""
    if b"\r" in event:
        event = event.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    obj = _parse_event(event.strip(b"\n"))
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


def _event_usage(obj: Any) -> tuple[dict[str, int], bool] | None:
    """The usage fields in one parsed stream event, and whether they are the final report."""
    if not isinstance(obj, dict):
        return None
    kind = obj.get("type")
    final = True
    if kind == "message_start":
        # Anthropic: input and cache tokens; its output_tokens is a placeholder until the
        # cumulative count in `message_delta`.
        message = obj.get("message")
        usage = message.get("usage") if isinstance(message, dict) else None
        final = False
    elif kind in _RESPONSE_DONE:
        response = obj.get("response")
        usage = response.get("usage") if isinstance(response, dict) else None
    else:
        usage = obj.get("usage")  # OpenAI chunks, Anthropic message_delta
    fields = _read_usage(usage)
    return (fields, final) if fields else None


def _read_usage(usage: object) -> dict[str, int]:
    """The valid counts of a usage object, under our field names; {} if none."""
    if not isinstance(usage, Mapping):
        return {}
    fields: dict[str, int] = {}
    for key, name in _FIELDS:
        value = usage.get(key)
        if _is_count(value):
            fields[name] = value
    for key in ("prompt_tokens_details", "input_tokens_details"):
        details = usage.get(key)
        if isinstance(details, Mapping):
            cached = details.get("cached_tokens")
            if _is_count(cached):
                fields["cached"] = cached
    return fields


def _is_count(value: object) -> TypeGuard[int]:
    # bool is an int subclass, and `true` is no token count.
    return type(value) is int and value >= 0


def _to_usage(fields: Mapping[str, int]) -> Usage:
    cache_read = fields.get("cache_read", 0)
    cache_write = fields.get("cache_write", 0)
    if "prompt" in fields:
        # OpenAI shape: a total (gateways such as LiteLLM may add Anthropic's cache fields).
        total = fields["prompt"]
    else:
        # Anthropic's input_tokens excludes the cache; the Responses API has no cache_* fields.
        total = fields.get("input", 0) + cache_read + cache_write
    cached = fields.get("cached", cache_read)
    return Usage(
        input_tokens=total,
        output_tokens=fields.get("output", 0),
        cached_input_tokens=min(cached, total),
        cache_write_tokens=min(cache_write, total),
    )


def _collect_text(obj: Any, out: list[str]) -> None:
    """Append the output text deltas of one parsed stream event to `out`."""
    if not isinstance(obj, dict):
        return
    kind = obj.get("type")
    if kind == "content_block_delta":  # Anthropic
        delta = obj.get("delta")
        if isinstance(delta, dict):
            _append_strings(delta, ("text", "partial_json", "thinking"), out)
    elif isinstance(kind, str) and kind.startswith("response."):
        # Responses API: output_text, refusal, function_call_arguments, reasoning… deltas; audio
        # deltas are base64, not text.
        if kind.endswith(".delta") and "audio" not in kind:
            _append_strings(obj, ("delta",), out)
    else:
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            _append_strings(choice, ("text",), out)  # legacy completions
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            _append_strings(delta, ("content", "refusal", "reasoning_content", "reasoning"), out)
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        _append_strings(function, ("name", "arguments"), out)


def _append_strings(obj: dict[str, Any], keys: tuple[str, ...], out: list[str]) -> None:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str):
            out.append(value)
