"""The web door: one module per concern, wired here.

keys (the typed app keys), http (hardening: headers, CSP, client address, origin), login (the
login cookie, login and logout), chooser (the profile chooser), terminal (the page and its /ws
socket), watch (admins watching or joining someone's session), files (home directory transfers),
console (the admin console under admin/) and ops (/healthz, /metrics), all under `web.base_path`
(paths). Static assets come from the web root (bridge._web when
installed), never from a CDN.
"""

from __future__ import annotations

import weakref
from pathlib import Path

from aiohttp import web

from . import chooser, console, files, login, ops, paths, terminal, watch
from .http import security_headers
from .keys import WEB_ROOT, WEBSOCKETS
from .paths import under

# npm packages under web/node_modules/@xterm/ served as /static/vendor/<name>/ (never a CDN).
VENDOR_PACKAGES = ("xterm", "addon-fit", "addon-search", "addon-unicode11", "addon-web-links", "addon-webgl")


def setup_routes(app: web.Application, web_root: Path) -> None:
    app[WEB_ROOT] = web_root
    app[WEBSOCKETS] = weakref.WeakSet()
    app.on_response_prepare.append(security_headers)
    terminal.setup_routes(app)
    login.setup_routes(app)
    chooser.setup_routes(app)
    ops.setup_routes(app)
    files.setup_routes(app)
    console.setup_routes(app)
    watch.setup_routes(app)
    paths.setup_routes(app)
    modules = web_root / "node_modules"
    for package in VENDOR_PACKAGES:
        app.router.add_static(under(app, f"static/vendor/{package}/"), modules / "@xterm" / package, follow_symlinks=False)
    # the admin console's recording player (its bundle: one script, one style sheet)
    app.router.add_static(under(app, "static/vendor/asciinema-player/"),
                          modules / "asciinema-player" / "dist" / "bundle", follow_symlinks=False)
    app.router.add_static(under(app, "static/"), web_root / "static", follow_symlinks=False)
