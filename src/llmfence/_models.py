"""One identity per model: the names a request may use for it, reduced to its base name.

A key's allow-list and per-model budgets name models as people write them (`gpt-4o`); requests
name them as SDKs and gateways do: dated snapshots (`gpt-4o-2024-08-06`, `gpt-3.5-turbo-0613`,
`claude-3-5-sonnet-20241022`, Vertex's `claude-3-5-sonnet@20241022`), `-latest` aliases,
provider prefixes (`openai/gpt-4o`, `azure/gpt-4o`) and any case. All of them count against the
entry of their base name, as prices resolve them, so a budget or an allow-list cannot be escaped
by spelling the model another way.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["base_model", "same_model"]

# A snapshot or alias suffix: -YYYY-MM-DD, -YYYYMMDD, @YYYYMMDD, -MMDD / -YYMM, -latest.
_SUFFIX = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|[-@]\d{8}|-\d{4}|-latest)$")


@lru_cache(maxsize=4096)
def base_model(name: str) -> str:
    """The base name a model name counts as: no provider prefix, no snapshot date, lower case.

    ```python
    base_model("OpenAI/gpt-4o-2024-08-06") == "gpt-4o"
    ```
    """
    bare = name.rsplit("/", 1)[-1].lower()
    return _SUFFIX.sub("", bare) or bare


def same_model(entry: str, model: str) -> bool:
    """Whether a configured entry (an allow-list or budget name) covers a requested model."""
    return entry == model or base_model(entry) == base_model(model)
