"""`TokenCounter.bound` is never below `TokenCounter.count`, for every request shape.

The meter reserves with the bound when it fits comfortably and counts exactly otherwise; an
admission under a bound that could be lower than the exact count would let a request through
that exact counting refuses. So the bound is checked over generated requests: built directly
(any JSON in any field) and parsed from bodies of every endpoint, with text that is ASCII,
non-ASCII (CJK, emoji, combining marks), special-token text, long runs BPE merges well, and
lone surrogates (valid JSON escapes).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st

from llmfence._request import LLMRequest, parse_request
from llmfence._tokens import TokenCounter
from llmfence.exceptions import InvalidRequestError

MODELS = ("gpt-4o", "gpt-4", "gpt-3.5-turbo", "text-embedding-3-small", "claude-3-5-haiku", "")

ADVERSARIAL = (
    "<|endoftext|>",
    "<|endofprompt|><|fim_prefix|>",
    "a" * 300,
    " " * 200,
    "\n\r\n\t" * 40,
    "1234567890" * 20,
    "日本語のテキスト" * 10,
    "🦜🔥👩‍👩‍👧‍👦" * 10,
    "e\u0301" * 30,
    "ÿ" * 50,
    "'s'll're've" * 20,
    "\x00\x01\x7f",
)

surrogates = st.lists(st.integers(0xD800, 0xDFFF).map(chr), min_size=1, max_size=4).map("".join)
text = st.one_of(
    st.text(max_size=40),
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.sampled_from(ADVERSARIAL),
    st.tuples(st.text(max_size=8), surrogates, st.text(max_size=8)).map("".join),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**6), 10**6) | text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=12,
)
image = st.builds(
    lambda detail, nested: (
        {"type": "image_url", "image_url": {"url": "data:,", "detail": detail}}
        if nested
        else {"type": "input_image", "image_url": "data:,", "detail": detail}
    ),
    st.sampled_from(["low", "high", "auto"]),
    st.booleans(),
)
part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, text),
    image,
    text,
    st.dictionaries(st.sampled_from(["type", "id", "text", "input", "content", "x"]), json_values),
    json_values,
)
content = st.one_of(text, st.lists(part, max_size=4), json_values)
message = st.builds(
    lambda role, body, extra: {"role": role, "content": body, **extra},
    st.sampled_from(["system", "user", "assistant", "tool"]),
    content,
    st.dictionaries(st.sampled_from(["name", "tool_calls", "tool_call_id", "x"]), json_values),
)
prop = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["string", "integer", "object"]) | json_values,
            "description": text,
            "enum": st.lists(json_values, max_size=4),
            "properties": json_values,
            "items": json_values,
            "anyOf": json_values,
        },
    ),
)
function = st.fixed_dictionaries(
    {"name": text},
    optional={
        "description": text,
        "parameters": st.one_of(
            st.builds(lambda p: {"type": "object", "properties": p}, st.dictionaries(text, prop)),
            json_values,
        ),
        "input_schema": st.builds(lambda p: {"properties": p}, st.dictionaries(text, prop)),
    },
)
tool = st.one_of(
    st.builds(lambda f: {"type": "function", "function": f}, function),
    function,
    st.builds(lambda v: {"type": "function", "function": v}, json_values),
    st.dictionaries(text, json_values, max_size=3),
)


def assert_bounded(request: LLMRequest) -> None:
    counter = TokenCounter()
    assert counter.bound(request) >= counter.count(request)


@given(
    st.sampled_from(MODELS),
    st.lists(message, max_size=4),
    st.lists(text, max_size=3),
    st.integers(0, 50),
    st.lists(tool, max_size=3),
)
def test_the_bound_is_never_below_the_count(
    model: str,
    messages: list[dict[str, Any]],
    texts: list[str],
    token_ids: int,
    tools: list[dict[str, Any]],
) -> None:
    request = LLMRequest(
        "chat", model, tuple(messages), tuple(texts), token_ids, tuple(tools), max_output_tokens=9
    )
    assert_bounded(request)


def _body(endpoint: str, model: str, prompt: Any, extra: dict[str, Any]) -> dict[str, Any]:
    if endpoint == "chat":
        return {"model": model, "messages": prompt, **extra}
    if endpoint == "completions":
        return {"model": model, "prompt": prompt}
    if endpoint == "embeddings":
        return {"model": model, "input": prompt}
    if endpoint == "responses":
        return {"model": model, "input": prompt, **extra}
    return {"model": model, "messages": prompt, "max_tokens": 5, **extra}


PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
}
chat_messages = st.lists(message, min_size=1, max_size=3)
prompts = {
    "chat": chat_messages,
    "completions": text | st.lists(text, min_size=1, max_size=3) | st.lists(st.integers(0, 9)),
    "embeddings": text | st.lists(text, min_size=1, max_size=3),
    "responses": text | chat_messages,
    "messages": st.lists(
        st.builds(
            lambda role, body: {"role": role, "content": body},
            st.sampled_from(["user", "assistant"]),
            text | st.lists(part, max_size=3),
        ),
        min_size=1,
        max_size=3,
    ),
}
extras = st.fixed_dictionaries(
    {},
    optional={
        "tools": st.lists(tool, max_size=2),
        "system": text | st.lists(st.builds(lambda t: {"type": "text", "text": t}, text)),
        "instructions": text,
    },
)


@given(st.data(), st.sampled_from(sorted(PATHS)), st.sampled_from(MODELS[:-1]))
def test_the_bound_holds_for_parsed_bodies_of_every_endpoint(
    data: st.DataObject, endpoint: str, model: str
) -> None:
    prompt = data.draw(prompts[endpoint])
    extra = data.draw(extras)
    if endpoint == "chat":
        extra.pop("system", None)
    if endpoint != "responses":
        extra.pop("instructions", None)
    raw = json.dumps(_body(endpoint, model, prompt, extra)).encode()
    try:
        request = parse_request(raw, PATHS[endpoint])
    except InvalidRequestError:  # a body the parser refuses is never counted
        assume(False)
    assert_bounded(request)


def test_the_bound_of_english_is_a_few_bytes_a_token() -> None:
    # Not a requirement, what the meter's comfort rule assumes: ~4 bytes a token in English.
    counter = TokenCounter()
    words = "The quick brown fox jumps over the lazy dog. " * 100
    request = LLMRequest("chat", "gpt-4o", ({"role": "user", "content": words},))
    assert 3 * counter.count(request) <= counter.bound(request) <= 6 * counter.count(request)
