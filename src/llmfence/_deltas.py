"""The text a stream shows its client, read from its events' deltas, for an estimate.

A stream that ends without a usage report (the upstream was not asked for one, or the client went
away first) is counted by tokenizing what it streamed: OpenAI chat and completions deltas
(content, refusals, reasoning, tool calls), Responses API `*.delta` events, and Anthropic's
`content_block_delta` (text, tool input JSON, thinking).
"""

from __future__ import annotations

from typing import Any

from ._json import loads
from ._sse import event_data, events

__all__ = ["delta_texts"]


def delta_texts(done: bytes) -> list[str]:
    """The delta texts of a run of complete SSE events, in order.

    Args:
        done: Complete events as framed by `SSEFramer`; events that are not JSON are skipped.
    """
    data = [d for d in map(event_data, events(done)) if d is not None and d != b"[DONE]"]
    try:
        # One parse of all events as a JSON array costs half as much as one per event.
        parsed = loads(b"[" + b",".join(data) + b"]")
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, list) or len(parsed) != len(data):
        parsed = [_loads(d) for d in data]  # some event is not JSON: skip only that one
    out: list[str] = []
    for obj in parsed:
        _collect_text(obj, out)
    return out


def _loads(data: bytes) -> Any:
    try:
        return loads(data)
    except (ValueError, RecursionError):
        return None


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
