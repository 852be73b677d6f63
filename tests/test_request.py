from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llmfence._json import loads, loads_strict
from llmfence._request import LLMRequest, amend, endpoint_for_path, parse_request
from llmfence.exceptions import InvalidRequestError


def parse(body: dict[str, Any] | bytes, path: str = "/v1/chat/completions") -> LLMRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return parse_request(raw, path)


CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/v1/chat/completions", "chat"),
        ("/chat/completions", "chat"),
        ("/openai/deployments/gpt4o/chat/completions", "chat"),
        ("/v1/completions", "completions"),
        ("/v1/embeddings", "embeddings"),
        ("/v1/responses", "responses"),
        ("/v1/messages", "messages"),
        ("/v1/messages/", "messages"),
        ("/v1/models", None),
        ("/health", None),
    ],
)
def test_endpoint_for_path(path: str, endpoint: str | None) -> None:
    assert endpoint_for_path(path) == endpoint


def test_chat_fields() -> None:
    request = parse(
        {
            "model": "gpt-4o",
            "messages": [
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}},
                    ],
                },
            ],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
            "functions": [{"name": "g"}],
            "max_completion_tokens": 50,
            "max_tokens": 70,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "alice",
        }
    )
    assert request.endpoint == "chat"
    assert request.model == "gpt-4o"
    assert len(request.messages) == 2
    assert [t.get("name") or t["function"]["name"] for t in request.tools] == ["f", "g"]
    assert request.max_output_tokens == 50  # max_completion_tokens wins over the alias
    assert request.n == 2
    assert request.stream
    assert request.include_usage
    assert request.usage_in_stream
    assert request.end_user == "alice"


def test_defaults() -> None:
    request = parse(CHAT)
    assert request.max_output_tokens is None
    assert request.n == 1
    assert not request.stream
    assert not request.include_usage
    assert not request.usage_in_stream
    assert request.end_user is None


def test_completions_prompt_forms() -> None:
    assert parse({"model": "m", "prompt": "hello"}, "/v1/completions").texts == ("hello",)
    request = parse({"model": "m", "prompt": ["a", "b", [1, 2, 3]]}, "/v1/completions")
    assert request.texts == ("a", "b")
    assert request.prompt_token_ids == 3
    request = parse({"model": "m", "prompt": [1, 2, 3, 4]}, "/v1/completions")
    assert request.prompt_token_ids == 4


def test_embeddings_input() -> None:
    request = parse({"model": "text-embedding-3-small", "input": ["x", "y"]}, "/v1/embeddings")
    assert request.endpoint == "embeddings"
    assert request.texts == ("x", "y")
    assert request.usage_in_stream


def test_responses_api() -> None:
    request = parse(
        {"model": "gpt-4.1", "input": "hi", "instructions": "be nice", "max_output_tokens": 9},
        "/v1/responses",
    )
    assert request.texts == ("hi", "be nice")
    assert request.max_output_tokens == 9
    items = parse(
        {"model": "gpt-4.1", "input": [{"role": "user", "content": "hi"}]}, "/v1/responses"
    )
    assert items.messages == ({"role": "user", "content": "hi"},)


def test_anthropic_messages() -> None:
    request = parse(
        {
            "model": "claude-3-5-sonnet-latest",
            "system": [{"type": "text", "text": "sys"}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 1024,
            "metadata": {"user_id": "u-1"},
            "stream": True,
        },
        "/v1/messages",
    )
    assert request.endpoint == "messages"
    assert request.texts == ("sys",)
    assert request.max_output_tokens == 1024
    assert request.end_user == "u-1"
    assert request.usage_in_stream  # Anthropic always reports usage in streams
    assert parse({**CHAT, "system": "s"}, "/v1/messages").texts == ("s",)


def test_azure_deployment_names_the_model() -> None:
    body = {"messages": [{"role": "user", "content": "x"}]}
    request = parse(body, "/openai/deployments/my-gpt4o/chat/completions")
    assert request.model == "my-gpt4o"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"", None),
        (b"\xff\xfe\xfa", None),
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'"text"', None),
        (b"null", None),
        (b'{"model": "m", "messages": [], "max_tokens": NaN}', None),
        (b"[" * 100_000 + b"]" * 100_000, None),
        ({"messages": []}, "model"),
        ({"model": 5, "messages": []}, "model"),
        ({"model": "x" * 300, "messages": []}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": "m", "messages": "hi"}, "messages"),
        ({"model": "m", "messages": [5]}, "messages[0]"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0]"),
        ({"model": "m", "messages": [{"role": 1}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "u", "content": 5}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "u", "content": [5]}]}, "messages[0].content[0]"),
        ({"model": "m", "messages": [{"role": "u", "name": 5}]}, "messages[0].name"),
        ({**CHAT, "max_tokens": -1}, "max_tokens"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": 10**12}, "max_tokens"),
        ({**CHAT, "max_tokens": 1.5}, "max_tokens"),
        ({**CHAT, "max_tokens": "100"}, "max_tokens"),
        ({**CHAT, "max_tokens": True}, "max_tokens"),
        ({**CHAT, "max_completion_tokens": -5}, "max_completion_tokens"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "n": 1000}, "n"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "stream_options": []}, "stream_options"),
        ({**CHAT, "stream_options": {"include_usage": 1}}, "include_usage"),
        ({**CHAT, "user": 7}, "user"),
        ({**CHAT, "tools": {}}, "tools"),
        ({**CHAT, "tools": ["f"]}, "tools[0]"),
    ],
)
def test_malformed_bodies_raise_typed_errors(
    body: dict[str, Any] | bytes, param: str | None
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse(body)
    error = info.value
    assert error.status_code == 400
    assert error.param == param
    shaped = error.to_openai()["error"]
    assert shaped["code"] == "invalid_request_error"
    assert shaped["type"] == "invalid_request_error"
    assert shaped["message"]


@pytest.mark.parametrize(
    ("body", "path", "param"),
    [
        ({"model": "m"}, "/v1/completions", "prompt"),
        ({"model": "m", "prompt": {"a": 1}}, "/v1/completions", "prompt"),
        ({"model": "m", "prompt": [1.5]}, "/v1/completions", "prompt[0]"),
        ({"model": "m", "prompt": [[1, "a"]]}, "/v1/completions", "prompt[0]"),
        ({"model": "m"}, "/v1/embeddings", "input"),
        ({"model": "m", "input": 5}, "/v1/embeddings", "input"),
        ({"model": "m", "input": [True]}, "/v1/embeddings", "input[0]"),
        ({"model": "m", "input": 5}, "/v1/responses", "input"),
        ({"model": "m", "input": "x", "instructions": 1}, "/v1/responses", "instructions"),
        ({"model": "m", "messages": [], "system": 5}, "/v1/messages", "system"),
        ({"model": "m", "messages": [], "system": [{"text": 1}]}, "/v1/messages", "system[0].text"),
        ({"model": "m", "messages": [], "metadata": "u"}, "/v1/messages", "metadata"),
        ({"model": "m"}, "/v1/messages", "messages"),
    ],
)
def test_malformed_bodies_per_endpoint(body: dict[str, Any], path: str, param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse(body, path)
    assert info.value.param == param


def test_custom_paths_infer_the_api_from_the_body() -> None:
    assert parse(CHAT, "/api/generate").endpoint == "chat"
    assert parse({**CHAT, "system": "s"}, "/api/generate").endpoint == "messages"
    assert parse({"model": "m", "prompt": "p"}, "/x").endpoint == "completions"
    assert parse({"model": "text-embedding-3-small", "input": "p"}, "/x").endpoint == "embeddings"
    assert parse({"model": "gpt-4.1", "input": "p"}, "/x").endpoint == "responses"
    with pytest.raises(InvalidRequestError, match="cannot meter"):
        parse({"model": "m"}, "/v1/models")


def test_utf8_with_bom_and_unicode() -> None:
    body = json.dumps({**CHAT, "user": "zoë"}, ensure_ascii=False).encode()
    assert parse(body).end_user == "zoë"


@pytest.mark.parametrize(
    ("body", "path", "name"),
    [
        (CHAT, "/v1/chat/completions", "max_tokens"),
        ({**CHAT, "model": "o3-mini"}, "/v1/chat/completions", "max_completion_tokens"),
        ({**CHAT, "model": "o1"}, "/v1/chat/completions", "max_completion_tokens"),
        ({**CHAT, "model": "o4-mini"}, "/v1/chat/completions", "max_completion_tokens"),
        ({**CHAT, "model": "gpt-5-nano"}, "/v1/chat/completions", "max_completion_tokens"),
        ({**CHAT, "model": "o3-mini", "max_tokens": 90}, "/v1/chat/completions", "max_tokens"),
        ({**CHAT, "max_completion_tokens": 90}, "/v1/chat/completions", "max_completion_tokens"),
        ({"model": "gpt-4.1", "input": "hi"}, "/v1/responses", "max_output_tokens"),
        ({"model": "gpt-4.1", "input": "hi", "max_tokens": 9}, "/v1/responses", "max_tokens"),
        ({**CHAT, "model": "o3", "max_tokens": 9}, "/v1/messages", "max_tokens"),
        ({**CHAT, "model": "o3"}, "/v1/messages", "max_tokens"),
        ({"model": "o3", "prompt": "p"}, "/v1/completions", "max_tokens"),
    ],
)
def test_amend_names_the_allowance_as_the_api_expects(
    body: dict[str, Any], path: str, name: str
) -> None:
    request = parse(body, path)
    amended, raw = amend(request, max_tokens=12)
    assert amended.body is not None
    assert amended.body[name] == 12
    assert json.loads(raw) == {**body, name: 12}
    # Only the body changes: the parse is not redone, and the original stays as it was.
    assert amended.max_output_tokens == request.max_output_tokens
    assert request.body == body


def test_amend_stream_options_and_compact_utf8() -> None:
    body = {**CHAT, "user": "zoë", "stream": True, "stream_options": {"x": 1}}
    request = parse(json.dumps(body).encode())
    amended, raw = amend(request, stream_options={"include_usage": True})
    assert raw == json.dumps(
        {**body, "stream_options": {"include_usage": True}},
        ensure_ascii=False,
        separators=(",", ":"),
    ).encode("utf-8")
    assert "zoë".encode() in raw
    assert amended.body is not None
    assert amended.body["stream_options"] == {"include_usage": True}
    both, raw = amend(request, max_tokens=3, stream_options={})
    assert json.loads(raw) == {**body, "max_tokens": 3, "stream_options": {}}
    assert both.endpoint == request.endpoint
    assert both.messages == request.messages


def test_amend_without_changes_reserializes_the_same_body() -> None:
    request = parse({**CHAT, "max_tokens": 5})
    amended, raw = amend(request)
    assert amended == request
    assert json.loads(raw) == {**CHAT, "max_tokens": 5}


def test_amend_needs_a_body() -> None:
    with pytest.raises(ValueError, match="no body"):
        amend(LLMRequest(endpoint="chat", model="m"), max_tokens=1)


def test_utf8_bom_and_other_encodings_read_as_json_loads_reads_them() -> None:
    body = json.dumps({**CHAT, "user": "zoë"}, ensure_ascii=False)
    assert parse(b"\xef\xbb\xbf" + body.encode()).end_user == "zoë"
    for encoding in ("utf-16", "utf-16-le", "utf-32-be"):
        assert parse(body.encode(encoding)).end_user == "zoë"
    assert parse(b" \r\n\t" + body.encode() + b"\n ").end_user == "zoë"


JSON_TEXT = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
).map(json.dumps)
ENCODED = st.tuples(
    JSON_TEXT,
    st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]),
    st.sampled_from(["", " ", "\n", "\t\r\n", "x", "\x00", "{"]),
).map(lambda t: (t[2] + t[0] + t[2]).encode(t[1], "surrogatepass"))


def outcome(load: Any, data: bytes | bytearray) -> str:
    try:
        return repr(load(data))  # (repr: NaN is not equal to itself)
    except UnicodeDecodeError:
        return "UnicodeDecodeError"
    except ValueError:
        return "ValueError"
    except RecursionError:
        return "RecursionError"


@given(st.binary(max_size=40) | ENCODED | ENCODED.map(lambda raw: raw[: len(raw) // 2]))
def test_prebuilt_decoders_read_as_json_loads(data: bytes) -> None:
    assert outcome(loads, data) == outcome(json.loads, data)
    assert outcome(loads, bytearray(data)) == outcome(json.loads, data)

    def reject(name: str) -> None:
        raise ValueError(name)

    assert outcome(loads_strict, data) == outcome(
        lambda raw: json.loads(raw, parse_constant=reject), data
    )


def test_strict_decoder_refuses_nan_and_infinity() -> None:
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        assert str(loads(b"[" + constant + b"]")[0]) in ("nan", "inf", "-inf")
        with pytest.raises(ValueError, match="not valid JSON"):
            loads_strict(b'{"a": ' + constant + b"}")
