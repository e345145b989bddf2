"""HTTP hardening for every response and request: security headers and the CSP (with a per-page
nonce), the client's address and scheme behind trusted proxies, and the Origin check.
"""

from __future__ import annotations

import html
import ipaddress
import secrets
import string

from aiohttp import web

from ..config import Config
from .keys import CONFIG, WEB_ROOT

# Scripts and style sheets from this origin only. xterm.js builds <style> elements at run time:
# the page's own nonce admits those (web/static/csp.js stamps it on them), nothing else inline.
# The recording player's page alone may compile WebAssembly (asciinema-player's terminal is one).
CSP = (
    "default-src 'self'; script-src 'self'{script}; style-src 'self'{nonce}; img-src 'self'; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)



def address_in(address: str | None, networks: tuple[str, ...]) -> bool:
    """Whether `address` is one of `networks` (addresses or CIDR networks from the config)."""
    if not address or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
    return any(ip in ipaddress.ip_network(net, strict=False) for net in networks)


def _trusted(config: Config, address: str | None) -> bool:
    return address_in(address, config.web.trusted_proxies)


def client_address(request: web.Request) -> str:
    """The peer, or the nearest untrusted hop of X-Forwarded-For when the peer is a trusted proxy."""
    config = request.app[CONFIG]
    peer = request.remote or "-"
    if not _trusted(config, peer):
        return peer
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _trusted(config, hop):
            return hop
    return hops[0] if hops else peer


def request_scheme(request: web.Request) -> str:
    config = request.app[CONFIG]
    if _trusted(config, request.remote):
        proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
        if proto in ("http", "https"):
            return proto
    return request.scheme


def expected_origin(request: web.Request) -> str:
    return request.app[CONFIG].web.public_origin or f"{request_scheme(request)}://{request.host}"


def origin_allowed(request: web.Request, *, required: bool) -> bool:
    """A foreign Origin is refused. Where not required (the login and logout forms) a missing or
    opaque ("null") Origin passes: Chromium sends "null" for form posts from our no-referrer
    pages, and those forms carry a CSRF token, which is what protects them."""
    origin = request.headers.get("Origin")
    if origin is None or (origin == "null" and not required):
        return not required
    return origin.rstrip("/") == expected_origin(request)


def page(
    request: web.Request, name: str, status: int = 200, markup: dict[str, str] | None = None, wasm: bool = False,
    **values: str,
) -> web.Response:
    """A template from web/templates, its values escaped, under a CSP with a fresh nonce (and
    WebAssembly allowed, with `wasm`); `$base` is `web.base_path`, which every link in a
    template starts with. `markup`: HTML fragments the caller built (and escaped the parts of),
    put in as they are."""
    nonce = secrets.token_urlsafe(16)
    template = string.Template((request.app[WEB_ROOT] / "templates" / name).read_text())
    values = {**values, "nonce": nonce, "base": request.app[CONFIG].web.base_path}
    escaped = {k: html.escape(v) for k, v in values.items()}
    body = template.safe_substitute({**escaped, **(markup or {})})
    response = web.Response(text=body, status=status, content_type="text/html")
    response.headers["Content-Security-Policy"] = CSP.format(nonce=f" 'nonce-{nonce}'", script=" 'wasm-unsafe-eval'" if wasm else "")
    return response


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, errors and static files included."""
    headers = response.headers
    headers["Server"] = "termbridge"  # not aiohttp's default, which names Python's and its own versions
    headers.setdefault("Content-Security-Policy", CSP.format(nonce="", script=""))
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    if response.content_type == "text/html":
        headers.setdefault("Cache-Control", "no-store")
    if request_scheme(request) == "https":
        headers.setdefault("Strict-Transport-Security", "max-age=31536000")
