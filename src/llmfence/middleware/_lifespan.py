"""The app's lifespan, seen by llmfence: the outbox is drained (and budget alerts are sent)
while the app runs and at shutdown.

A settlement the store did not take (an outage) waits in the meter's outbox. For as long as the
server runs the app's lifespan, one background task sends it again as soon as its backoff
passes, so a key's lease comes back without waiting for another request. At
`lifespan.shutdown` the outbox is drained and the store's leases (global budget slices) are
returned, bounded in time, before the app hears of the shutdown, since the app's own shutdown
handlers may close the store.
"""

from __future__ import annotations

import logging

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmfence._core.meter import Meter
from llmfence.stores._leases import return_leases

__all__ = ["SHUTDOWN_DRAIN_SECONDS", "run_lifespan"]

logger = logging.getLogger("llmfence")

SHUTDOWN_DRAIN_SECONDS = 10.0
"""The longest a shutdown waits for the outbox (at least three store timeouts)."""


async def run_lifespan(
    meter: Meter, app: ASGIApp, scope: Scope, receive: Receive, send: Send
) -> None:
    """Pass a lifespan scope to `app`, draining `meter`'s outbox while it runs."""
    outbox = meter.outbox
    if outbox.running:  # another llmfence layer over the same meter drains it already
        await app(scope, receive, send)
        return

    async def receive_shutdown_last() -> Message:
        message = await receive()
        if message["type"] == "lifespan.shutdown" and outbox.depth:
            with anyio.move_on_after(max(SHUTDOWN_DRAIN_SECONDS, 3 * meter.store_timeout)):
                await outbox.drain(meter.resend, wait=True)
            if outbox.depth:
                logger.error(
                    "llmfence shut down with %d settlements the store did not take",
                    outbox.depth,
                )
        if message["type"] == "lifespan.shutdown":
            # What the store leased (global budget slices) back, after the settlements.
            with anyio.move_on_after(max(SHUTDOWN_DRAIN_SECONDS, 3 * meter.store_timeout)):
                await return_leases(meter.store)
        if message["type"] == "lifespan.shutdown" and alerts is not None:
            with anyio.move_on_after(SHUTDOWN_DRAIN_SECONDS):
                await alerts.flush()
        return message

    failure: BaseException | None = None
    outbox.running = True  # before the task starts: an inner layer must not start another
    alerts = meter.alerts  # budget alerts are sent (`_core.alerts`) by a task of their own
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(outbox.run, meter.resend)
        if alerts is not None:
            tasks.start_soon(alerts.run)
        try:
            await app(scope, receive_shutdown_last, send)
        except BaseException as error:  # re-raised below, outside the task group
            failure = error
        finally:
            tasks.cancel_scope.cancel()
    if failure is not None:
        raise failure
