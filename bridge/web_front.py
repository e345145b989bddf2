"""The web door: login, pages, static assets and the terminal WebSocket.

Boundaries translate: this module catches broad errors, logs the detail with the session and
user, and shows the person a safe message. Untrusted input is parsed in `wsproto`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import html
import ipaddress
import logging
import secrets
import socket
import string
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSCloseCode, WSMsgType, web

from . import wsproto
from .auth import AuthenticatedUser, Outcome, printable_username
from .backend import Backend
from .config import Config
from .errors import BackendUnavailable, BridgeError, ProtocolError
from .metrics import Metrics
from .sessions import Attachment, Session, SessionManager, TerminalRequest
from .throttle import ThrottledAuthenticator

log = logging.getLogger("termbridge.web")

COOKIE_NAME = "termbridge_login"
CSRF_COOKIE = "termbridge_csrf"
LOGIN_TTL = 12 * 3600
MAX_EARLY_INPUT = 64 * 1024
INPUT_WAIT_CHECK = 1.0  # how often input blocked on a slow shell checks that its socket still lives
LOGIN_FAILED = "Login failed: the username or password is wrong, or this account may not log in here."
FORM_EXPIRED = "This login form has expired or came from another site. Please log in again."
THROTTLED = "Too many failed logins. Try again in {minutes} minute(s)."
# Scripts and style sheets from this origin only. xterm.js builds <style> elements at run time:
# the page's own nonce admits those (web/static/csp.js stamps it on them), nothing else inline.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'{nonce}; img-src 'self'; font-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

CONFIG = web.AppKey("config", Config)
MANAGER = web.AppKey("manager", SessionManager)
AUTHENTICATOR = web.AppKey("authenticator", ThrottledAuthenticator)
BACKEND = web.AppKey("backend", Backend)
LOGINS = web.AppKey("logins", "LoginRegistry")
METRICS = web.AppKey("metrics", Metrics)
WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet)
WEB_ROOT = web.AppKey("web_root", Path)


# -- logins ---------------------------------------------------------------------------------------


@dataclass
class Login:
    id: str
    user: AuthenticatedUser
    expires: float
    sessions: set[str] = field(default_factory=set)


class LoginRegistry:
    """Web logins: a signed cookie names a login kept here; logout forgets it server-side."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._logins: dict[str, Login] = {}

    def _sign(self, payload: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self._secret, payload, hashlib.sha256).digest()).decode().rstrip("=")

    def issue(self, user: AuthenticatedUser) -> tuple[Login, str]:
        login = Login(id=secrets.token_urlsafe(18), user=user, expires=time.time() + LOGIN_TTL)
        self._logins[login.id] = login
        payload = base64.urlsafe_b64encode(f"{login.id}:{int(login.expires)}".encode()).decode().rstrip("=")
        return login, f"{payload}.{self._sign(payload.encode())}"

    def lookup(self, cookie: str | None) -> Login | None:
        if not cookie or len(cookie) > 512 or "." not in cookie:
            return None
        payload, _, signature = cookie.partition(".")
        if not hmac.compare_digest(signature, self._sign(payload.encode())):
            return None
        try:
            login_id, _, _ = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        login = self._logins.get(login_id)
        if login is None or login.expires < time.time():
            self._logins.pop(login_id, None)
            return None
        return login

    def revoke(self, login: Login) -> None:
        self._logins.pop(login.id, None)

    def form_token(self, purpose: str, binding: str) -> str:
        """A CSRF token for a form: only this gateway can make it, and only for `binding` (the
        browser's CSRF cookie for the login form, the login's id for logout)."""
        return self._sign(f"{purpose}:{binding}".encode())

    def form_token_ok(self, purpose: str, binding: str | None, token: str) -> bool:
        return bool(binding) and hmac.compare_digest(token.encode(), self.form_token(purpose, binding).encode())


# -- request helpers ------------------------------------------------------------------------------


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


def current_login(request: web.Request) -> Login | None:
    return request.app[LOGINS].lookup(request.cookies.get(COOKIE_NAME))


def _page(request: web.Request, name: str, status: int = 200, **values: str) -> web.Response:
    nonce = secrets.token_urlsafe(16)
    template = string.Template((request.app[WEB_ROOT] / "templates" / name).read_text())
    body = template.safe_substitute({k: html.escape(v) for k, v in {**values, "nonce": nonce}.items()})
    response = web.Response(text=body, status=status, content_type="text/html")
    response.headers["Content-Security-Policy"] = CSP.format(nonce=f" 'nonce-{nonce}'")
    return response


def _login_page(request: web.Request, status: int = 200, error: str = "", username: str = "") -> web.Response:
    """The login form with a CSRF token bound to this browser's CSRF cookie (made if missing)."""
    binding = request.cookies.get(CSRF_COOKIE, "")
    if not (16 <= len(binding) <= 64 and binding.replace("-", "").replace("_", "").isalnum()):
        binding = secrets.token_urlsafe(24)
    token = request.app[LOGINS].form_token("login", binding)
    response = _page(
        request, "login.html", status=status, error=error, error_class="" if error else "hidden",
        invalid="true" if status == 401 else "false", username=username, csrf=token,
    )
    response.set_cookie(
        CSRF_COOKIE, binding, httponly=True, samesite="Strict", secure=request_scheme(request) == "https", path="/login"
    )
    return response


async def security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response, errors and static files included."""
    headers = response.headers
    headers.setdefault("Content-Security-Policy", CSP.format(nonce=""))
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
    headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
    if response.content_type == "text/html":
        headers.setdefault("Cache-Control", "no-store")
    if request_scheme(request) == "https":
        headers.setdefault("Strict-Transport-Security", "max-age=31536000")


# -- handlers -------------------------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    login = current_login(request)
    if login is None:
        raise web.HTTPSeeOther("/login")
    logout_csrf = request.app[LOGINS].form_token("logout", login.id)
    return _page(
        request, "terminal.html", user=login.user.name, logout_csrf=logout_csrf,
        max_upload=str(request.app[CONFIG].web.max_upload_size),
    )


async def login_form(request: web.Request) -> web.StreamResponse:
    return _login_page(request)


async def login_submit(request: web.Request) -> web.StreamResponse:
    if not origin_allowed(request, required=False):
        log.warning("login refused: Origin %r from %s", request.headers.get("Origin"), client_address(request))
        raise web.HTTPForbidden(text="cross-origin login refused")
    form = await request.post()
    username = str(form.get("username", "")).strip()
    password = str(form.get("password", ""))
    rhost = client_address(request)
    logins = request.app[LOGINS]
    if not logins.form_token_ok("login", request.cookies.get(CSRF_COOKIE), str(form.get("csrf", ""))):
        log.warning("login refused: missing or wrong CSRF token from %s", rhost)
        return _login_page(request, status=403, error=FORM_EXPIRED)
    result = await request.app[AUTHENTICATOR].authenticate(username, password, rhost)
    request.app[MANAGER].note_login(printable_username(username), rhost, "web", result.outcome.value, result.reason)
    if result.outcome is Outcome.THROTTLED:
        response = _login_page(
            request, status=429, error=THROTTLED.format(minutes=-(-result.retry_after // 60)), username=username
        )
        response.headers["Retry-After"] = str(result.retry_after)
        return response
    if result.outcome is Outcome.UNAVAILABLE:
        error = "Login is unavailable right now; try again later."
        return _login_page(request, status=503, error=error, username=username)
    if not result.ok or result.user is None:
        return _login_page(request, status=401, error=LOGIN_FAILED, username=username)
    previous = current_login(request)
    login, cookie = logins.issue(result.user)  # always a new id: a cookie set before login is worthless
    if previous is not None:
        logins.revoke(previous)
        if previous.user.name == login.user.name:
            login.sessions |= previous.sessions
        else:
            await _end_terminals(request.app, previous, "another account logged in from this browser")
    response = web.HTTPSeeOther("/")
    response.set_cookie(
        COOKIE_NAME,
        cookie,
        max_age=LOGIN_TTL,
        httponly=True,
        samesite="Lax",
        secure=request_scheme(request) == "https",
        path="/",
    )
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    if not origin_allowed(request, required=False):
        raise web.HTTPForbidden(text="cross-origin logout refused")
    login = current_login(request)
    if login is not None:
        form = await request.post()
        if not request.app[LOGINS].form_token_ok("logout", login.id, str(form.get("csrf", ""))):
            log.warning("logout of %s refused: missing or wrong CSRF token", login.user.name)
            raise web.HTTPForbidden(text="logout refused: reload the page and try again")
        request.app[LOGINS].revoke(login)
        await _end_terminals(request.app, login, "you logged out", actor="logout")
        log.info("logout of %s", login.user.name)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE_NAME, path="/")
    raise response


async def _end_terminals(app: web.Application, login: Login, message: str, actor: str = "logout") -> None:
    manager = app[MANAGER]
    for session_id in list(login.sessions):
        session = manager.get(session_id)
        if session is not None:
            await manager.kill(session, message, actor=actor)


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


# npm packages under web/node_modules/@xterm/ served as /static/vendor/<name>/ (never a CDN).
VENDOR_PACKAGES = ("xterm", "addon-fit", "addon-search", "addon-unicode11", "addon-web-links", "addon-webgl")

SUPERSEDED = 4001  # close code: another window attached to this session


class WebSocketSink:
    """Adapts one WebSocket to the session manager's AttachedSink."""

    def __init__(self, ws: web.WebSocketResponse, login: Login, config: Config) -> None:
        self.ws = ws
        self.login = login
        self.config = config
        self.session: Session | None = None

    async def started(self, session: Session) -> None:
        self.session = session

    async def attached(self, session: Session, offset: int, lost: int) -> None:
        self.session = session
        self.login.sessions.add(session.id)
        cfg = self.config.session
        await self.ws.send_str(
            wsproto.session_message(session.id, cfg.idle_timeout, offset=offset, reconnect_grace=cfg.reconnect_grace)
        )
        if lost:
            await self.ws.send_str(wsproto.gap_message(lost))

    async def output(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def idle_warning(self, seconds: float) -> None:
        await self.ws.send_str(wsproto.idle_warning(seconds))

    async def superseded(self) -> None:
        if not self.ws.closed:
            await self.ws.send_str(wsproto.error_message("this session was opened in another window"))
            await self.ws.close(code=SUPERSEDED, message=b"superseded")

    async def ended(self, code: int | None, reason: str, message: str | None) -> None:
        if self.session is not None:
            self.login.sessions.discard(self.session.id)
        if not self.ws.closed:
            await self.ws.send_str(wsproto.exit_message(code, reason, message))
            await self.ws.close(code=WSCloseCode.OK, message=reason.encode())


async def _refuse(ws: web.WebSocketResponse, exc: BridgeError) -> None:
    if not ws.closed:
        await ws.send_str(wsproto.error_message(exc.user_message))
        await ws.send_str(wsproto.exit_message(None, "error", exc.user_message))
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER if isinstance(exc, BackendUnavailable) else WSCloseCode.OK)


def _resumable(request: web.Request, login: Login) -> tuple[Session | None, int]:
    """The caller's own live web session named by `?session=ID&offset=N`, if any.
    Anything else (unknown, ended, another user's, an SSH session) gets a new session."""
    session_id = request.query.get("session")
    if not session_id:
        return None, 0
    offset_text = request.query.get("offset", "0")
    offset = int(offset_text) if offset_text.isdigit() and len(offset_text) <= 18 else 0
    session = request.app[MANAGER].get(session_id[:64])
    if session is None or session.ending or session.process is None or session.door != "web":
        log.info("reattach of %s to %.12s: no such live session; starting a new one", login.user.name, session_id)
        return None, 0
    if session.user.name != login.user.name:
        log.warning("reattach of %s to %.12s refused: it belongs to %s", login.user.name, session_id, session.user.name)
        return None, 0
    return session, offset


async def _start(manager: SessionManager, login: Login, terminal: TerminalRequest, sink: WebSocketSink,
                 early: bytearray) -> Attachment:
    """A new session, attached to this socket from byte 0."""
    session = await manager.create(login.user, "web", sink, terminal)
    attachment = await manager.attach(session, sink, 0)
    await _flush(early, session)
    return attachment


async def _flush(early: bytearray, session: Session) -> None:
    """Replay what the person typed while the session was starting."""
    if early:
        data = bytes(early)
        early.clear()
        await session.write(data)


async def _send_input(request: web.Request, ws: web.WebSocketResponse, session: Session, data: bytes) -> bool:
    """Keystrokes to the shell with backpressure: while the shell does not read, this socket is
    not read either (TCP pushes back to the browser). Returns False if the socket died meanwhile:
    unread, it would not notice by itself, so a ping probes it (a gone peer answers with a reset).
    A keystroke the channel takes at once (the usual case) costs no task and no wait."""
    try:
        if not session.feed(data):
            return True
    except ConnectionError:
        if not session.ending:  # an ended session is reported by its own path
            raise
        return True
    writing = asyncio.ensure_future(session.drain())
    while True:
        done, _ = await asyncio.wait({writing}, timeout=INPUT_WAIT_CHECK)
        if done:
            try:
                writing.result()
            except ConnectionError:
                if not session.ending:  # an ended session is reported by its own path
                    raise
            return True
        transport = request.transport
        if transport is None or transport.is_closing():
            writing.cancel()
            return False
        try:
            await asyncio.wait_for(ws.ping(), INPUT_WAIT_CHECK)
        except (TimeoutError, ConnectionError, RuntimeError):
            pass


# What may be in flight to a browser when its socket dies must stay replayable (sessions.py keeps
# IN_FLIGHT_RESERVE before the drop); left alone, Linux grows a socket's send buffer to MBs.
SEND_BUFFER = 128 * 1024


def _bound_send_buffer(request: web.Request) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


async def terminal_socket(request: web.Request) -> web.StreamResponse:
    login = current_login(request)
    if login is None:
        raise web.HTTPUnauthorized(text="log in first")
    if not origin_allowed(request, required=True):
        log.warning("WebSocket refused: Origin %r, expected %r", request.headers.get("Origin"), expected_origin(request))
        raise web.HTTPForbidden(text="cross-origin WebSocket refused")
    app = request.app
    manager = app[MANAGER]
    resume, offset = _resumable(request, login)
    ws = web.WebSocketResponse(max_msg_size=app[CONFIG].web.max_message_size, heartbeat=30, compress=False)
    await ws.prepare(request)
    _bound_send_buffer(request)
    app[WEBSOCKETS].add(ws)
    terminal = TerminalRequest()
    sink = WebSocketSink(ws, login, app[CONFIG])
    early = bytearray()
    if resume is not None:
        starting = asyncio.create_task(manager.attach(resume, sink, offset))
    else:
        starting = asyncio.create_task(_start(manager, login, terminal, sink, early))
    watcher = asyncio.create_task(_refuse_on_failure(ws, starting))
    try:
        async for msg in ws:
            session = sink.session
            if msg.type == WSMsgType.BINARY:
                if starting.done() and session is not None and session.ready:
                    await _flush(early, session)
                    if not await _send_input(request, ws, session, msg.data):
                        log.info("WebSocket of %s went away while its input waited for the shell", login.user.name)
                        break
                elif not starting.done():
                    if len(early) + len(msg.data) > MAX_EARLY_INPUT:
                        await ws.send_str(wsproto.error_message("too much input before the session started; dropped"))
                    else:
                        early.extend(msg.data)
            elif msg.type == WSMsgType.TEXT:
                try:
                    control = wsproto.parse_client_text(msg.data)
                except ProtocolError as exc:
                    await ws.send_str(wsproto.error_message(exc.user_message))
                    continue
                if isinstance(control, wsproto.End):
                    await _end_by_owner(ws, manager, session)
                    continue
                terminal.cols, terminal.rows = control.cols, control.rows
                if session is not None:
                    session.resize(control.cols, control.rows)
            elif msg.type == WSMsgType.ERROR:
                log.info("WebSocket error for %s: %r", login.user.name, ws.exception())
                break
    except (ConnectionError, asyncio.TimeoutError) as exc:
        log.info("WebSocket of %s dropped: %r", login.user.name, exc)
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        if sink.session is not None:
            manager.detach(sink.session, sink)
    return ws


async def _end_by_owner(ws: web.WebSocketResponse, manager: SessionManager, session: Session | None) -> None:
    """The page's "End session": the session ends as `exit` in the shell would (reason `exit`,
    no exit status since the shell did not choose one), and its container goes."""
    if session is None or not session.ready:
        await ws.send_str(wsproto.error_message("the session has not started yet"))
        return
    session.log.info("ended by its owner from the page")
    await manager.end(session, "exit", message="you ended the session")


async def _refuse_on_failure(ws: web.WebSocketResponse, starting: asyncio.Task) -> None:
    """Tell the person at once when the start fails (not on their next keystroke). Cancelling
    this cancels the start too: a socket that goes away mid-start leaves nothing behind."""
    try:
        await starting
    except BridgeError as exc:
        await _refuse(ws, exc)


def setup_routes(app: web.Application, web_root: Path) -> None:
    app[WEB_ROOT] = web_root
    app[WEBSOCKETS] = weakref.WeakSet()
    app.on_response_prepare.append(security_headers)
    app.router.add_get("/", index)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login_submit)
    app.router.add_post("/logout", logout)
    app.router.add_get("/ws", terminal_socket)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_page)
    modules = web_root / "node_modules"
    for package in VENDOR_PACKAGES:
        app.router.add_static(f"/static/vendor/{package}/", modules / "@xterm" / package, follow_symlinks=False)
    app.router.add_static("/static/", web_root / "static", follow_symlinks=False)


async def close_websockets(app: web.Application) -> None:
    for ws in list(app[WEBSOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")
