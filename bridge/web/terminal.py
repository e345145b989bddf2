"""The terminal: its page and the /ws WebSocket that carries one session's bytes and control
messages. The manager's `open_terminal` starts or resumes the session; this module adapts the
socket to it (`WebSocketSink`), passes keystrokes on with backpressure, and closes the sockets
with GOING_AWAY on shutdown. Untrusted control messages are parsed in `wsproto`.
"""

from __future__ import annotations

import asyncio
import logging
import socket

from aiohttp import WSCloseCode, WSMsgType, web

from .. import wsproto
from ..config import Config
from ..errors import BackendUnavailable, BridgeError, ProtocolError, SessionStartError
from ..profiles import pick
from ..session import Session, TerminalRequest, Viewer
from ..sessions import SessionManager, started_and_idle
from ..vocab import Door, EndReason
from .http import client_address, expected_origin, origin_allowed, page
from .chooser import profiles_of
from .keys import ACCOUNTS, CONFIG, LOGINS, MANAGER, WEBSOCKETS
from .login import Login, current_login
from .paths import redirect, under

log = logging.getLogger("termbridge.web")

MAX_EARLY_INPUT = 64 * 1024
INPUT_WAIT_CHECK = 1.0  # how often input blocked on a slow shell checks that its socket still lives


async def index(request: web.Request) -> web.StreamResponse:
    login = await current_login(request)
    if login is None:
        raise redirect(request.app, "login")
    mine, remembered = await profiles_of(request, login)
    if len(mine) > 1 and remembered is None:
        raise redirect(request.app, "profile")  # several profiles, none chosen yet
    logout_csrf = request.app[LOGINS].form_token("logout", login.id)
    return page(
        request, "terminal.html", user=login.user.name, logout_csrf=logout_csrf,
        max_upload=str(request.app[CONFIG].web.max_upload_size), profile=remembered or mine[0].name,
        markup={"profile_change_hidden": "" if len(mine) > 1 else "hidden"},
    )


SUPERSEDED = 4001  # close code: another window attached to this session


class WebSocketSink:
    """Adapts one WebSocket to the session manager's AttachedSink."""

    def __init__(self, ws: web.WebSocketResponse, login: Login, config: Config) -> None:
        self.ws = ws
        self.login = login
        self.config = config
        self.session: Session | None = None

    async def started(self, session: Session) -> None:
        """The session is ready: it belongs to the login from now on (logout ends it), unless the
        login went while it started; then it must not go live."""
        if self.login.revoked:
            raise SessionStartError("you logged out", detail=f"login of {self.login.user.name} ended while starting")
        self.session = session
        self.login.sessions.add(session.id)

    async def attached(self, offset: int, lost: int) -> None:
        session = self.session
        if session is None:
            raise RuntimeError("attached() before started()")
        cfg = self.config.session
        idle_timeout = (session.settings or cfg).idle_timeout
        await self.ws.send_str(wsproto.session_message(
            session.id, idle_timeout, offset=offset, reconnect_grace=cfg.reconnect_grace, profile=session.profile
        ))
        if lost:
            await self.ws.send_str(wsproto.gap_message(lost))

    async def output(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def idle_warning(self, seconds: float) -> None:
        await self.ws.send_str(wsproto.idle_warning(seconds))

    async def viewers(self, viewers: list[Viewer]) -> None:
        if not self.ws.closed:
            await self.ws.send_str(wsproto.viewers_message([viewer.describe() for viewer in viewers]))

    async def superseded(self) -> None:
        if not self.ws.closed:
            await self.ws.send_str(wsproto.error_message("this session was opened in another window"))
            await self.ws.close(code=SUPERSEDED, message=b"superseded")

    async def restarting(self) -> None:
        if self.session is not None:
            self.login.sessions.discard(self.session.id)
        if not self.ws.closed:
            await self.ws.send_str(wsproto.restarting_message())
            await self.ws.close(code=WSCloseCode.SERVICE_RESTART, message=b"gateway restarting")

    async def ended(self, code: int | None, reason: EndReason, message: str | None) -> None:
        if self.session is not None:
            self.login.sessions.discard(self.session.id)
        if not self.ws.closed:
            await self.ws.send_str(wsproto.exit_message(code, reason, message))
            await self.ws.close(code=WSCloseCode.OK, message=reason.encode())


async def _refuse(ws: web.WebSocketResponse, exc: BridgeError) -> None:
    if not ws.closed:
        await ws.send_str(wsproto.error_message(exc.user_message))
        await ws.send_str(wsproto.exit_message(None, EndReason.ERROR, exc.user_message))
        await ws.close(code=WSCloseCode.TRY_AGAIN_LATER if isinstance(exc, BackendUnavailable) else WSCloseCode.OK)


def _resume_request(request: web.Request) -> tuple[str, int] | None:
    """`?session=ID&offset=N`: the session the page had (the manager decides whether it may have
    it back: only its own live web session, else it gets a new one)."""
    session_id = request.query.get("session")
    if not session_id:
        return None
    offset_text = request.query.get("offset", "0")
    offset = int(offset_text) if offset_text.isdigit() and len(offset_text) <= 18 else 0
    return session_id[:64], offset


async def _open(request: web.Request, login: Login, terminal: TerminalRequest, sink: WebSocketSink,
                resume: tuple[str, int] | None, early: bytearray) -> Session:
    """This socket's terminal, new or resumed, if the login's account may still log in and the
    profile the page asks for (`?profile=NAME`) is theirs now; then what the person typed meanwhile."""
    await request.app[ACCOUNTS].check(login.user, client_address(request))
    mine, remembered = await profiles_of(request, login)
    requested = request.query.get("profile", "")[:64] or None
    profile = pick(request.app[MANAGER].config, login.user.name, mine, requested, remembered)
    session = await request.app[MANAGER].open_terminal(
        login.user, Door.WEB, sink, terminal, resume=resume, profile=profile
    )
    await _flush(early, session)
    return session


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


# What may be in flight to a browser when its socket dies must stay replayable (stream.py keeps
# IN_FLIGHT_RESERVE before the drop); left alone, Linux grows a socket's send buffer to MBs.
SEND_BUFFER = 128 * 1024


def _bound_send_buffer(request: web.Request) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)


async def terminal_socket(request: web.Request) -> web.StreamResponse:
    login = await current_login(request)
    if login is None:
        raise web.HTTPUnauthorized(text="log in first")
    if not origin_allowed(request, required=True):
        log.warning("WebSocket refused: Origin %r, expected %r", request.headers.get("Origin"), expected_origin(request))
        raise web.HTTPForbidden(text="cross-origin WebSocket refused")
    app = request.app
    manager = app[MANAGER]
    resume = _resume_request(request)
    ws = web.WebSocketResponse(max_msg_size=app[CONFIG].web.max_message_size, heartbeat=30, compress=False)
    await ws.prepare(request)
    _bound_send_buffer(request)
    app[WEBSOCKETS].add(ws)
    terminal = TerminalRequest()
    sink = WebSocketSink(ws, login, manager.config)  # the manager's: a reload may have changed it
    early = bytearray()
    starting = asyncio.create_task(_open(request, login, terminal, sink, resume, early))
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
    await manager.end(session, EndReason.EXIT, message="you ended the session")


async def _refuse_on_failure(ws: web.WebSocketResponse, starting: asyncio.Task) -> None:
    """Tell the person at once when the start fails (not on their next keystroke). Cancelling
    this cancels the start too: a socket that goes away mid-start leaves nothing behind."""
    try:
        await starting
    except BridgeError as exc:
        await _refuse(ws, exc)


async def own_sessions(request: web.Request) -> web.StreamResponse:
    """The caller's live terminal sessions, of either door (the page offers to attach to one)."""
    login = await current_login(request)
    if login is None:
        raise web.HTTPUnauthorized(text="log in first")
    entries = []
    for entry in await request.app[MANAGER].own_terminals(login.user):
        started, idle = started_and_idle(entry)
        entries.append({"id": entry.id, "door": str(entry.door), "started": started.isoformat(timespec="seconds"),
                        "idle_for": round(idle)})
    return web.json_response({"sessions": entries})


def setup_routes(app: web.Application) -> None:
    app.router.add_get(under(app), index)
    app.router.add_get(under(app, "ws"), terminal_socket)
    app.router.add_get(under(app, "sessions"), own_sessions)


CLOSE_ALL_TIMEOUT = 3.0  # a close waits for the peer's answer; a gone peer must not hold the stop


async def close_websockets(app: web.Application) -> None:
    """Close the remaining sockets together, within CLOSE_ALL_TIMEOUT (the gateway stops within
    10 s whatever its clients do)."""
    closing = [ws.close(code=WSCloseCode.GOING_AWAY, message=b"gateway shutting down") for ws in list(app[WEBSOCKETS])]
    if closing:
        try:
            async with asyncio.timeout(CLOSE_ALL_TIMEOUT):
                await asyncio.gather(*closing, return_exceptions=True)
        except TimeoutError:
            log.info("some WebSockets did not answer their close within %.0f s", CLOSE_ALL_TIMEOUT)
