"""Where the web door's URLs live: everything under `web.base_path` ("/" or e.g. "/terminal/").

Routes, redirects, cookie paths and page links all come from `under`, so that a gateway behind a
proxy at a sub-path answers there and nowhere else. Pages get the base as `$base` (`http.page`);
scripts get it from web/static/base.js.
"""

from __future__ import annotations

from aiohttp import web

from .keys import CONFIG


def base_path(app: web.Application) -> str:
    """`web.base_path`: starts and ends with "/"."""
    return app[CONFIG].web.base_path


def under(app: web.Application, path: str = "") -> str:
    """`path` under the base path: `under(app, "login")` (or "/login") is "/terminal/login" when
    `web.base_path` is "/terminal/", and "/login" by default. For routes and URLs alike."""
    return base_path(app) + path.lstrip("/")


def redirect(app: web.Application, path: str = "") -> web.HTTPSeeOther:
    """A 303 to `path` under the base path (raise it)."""
    return web.HTTPSeeOther(under(app, path))


def setup_routes(app: web.Application) -> None:
    """The base path without its slash ("/terminal") leads into it, as a proxy would do; every
    other path outside the base is 404."""
    base = base_path(app)
    if base != "/":
        async def into_base(request: web.Request) -> web.StreamResponse:
            raise web.HTTPMovedPermanently(base)

        app.router.add_get(base.rstrip("/"), into_base)
