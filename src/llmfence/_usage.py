"""Usage reported by an LLM response: from JSON bodies and, incrementally, from SSE streams.

Providers report usage in three shapes, all normalized into `Usage`:

- OpenAI chat/completions/embeddings: `prompt_tokens` (cached ones included),
  `completion_tokens`, `prompt_tokens_details.cached_tokens`.
- OpenAI Responses: `input_tokens` (cached ones included), `output_tokens`,
  `input_tokens_details.cached_tokens`.
- Anthropic messages: `input_tokens` *without* the cache, plus `cache_read_input_tokens` and
  `cache_creation_input_tokens`, and `output_tokens`.

Streams are scanned by `StreamUsageScanner`, which runs on every body chunk a proxy forwards, so
its `feed` only keeps the chunk: chunks are framed into events (`_sse`) many at a time, and only
the rare events that may carry usage are parsed; text deltas are kept raw and parsed only if the
stream ends without usage. `UsageChunkFilter` must answer every chunk, so it frames each one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._deltas import delta_texts
from ._json import loads
from ._sse import SSEFramer, event_around, event_data, events_with

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
# It is searched with `rfind`: that search tests each position against the marker's first byte,
# and `_` is much rarer in a stream than the `"` that `find` would test against.
_MARK = b'_tokens"'
# Raw delta events kept for an estimate are parsed into text beyond this size, to bound memory.
_MAX_RAW = 4 << 20
# A scanner frames the chunks it was fed once they add up to this much, or when it is asked for a
# result: one search over many chunks costs less than one per chunk.
_MAX_PENDING = 64 << 10
_RESPONSE_DONE = frozenset({"response.completed", "response.incomplete", "response.failed"})
_DETAILS = ("prompt_tokens_details", "input_tokens_details")
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


def usage_from_json(body: bytes | bytearray | memoryview | Mapping[str, Any]) -> Usage | None:
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
    if isinstance(body, (bytes, bytearray, memoryview)):  # (a tuple tests faster than a union)
        try:
            body = loads(body.tobytes() if isinstance(body, memoryview) else body)
        except (ValueError, RecursionError):
            return None
    # (`type() is dict` first: an isinstance test against an ABC costs several times more.)
    if type(body) is not dict and not isinstance(body, Mapping):
        return None
    fields = _read_usage(body.get("usage"))
    return _to_usage(fields) if fields else None


def _rough_count(text: str) -> int:
    return -(-len(text) // 4)


class StreamUsageScanner(SSEFramer):
    """Reads the usage of a streamed (SSE) response from its body chunks as they pass.

    Feed it every body chunk in order, then call `finish` once the body ended (or the client
    went away). Chunks may split events anywhere. Usage comes from OpenAI's final usage chunk
    (`stream_options.include_usage`), the Responses API's `response.completed` (or
    `.incomplete` / `.failed`) event, or Anthropic's `message_start` merged with its
    `message_delta` (later values win per field). Without a final report, the output is
    estimated from the streamed text deltas.

    `feed` is cheap: it keeps the chunk, and chunks are framed into events many at a time (at
    the latest when a result is asked for). Only events that may carry usage are parsed; the
    others are kept raw (bounded) until `finish` knows whether it must count their text.

    Args:
        count_tokens: Counts the tokens of the streamed text when the stream reports no usage;
            defaults to a crude one token per four characters.
    """

    __slots__ = (
        "_count",
        "_fields",
        "_final",
        "_pending",
        "_pending_size",
        "_raw",
        "_raw_size",
        "_text",
    )

    def __init__(self, count_tokens: Callable[[str], int] | None = None) -> None:
        super().__init__()
        self._count = count_tokens or _rough_count
        self._fields: dict[str, int] = {}
        self._final = False
        self._pending: list[bytes] = []  # chunks fed but not framed yet
        self._pending_size = 0
        self._raw: list[bytes] = []  # complete events not parsed yet, for an estimate
        self._raw_size = 0
        self._text: list[str] = []  # delta text parsed from `_raw` so far

    @property
    def usage_seen(self) -> bool:
        """Whether the provider's final usage report was seen (`finish` will not estimate)."""
        self._frame()
        return self._final

    def feed(self, chunk: bytes) -> None:
        """Scan the next chunk of the response body.

        Args:
            chunk: The bytes exactly as received; any split point is fine.
        """
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        if self._pending_size > _MAX_PENDING:
            self._frame()

    def finish(self) -> Usage:
        """End the stream and return its usage.

        An unterminated last event is read too. Without a final usage report, `output_tokens`
        is counted from the text deltas (at least what a partial report said), `input_tokens`
        is what a partial report said or 0 (the caller knows its prompt), and `estimated` is
        True.

        Returns:
            The usage of the whole stream, or of what was streamed so far.
        """
        self._frame()
        rest = self._take_tail()
        if rest:
            self._take(rest, rest.rfind(_MARK) >= 0)
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
        self._frame()
        self._compact()
        return "".join(self._text)

    def _frame(self) -> None:
        """Frame the chunks fed so far, and take the complete events they hold."""
        pending = self._pending
        if not pending:
            return
        chunk = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self._pending_size = 0
        done = self._push(chunk)
        if done:
            self._take(done, done.rfind(_MARK) >= 0)

    def _take(self, done: bytes, marked: bool) -> None:
        """Take a run of complete events; `marked`: whether the usage marker is in it."""
        if marked:
            self._find_usage(done)
        if self._final:
            return
        self._raw.append(done)
        self._raw_size += len(done)
        if self._raw_size > _MAX_RAW:
            self._compact()

    def _find_usage(self, done: bytes) -> None:
        for event in events_with(done, _MARK):
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
        self._text += delta_texts(done)


class UsageChunkFilter(SSEFramer):
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
        marked = done.rfind(_MARK) >= 0  # one search for both the scanner and the filter
        if self._scanner is not None:
            self._scanner._take(done, marked)
        return self._strip(done) if marked else done

    def finish(self) -> bytes:
        """End the stream and return the held-back bytes (filtered too)."""
        rest = self._take_tail()
        if not rest:
            return rest
        marked = rest.rfind(_MARK) >= 0
        if self._scanner is not None:
            self._scanner._take(rest, marked)
        return self._strip(rest) if marked else rest

    def _strip(self, done: bytes) -> bytes:
        # Only an event holding the marker can be the usage chunk: look at those alone, found
        # from the marker, and pass the bytes between them through in one piece.
        kept: list[bytes] = []
        start = 0
        at = done.find(_MARK)
        while at >= 0:
            first, end = event_around(done, at)
            if _is_usage_chunk(done[first:end]):
                self._stripped = True
                kept.append(done[start:first])
                start = end
            at = done.find(_MARK, end)
        if not kept:
            return done
        kept.append(done[start:])
        return b"".join(kept)


def _parse_event(event: bytes) -> Any:
    data = event_data(event)
    return None if data is None or data == b"[DONE]" else _loads(data)


def _loads(data: bytes) -> Any:
    try:
        return loads(data)
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
    # Plain dicts are tested by type first, and counts inline: this runs on every response.
    if type(usage) is not dict and not isinstance(usage, Mapping):
        return {}
    get = usage.get
    fields: dict[str, int] = {}
    for key, name in _FIELDS:
        value = get(key)
        # bool is an int subclass, and `true` is no token count.
        if type(value) is int and value >= 0:
            fields[name] = value
    for key in _DETAILS:
        details = get(key)
        if details is not None and (type(details) is dict or isinstance(details, Mapping)):
            cached = details.get("cached_tokens")
            if type(cached) is int and cached >= 0:
                fields["cached"] = cached
    return fields


def _to_usage(fields: Mapping[str, int]) -> Usage:
    get = fields.get
    cache_read = get("cache_read", 0)
    cache_write = get("cache_write", 0)
    # OpenAI's prompt_tokens is a total (gateways such as LiteLLM may add Anthropic's cache
    # fields); Anthropic's input_tokens excludes the cache; the Responses API has no cache_*.
    total = fields["prompt"] if "prompt" in fields else get("input", 0) + cache_read + cache_write
    cached = get("cached", cache_read)
    # Parts of the input never exceed it. (Positional, and no `min` calls: this runs on every
    # response, and a frozen dataclass is slow enough to build as it is.)
    return Usage(
        total,
        get("output", 0),
        cached if cached < total else total,
        cache_write if cache_write < total else total,
    )
