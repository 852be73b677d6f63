"""Typed fields out of a parsed JSON request body, each refusal an `InvalidRequestError`
naming the field (`param`): what `parse_request` reads a body with."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NoReturn

from .exceptions import InvalidRequestError

__all__ = [
    "bool_field",
    "chat_messages",
    "deeper_than",
    "fail",
    "identifier",
    "int_field",
    "json_type",
    "objects",
    "prompt_input",
    "str_field",
    "system_texts",
]


def fail(message: str, param: str | None = None) -> NoReturn:
    raise InvalidRequestError(message, param=param)


def deeper_than(value: object, limit: int) -> bool:
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


def json_type(value: object) -> str:
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


def int_field(body: Mapping[str, Any], name: str, *, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    # bool is an int in Python but not in JSON Schema: `"max_tokens": true` is a client bug.
    if isinstance(value, bool) or not isinstance(value, int):
        fail(f"'{name}' must be an integer, not {json_type(value)}.", name)
    if not low <= value <= high:
        fail(f"'{name}' must be between {low} and {high}; got {value}.", name)
    return value


def bool_field(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        fail(f"'{name}' must be a boolean, not {json_type(value)}.", name)
    return value


def str_field(body: Mapping[str, Any], name: str, *, max_length: int | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        fail(f"'{name}' must be a string, not {json_type(value)}.", name)
    if max_length is not None and len(value) > max_length:
        fail(f"'{name}' is longer than {max_length} characters.", name)
    return value


def identifier(
    body: Mapping[str, Any], name: str, *, max_length: int, param: str | None = None
) -> str | None:
    """A string that names a counter or a price in the store: no lone surrogates, which have
    no UTF-8 form and so no name in Redis (nor a place in a spend record)."""
    value = str_field(body, name, max_length=max_length)
    if value is not None and not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            param = param or name
            fail(f"'{param}' must be valid Unicode text (it holds a lone surrogate).", param)
    return value


def objects(value: object, param: str) -> tuple[Mapping[str, Any], ...]:
    if not isinstance(value, list):
        fail(f"'{param}' must be an array, not {json_type(value)}.", param)
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            fail(f"'{param}[{i}]' must be an object, not {json_type(item)}.", f"{param}[{i}]")
    return tuple(value)


def chat_messages(
    value: object, param: str, *, anthropic: bool = False
) -> tuple[Mapping[str, Any], ...]:
    """Chat messages: objects with a string `role` (Anthropic's may omit it) and content."""
    messages = objects(value, param)
    for i, message in enumerate(messages):
        # Plain type tests first, and each error's `param` built only if it is raised: this
        # runs for every message of every request.
        role = message.get("role")
        if type(role) is not str:
            if role is not None:
                fail(f"'{param}[{i}].role' must be a string.", f"{param}[{i}].role")
            if "role" not in message and not anthropic and "type" not in message:
                fail(f"'{param}[{i}]' has no 'role'.", f"{param}[{i}]")
        content = message.get("content")
        if type(content) is not str and content is not None:
            if not isinstance(content, list):
                fail(
                    f"'{param}[{i}].content' must be a string or an array, "
                    f"not {json_type(content)}.",
                    f"{param}[{i}].content",
                )
            for j, part in enumerate(content):
                if not isinstance(part, dict | str):
                    fail(
                        f"'{param}[{i}].content[{j}]' must be an object.",
                        f"{param}[{i}].content[{j}]",
                    )
        name = message.get("name")
        if name is not None and type(name) is not str:
            fail(f"'{param}[{i}].name' must be a string.", f"{param}[{i}].name")
    return messages


def prompt_input(value: object, param: str) -> tuple[tuple[str, ...], int]:
    """`prompt` / embeddings `input`: a string, strings, token ids, or arrays of token ids."""
    if isinstance(value, str):
        return (value,), 0
    if not isinstance(value, list):
        fail(f"'{param}' must be a string or an array, not {json_type(value)}.", param)
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
            fail(
                f"'{param}[{i}]' must be a string, a token id or an array of token ids.",
                f"{param}[{i}]",
            )
    return tuple(texts), token_ids


def system_texts(value: object, param: str) -> tuple[str, ...]:
    """Anthropic `system`: a string or an array of text blocks."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    blocks = objects(value, param)
    texts = []
    for i, block in enumerate(blocks):
        text = block.get("text")
        if not isinstance(text, str):
            fail(f"'{param}[{i}].text' must be a string.", f"{param}[{i}].text")
        texts.append(text)
    return tuple(texts)
