"""Count prompt tokens offline, once per message.

The encodings (`cl100k_base`, `o200k_base`) ship inside the package: they are read from package
data, checked against the sha256 that tiktoken publishes for them, and handed to tiktoken's public
`Encoding` constructor, so counting never opens a connection and never writes tiktoken's cache.

Chat overhead follows OpenAI's cookbook ("How to count tokens with tiktoken"): 3 tokens per
message, 1 per `name`, 3 to prime the reply, and the cookbook's formula for tool definitions.
Models that are not OpenAI's are counted with `o200k_base` as an approximation; the provider's
reported usage replaces the estimate once the response arrives.

`TokenCounter.bound` is the same arithmetic with every text measured by its UTF-8 length
instead of encoded: a byte-level BPE token is at least one byte, so it is an upper bound of
`count` for every request, at the cost of a length (ASCII) or one `str.encode` per text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections.abc import Callable, Iterable, Mapping
from functools import cache, lru_cache
from importlib.resources import files
from typing import Any

import anyio.to_thread
import tiktoken

from ._request import LLMRequest

__all__ = ["TokenCounter", "encoding_for_model", "encoding_name_for_model", "get_encoding"]

# sha256 of the files, as tiktoken_ext.openai_public publishes them.
_SHA256 = {
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
}
# Split patterns and special tokens, as tiktoken_ext.openai_public defines them (a test checks
# that they still agree with the installed tiktoken).
_PATTERNS = {
    "cl100k_base": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
        r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
    ),
    "o200k_base": "|".join(
        [
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
            r"""\p{N}{1,3}""",
            r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
            r"""\s*[\r\n]+""",
            r"""\s+(?!\S)""",
            r"""\s+""",
        ]
    ),
}
_SPECIAL_TOKENS = {
    "cl100k_base": {
        "<|endoftext|>": 100257,
        "<|fim_prefix|>": 100258,
        "<|fim_middle|>": 100259,
        "<|fim_suffix|>": 100260,
        "<|endofprompt|>": 100276,
    },
    "o200k_base": {"<|endoftext|>": 199999, "<|endofprompt|>": 200018},
}

# Model name prefixes that use cl100k_base; every other model uses o200k_base (OpenAI's current
# models do, and for other providers' models it is the documented approximation).
_CL100K_PREFIXES = (
    "gpt-4",
    "gpt-3.5",
    "gpt-35",
    "text-embedding-",
    "davinci-002",
    "babbage-002",
    "text-davinci-",
)
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "chatgpt-4o")

_lock = threading.Lock()


def _ranks(data: bytes) -> dict[bytes, int]:
    # tiktoken's own `load_tiktoken_bpe` takes a path and copies the file into its cache
    # directory; parsing the lines here keeps package data read-only and the process offline.
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@cache
def _load(name: str) -> tiktoken.Encoding:
    data = files("llmfence").joinpath("_encodings", f"{name}.tiktoken").read_bytes()
    if hashlib.sha256(data).hexdigest() != _SHA256[name]:
        raise RuntimeError(f"the bundled {name} encoding is corrupt (sha256 mismatch)")
    return tiktoken.Encoding(
        name=name,
        pat_str=_PATTERNS[name],
        mergeable_ranks=_ranks(data),
        special_tokens=_SPECIAL_TOKENS[name],
    )


def get_encoding(name: str) -> tiktoken.Encoding:
    """A bundled encoding by name (`"cl100k_base"` or `"o200k_base"`), loaded once."""
    if name not in _SHA256:
        raise ValueError(f"llmfence bundles cl100k_base and o200k_base, not {name!r}")
    # Loading takes ~0.5 s; the lock keeps two threads from loading the same file twice.
    with _lock:
        return _load(name)


@lru_cache(maxsize=4096)
def encoding_name_for_model(model: str | None) -> str:
    """The encoding llmfence counts a model's tokens with.

    `gpt-4o`, `gpt-4.1`, `o`-series and `gpt-5` models use `o200k_base`; `gpt-4`,
    `gpt-3.5` and the `text-embedding-*` models use `cl100k_base`; every other model,
    including other providers', is approximated with `o200k_base`.
    """
    if not model:
        return "o200k_base"
    name = model.rsplit("/", 1)[-1].lower()
    if name.startswith("ft:"):
        name = name[3:]
    if name.startswith(_O200K_PREFIXES):
        return "o200k_base"
    if name.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return "o200k_base"


def encoding_for_model(model: str | None) -> tiktoken.Encoding:
    """The bundled tiktoken encoding for a model (see `encoding_name_for_model`)."""
    found = _BY_MODEL.get(model)
    if found is None:
        found = get_encoding(encoding_name_for_model(model))
        if len(_BY_MODEL) >= 4096:  # model names come from request bodies
            _BY_MODEL.clear()
        _BY_MODEL[model] = found
    return found


# Every request asks for its model's encoding: a dict read, without the loading lock.
_BY_MODEL: dict[str | None, tiktoken.Encoding] = {}

Measure = Callable[[str], int]
"""How many tokens a text counts for: encoded (`count`) or bounded by its bytes (`bound`)."""


@cache
def _measure(enc: tiktoken.Encoding) -> Measure:
    encode = enc.encode_ordinary
    return lambda text: len(encode(text))


def _utf8_length(text: str) -> int:
    # `isascii` reads a flag of the string (O(1)). Lone surrogates (valid JSON escapes) take
    # 3 bytes here, as the U+FFFD tiktoken encodes in their place does.
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


# OpenAI's cookbook constants for counting tool definitions.
_FUNC_INIT = 7
_PROP_INIT = 3
_PROP_KEY = 3
_ENUM_INIT = -3
_ENUM_ITEM = 3
_FUNC_END = 12
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_NAME = 1
_REPLY_PRIMING = 3
# Image parts: OpenAI bills 85 tokens for `detail: low` and 85 + 170 per 512px tile otherwise;
# without the image's size, a 1024×1024 image (4 tiles, 765 tokens) is the estimate.
_IMAGE_LOW = 85
_IMAGE_DEFAULT = 765
# Above this many characters still to encode, counting moves to a worker thread
# (tiktoken releases the GIL, so the second core does the work).
_THREAD_THRESHOLD = 16_384


class TokenCounter:
    """Counts the prompt tokens of a `LLMRequest`, remembering each message's count.

    A multi-turn chat resends its whole history on every call; the per-message cache (keyed by
    a hash of the message and the encoding; the oldest half dropped when it is full) means only
    the new messages are encoded.
    The counter is safe to share between the event loop and worker threads.

    Args:
        cache_size: How many message counts to remember.
        thread_threshold: Characters still to encode above which `acount` moves the work to a
            worker thread so the event loop is never blocked.
    """

    def __init__(self, *, cache_size: int = 65_536, thread_threshold: int = _THREAD_THRESHOLD):
        # A plain dict rather than cachetools' LRUCache behind a lock: every request reads it
        # once per message, and a dict read or write is atomic under the GIL (worker threads
        # count large prompts too). When full, the oldest half is dropped (insertion order),
        # which keeps the messages of conversations still going.
        self._cache: dict[int, int] = {}
        self._cache_size = cache_size
        self._thread_threshold = thread_threshold

    def count_text(self, text: str, model: str | None = None) -> int:
        """Tokens in a plain string, special-token text counted as ordinary text."""
        return len(encoding_for_model(model).encode_ordinary(text))

    def count(self, request: LLMRequest) -> int:
        """Prompt tokens of a request, chat overhead and tool definitions included."""
        enc = encoding_for_model(request.model)
        measure = _measure(enc)
        total = request.prompt_token_ids + sum(map(measure, request.texts))
        if request.messages:
            total += sum(self._message(enc, m) for m in request.messages) + _REPLY_PRIMING
        if request.tools:
            total += _tools(measure, request.tools)
        return total

    def bound(self, request: LLMRequest) -> int:
        """An upper bound of `count(request)`, found without encoding anything.

        `count`'s own arithmetic (per-message and per-name overhead, reply priming, the tool
        formula, image parts, pre-tokenized prompts) with each text measured by its UTF-8
        length: tiktoken's encodings are byte-level BPE, whose every token stands for at least
        one byte, so no text encodes to more tokens than it has bytes. Every term is the same
        constant or a larger measure of the same text, so the sum is never below `count`'s (a
        property test checks it over generated requests, non-ASCII and adversarial text
        included). An ASCII text is measured in O(1); English runs about 4 bytes a token.
        """
        total = request.prompt_token_ids + sum(map(_utf8_length, request.texts))
        if request.messages:
            total += sum(_count_message(_utf8_length, m) for m in request.messages)
            total += _REPLY_PRIMING
        if request.tools:
            total += _tools(_utf8_length, request.tools)
        return total

    async def acount(self, request: LLMRequest) -> int:
        """`count`, moved to a worker thread when there is much uncached text to encode."""
        # Most prompts are small: the cache is consulted for the thread decision only when
        # the whole prompt is large enough for it to matter.
        if (
            _rough_chars(request) > self._thread_threshold
            and self._uncached_chars(request) > self._thread_threshold
        ):
            return await anyio.to_thread.run_sync(self.count, request)
        return self.count(request)

    def may_thread(self, request: LLMRequest) -> bool:
        """Whether `acount` may move this request's counting to a worker thread."""
        return _rough_chars(request) > self._thread_threshold

    # -- messages --------------------------------------------------------------------------

    @staticmethod
    def _key(enc: tiktoken.Encoding, message: Mapping[str, Any]) -> int:
        # Plain messages hash their (key, value) pairs directly; anything nested is serialized
        # first. Python's str hash is keyed per process, so a client cannot aim collisions.
        try:
            return hash((enc.name, tuple(message.items())))
        except TypeError:
            blob = json.dumps(message, sort_keys=True, separators=(",", ":"))
            return hash((enc.name, blob))

    def _message(self, enc: tiktoken.Encoding, message: Mapping[str, Any]) -> int:
        key = self._key(enc, message)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        count = _count_message(_measure(enc), message)
        if len(self._cache) >= self._cache_size:
            self._evict()
        self._cache[key] = count
        return count

    def _evict(self) -> None:
        with _lock:  # one thread evicts at a time; readers never wait
            keep = self._cache_size // 2
            if len(self._cache) >= self._cache_size:
                self._cache = dict(list(self._cache.items())[-keep:]) if keep else {}

    def _uncached_chars(self, request: LLMRequest) -> int:
        enc = encoding_for_model(request.model)
        chars = sum(len(t) for t in request.texts)
        for message in request.messages:
            if self._key(enc, message) in self._cache:
                continue
            chars += len(str(message.get("content", "")))
        return chars


def _rough_chars(request: LLMRequest) -> int:
    """About how many characters a request's prompt has (nested content counts by its repr)."""
    chars = sum(len(text) for text in request.texts)
    for message in request.messages:
        content = message.get("content")
        chars += len(content) if isinstance(content, str) else len(str(content))
    return chars


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _tools(measure: Measure, tools: Iterable[Mapping[str, Any]]) -> int:
    count = 0
    for tool in tools:
        # {"type": "function", "function": {...}} (chat), the function itself (legacy
        # `functions`, Responses API), or Anthropic's {"name", "description", "input_schema"}.
        function = tool.get("function", tool)
        if not isinstance(function, Mapping):
            count += measure(json.dumps(tool))
            continue
        count += _FUNC_INIT
        name = _text(function.get("name"))
        description = _text(function.get("description")).removesuffix(".")
        count += measure(f"{name}:{description}")
        schema = function.get("parameters", function.get("input_schema"))
        properties = schema.get("properties") if isinstance(schema, Mapping) else None
        if isinstance(properties, Mapping) and properties:
            count += _PROP_INIT
            for key, prop in properties.items():
                count += _PROP_KEY
                count += _property(measure, str(key), prop)
    return count + _FUNC_END if count else 0


def _property(measure: Measure, name: str, prop: object) -> int:
    if not isinstance(prop, Mapping):
        return measure(f"{name}:{json.dumps(prop)}")
    count = 0
    enum = prop.get("enum")
    if isinstance(enum, list):
        count += _ENUM_INIT
        for item in enum:
            count += _ENUM_ITEM + measure(str(item))
    kind = prop.get("type")
    kind_text = kind if isinstance(kind, str) else json.dumps(kind) if kind else ""
    description = _text(prop.get("description")).removesuffix(".")
    count += measure(f"{name}:{kind_text}:{description}")
    # The cookbook's formula covers flat schemas; nested objects and arrays are counted by
    # their JSON so that a large schema is never free.
    for nested in ("properties", "items", "anyOf", "oneOf"):
        if nested in prop:
            count += measure(json.dumps(prop[nested]))
    return count


def _count_message(measure: Measure, message: Mapping[str, Any]) -> int:
    count = _TOKENS_PER_MESSAGE
    for key, value in message.items():
        # Most values are strings: measured here, without a call through `_count_value`.
        count += measure(value) if value.__class__ is str else _count_value(measure, value)
        if key == "name":
            count += _TOKENS_PER_NAME
    return count


def _count_value(measure: Measure, value: object) -> int:
    if isinstance(value, str):
        return measure(value)
    if isinstance(value, list):
        return sum(_count_part(measure, part) for part in value)
    if isinstance(value, Mapping):
        return measure(json.dumps(value, separators=(",", ":")))
    return 0


def _count_part(measure: Measure, part: object) -> int:
    if isinstance(part, str):
        return measure(part)
    if not isinstance(part, Mapping):
        return 0
    kind = part.get("type")
    if kind in ("image_url", "input_image", "image"):
        detail = part.get("detail")
        image = part.get("image_url")
        if isinstance(image, Mapping):
            detail = image.get("detail", detail)
        return _IMAGE_LOW if detail == "low" else _IMAGE_DEFAULT
    count = 0
    for key, value in part.items():
        if key in ("type", "cache_control", "id", "tool_use_id", "signature"):
            continue
        if isinstance(value, str):
            count += measure(value)
        elif isinstance(value, list):
            count += sum(_count_part(measure, item) for item in value)
        elif isinstance(value, Mapping):
            count += measure(json.dumps(value, separators=(",", ":")))
    return count
