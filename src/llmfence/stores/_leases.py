"""What a store leased ahead of requests, given back: the flush and shutdown hook.

`RedisStore` on a cluster leases slices of the global budget (`_redis_slices`) and returns them
on its own when they are idle; `Fence.flush` and the app's shutdown return them at once, so
the spend they hold shows in the global counter (`/global/spend`) before the process goes.
Other stores lease nothing, and this is a no-op for them.
"""

from __future__ import annotations

import logging

from llmfence.exceptions import StoreError

__all__ = ["return_leases"]

logger = logging.getLogger("llmfence")


async def return_leases(store: object) -> None:
    """Return what `store` leased ahead of requests, if it leases anything.

    A store that fails is logged, not raised: its leases expire on their own, and then count
    as spent in full.
    """
    give_back = getattr(store, "return_slices", None)
    if give_back is None:
        return
    try:
        await give_back()
    except StoreError:
        logger.warning("llmfence could not return its global budget slices; they will expire")
