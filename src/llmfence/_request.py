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
from typing import Any, Literal, NoReturn

from ._json import loads_strict
from .exceptions import InvalidRequestError

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


def _fail(message: str, param: str | None = None) -> NoReturn:
    raise InvalidRequestError(message, param=param)


def _load(body: bytes) -> dict[str, Any]:
    if not body:
        _fail("The request body is empty; a JSON object is required.")
    try:
        data = loads_strict(body)  # a prebuilt decoder: NaN and Infinity are not JSON
    except UnicodeDecodeError:
        _fail("The request body is not valid UTF-8.")
    except ValueError:
        _fail("The request body is not valid JSON.")
    except RecursionError:
        _fail(f"The request body nests arrays and objects more than {MAX_DEPTH} levels deep.")
    if not isinstance(data, dict):
        _fail(f"The request body must be a JSON object, not {_json_type(data)}.")
    # Only a body with more openers than the limit can nest deeper: most bodies skip the walk.
    if body.count(b"[") + body.count(b"{") > MAX_DEPTH and _deeper_than(data, MAX_DEPTH):
        _fail(f"The request body nests arrays and objects more than {MAX_DEPTH} levels deep.")
    return data


def _deeper_than(value: object, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` levels (walked level by level, with
    no recursion; exact type tests, as only the decoder's dicts and lists are here)."""
    level: list[Any] = [value]
    depth = 1
    while level:
        if depth > limit:
            return True
        below: list[Any] = []
        for item in level:
            for child in item.values() if type(item) is dict else item:
                if type(child) is dict or type(child) is list:
                    below.append(child)
        level = below
        depth += 1
    return False


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _int(body: Mapping[str, Any], name: str, *, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    # bool is an int in Python but not in JSON Schema: `"max_tokens": true` is a client bug.
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"'{name}' must be an integer, not {_json_type(value)}.", name)
    if not low <= value <= high:
        _fail(f"'{name}' must be between {low} and {high}; got {value}.", name)
    return value


def _bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        _fail(f"'{name}' must be a boolean, not {_json_type(value)}.", name)
    return value


def _str(body: Mapping[str, Any], name: str, *, max_length: int | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        _fail(f"'{name}' must be a string, not {_json_type(value)}.", name)
    if max_length is not None and len(value) > max_length:
        _fail(f"'{name}' is longer than {max_length} characters.", name)
    return value


def _identifier(
    body: Mapping[str, Any], name: str, *, max_length: int, param: str | None = None
) -> str | None:
    """A string that names a counter or a price in the store: no lone surrogates, which have
    no UTF-8 form and so no name in Redis (nor a place in a spend record)."""
    value = _str(body, name, max_length=max_length)
    if value is not None and not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            param = param or name
            _fail(f"'{param}' must be valid Unicode text (it holds a lone surrogate).", param)
    return value


def _objects(value: object, param: str) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, list):
        _fail(f"'{param}' must be an array, not {_json_type(value)}.", param)
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            _fail(f"'{param}[{i}]' must be an object, not {_json_type(item)}.", f"{param}[{i}]")
    return tuple(value)


def _messages(
    value: object, param: str, *, anthropic: bool = False
) -> tuple[Mapping[str, Any], ...]:
    """Chat messages: objects with a string `role` (Anthropic's may omit it) and content."""
    messages = _objects(value, param)
    for i, message in enumerate(messages):
        # Plain type tests first, and each error's `param` built only if it is raised: this
        # runs for every message of every request.
        role = message.get("role")
        if type(role) is not str:
            if role is not None:
                _fail(f"'{param}[{i}].role' must be a string.", f"{param}[{i}].role")
            if "role" not in message and not anthropic and "type" not in message:
                _fail(f"'{param}[{i}]' has no 'role'.", f"{param}[{i}]")
        content = message.get("content")
        if type(content) is not str and content is not None:
            if not isinstance(content, list):
                _fail(
                    f"'{param}[{i}].content' must be a string or an array, "
                    f"not {_json_type(content)}.",
                    f"{param}[{i}].content",
                )
            for j, part in enumerate(content):
                if not isinstance(part, dict | str):
                    _fail(
                        f"'{param}[{i}].content[{j}]' must be an object.",
                        f"{param}[{i}].content[{j}]",
                    )
        name = message.get("name")
        if name is not None and type(name) is not str:
            _fail(f"'{param}[{i}].name' must be a string.", f"{param}[{i}].name")
    return messages


def _prompt_input(value: object, param: str) -> tuple[tuple[str, ...], int]:
    """`prompt` / embeddings `input`: a string, strings, token ids, or arrays of token ids."""
    if isinstance(value, str):
        return (value,), 0
    if not isinstance(value, list):
        _fail(f"'{param}' must be a string or an array, not {_json_type(value)}.", param)
    texts: list[str] = []
    token_ids = 0
    for i, item in enumerate(value):
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            token_ids += 1
        elif isinstance(item, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in item
        ):
            token_ids += len(item)
        else:
            _fail(
                f"'{param}[{i}]' must be a string, a token id or an array of token ids.",
                f"{param}[{i}]",
            )
    return tuple(texts), token_ids


def _system_texts(value: object, param: str) -> tuple[str, ...]:
    """Anthropic `system`: a string or an array of text blocks."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    blocks = _objects(value, param)
    texts = []
    for i, block in enumerate(blocks):
        text = block.get("text")
        if not isinstance(text, str):
            _fail(f"'{param}[{i}].text' must be a string.", f"{param}[{i}].text")
        texts.append(text)
    return tuple(texts)


def _azure_deployment(path: str) -> str | None:
    # Azure OpenAI names the model in the path: /openai/deployments/{deployment}/chat/completions
    if "/deployments/" not in path:
        return None
    parts = path.split("/")
    name = parts[parts.index("deployments") + 1]
    if len(name) > MAX_MODEL_LENGTH:
        _fail(f"The deployment name is longer than {MAX_MODEL_LENGTH} characters.", "model")
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
        _fail(
            "The request body has none of 'messages', 'prompt' or 'input'; llmfence cannot "
            "meter it."
        )
    for name in _FOREIGN_FIELDS[endpoint]:
        if data.get(name) is not None:
            _fail(
                f"'{name}' does not belong in a body for the {endpoint} API (which the path "
                "names); llmfence will not guess which field the upstream reads.",
                name,
            )

    model = _identifier(data, "model", max_length=MAX_MODEL_LENGTH)
    deployment = _azure_deployment(path)
    if deployment is not None:
        # What runs is the deployment, whatever the body says: check and price that.
        model = (deployments or {}).get(deployment, deployment)
    if not model:
        _fail("'model' is required.", "model")

    messages: tuple[Mapping[str, Any], ...] = ()
    texts: tuple[str, ...] = ()
    token_ids = 0
    tools: tuple[Mapping[str, Any], ...] = ()
    end_user = _identifier(data, "user", max_length=MAX_END_USER)

    if endpoint == "chat":
        if "messages" not in data:
            _fail("'messages' is required.", "messages")
        messages = _messages(data["messages"], "messages")
    elif endpoint == "messages":
        if "messages" not in data:
            _fail("'messages' is required.", "messages")
        messages = _messages(data["messages"], "messages", anthropic=True)
        texts = _system_texts(data.get("system"), "system")
        metadata = data.get("metadata")
        if metadata is not None:
            if not isinstance(metadata, dict):
                _fail("'metadata' must be an object.", "metadata")
            end_user = (
                _identifier(metadata, "user_id", max_length=MAX_END_USER, param="metadata.user_id")
                or end_user
            )
    elif endpoint == "completions":
        if "prompt" not in data:
            _fail("'prompt' is required.", "prompt")
        texts, token_ids = _prompt_input(data["prompt"], "prompt")
    elif endpoint == "embeddings":
        if "input" not in data:
            _fail("'input' is required.", "input")
        texts, token_ids = _prompt_input(data["input"], "input")
    else:  # responses
        value = data.get("input")
        if isinstance(value, str):
            texts = (value,)
        elif value is not None:
            messages = _messages(value, "input")
        instructions = _str(data, "instructions")
        if instructions:
            texts = (*texts, instructions)

    if "tools" in data and data["tools"] is not None:
        tools = _objects(data["tools"], "tools")
    if "functions" in data and data["functions"] is not None:
        tools = (*tools, *_objects(data["functions"], "functions"))

    allowance = None
    for name in _ALLOWANCE_NAMES:
        # Each one given is checked; the first wins.
        if data.get(name) is not None:
            value = _int(data, name, low=1, high=MAX_OUTPUT_TOKENS)
            if allowance is None:
                allowance = value

    n = 1 if data.get("n") is None else _int(data, "n", low=1, high=MAX_N) or 1
    stream = data.get("stream") is True or _bool(data, "stream")
    include_usage = False
    options = data.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            _fail("'stream_options' must be an object.", "stream_options")
        include_usage = _bool(options, "include_usage")

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
