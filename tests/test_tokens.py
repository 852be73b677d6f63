from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import anyio
import pytest
import tiktoken
import tiktoken_ext.openai_public as openai_public

from llmfence._request import LLMRequest
from llmfence._tokens import (
    _PATTERNS,
    _SPECIAL_TOKENS,
    TokenCounter,
    encoding_name_for_model,
    get_encoding,
)

pytestmark = pytest.mark.anyio


def chat(
    model: str, *messages: dict[str, Any], tools: tuple[dict[str, Any], ...] = ()
) -> LLMRequest:
    return LLMRequest(endpoint="chat", model=model, messages=messages, tools=tools)


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("o1-preview", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o4-mini", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-4-0613", "cl100k_base"),
        ("gpt-3.5-turbo-0613", "cl100k_base"),
        ("gpt-35-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("text-embedding-ada-002", "cl100k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("azure/gpt-35-turbo", "cl100k_base"),
        ("ft:gpt-3.5-turbo-0613:acme::abc", "cl100k_base"),
        ("claude-3-5-sonnet-latest", "o200k_base"),
        ("llama-3.1-70b", "o200k_base"),
        (None, "o200k_base"),
    ],
)
def test_model_to_encoding(model: str | None, encoding: str) -> None:
    assert encoding_name_for_model(model) == encoding


def test_bundled_encodings_match_tiktoken_definitions(monkeypatch: pytest.MonkeyPatch) -> None:
    # Build tiktoken's own definitions, feeding them our bundled ranks instead of a download:
    # the split pattern and special tokens we ship must be exactly tiktoken's.
    for name in ("cl100k_base", "o200k_base"):
        ours = get_encoding(name)
        monkeypatch.setattr(
            openai_public, "load_tiktoken_bpe", lambda *a, _o=ours, **k: _o._mergeable_ranks
        )
        reference = getattr(openai_public, name)()
        assert reference["pat_str"] == _PATTERNS[name]
        assert reference["special_tokens"] == _SPECIAL_TOKENS[name]
        assert reference["mergeable_ranks"] == ours._mergeable_ranks


def test_unknown_encoding_name() -> None:
    with pytest.raises(ValueError, match="bundles"):
        get_encoding("p50k_base")


@pytest.mark.parametrize(
    ("text", "cl100k", "o200k"),
    [
        ("hello world", [15339, 1917], 2),
        ("tiktoken is great!", [83, 1609, 5963, 374, 2294, 0], 6),
        ("", [], 0),
    ],
)
def test_known_token_counts(text: str, cl100k: list[int], o200k: int) -> None:
    # The cl100k ids are the ones OpenAI's cookbook prints for these strings.
    assert get_encoding("cl100k_base").encode_ordinary(text) == cl100k
    counter = TokenCounter()
    assert counter.count_text(text, "gpt-4") == len(cl100k)
    assert counter.count_text(text, "gpt-4o") == o200k


def test_special_token_text_is_ordinary_text() -> None:
    # A user pasting "<|endoftext|>" must be counted, not raise tiktoken's disallowed-special error.
    assert TokenCounter().count_text("<|endoftext|>", "gpt-4o") > 1


def test_seed_notebook_prompt_is_14_tokens() -> None:
    # The seed notebook's call: gpt-3.5-turbo-0613 reported 14 prompt tokens for this message.
    request = chat("gpt-3.5-turbo-0613", {"role": "user", "content": "Hey, how's it going?"})
    assert TokenCounter().count(request) == 14


def test_chat_overhead_per_message_name_and_priming() -> None:
    counter = TokenCounter()
    enc = get_encoding("o200k_base")
    one = chat("gpt-4o", {"role": "user", "content": "hello world"})
    # 3 per message + "user" (1) + "hello world" (2) + 3 reply priming
    assert counter.count(one) == 3 + 1 + 2 + 3
    named = chat("gpt-4o", {"role": "user", "name": "bob", "content": "hello world"})
    assert counter.count(named) == counter.count(one) + len(enc.encode("bob")) + 1
    two = chat(
        "gpt-4o",
        {"role": "system", "content": "hello world"},
        {"role": "user", "content": "hello world"},
    )
    assert counter.count(two) == 3 + (3 + 1 + 2) * 2
    assert counter.count(chat("gpt-4o")) == 0


def test_multipart_content_and_images() -> None:
    counter = TokenCounter()
    text = chat("gpt-4o", {"role": "user", "content": "hello world"})
    parts = chat("gpt-4o", {"role": "user", "content": [{"type": "text", "text": "hello world"}]})
    assert counter.count(parts) == counter.count(text)
    low = chat(
        "gpt-4o",
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "low"}}],
        },
    )
    high = chat(
        "gpt-4o", {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    )
    assert counter.count(low) == 3 + 1 + 3 + 85
    assert counter.count(high) == 3 + 1 + 3 + 765


def test_tools_follow_the_cookbook_formula() -> None:
    enc = get_encoding("o200k_base")
    weather: dict[str, Any] = {
        "name": "get_weather",
        "description": "Get the weather.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city."},
                "unit": {"type": "string", "description": "Unit", "enum": ["c", "f"]},
            },
        },
    }
    tool = {"type": "function", "function": weather}
    message = {"role": "user", "content": "hi"}
    counter = TokenCounter()
    base = counter.count(chat("gpt-4o", message))
    expected = (
        7  # function init
        + len(enc.encode("get_weather:Get the weather"))
        + 3  # properties init
        + 3
        + len(enc.encode("city:string:The city"))
        + 3
        - 3
        + 3
        + len(enc.encode("c"))
        + 3
        + len(enc.encode("f"))
        + len(enc.encode("unit:string:Unit"))
        + 12  # end
    )
    assert counter.count(chat("gpt-4o", message, tools=(tool,))) == base + expected
    # Anthropic's tool shape counts the same way.
    anthropic = {
        "name": "get_weather",
        "description": "Get the weather.",
        "input_schema": weather["parameters"],
    }
    assert counter.count(chat("gpt-4o", message, tools=(anthropic,))) == base + expected


def test_texts_and_token_ids() -> None:
    request = LLMRequest(
        endpoint="embeddings",
        model="text-embedding-3-small",
        texts=("hello world", "hi"),
        prompt_token_ids=5,
    )
    assert TokenCounter().count(request) == 2 + 1 + 5


def test_count_once_caches_each_message() -> None:
    counter = TokenCounter()
    history = tuple({"role": "user", "content": f"turn {i} " * 50} for i in range(20))
    counter.count(chat("gpt-4o", *history))
    before = len(counter._cache)
    counter.count(chat("gpt-4o", *history, {"role": "user", "content": "new"}))
    assert len(counter._cache) == before + 1  # only the new message was encoded
    # The same text under another encoding is a different entry.
    counter.count(chat("gpt-4", *history))
    assert len(counter._cache) == before + 1 + 20


def test_nested_messages_are_cached_too() -> None:
    counter = TokenCounter()
    message = {"role": "user", "content": [{"type": "text", "text": "x"}]}
    first = counter.count(chat("gpt-4o", message))
    assert counter.count(chat("gpt-4o", message)) == first
    assert len(counter._cache) == 1


def test_cache_is_bounded() -> None:
    counter = TokenCounter(cache_size=10)
    for i in range(50):
        counter.count(chat("gpt-4o", {"role": "user", "content": str(i)}))
    assert len(counter._cache) == 10


async def test_acount_small_stays_on_loop_and_large_uses_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    counter = TokenCounter(thread_threshold=1000)
    calls: list[object] = []
    real = anyio.to_thread.run_sync

    async def spy(func: Any, *args: Any) -> Any:
        calls.append(func)
        return await real(func, *args)

    monkeypatch.setattr(anyio.to_thread, "run_sync", spy)
    small = chat("gpt-4o", {"role": "user", "content": "hi"})
    assert await counter.acount(small) == counter.count(small)
    assert calls == []
    large = chat("gpt-4o", {"role": "user", "content": "word " * 5000})
    expected = TokenCounter().count(large)
    assert await counter.acount(large) == expected
    assert len(calls) == 1
    # Counted once: the resent message is cached now, so no thread the second time.
    assert await counter.acount(large) == expected
    assert len(calls) == 1


def test_counting_never_opens_a_connection() -> None:
    # A fresh interpreter with an audit hook that fails on any socket use: loading both bundled
    # encodings and counting a chat must not touch the network (nor tiktoken's download path).
    script = textwrap.dedent(
        """
        import sys
        def hook(event, args):
            if event.startswith(("socket.", "urllib.")):
                raise RuntimeError(f"network access: {event}")
        sys.addaudithook(hook)
        from llmfence._request import LLMRequest
        from llmfence._tokens import TokenCounter
        counter = TokenCounter()
        for model in ("gpt-4o", "gpt-4"):
            request = LLMRequest(endpoint="chat", model=model,
                                 messages=({"role": "user", "content": "hello world"},))
            assert counter.count(request) == 9, counter.count(request)
        print("offline-ok")
        """
    )
    env = {"PATH": "", "TIKTOKEN_CACHE_DIR": "/nonexistent/never-used"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "offline-ok"


def test_bundled_encoding_is_a_real_tiktoken_encoding() -> None:
    enc = get_encoding("o200k_base")
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.decode(enc.encode_ordinary("round trip ✓")) == "round trip ✓"
    assert enc.n_vocab == 200019
