"""Parse an LLM request body once into a typed `LLMRequest`.

One pure function, `parse_request(body, path)`, understands the bodies of OpenAI's chat
completions, completions, embeddings and Responses API and Anthropic's messages API. Everything a
guard needs (model, prompt parts, output allowance, `n`, streaming, end user) is read here, so no
later step looks at the JSON again. Bodies llmfence cannot meter raise `InvalidRequestError`,
which the middlewares answer with an OpenAI-shaped 400. `amend(request, ...)` is the way back:
the body re-serialized with a clamped output allowance or changed stream options.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from ._body import (
    bool_field,
    chat_messages,
    deeper_than,
    fail,
    identifier,
    int_field,
    json_type,
    objects,
    prompt_input,
    str_field,
    system_texts,
)
from ._json import loads_strict

__all__ = ["MAX_END_USER", "Endpoint", "LLMRequest", "amend", "endpoint_for_path", "parse_request"]

MAX_END_USER = 256
"""The longest end-user id accepted: each one names a budget counter in the store."""

Endpoint = Literal["chat", "completions", "embeddings", "responses", "messages"]

# Larger values are not a real request but an attempt to make the projection overflow or to
# reserve an absurd amount; the providers' own limits are far below these.
MAX_OUTPUT_TOKENS = 1 << 24
MAX_N = 128
MAX_MODEL_LENGTH = 256
MAX_DEPTH = 128
"""The deepest nesting of arrays and objects accepted in a body: real requests (tool schemas
included) stay far below it, and every later stage (token counting, re-encoding) may recurse."""

# OpenAI's reasoning models refuse `max_tokens` on chat completions: they take
# `max_completion_tokens` instead.
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")
_ALLOWANCE_NAMES = ("max_completion_tokens", "max_output_tokens", "max_tokens")
# Built once: `json.dumps` with options builds an encoder per call.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
# For a body holding lone surrogates (`"\ud800"` is valid JSON): escaped again as the client
# wrote them, since they have no UTF-8 form.
_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"))

_SUFFIXES: tuple[tuple[str, Endpoint], ...] = (
    ("/chat/completions", "chat"),
    ("/completions", "completions"),
    ("/embeddings", "embeddings"),
    ("/responses", "responses"),
    ("/messages", "messages"),
)


@dataclass(frozen=True, slots=True)
class LLMRequest:
    """What llmfence needs to know about one LLM request.

    Attributes:
        endpoint: Which API the body belongs to.
        model: The model named by the body (or by an Azure deployment path).
        messages: Chat-style messages (OpenAI chat, Anthropic messages, Responses `input`
            items), as parsed JSON objects; counted per message.
        texts: Other prompt text: `prompt`, embeddings `input`, `instructions`, `system`.
        prompt_token_ids: Tokens given pre-tokenized (arrays of ints in `prompt` or `input`).
        tools: Tool and function definitions, as parsed JSON objects.
        max_output_tokens: The output allowance the body asks for, or `None`.
        n: How many completions the call asks for.
        stream: Whether the response is streamed.
        include_usage: Whether the body already asks for usage in the stream.
        end_user: The end user named by the body (`user`, or Anthropic `metadata.user_id`).
        body: The parsed body.
    """

    endpoint: Endpoint
    model: str
    messages: tuple[Mapping[str, Any], ...] = ()
    texts: tuple[str, ...] = ()
    prompt_token_ids: int = 0
    tools: tuple[Mapping[str, Any], ...] = ()
    max_output_tokens: int | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    end_user: str | None = None
    body: Mapping[str, Any] | None = None

    @property
    def usage_in_stream(self) -> bool:
        """Whether a streamed response will report usage without any amendment.

        Only OpenAI chat and completions streams need `stream_options.include_usage`;
        Anthropic and the Responses API always report usage at the end of a stream.
        """
        return self.include_usage or self.endpoint not in ("chat", "completions")


def endpoint_for_path(path: str) -> Endpoint | None:
    """The LLM API a request path belongs to, by suffix, or `None`."""
    path = path.rstrip("/")
    for suffix, endpoint in _SUFFIXES:
        if path.endswith(suffix):
            return endpoint
    return None


def _load(body: bytes) -> dict[str, Any]:
    if not body:
        fail("The request body is empty; a JSON object is required.")
    try:
        data = loads_strict(body)  # a prebuilt decoder: NaN and Infinity are not JSON
    except UnicodeDecodeError:
        fail("The request body is not valid UTF-8.")
    except ValueError:
        fail("The request body is not valid JSON.")
    except RecursionError:
        fail(f"The request body nests arrays and objects more than {MAX_DEPTH} levels deep.")
    if not isinstance(data, dict):
        fail(f"The request body must be a JSON object, not {json_type(data)}.")
    # Only a body with more openers than the limit can nest deeper: most bodies skip the walk.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and deeper_than(data, MAX_DEPTH):
        fail(f"The request body nests arrays and objects more than {MAX_DEPTH} levels deep.")
    return data


def _azure_deployment(path: str) -> str | None:
    # Azure OpenAI names the model in the path: /openai/deployments/{deployment}/chat/completions
    if "/deployments/" not in path:
        return None
    parts = path.split("/")
    name = parts[parts.index("deployments") + 1]
    if len(name) > MAX_MODEL_LENGTH:
        fail(f"The deployment name is longer than {MAX_MODEL_LENGTH} characters.", "model")
    return name or None


def _infer_endpoint(data: Mapping[str, Any]) -> Endpoint | None:
    """The API of a body sent to a path with no standard suffix (a custom metered path)."""
    if "messages" in data:
        # Anthropic puts the system prompt beside the messages; OpenAI puts it among them.
        return "messages" if "system" in data else "chat"
    if "prompt" in data:
        return "completions"
    if "input" in data:
        model = data.get("model")
        return "embeddings" if isinstance(model, str) and "embed" in model else "responses"
    return None


# Each API's prompt fields belong to it alone: a body that also carries another API's (a `prompt`
# on a chat path) is refused, since llmfence would count one field and an upstream may read the
# other. (The Responses API has a `prompt` of its own: a stored prompt's reference.)
_FOREIGN_FIELDS: dict[Endpoint, tuple[str, ...]] = {
    "chat": ("prompt", "input"),
    "completions": ("messages", "input"),
    "embeddings": ("messages", "prompt"),
    "responses": ("messages",),
    "messages": ("prompt", "input"),
}


def parse_request(
    body: bytes, path: str, deployments: Mapping[str, str] | None = None
) -> LLMRequest:
    """Parse the raw body of an LLM request.

    Args:
        body: The request body, exactly as received.
        path: The request path; its suffix (`/chat/completions`, `/messages`…) decides which
            API the body belongs to. On other paths the body's fields decide: `messages` is a
            chat (Anthropic's if `system` is beside it), `prompt` a completion, `input` an
            embedding (for a model named `*embed*`) or a Responses API call.
        deployments: Azure-style deployment names (`/openai/deployments/{name}/...`) and the
            model each one runs. On such a path the deployment decides the model (a body
            `model` that says otherwise does not change it); a deployment not in the map is
            the model of its own name.

    Returns:
        The typed request.

    Raises:
        InvalidRequestError: The body is not UTF-8 JSON, not an object, not an LLM request,
            carries another API's prompt field (a `prompt` on a chat path), or has fields of
            the wrong type or out of range.
    """
    data = _load(body)
    endpoint = endpoint_for_path(path) or _infer_endpoint(data)
    if endpoint is None:
        fail(
            "The request body has none of 'messages', 'prompt' or 'input'; llmfence cannot "
            "meter it."
        )
    for name in _FOREIGN_FIELDS[endpoint]:
        if data.get(name) is not None:
            fail(
                f"'{name}' does not belong in a body for the {endpoint} API (which the path "
                "names); llmfence will not guess which field the upstream reads.",
                name,
            )

    model = identifier(data, "model", max_length=MAX_MODEL_LENGTH)
    deployment = _azure_deployment(path)
    if deployment is not None:
        # What runs is the deployment, whatever the body says: check and price that.
        model = (deployments or {}).get(deployment, deployment)
    if not model:
        fail("'model' is required.", "model")

    messages: tuple[Mapping[str, Any], ...] = ()
    texts: tuple[str, ...] = ()
    token_ids = 0
    tools: tuple[Mapping[str, Any], ...] = ()
    end_user = identifier(data, "user", max_length=MAX_END_USER)

    if endpoint == "chat":
        if "messages" not in data:
            fail("'messages' is required.", "messages")
        messages = chat_messages(data["messages"], "messages")
    elif endpoint == "messages":
        if "messages" not in data:
            fail("'messages' is required.", "messages")
        messages = chat_messages(data["messages"], "messages", anthropic=True)
        texts = system_texts(data.get("system"), "system")
        metadata = data.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict):
                fail("'metadata' must be an object.", "metadata")
            end_user = (
                identifier(metadata, "user_id", max_length=MAX_END_USER, param="metadata.user_id")
                or end_user
            )
    elif endpoint == "completions":
        if "prompt" not in data:
            fail("'prompt' is required.", "prompt")
        texts, token_ids = prompt_input(data["prompt"], "prompt")
    elif endpoint == "embeddings":
        if "input" not in data:
            fail("'input' is required.", "input")
        texts, token_ids = prompt_input(data["input"], "input")
    else:  # responses
        value = data.get("input")
        if isinstance(value, str):
            texts = (value,)
        elif value is not None:
            messages = chat_messages(value, "input")
        instructions = str_field(data, "instructions")
        if instructions:
            texts = (*texts, instructions)

    if "tools" in data and data["tools"] is not None:
        tools = objects(data["tools"], "tools")
    if "functions" in data and data["functions"] is not None:
        tools = (*tools, *objects(data["functions"], "functions"))

    allowance = None
    for name in _ALLOWANCE_NAMES:
        # Each one given is checked; the first wins.
        if data.get(name) is not None:
            value = int_field(data, name, low=1, high=MAX_OUTPUT_TOKENS)
            if allowance is None:
                allowance = value

    n = 1 if data.get("n") is None else int_field(data, "n", low=1, high=MAX_N) or 1
    stream = data.get("stream") is True or bool_field(data, "stream")
    include_usage = False
    options = data.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            fail("'stream_options' must be an object.", "stream_options")
        include_usage = bool_field(options, "include_usage")

    # (Positional: a frozen dataclass takes them faster than by keyword.)
    return LLMRequest(
        endpoint,
        model,
        messages,
        texts,
        token_ids,
        tools,
        allowance,
        n,
        stream,
        include_usage,
        end_user,
        data,
    )


def amend(
    request: LLMRequest,
    *,
    max_tokens: int | None = None,
    stream_options: Mapping[str, Any] | None = None,
) -> tuple[LLMRequest, bytes]:
    """Change some fields of a parsed request's body and serialize it again.

    The output allowance keeps the name the body already uses (`max_completion_tokens`,
    `max_output_tokens` or `max_tokens`, the first present); a body naming none gets the name
    its API expects: `max_output_tokens` for the Responses API, `max_completion_tokens` for
    OpenAI's reasoning models (`o1`, `o3`, `o4`, `gpt-5`…) on chat completions, `max_tokens`
    otherwise.

    Args:
        request: A request from `parse_request` (it must carry its body).
        max_tokens: The new output allowance per choice; `None` leaves it as it is.
        stream_options: Replaces the body's `stream_options`; `None` leaves them as they are.

    Returns:
        The request with its `body` replaced (its other fields are unchanged), and the new body
        as compact UTF-8 JSON bytes.

    Raises:
        ValueError: The request has no body.
    """
    if request.body is None:
        raise ValueError("the request has no body to amend")
    body = dict(request.body)
    if max_tokens is not None:
        name = next((n for n in _ALLOWANCE_NAMES if n in body), None)
        if name is None:
            if request.endpoint == "responses":
                name = "max_output_tokens"
            elif request.endpoint == "chat" and request.model.startswith(_REASONING_PREFIXES):
                name = "max_completion_tokens"
            else:
                name = "max_tokens"
        body[name] = max_tokens
    if stream_options is not None:
        body["stream_options"] = dict(stream_options)
    text = _ENCODER.encode(body)
    try:
        data = text.encode()
    except UnicodeEncodeError:  # a lone surrogate somewhere: escape it as it came in
        data = _ASCII_ENCODER.encode(body).encode()
    return replace(request, body=body), data
