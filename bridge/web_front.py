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
import json
import logging
import secrets
import string
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import WSCloseCode, WSMsgType, web

from . import wsproto
from .auth import AuthenticatedUser, Outcome, PamAuthenticator
from .backend import Backend
from .config import Config
from .errors import BackendUnavailable, BridgeError, ProtocolError
from .sessions import Attachment, Session, SessionManager, TerminalRequest

log = logging.getLogger("termbridge.web")

COOKIE_NAME = "termbridge_login"
LOGIN_TTL = 12 * 3600
MAX_WS_MESSAGE = 1024 * 1024
MAX_EARLY_INPUT = 64 * 1024
LOGIN_FAILED = "Login failed: the username or password is wrong, or this account may not log in here."

CONFIG = web.AppKey("config", Config)
MANAGER = web.AppKey("manager", SessionManager)
AUTHENTICATOR = web.AppKey("authenticator", PamAuthenticator)
BACKEND = web.AppKey("backend", Backend)
LOGINS = web.AppKey("logins", "LoginRegistry")
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


# -- request helpers ------------------------------------------------------------------------------


def _trusted(config: Config, address: str | None) -> bool:
    if not address or not config.web.trusted_proxies:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(net, strict=False) for net in config.web.trusted_proxies)


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
    origin = request.headers.get("Origin")
    if origin is None:
        return not required
    return origin.rstrip("/") == expected_origin(request)


def current_login(request: web.Request) -> Login | None:
    return request.app[LOGINS].lookup(request.cookies.get(COOKIE_NAME))


def _page(request: web.Request, name: str, status: int = 200, **values: str) -> web.Response:
    template = string.Template((request.app[WEB_ROOT] / "templates" / name).read_text())
    body = template.safe_substitute({k: html.escape(v) for k, v in values.items()})
    return web.Response(text=body, status=status, content_type="text/html")


# -- handlers -------------------------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    login = current_login(request)
    if login is None:
        raise web.HTTPSeeOther("/login")
    return _page(
        request, "terminal.html", user=login.user.name, max_upload=str(request.app[CONFIG].web.max_upload_size)
    )


async def login_form(request: web.Request) -> web.StreamResponse:
    return _page(request, "login.html", error="", error_class="hidden", invalid="false", username="")


async def login_submit(request: web.Request) -> web.StreamResponse:
    if not origin_allowed(request, required=False):
        log.warning("login refused: Origin %r from %s", request.headers.get("Origin"), client_address(request))
        raise web.HTTPForbidden(text="cross-origin login refused")
    form = await request.post()
    username = str(form.get("username", "")).strip()
    password = str(form.get("password", ""))
    rhost = client_address(request)
    result = await request.app[AUTHENTICATOR].authenticate(username, password, rhost)
    if result.outcome is Outcome.UNAVAILABLE:
        return _page(
            request, "login.html", status=503, error="Login is unavailable right now; try again later.",
            error_class="", invalid="false", username=username,
        )
    if not result.ok or result.user is None:
        return _page(
            request, "login.html", status=401, error=LOGIN_FAILED, error_class="", invalid="true", username=username
        )
    _, cookie = request.app[LOGINS].issue(result.user)
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
        request.app[LOGINS].revoke(login)
        manager = request.app[MANAGER]
        for session_id in list(login.sessions):
            session = manager.get(session_id)
            if session is not None:
                await manager.kill(session, "you logged out")
        log.info("logout of %s", login.user.name)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE_NAME, path="/")
    raise response


async def healthz(request: web.Request) -> web.StreamResponse:
    try:
        async with asyncio.timeout(5):
            await request.app[BACKEND].ping()
    except (BridgeError, TimeoutError) as exc:
        detail = exc.detail if isinstance(exc, BridgeError) else "timed out"
        log.warning("healthz: Docker unreachable: %s", detail)
        return web.Response(status=503, text="docker unreachable\n")
    return web.Response(text="ok\n")


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
    ws = web.WebSocketResponse(max_msg_size=MAX_WS_MESSAGE, heartbeat=30, compress=False)
    await ws.prepare(request)
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
                    await session.write(msg.data)
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
        attachment = starting.result() if starting.done() and not starting.cancelled() and not starting.exception() else None
        if attachment is not None:
            manager.detach(attachment)
        elif sink.session is not None and not sink.session.ending and sink.session.attachment is None:
            await manager.end(sink.session, "disconnected")
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
    app.router.add_get("/", index)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login_submit)
    app.router.add_post("/logout", logout)
    app.router.add_get("/ws", terminal_socket)
    app.router.add_get("/healthz", healthz)
    modules = web_root / "node_modules"
    for package in VENDOR_PACKAGES:
        app.router.add_static(f"/static/vendor/{package}/", modules / "@xterm" / package, follow_symlinks=False)
    app.router.add_static("/static/", web_root / "static", follow_symlinks=False)


async def close_websockets(app: web.Application) -> None:
    for ws in list(app[WEBSOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down")
