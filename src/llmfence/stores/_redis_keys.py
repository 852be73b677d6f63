"""`RedisStore`'s key layout: which keys share a hash tag, so a Redis Cluster spreads them.

A key's hash tag (the text between its first `{` and the `}` after it) decides its cluster slot.
Keys that one atomic step must touch together share a tag; everything else is spread:

- a scope's counters: `{<prefix>:<scope>}:budget:<counter>`, `…:bucket:<counter>` and
  `…:lease:<counter>`, where the scope is what the counter counts for (`global`, `team:<id>`,
  `user:<id>`, `key:<hash>`, `end_user:<id>`…): a key's RPM and TPM buckets, its lease set,
  its budget and its per-model counters live together, and every other principal elsewhere;
- the spend log, its running totals and the end users' ranking: `{<prefix>:spend}:…`, and
  on a cluster each of its shards' under `{<prefix>:spend:<i>}:…` (see `_redis_spendlog`);
- the global budget's slices leased to app instances, beside its counter:
  `{<prefix>:global}:slices` (see `_redis_slices`);
- the registry (key, user and team records, their indexes, access groups, projects):
  `{<prefix>}:…`, the names of earlier versions;
- a request's reservation and tombstone: on a single node `{<prefix>}:reservation:<id>` and
  `{<prefix>}:tombstone:<id>` (one script reaches every key there); on a cluster one of each
  per slot the request reserves on, under that slot's tag, and the request's home,
  `{<prefix>:req:<id>}:home`, which records where its admission reserved (see
  `_redis_shards`).

The scope is read from the counter's name as `llmfence._counters` writes it (`rpm:<window
ms>:<scope>`, `tpm:…`, `parallel:<scope>`, budgets named by their scope). A name in no known
form is a scope of its own: where a key lands only decides how the load spreads, never what a
call does, since a cluster store sends each slot the part of a call that lives there.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Final

__all__ = ["SPEND", "request_tag", "scope_of", "scoped", "tag"]

SPEND: Final = "spend"
"""The scope of the spend log and its totals."""

_RATES: Final = frozenset({"rpm", "tpm"})


def scope_of(counter: str) -> str:
    """The scope a counter counts for: what its key's hash tag names."""
    head, _, rest = counter.partition(":")
    if head in _RATES:
        _, found, scope = rest.partition(":")  # past the window length
        counter = scope if found else counter
    elif head == "parallel":
        counter = rest
    elif head == "key_model":
        # A key's budget for one model lives with the key's other counters.
        return "key:" + rest.partition(":")[0]
    if counter.startswith("model:key:"):
        # A key's rate limits for one model (`model:key:<hash>:<model>`) likewise.
        return "key:" + counter[10:].partition(":")[0]
    return counter


def tag(prefix: str, scope: str) -> str:
    """The hash tag, with its braces, of one scope's keys."""
    return "{" + prefix + ":" + scope + "}:"


def request_tag(prefix: str, request_id: str) -> str:
    """The hash tag of a request id's own keys."""
    return "{" + prefix + ":req:" + request_id + "}:"


@lru_cache(maxsize=65_536)
def scoped(prefix: str, kind: str, counter: str) -> str:
    """A counter's key: `{<prefix>:<scope>}:<kind>:<counter>` (kind: budget, bucket, lease).

    Cached: a principal's counters come back with every request it makes.
    """
    return "{" + prefix + ":" + scope_of(counter) + "}:" + kind + ":" + counter
