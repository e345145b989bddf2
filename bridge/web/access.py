"""The web door's access log (`log.access = true`): one line per request on the
`termbridge.access` logger, through the same safe formatter as every other line.

aiohttp's own format would write the request line, query string and all; a query string can
carry a secret, so this one writes the path alone, and never a header but the User-Agent.
"""

from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .http import client_address

ACCESS_LOG = logging.getLogger("termbridge.access")


class AccessLog(AbstractAccessLogger):
    """client "METHOD /path" status bytes duration "user agent"."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        client = client_address(request) if isinstance(request, web.Request) else (request.remote or "-")
        self.logger.info(
            '%s "%s %s" %d %d %.3fs "%s"', client, request.method, request.rel_url.raw_path, response.status,
            response.body_length, time, request.headers.get("User-Agent", "-"),
        )
