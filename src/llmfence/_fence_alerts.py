"""`Fence`'s budget alerts: its `alert_thresholds` and `on_alert` options, and the webhook an
`on_alert` URL becomes.

A webhook posts each `BudgetAlert` as JSON (`BudgetAlert.to_dict`, whose `text` a Slack or
Teams incoming webhook shows as is), retrying a connection failure, a timeout, a 429 or a 5xx
with exponential backoff and jitter, a bounded number of times. It runs on the alerts' background
task, never on a request's path. httpx (the `hosted` extra) is imported when a webhook is made.
"""

from __future__ import annotations

import importlib.util
import logging
import random
from collections.abc import Callable, Iterable, Mapping

import anyio

from ._core.alerts import DEFAULT_THRESHOLDS, AlertHook, Alerts, BudgetAlert, checked_thresholds
from ._core.meter import Meter
from .exceptions import ConfigurationError, LLMFenceError

__all__ = [
    "DEFAULT_THRESHOLDS",
    "AlertHook",
    "Webhook",
    "WebhookError",
    "install_alerts",
]

logger = logging.getLogger("llmfence.alerts")

_INSTALL_HINT = 'an on_alert URL needs httpx: pip install "llmfence[hosted]"'
_RETRY_STATUSES = frozenset({408, 425, 429})


class WebhookError(LLMFenceError):
    """A budget alert webhook did not take an alert (after its retries)."""


class Webhook:
    """Posts budget alerts as JSON to a URL, with retries.

    Args:
        url: Where to post (`http://` or `https://`); a Slack or Teams incoming webhook works
            as is. It is never logged (such URLs are secrets).
        attempts: Posts tried per alert, the first included.
        backoff: Seconds before the second attempt; each later wait doubles (with jitter),
            up to `max_backoff`.
        max_backoff: The longest wait between two attempts.
        timeout: Seconds one post may take.
        headers: Extra headers (an `Authorization`, say).
    """

    def __init__(
        self,
        url: str,
        *,
        attempts: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigurationError("an on_alert URL must start with http:// or https://")
        if importlib.util.find_spec("httpx") is None:  # pragma: no cover - dev installs it
            raise ConfigurationError(_INSTALL_HINT)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigurationError(f"attempts must be an int ≥ 1, not {attempts!r}")
        self.url = url
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.headers = dict(headers or {})

    def __repr__(self) -> str:
        return "Webhook(<url>)"  # the URL may hold a secret

    async def __call__(self, alert: BudgetAlert) -> None:
        """Post one alert; retried as the class says.

        Raises:
            WebhookError: Every attempt failed, or the receiver refused it (another 4xx).
        """
        import httpx

        payload = alert.to_dict()
        delay = self.backoff
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            for attempt in range(1, self.attempts + 1):
                try:
                    response = await client.post(self.url, json=payload, headers=self.headers)
                except httpx.HTTPError as error:
                    why = type(error).__name__
                else:
                    status = response.status_code
                    if status < 300:
                        return
                    why = f"HTTP {status}"
                    if status < 500 and status not in _RETRY_STATUSES:
                        raise WebhookError(f"The budget alert webhook answered {why}.")
                if attempt == self.attempts:
                    raise WebhookError(
                        f"The budget alert webhook failed {self.attempts} times (last: {why})."
                    )
                logger.info("llmfence budget alert webhook: %s; retrying", why)
                await anyio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(self.max_backoff, delay * 2)


def install_alerts(
    meter: Meter,
    thresholds: Iterable[float],
    on_alert: AlertHook | str | None,
    clock: Callable[[], float],
) -> None:
    """Give `meter` the alerts `Fence(alert_thresholds=..., on_alert=...)` asks for (none
    without `on_alert`: then nothing is checked on any request).

    Raises:
        ConfigurationError: An option is not valid, or the store keeps no claims.
    """
    if on_alert is None:
        checked_thresholds(thresholds)
        return
    hook: AlertHook = Webhook(on_alert) if isinstance(on_alert, str) else on_alert
    meter.alerts = Alerts(meter.store, hook, thresholds, call=meter.call, clock=clock)
