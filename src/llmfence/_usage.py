"""Usage reported by an LLM response: from JSON bodies and, incrementally, from SSE streams."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Usage"]


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
