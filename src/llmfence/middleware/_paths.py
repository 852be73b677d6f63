"""`PathRules`: which paths llmfence meters, which get auth only, and which it leaves alone."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from llmfence._request import endpoint_for_path

__all__ = ["DEFAULT_EXEMPT_PATHS", "PathRules"]

DEFAULT_EXEMPT_PATHS = ("/health", "/healthz", "/livez", "/readyz")


class PathRules:
    """Which paths are metered, which get auth only, and which llmfence leaves alone.

    Args:
        metered: `fnmatch` patterns of metered paths; `None` meters the OpenAI and Anthropic
            LLM endpoints (`*/chat/completions`, `*/completions`, `*/embeddings`,
            `*/responses`, `*/messages`).
        exempt: `fnmatch` patterns of paths that get nothing (health checks, docs).
    """

    # Every middleware of a stack asks about every request's path: answers are remembered, in
    # a dict bounded because paths come from clients.
    _CACHE_SIZE = 4096

    def __init__(
        self, metered: Sequence[str] | None = None, exempt: Sequence[str] = DEFAULT_EXEMPT_PATHS
    ) -> None:
        self.metered = tuple(metered) if metered is not None else None
        self.exempt = tuple(exempt)
        self._metered_re = _compile(self.metered) if self.metered is not None else None
        self._exempt_re = _compile(self.exempt)
        self._seen: dict[str, tuple[bool, bool]] = {}

    def _classify(self, path: str) -> tuple[bool, bool]:
        known = self._seen.get(path)
        if known is None:
            exempt = self._exempt_re is not None and self._exempt_re.match(path) is not None
            if self._metered_re is None:
                metered = endpoint_for_path(path) is not None
            else:
                metered = self._metered_re.match(path) is not None
            if len(self._seen) >= self._CACHE_SIZE:
                self._seen.clear()
            known = self._seen[path] = (exempt, metered)
        return known

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PathRules):
            return NotImplemented
        return (self.metered, self.exempt) == (other.metered, other.exempt)

    def __hash__(self) -> int:
        return hash((self.metered, self.exempt))

    def classify(self, path: str) -> tuple[bool, bool]:
        """`(exempt, metered)` for a path (remembered: every request asks)."""
        return self._classify(path)

    def is_exempt(self, path: str) -> bool:
        """Whether llmfence leaves this path alone."""
        return self._classify(path)[0]

    def is_metered(self, path: str) -> bool:
        """Whether requests to this path are LLM calls to limit and charge."""
        return self._classify(path)[1]


def _compile(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
