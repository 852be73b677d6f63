"""JSON from bytes, read exactly as `json.loads` reads it, by decoders built once.

`json.loads(data, parse_constant=...)` builds a new decoder and scanner on every call, and even a
plain `json.loads(data)` detects the encoding in Python first. On the hot path (every request
body, every JSON response body, the stream events that carry usage) that overhead is most of the
cost of a small body. `loads` and `loads_strict` give the same values and raise on the same
inputs as `json.loads` given bytes: UTF-8, -16 or -32 told apart by their first bytes (RFC 4627),
surrogates passed through, whitespace around the document allowed.
"""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

__all__ = ["loads", "loads_strict"]


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


_LENIENT = json.JSONDecoder()
# NaN and Infinity are not JSON: no request field, budget or stored document may hold them.
_STRICT = json.JSONDecoder(parse_constant=_reject_constant)
_SPACE = re.compile(r"[ \t\n\r]*").match  # what `JSONDecoder.decode` skips around a document


def loads(data: bytes | bytearray) -> Any:
    """`json.loads(data)`, without its per-call overhead.

    Raises:
        ValueError: The data is not JSON (`json.JSONDecodeError`) or not text in the encoding
            its first bytes imply (`UnicodeDecodeError`).
        RecursionError: The document nests too deeply.
    """
    return _decode(_LENIENT, _text(data))


def loads_strict(data: bytes | bytearray) -> Any:
    """`loads`, refusing `NaN`, `Infinity` and `-Infinity` (a `ValueError`)."""
    return _decode(_STRICT, _text(data))


def _text(data: bytes | bytearray) -> str:
    # `json.detect_encoding` reads NULs and BOMs in the first four bytes. A body opening with "{"
    # and no NUL after it is UTF-8 to it: that is every body an LLM API sends or receives.
    if data[:1] == b"{" and data[1:2] != b"\0":
        return data.decode("utf-8", "surrogatepass")
    return data.decode(json.detect_encoding(data), "surrogatepass")


def _decode(decoder: json.JSONDecoder, text: str) -> Any:
    # `JSONDecoder.decode` without its extra frame and its regex calls on a tidy document.
    value, end = decoder.raw_decode(text, 0 if text[:1] == "{" else _skip_space(text, 0))
    if end != len(text) and _skip_space(text, end) != len(text):
        raise json.JSONDecodeError("Extra data", text, end)
    return value


def _skip_space(text: str, at: int) -> int:
    match = _SPACE(text, at)
    return at if match is None else match.end()  # (it always matches, if only "")
