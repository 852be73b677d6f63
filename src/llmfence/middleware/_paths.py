"""`PathRules`: which paths llmfence meters, which get auth only, and which it leaves alone.

A path has one truth: the one an HTTP router or client reaches. httpx removes `.` and `..`
segments before it sends, servers and proxies merge repeated slashes, and an upstream may decode
`%2F` or `%2E` (or a double-encoded `%252F`) into separators and dots. A path that reads
differently once those are resolved is classified as its normalized form, and refused (400)
when any of its readings, or a segment prefix of one, is metered, or when its readings disagree
on being exempt: llmfence does not guess which one the app behind it will forward. A plain path
(the usual case) costs one dict lookup.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote

from llmfence._request import endpoint_for_path
from llmfence.exceptions import InvalidRequestError

__all__ = ["DEFAULT_EXEMPT_PATHS", "PathRules", "normalize_path"]

DEFAULT_EXEMPT_PATHS = (
    "/health",
    "/healthz",
    "/livez",
    "/readyz",
    # FastAPI's interactive docs and the schema they read: a browser opens them with no key.
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/openapi.json",
    # The spend page (llmfence.ui): static HTML that asks the operator for the master key.
    "/ui/spend",
)

# What a path needs to read differently once normalized: a dot segment or a repeated slash, a
# backslash (a separator to WHATWG URL parsers), a percent escape (decoded again downstream).
_ODD = re.compile(r"//|/\.|\\|%")
_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")
# In the raw path, an escaped slash: the decoded path shows it as a plain separator. (Escaped
# dots, backslashes and percent signs show in the decoded path as themselves.)
_ESCAPED_SLASH = re.compile(rb"%2[Ff]")
# Each decoding can reveal another layer; past this many the path is refused outright.
_MAX_DECODES = 4
# An odd path with more segments than this is refused rather than checked prefix by prefix.
_MAX_ODD_SEGMENTS = 64


def normalize_path(path: str) -> str:
    """The path an HTTP router or client reaches: percent escapes decoded (repeatedly),
    backslashes read as slashes, repeated slashes merged, `.` and `..` segments resolved
    (RFC 3986 §5.2.4). A trailing slash (or a trailing dot segment) stays a trailing slash."""
    for _ in range(_MAX_DECODES):
        if _ESCAPE.search(path) is None:
            break
        path = unquote(path)
    segments: list[str] = []
    parts = path.replace("\\", "/").split("/")
    for part in parts:
        if part == "..":
            if segments:
                segments.pop()
        elif part and part != ".":
            segments.append(part)
    trailing = len(parts) > 1 and parts[-1] in ("", ".", "..") and bool(segments)
    return "/" + "/".join(segments) + ("/" if trailing else "")


class PathRules:
    """Which paths are metered, which get auth only, and which llmfence leaves alone.

    Paths are classified as normalized (see the module docstring): a request whose path reads
    differently once dot segments, repeated slashes and percent-encoded separators are resolved
    is refused with a 400 when a metered route is involved.

    Args:
        metered: `fnmatch` patterns of metered paths; `None` meters the OpenAI and Anthropic
            LLM endpoints (`*/chat/completions`, `*/completions`, `*/embeddings`,
            `*/responses`, `*/messages`).
        exempt: `fnmatch` patterns of paths that get nothing (health checks, docs).
    """

    # Every middleware of a stack asks about every request's path: answers are remembered, in
    # dicts bounded because paths come from clients.
    _CACHE_SIZE = 4096

    def __init__(
        self, metered: Sequence[str] | None = None, exempt: Sequence[str] = DEFAULT_EXEMPT_PATHS
    ) -> None:
        self.metered = tuple(metered) if metered is not None else None
        self.exempt = tuple(exempt)
        self._metered_re = _compile(self.metered) if self.metered is not None else None
        self._exempt_re = _compile(self.exempt)
        # Paths whose raw form holds no `%`, by path; `None` marks a refused one.
        self._seen: dict[str, tuple[bool, bool] | None] = {}
        # Paths whose raw form holds a `%`, by both.
        self._escaped: dict[tuple[str, bytes], tuple[bool, bool] | None] = {}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PathRules):
            return NotImplemented
        return (self.metered, self.exempt) == (other.metered, other.exempt)

    def __hash__(self) -> int:
        return hash((self.metered, self.exempt))

    def classify(self, path: str, raw_path: bytes | None = None) -> tuple[bool, bool]:
        """`(exempt, metered)` for a request's path (remembered: every request asks).

        Args:
            path: The decoded path (ASGI `scope["path"]`).
            raw_path: The path as sent (ASGI `scope["raw_path"]`), if known.

        Raises:
            InvalidRequestError: The path reads differently once normalized, and a metered
                route is involved (or its readings disagree on being exempt).
        """
        # (`0x25`, not `b"%"`: an int is found by one scan, a bytes needle costs ~10x more.)
        if raw_path is None or 0x25 not in raw_path:  # no `%` in the path as sent
            known = self._seen.get(path)
            if known is None:
                known = self._lookup(self._seen, path, path, None)
            return known
        return self._lookup(self._escaped, (path, raw_path), path, raw_path)

    def is_exempt(self, path: str) -> bool:
        """Whether llmfence leaves this path alone (never a path it would refuse)."""
        try:
            return self.classify(path)[0]
        except InvalidRequestError:
            return False

    def is_metered(self, path: str) -> bool:
        """Whether requests to this path are LLM calls to limit and charge (a path llmfence
        refuses as ambiguous counts as metered)."""
        try:
            return self.classify(path)[1]
        except InvalidRequestError:
            return True

    def _lookup(
        self,
        cache: dict[Any, tuple[bool, bool] | None],
        key: object,
        path: str,
        raw_path: bytes | None,
    ) -> tuple[bool, bool]:
        if key in cache:
            answer = cache[key]
        else:
            answer = self._resolve(path, raw_path)
            if len(cache) >= self._CACHE_SIZE:
                cache.clear()
            cache[key] = answer
        if answer is None:
            raise _ambiguous(path)
        return answer

    def _rules(self, path: str) -> tuple[bool, bool]:
        exempt = self._exempt_re is not None and self._exempt_re.match(path) is not None
        if self._metered_re is None:
            metered = endpoint_for_path(path) is not None
        else:
            metered = self._metered_re.match(path) is not None
        return exempt, metered

    def _resolve(self, path: str, raw_path: bytes | None) -> tuple[bool, bool] | None:
        """The classification of a path not seen before; `None` to refuse it."""
        raw_odd = raw_path is not None and _odd_raw(raw_path)
        if not raw_odd and _ODD.search(path) is None:
            return self._rules(path)
        normal = normalize_path(path)
        if normal == path and not raw_odd:
            return self._rules(path)
        readings = (path, normal)
        if _ESCAPE.search(normal) is not None or any(
            r.count("/") > _MAX_ODD_SEGMENTS for r in readings
        ):
            return None  # still encoded after every decoding, or too long to check
        answers = {self._rules(r) for r in readings}
        if len(answers) > 1 or any(metered for _, metered in answers):
            return None
        for reading in readings:
            end = reading.find("/", 1)
            while end != -1:
                if self._rules(reading[:end])[1]:
                    return None  # a metered route on the way
                end = reading.find("/", end + 1)
        return answers.pop()


def _odd_raw(raw_path: bytes) -> bool:
    """Whether the raw path encodes a slash (that its decoded form shows as a separator)."""
    return _ESCAPED_SLASH.search(raw_path.partition(b"?")[0]) is not None


def _ambiguous(path: str) -> InvalidRequestError:
    shown = path if len(path) <= 200 else path[:200] + "…"
    return InvalidRequestError(
        f"The request path {shown!r} is ambiguous: once dot segments, repeated slashes and "
        f"percent-encoded separators are resolved it reads {normalize_path(path)[:200]!r}, on "
        "or near a metered route. Send the plain path."
    )


def _compile(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
