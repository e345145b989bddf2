"""The operations endpoints: /healthz for load balancers, /metrics for Prometheus (allow-listed)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..errors import BridgeError
from .http import address_in, client_address
from .keys import BACKEND, CONFIG, METRICS
from .paths import under

log = logging.getLogger("termbridge.web")


async def healthz(request: web.Request) -> web.StreamResponse:
    try:
        async with asyncio.timeout(5):
            await request.app[BACKEND].ping()
    except (BridgeError, TimeoutError) as exc:
        detail = exc.detail if isinstance(exc, BridgeError) else "timed out"
        log.warning("healthz: Docker unreachable: %s", detail)
        return web.Response(status=503, text="docker unreachable\n")
    return web.Response(text="ok\n")


async def metrics_page(request: web.Request) -> web.StreamResponse:
    """Prometheus text, for `web.metrics_allow` only. The client is judged by `client_address`, so a
    request relayed by a trusted proxy counts as its real client, not as the proxy's loopback."""
    client = client_address(request)
    if not address_in(client, request.app[CONFIG].web.metrics_allow):
        log.warning("/metrics refused to %s (not in web.metrics_allow)", client)
        raise web.HTTPForbidden(text="metrics are not available to this address (web.metrics_allow)\n")
    body, content_type = request.app[METRICS].render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


def setup_routes(app: web.Application) -> None:
    app.router.add_get(under(app, "healthz"), healthz)
    app.router.add_get(under(app, "metrics"), metrics_page)
