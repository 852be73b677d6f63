"""The spend page: one self-contained HTML page over the admin API, and the admin route it
reads recent refusals from.

`GET /ui/spend` serves a static page (no data in it, no key needed to load it: it is among
the default `exempt_paths`). The operator types the master key into the page; the page keeps
it in memory (and in `sessionStorage` if asked, for this tab only) and calls the admin API
with it: `/global/spend`, `/spend/report` (per key, user, team, model), `/key/list`,
`/user/list`, `/team/list`, `/customer/list` and `/spend/refusals`. Charts are inline SVG
drawn by the page's own script: no CDN, no build step, and it works offline. A content
security policy lets the page run only its own inline script and style (by their hashes)
and talk only to its own origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from ._refusals import RefusalRing, refusal_ring

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["SPEND_PAGE_PATH", "RefusalRing", "refusal_ring", "refusals_handler", "spend_page"]

SPEND_PAGE_PATH = "/ui/spend"


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@cache
def _page() -> tuple[str, str]:
    """The page's HTML and its content security policy (the inline script's and style's
    hashes: nothing else runs)."""
    html = files(__package__).joinpath("spend.html").read_text(encoding="utf-8")
    scripts = " ".join(_digest(s) for s in re.findall(r"<script>(.*?)</script>", html, re.S))
    styles = " ".join(_digest(s) for s in re.findall(r"<style>(.*?)</style>", html, re.S))
    policy = (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    return html, policy


async def _serve(request: Request) -> Response:
    html, policy = _page()
    return HTMLResponse(
        html,
        headers={
            "content-security-policy": policy,
            "referrer-policy": "no-referrer",
            "x-content-type-options": "nosniff",
            "cache-control": "no-store",
        },
    )


def spend_page() -> Route:
    """The spend page's route, `GET /ui/spend` (the admin routes include it)."""
    return Route(SPEND_PAGE_PATH, _serve, methods=["GET"], include_in_schema=False)


def refusals_handler() -> Callable[[dict[str, Any]], Awaitable[Any]]:
    """`GET /spend/refusals?limit=50`: this process's latest refusals, newest first (an
    admin route: the master key only)."""
    ring = refusal_ring()

    async def refusals(body: dict[str, Any]) -> Any:
        try:
            limit = int(body.get("limit") or 50)
        except (TypeError, ValueError):
            limit = 50
        return {"refusals": ring.recent(max(1, min(limit, 200)))}

    return refusals
